"""The draft's weights in the format this CPU runs fastest: the GGUF as given, or a Q4_0 copy of it.

The draft only proposes; the target decides every token, so the draft's weight format changes how often
it is right (acceptance) and how fast it drafts, never the output. llama.cpp repacks Q4_0 weights into
interleaved rows for its AVX2/AVX-512 kernels (CPU_REPACK) and has no such path for Q5_0, which the
Qwen2.5-0.5B "Q4_K_M" file mostly holds (its 896-wide rows do not fit K-quant blocks). Measured on the
2-core AMD EPYC VM (bench/results/issue16-draft-quant.txt): 28.1 -> 18.1 ms/token with 2 threads,
48.0 -> 24.1 ms/token with 1.

    setting   what runs
    keep      the GGUF as given
    q4_0      a Q4_0 copy, made once by llama.cpp's own quantizer (output tensor kept as llama.cpp
              chooses) and cached under $DUO_CACHE/drafts
    auto      the copy when the draft is large enough for weight reads to set its speed (>= 64 MiB),
              not already Q4_0, and llama_probe measures the copy at least 1.1x faster per token

The quantizer runs in a child process (`python -m duo.draft_quant SRC DST`): its per-tensor log stays out
of the user's terminal and a crash in it is a one-line error.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from .errors import DuoError, UsageError
from .registry import cache_dir

SETTINGS = ("auto", "keep", "q4_0")
MIN_BYTES = 64 << 20      # below this a draft's time per token is overhead, not weight reads
MIN_GAIN = 1.1            # auto: the copy must be this much faster per token (it accepted 7% fewer tokens
                          # per pass on GSM8K here, the same on HumanEval: bench/results/issue16-draft-quant.txt)
QUANT_TIMEOUT_S = 900


def copy_path(src: Path) -> Path:
    """Where the Q4_0 copy of `src` is cached (keyed by its name, size and modification time)."""
    st = src.stat()
    return cache_dir() / "drafts" / f"{src.stem}-{st.st_size}-{st.st_mtime_ns}.q4_0.gguf"


def q4_0_share(path: Path) -> float:
    """The fraction of the file's tensor bytes already stored as Q4_0."""
    from gguf import GGUFReader
    tensors = GGUFReader(str(path)).tensors
    total = sum(int(t.n_bytes) for t in tensors) or 1
    return sum(int(t.n_bytes) for t in tensors if t.tensor_type.name == "Q4_0") / total


def q4_0_copy(src: Path, progress: bool = True) -> Path:
    """The cached Q4_0 copy of `src`, made now if missing (one llama.cpp quantizer call in a child process)."""
    return made_once(copy_path(src), lambda dst: quantize_q4_0(src, dst), progress,
                     f"duo: making a Q4_0 copy of the draft {src.name} (once; --draft-quant keep skips it)...")


def made_once(dst: Path, make, progress: bool, message: str) -> Path:
    """dst, made by make(dst) under a lock if it is missing (other processes wait for it; message said first)."""
    from .models import _locked
    if dst.exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dst.with_suffix(".lock"), progress):
        if dst.exists():
            return dst
        if progress:
            print(message, file=sys.stderr, flush=True)
        make(dst)
    return dst


def quantize_q4_0(src: Path, dst: Path) -> None:
    """src -> dst as Q4_0 by llama.cpp's quantizer in a child process (dst appears only when complete)."""
    tmp = Path(dst).with_suffix(".partial")
    try:
        proc = subprocess.run([sys.executable, "-m", "duo.draft_quant", str(src), str(tmp)],
                              capture_output=True, text=True, timeout=QUANT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        tmp.unlink(missing_ok=True)
        raise DuoError(f"quantizing the draft {src} took over {QUANT_TIMEOUT_S} s; use --draft-quant keep")
    if proc.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise DuoError(f"quantizing the draft {src} to Q4_0 failed ({last}); use --draft-quant keep")
    os.replace(tmp, dst)


def fastest_ms(verdict) -> float | None:
    """A llama_probe verdict's time per token with the configuration it chose (None: nothing runs)."""
    r = verdict.result(verdict.chosen) if verdict.chosen else None
    return r.ms_per_token if r is not None else None


def check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise UsageError(f"--draft-quant must be one of {', '.join(SETTINGS)}, not {setting!r}")


def prepare(dref, setting: str = "auto", progress: bool = True):
    """The DraftRef to run: `dref` itself, or one naming its Q4_0 copy (same name), as `setting` says."""
    check_setting(setting)
    src = Path(dref.gguf)
    if setting == "keep" or setting == "auto" and (src.stat().st_size < MIN_BYTES or q4_0_share(src) > 0.5):
        return dref
    copy = replace(dref, gguf=q4_0_copy(src, progress), weights="Q4_0 copy", source=src)
    if setting == "q4_0":
        return copy
    from .runtime.llama_probe import llama_verdict
    ms_src, ms_copy = fastest_ms(llama_verdict(src)), fastest_ms(llama_verdict(copy.gguf))
    faster = ms_copy is not None and (ms_src is None or ms_copy * MIN_GAIN <= ms_src)
    return copy if faster else dref


def resolve_draft(spec: str | None, setting: str = "auto", progress: bool = True):
    """models.resolve_draft(spec), then prepare() it."""
    from .models import resolve_draft as resolve
    check_setting(setting)
    return prepare(resolve(spec, progress=progress), setting, progress)


def _quantize(src: str, dst: str) -> None:
    """Child process: llama.cpp's quantizer, src -> dst as Q4_0 (requantizing an already quantized file)."""
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.allow_requantize, p.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, True, len(os.sched_getaffinity(0))
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), llama_cpp.byref(p))
    if rc != 0:
        print(f"llama_model_quantize returned {rc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _quantize(sys.argv[1], sys.argv[2])
