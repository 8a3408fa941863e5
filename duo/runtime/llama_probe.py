"""Which llama.cpp configuration runs the draft on this CPU, and how fast: probed once, then remembered.

llama.cpp's CPU backend chooses fast paths when it loads a model: "extra buffer types" that repack
quantized weights for AVX2/AVX-512 kernels (CPU_REPACK) or hand them to AMX tiles (AMX). Some VMs
advertise AMX in CPUID but trap its instructions, and the first llama_decode dies with SIGILL. So
before a draft is used, a throwaway child process loads the GGUF with each candidate configuration
and decodes a few tokens:

    variant      llama_model_params           what it costs
    extra-bufts  use_extra_bufts = True       llama.cpp's default: repack (and AMX where compiled in)
    plain        use_extra_bufts = False      plain CPU buffers: runs wherever llama.cpp runs

A child killed by a signal marks its variant unusable; the fastest variant that ran (best of two runs,
alternating) is chosen. The verdict is saved under the cache directory, keyed by the machine (CPU model
and flags), the llama.cpp build and the GGUF file, and used by every process that loads the draft
(worker, profiler, bench).
No variant running is an error naming the cause and the fix, never a silent fallback.

Every process that loads llama.cpp starts with the GPUs hidden (`cpu_only_env`, `gpus_hidden`): the draft runs
on the CPU, yet a GPU build of llama.cpp would open a context on each visible GPU when it loads.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

VARIANTS = {"extra-bufts": True, "plain": False}   # name -> llama_model_params.use_extra_bufts
PROBE_FORMAT = 1
PROBE_TIMEOUT_S = 180.0
PROBE_REPEATS = 2                 # runs of each variant, alternating; the fastest counts
FAULT_ENV = "DUO_PROBE_FAULT"     # tests only: "sigill:<variant>|all" makes that child die by SIGILL
# A GPU build of llama.cpp enumerates every device it sees when it loads and creates a context on each (CUDA:
# hundreds of MB of VRAM and 1-2 s per process), n_gpu_layers=0 or not: its processes see none (CUDA, ROCm, Vulkan).
HIDDEN_GPUS = {"CUDA_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": "", "ROCR_VISIBLE_DEVICES": "",
               "GGML_VK_VISIBLE_DEVICES": ""}
_ENV_LOCK = threading.Lock()


class DraftUnusable(RuntimeError):
    """No llama.cpp configuration runs the draft on this CPU."""


@dataclass
class VariantResult:
    variant: str
    ok: bool
    ms_per_token: float | None = None         # one-token decode steps, median
    prefill_ms_per_token: float | None = None  # a 64-token batch, per token
    buffers: list[str] = field(default_factory=list)   # llama.cpp buffer types holding weights (its log)
    error: str | None = None                  # why it did not run: "killed by SIGILL (illegal instruction)"


@dataclass
class Verdict:
    chosen: str | None              # the variant duo uses (None: none runs)
    results: list[VariantResult]
    key: str
    threads: int
    probed_s: float = 0.0

    @property
    def extra_bufts(self) -> bool:
        if self.chosen is None:
            raise DraftUnusable(unusable_message(self))
        return VARIANTS[self.chosen]

    def result(self, variant: str) -> VariantResult | None:
        return next((r for r in self.results if r.variant == variant), None)

    def summary(self) -> str:
        """One line: each variant's speed or failure, and the choice."""
        parts = [f"{r.variant} {r.ms_per_token:.1f} ms/token" if r.ok else f"{r.variant} {r.error}"
                 for r in self.results]
        return f"llama.cpp on this CPU ({self.threads} threads): " + "; ".join(parts) + \
            (f"; using {self.chosen}" if self.chosen else "; none runs")


def unusable_message(v: Verdict) -> str:
    why = "; ".join(f"{r.variant}: {r.error}" for r in v.results)
    return (f"llama.cpp cannot run the draft on this CPU ({why}); reinstall llama-cpp-python built for a "
            f"portable CPU: CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install --force-reinstall --no-cache-dir "
            f"--no-binary llama-cpp-python llama-cpp-python, or run the target alone with --mode target")


# ------------------------------------------------------------------------------------------- no GPU
def cpu_only_env(env: dict | None = None) -> dict:
    """A child's environment (default: this one) in which llama.cpp sees no GPU."""
    return dict(os.environ if env is None else env, **HIDDEN_GPUS)


@contextlib.contextmanager
def gpus_hidden():
    """Around a spawn-context child's start (it takes os.environ then): the GPUs hidden from it, this process's
    own values back afterwards. This process is unaffected: CUDA reads CUDA_VISIBLE_DEVICES once, in cuInit
    (torch's first CUDA call: is_available(), or the target's weights moving to the GPU), which a parent with
    a GPU target made before it starts a draft; torch's device_count() caches its count from then on. A parent
    that has not touched CUDA yet reads the restored values later; only a first CUDA call made by another of
    its threads inside this window (a process start: milliseconds) would see no GPU. The lock keeps this
    process's own launches apart."""
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in HIDDEN_GPUS}
        os.environ.update(HIDDEN_GPUS)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


# ------------------------------------------------------------------------------------------- the key
def _cpu_identity() -> str:
    """CPU model and feature flags (what decides which instructions llama.cpp may use)."""
    model, flags = platform.processor(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k == "model name" and not model:
                    model = v.strip()
                elif k in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(v.split()))
                if model and flags:
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{model}|{flags}"


def _llama_build() -> str:
    """llama-cpp-python's version and its shared libraries' sizes and times (a rebuild changes them)."""
    try:
        import llama_cpp
    except ImportError:
        return "none"
    lib = Path(llama_cpp.__file__).parent / "lib"
    files = sorted(lib.glob("*.so*")) + sorted(lib.glob("*.dylib")) + sorted(lib.glob("*.dll")) if lib.is_dir() else []
    return llama_cpp.__version__ + "|" + "|".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}"
                                                  for p in files)


def probe_key(gguf_path: str | os.PathLike, threads: int) -> str:
    """What the verdict depends on: machine, llama.cpp build, GGUF file (and the probe's thread count)."""
    p = Path(gguf_path).resolve()
    st = p.stat()
    raw = "\n".join([str(PROBE_FORMAT), _cpu_identity(), _llama_build(), f"{p}:{st.st_size}:{int(st.st_mtime)}",
                     str(threads), os.environ.get(FAULT_ENV, "")])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _verdict_path(key: str) -> Path:
    from ..models import cache_dir
    return cache_dir() / "llama-probe" / f"{key}.json"


_MEMO: dict[str, Verdict] = {}


# ------------------------------------------------------------------------------------------- probing
def default_threads() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def llama_verdict(gguf_path: str | os.PathLike, threads: int | None = None, refresh: bool = False,
                  progress=None) -> Verdict:
    """This machine's verdict for `gguf_path`: from memory, from the cache, or probed now (a few seconds)."""
    threads = threads or default_threads()
    key = probe_key(gguf_path, threads)
    if not refresh and key in _MEMO:
        return _MEMO[key]
    path = _verdict_path(key)
    if not refresh and path.is_file():
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            v = Verdict(d["chosen"], [VariantResult(**r) for r in d["results"]], key, d["threads"], d["probed_s"])
            _MEMO[key] = v
            return v
        except (OSError, ValueError, KeyError, TypeError):
            pass   # a damaged file: probe again
    t0 = time.perf_counter()
    results = {}
    for rep in range(PROBE_REPEATS):   # alternating A B A B: a burst of other work hits both alike
        for name in VARIANTS:
            if rep and not results[name].ok:
                continue
            if progress:
                progress(f"probing llama.cpp ({name}) on this CPU...")
            r = probe_variant(gguf_path, name, threads)
            best = results.get(name)
            if best is None or not r.ok or r.ms_per_token < best.ms_per_token:
                results[name] = r     # the fastest run of each (a failure in any run fails the variant)
    results = list(results.values())
    ran = [r for r in results if r.ok]   # the fastest; llama.cpp's default unless another beats it by 3%
    best = min(ran, key=lambda r: r.ms_per_token) if ran else None
    chosen = ran[0].variant if ran and ran[0].ms_per_token <= 1.03 * best.ms_per_token else best and best.variant
    v = Verdict(chosen, results, key, threads, round(time.perf_counter() - t0, 2))
    _MEMO[key] = v
    if chosen is None and not all((r.error or "").startswith("killed by") for r in results):
        return v   # not a verdict about this CPU (a bad file, a timeout): probe again next time
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(asdict(v), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass       # a read-only cache: probe again next time
    return v


def extra_bufts_for(gguf_path: str | os.PathLike) -> bool:
    """use_extra_bufts for this machine and GGUF (probed with every core, whatever the caller's thread
    count: which variant runs does not depend on it); raises DraftUnusable when no variant runs."""
    return llama_verdict(gguf_path).extra_bufts


def resolve_config(cfg):
    """The DraftConfig with extra_bufts decided: as given, or as probed (once per machine, build and GGUF)."""
    if cfg.extra_bufts is None:
        cfg = dataclasses.replace(cfg, extra_bufts=extra_bufts_for(cfg.gguf_path))
    return cfg


def run_child(gguf_path: str | os.PathLike, variant: str, threads: int, report: bool = False
              ) -> tuple[int, dict | None, str]:
    """Load and decode with `variant` in a throwaway process: (return code, its JSON answer or None, stderr).
    With `report`, the answer also holds llama.cpp's system info and the load log's buffer lines."""
    cmd = [sys.executable, "-m", "duo.runtime.llama_probe", str(gguf_path), variant, str(threads)] + \
        (["report"] if report else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=cpu_only_env(),
                       stdin=subprocess.DEVNULL)
    try:
        answer = json.loads((p.stdout.strip().splitlines() or [""])[-1])
    except ValueError:
        answer = None
    return p.returncode, answer, p.stderr


def probe_variant(gguf_path: str | os.PathLike, variant: str, threads: int) -> VariantResult:
    """Run one variant in a throwaway child; a signal, a non-zero exit or a hang means it does not run."""
    try:
        rc, d, stderr = run_child(gguf_path, variant, threads)
    except subprocess.TimeoutExpired:
        return VariantResult(variant, False, error=f"no answer within {PROBE_TIMEOUT_S:.0f} s")
    if rc < 0:
        return VariantResult(variant, False, error=died_by_signal(rc))
    if d is None:
        tail = (stderr.strip().splitlines() or ["no output"])[-1][:200]
        return VariantResult(variant, False, error=f"exit code {rc}: {tail}")
    if not d.get("ok"):
        return VariantResult(variant, False, error=d.get("error", f"exit code {rc}"))
    return VariantResult(variant, True, d["ms_per_token"], d["prefill_ms_per_token"], d["buffers"])


def died_by_signal(returncode: int) -> str | None:
    """"killed by SIGILL (illegal instruction)" for a child process's negative return code, else None."""
    if returncode >= 0:
        return None
    try:
        sig = signal.Signals(-returncode)
    except ValueError:
        return f"killed by signal {-returncode}"
    what = {signal.SIGILL: " (illegal instruction)", signal.SIGSEGV: " (segmentation fault)",
            signal.SIGBUS: " (bus error)"}.get(sig, "")
    return f"killed by {sig.name}{what}"


def _child(gguf_path: str, variant: str, threads: int, report: bool = False) -> dict:
    """In the throwaway process: load with `variant`, decode a 64-token batch and 24 single tokens."""
    import numpy as np

    from .drafter import DraftConfig, Drafter, repacked_tensors, weight_buffers
    from .tree_shapes import top_k

    lines: list[str] = []
    d = Drafter(DraftConfig(gguf_path=gguf_path, n_threads=threads, n_ctx=256, max_seqs=1,
                            extra_bufts=VARIANTS[variant]), log_sink=lines)
    fault = os.environ.get(FAULT_ENV, "")
    if fault.startswith("sigill:") and fault.split(":", 1)[1] in (variant, "all"):
        os.kill(os.getpid(), signal.SIGILL)   # as a trapped AMX instruction would
    prompt = [(7 + 13 * i) % d.n_vocab for i in range(64)]
    t = time.perf_counter()
    d.decode([(tok, 0) for tok in prompt], last_logits_only=True)
    prefill = (time.perf_counter() - t) / len(prompt)
    steps, row = [], len(prompt) - 1
    for _ in range(24):
        (tok,), _ = top_k(d.logits(row), 1)
        row = 0
        t = time.perf_counter()
        d.decode([(int(tok), 0)])
        steps.append(time.perf_counter() - t)
    d.close()
    buffers = weight_buffers(lines)
    out = {"ok": True, "ms_per_token": round(1000 * float(np.median(steps)), 3),
           "prefill_ms_per_token": round(1000 * prefill, 3), "buffers": sorted(buffers)}
    if report:
        out.update(buffer_mib=buffers, repacked=repacked_tensors(lines),
                   system_info=d.L.llama_print_system_info().decode("utf-8", "replace"),
                   lines=[x.strip(" .\n") for x in lines if "model buffer size" in x or "repack tensor" in x])
    return out


if __name__ == "__main__":
    try:
        out = _child(sys.argv[1], sys.argv[2], int(sys.argv[3]), report=sys.argv[4:] == ["report"])
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        out = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    print(json.dumps(out), flush=True)
