"""Is duo ready for this GPU? One script, no download, at most 8 minutes on one H200/H100/A100-class GPU.

    python -m bench.gpu_check [--device cuda] [--quick] [--json PATH] [--compile | --no-compile]
                              [--stages 1,3 | environment,trees] [--pair DIR] [--workdir DIR]
    python -m bench.gpu_check --device cpu --quick      the scaled-down version (how the tests run it)

--quick: 3 prompts, 3 repetitions, and on a GPU contexts 512/8192 and n = 1, 4, 16, 64 (fewer buckets to compile).

Models: the tiny random-weight pair built locally (duo.testing) and a random-weight target with
Qwen2.5-7B's config built on the GPU in bf16 (on the CPU: a tiny config, contexts 64/128, n <= 16, no
torch.compile unless --compile). Stages, each one row of one table (an exception is that stage's FAIL, the
others still run; the exit code is 1 if any row FAILs):

    1 environment   device, compute capability, native bf16, versions; the draft worker must not see a GPU
                    (CUDA_VISIBLE_DEVICES="" in its /proc/<pid>/environ; llama.cpp's gpu offload there)
    2 trees         tree passes and non-contiguous compactions against per-branch causal runs (fp32, bf16)
    3 exactness     Engine greedy = the same target alone: fp32 token for token, bf16 but at near-ties
    4 syncs         synchronizing CUDA calls per round (torch.cuda.set_sync_debug_mode)
    5 verify        ms per verification pass, n = 1..64 at contexts 512/2048/8192, eager vs compiled
    6 profile       `duo profile --quick` on the tiny pair: on a GPU it must choose overlap
    7 memory        peak memory; an OOM provoked, classified (duo.errors.is_oom), recovered from
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import gpu_check_parts as parts
from .gpu_check_parts import Outcome, Setup, Skipped

ROOT = Path(__file__).resolve().parents[1]
GiB = 2 ** 30
BUDGET_S = 480          # the whole check on one GPU


@dataclass
class Row:
    stage: str
    result: str
    figure: str
    status: str            # ok | FAIL | skipped (why)
    seconds: float
    details: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- stages 1, 4, 6, 7
def worker_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def gpu_offload(env: dict[str, str]) -> bool:
    """llama_cpp.llama_supports_gpu_offload() in a process with this environment (the draft worker's)."""
    code = "import llama_cpp; print(int(llama_cpp.llama_supports_gpu_offload()))"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if p.returncode:
        raise RuntimeError(f"llama_cpp failed to import in the worker's environment: {last_line(p.stderr)}")
    return p.stdout.strip().endswith("1")


def environment(s: Setup) -> Outcome:
    from importlib.metadata import version   # llama_cpp's version without loading llama.cpp here

    import transformers

    from duo.runtime.draft_client import DraftClient, DraftConfig

    versions = (f"torch {torch.__version__}, transformers {transformers.__version__}, "
                f"llama_cpp {version('llama_cpp_python')}")
    device = "cpu"
    if s.cuda:
        cap = torch.cuda.get_device_capability(s.device)
        device = (f"{torch.cuda.get_device_name(s.device)}, sm {cap[0]}.{cap[1]}, "
                  f"bf16 {'native' if cap >= (8, 0) else 'emulated (pre-Ampere)'}")
    with DraftClient(DraftConfig(gguf_path=str(s.pair.draft_gguf), n_ctx=256, max_nodes=64)) as draft:
        env = worker_environ(draft.worker_pid)
    visible, offload = env.get("CUDA_VISIBLE_DEVICES"), gpu_offload(env)
    hidden = visible == "" or not torch.cuda.is_available()     # no GPU on this machine: none to hide
    return Outcome(device, f"{versions}; draft worker CUDA_VISIBLE_DEVICES={visible!r} (must be ''), "
                           f"llama.cpp gpu offload there: {offload}", hidden and not offload,
                   dict(cuda_visible_devices=visible, gpu_offload=offload, versions=versions))


def profile(s: Setup) -> Outcome:
    """`duo profile --quick --json` on the tiny pair in a subprocess (its own cache: nothing saved for the user)."""
    pair = s.pair
    cmd = [sys.executable, "-m", "duo", "profile", "--quick", "--json", "--no-precisions", "--no-progress",
           "--model", str(pair.target_hf_dir), "--draft", str(pair.draft_gguf), "--device", str(s.device)]
    env = dict(os.environ, DUO_CACHE=str(s.work / "cache"))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=420)
    if p.returncode:
        return Outcome(f"exit code {p.returncode}", last_line(p.stderr), False)
    prof = json.loads(p.stdout[p.stdout.index("{"):])
    ch = prof["choice"]
    result = (f"{ch['mode']}" + (f" b={ch['budget']} w={ch['width']}" if ch["mode"] != "target" else "")
              + f", draft {ch['draft_threads']} / target {ch['target_threads']} threads")
    figure = (f"{ch['predicted_tps']:.0f} tok/s predicted ({ch['predicted_speedup']:.2f}x target alone); "
              f"profiled in {prof['wall_s']:.0f} s" + ("" if s.cuda else "; cpu: any mode is right"))
    return Outcome(result, figure, ch["mode"] == "overlap" or not s.cuda, dict(choice=ch))


def syncs(s: Setup) -> Outcome:
    """Synchronizing CUDA calls per round of one greedy generation (bf16, overlap), and where they are."""
    if not s.cuda:
        raise Skipped("cpu")
    from duo import Engine

    pair = s.pair
    with Engine(str(pair.target_hf_dir), str(pair.draft_gguf), device=str(s.device), dtype="bfloat16",
                mode="overlap", budget=8, progress=False, profile="off") as e:
        ids = e.encode(parts.PROMPTS[0])
        e.generate(ids, max_new_tokens=8)                  # warm-up: first-call allocations
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = e.generate(ids, max_new_tokens=64)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    found = [w for w in caught if "synchroniz" in str(w.message).lower()]
    rounds = res.stats["rounds"]
    sites = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in found).most_common(4)
    per_round = len(found) / max(1, rounds)
    # the chosen tokens must reach the host once a round: no warning at all means the count is broken
    return Outcome(f"{per_round:.1f} syncs/round ({len(found)} in {rounds} rounds)",
                   ", ".join(f"{site} x{n}" for site, n in sites), rounds > 0 and len(found) > 0,
                   dict(syncs=len(found), rounds=rounds, sites=sites))


def memory(s: Setup) -> Outcome:
    """Peak memory so far; a forward far too big for any GPU, then a normal pass after empty_cache()."""
    if not s.cuda:
        raise Skipped("cpu")
    from duo.errors import is_oom

    tm, dev = s.big, s.device
    torch.cuda.synchronize(dev)
    peak, before = torch.cuda.max_memory_allocated(dev), torch.cuda.memory_allocated(dev)
    caught = None
    try:
        with torch.inference_mode():   # 2M tokens: the first layer's activations alone exceed any GPU's memory
            tm.model(input_ids=torch.randint(1, tm.vocab_size, (256, 8192), device=dev), use_cache=False)
        torch.cuda.synchronize(dev)
    except Exception as e:  # noqa: BLE001 - which exception it is, is what this stage reports
        caught = (type(e).__name__, is_oom(e))
    gc.collect()
    torch.cuda.empty_cache()
    cache = tm.new_cache()
    tm.prefill(cache, [11, 12, 13, 14])
    tm.forward_tree(cache, 15, parts.binary_tree(7, tm.vocab_size, 0))
    torch.cuda.synchronize(dev)
    del cache
    gc.collect()
    after, reserved = torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev)
    result = ("no OOM provoked" if caught is None else f"{caught[0]}, is_oom {caught[1]}; a pass after it works")
    figure = (f"peak {peak / GiB:.1f} GiB; allocated {before / GiB:.2f} -> {after / GiB:.2f} GiB after recovery, "
              f"reserved {reserved / GiB:.1f} GiB")
    ok = caught is not None and caught[1] and abs(after - before) < GiB / 4
    return Outcome(result, figure, ok, dict(peak=peak, before=before, after=after, reserved=reserved))


STAGES = [("environment", environment), ("trees", parts.trees), ("exactness", parts.exactness),
          ("syncs", syncs), ("verify", parts.verify_time), ("profile", profile), ("memory", memory)]


# ------------------------------------------------------------------------------------------- running, reporting
def last_line(text: str) -> str:
    return next((ln for ln in reversed(text.strip().splitlines()) if ln.strip()), "")[:200]


def first_line(text: str) -> str:
    return next((ln for ln in text.strip().splitlines() if ln.strip()), "-")[:200]


def run_stages(stages: list, s: Setup | None) -> list[Row]:
    """Each stage in turn; a stage that raises is a FAIL row and the next one still runs."""
    rows = []
    for i, (name, fn) in enumerate(stages, 1):
        print(f"gpu_check: [{i}/{len(stages)}] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            out = fn(s)
            status = "ok" if out.ok else "FAIL"
        except Skipped as e:
            out, status = Outcome("-"), f"skipped ({e})"
        except Exception as e:  # noqa: BLE001 - one stage's failure is its row; the others still run
            out, status = Outcome(f"error: {type(e).__name__}: {first_line(str(e))}", ok=False), "FAIL"
            if torch.cuda.is_available():
                gc.collect()
                torch.cuda.empty_cache()
        rows.append(Row(name, out.result, out.figure, status, round(time.perf_counter() - t0, 1), out.details))
        print(f"gpu_check: [{i}/{len(stages)}] {name}: {status} in {rows[-1].seconds:.1f} s", file=sys.stderr,
              flush=True)
    return rows


def exit_code(rows: list[Row]) -> int:
    return 1 if any(r.status == "FAIL" for r in rows) else 0


def table(rows: list[Row]) -> str:
    lines = ["| # | stage | result | figure | s | status |", "|---|---|---|---|---|---|"]
    lines += [f"| {i} | {r.stage} | {r.result} | {r.figure} | {r.seconds:.1f} | {r.status} |"
              for i, r in enumerate(rows, 1)]
    return "\n".join(lines)


def grid_table(grid: list[dict]) -> str:
    """The verify stage's ms per pass (forward + compaction back), one line per (context, path)."""
    if not grid:
        return ""
    ns = sorted({c["n"] for c in grid})
    lines = ["verify ms per pass of n tokens (root + n - 1 tree nodes), median:", "",
             "| context | path | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|---|" + "---|" * len(ns)]
    for ctx in sorted({c["context"] for c in grid}):
        for path in dict.fromkeys(c["path"] for c in grid):
            ms = {c["n"]: c["ms"] for c in grid if c["context"] == ctx and c["path"] == path}
            lines.append(f"| {ctx} | {path} | " + " | ".join("n/a" if ms.get(n) is None else f"{ms[n]:.2f}"
                                                               for n in ns) + " |")
    return "\n".join(lines)


def select(spec: str | None) -> list:
    """--stages: numbers or names, comma separated (None: all)."""
    if not spec:
        return STAGES
    names = [n for n, _ in STAGES]
    out = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        i = int(item) - 1 if item.isdigit() else names.index(item) if item in names else -1
        if not 0 <= i < len(STAGES):
            raise ValueError(f"unknown stage {item!r}: use 1-{len(STAGES)} or {', '.join(names)}")
        out.append(STAGES[i])
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu: the scaled-down version)")
    p.add_argument("--quick", action="store_true", help="fewer prompts, repetitions, contexts and tree sizes")
    p.add_argument("--json", metavar="PATH", help="write the rows and the verify grid here as JSON")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the static verify path (default: on a GPU yes, on the CPU no)")
    p.add_argument("--stages", metavar="LIST", help="only these stages: numbers or names, comma separated")
    p.add_argument("--pair", metavar="DIR", help="build (or reuse) the tiny pair here (default: in the workdir)")
    p.add_argument("--workdir", metavar="DIR", help="scratch directory, kept (default: a temporary one)")
    return p


def main(argv=None) -> int:
    from duo.runtime.target import TargetError, resolve_device

    args = build_parser().parse_args(argv)
    try:
        dev = resolve_device(args.device)
        stages = select(args.stages)
    except (TargetError, ValueError) as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="duo-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    s = Setup(dev, quick=args.quick, compile=dev.type == "cuda" if args.compile is None else args.compile,
              pair_dir=Path(args.pair) if args.pair else work / "pair", work=work)
    t0 = time.perf_counter()
    try:
        rows = run_stages(stages, s)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - t0
    print(table(rows))
    if s.grid:
        print("\n" + grid_table(s.grid))
    over = " (over the 8-minute budget)" if dev.type == "cuda" and wall > BUDGET_S else ""
    print(f"\n{sum(r.status == 'FAIL' for r in rows)} FAIL of {len(rows)} stages on {dev}, {wall:.0f} s{over}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=str(dev), quick=args.quick, compile=s.compile,
                                                   wall_s=round(wall, 1), ok=not exit_code(rows),
                                                   rows=[asdict(r) for r in rows], verify_grid=s.grid),
                                              indent=1, default=str))
    return exit_code(rows)


if __name__ == "__main__":
    import logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING, format="duo: %(message)s")
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ngpu_check: interrupted", file=sys.stderr)
        sys.exit(130)
