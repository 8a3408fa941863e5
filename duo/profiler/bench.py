"""The micro-benchmarks of a profile: `run_benchmarks` runs them all, as `Settings` (duo.profiler.timing) say,
with the threads and cores of a `Layout`.

Each timing is repeated until stable (median, min, max over the repetitions; duo.profiler.timing.measure):

* target: ms of one verification pass over n = 1, 2, 4 ... 64 new tokens (forward_tree over a chain on
  a prefilled cache, argmax and cache compaction included) at a couple of context lengths (on a GPU up
  to 8192: `measured_contexts`) and at the thread counts the schedules use; plus the extra cost of a
  branched tree mask;
* draft: ms per llama.cpp decode step by thread count and batch width (1, 2, 4 sequences), in a
  spawned process pinned to the cores the worker would get (the last `threads` cores);
* interference: both at once (draft process spinning on its cores, target on the others), the
  slowdown of each side, as the overlap schedule would see it (these three: duo.profiler.benchers);
* channel: DraftClient.ping round trip;
* acceptance: duo's own decoding of the calibration prompts (duo.profiler.acceptance);
* sources: the free candidate sources' ms per round (duo.profiler.sources_cost).

Module level imports stay light (no torch).
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .acceptance import decode_calibration
from .sources_cost import measure_free_sources
from .benchers import TargetBencher, draft_steps, interference, target_threads
from .calibration_prompts import encode_prompts, filler
from .timing import Settings, progress_bar


GPU_CONTEXTS = (2048, 8192)   # also measured on a GPU: a pass there costs little per token, more per cached one


def measured_contexts(s: Settings, device, max_context: int | None) -> tuple:
    """The context lengths of the verification passes: `s.contexts` on the CPU; on a GPU also GPU_CONTEXTS,
    each with room for the longest pass (max(s.ns) tokens) within the model's max_context."""
    if getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return tuple(s.contexts)
    fits = lambda c: max_context is None or c + max(s.ns) + 8 <= max_context  # noqa: E731
    longer = [c for c in GPU_CONTEXTS if c > max(s.contexts) and fits(c)]
    return (s.contexts[0],) + tuple(c for c in s.contexts[1:] if fits(c)) + tuple(longer)


def default_draft_threads(n_cores: int) -> list[int]:
    out, t = [], 1
    while t < n_cores:
        out.append(t)
        t *= 2
    return out + [n_cores]


def overlap_splits(n_cores: int, draft_threads, gpu: bool) -> list[int]:
    """Draft thread counts usable by the overlap schedule (the target keeps at least as many on a CPU)."""
    if gpu:
        return [d for d in draft_threads if d <= max(1, n_cores - 1)]
    return [d for d in draft_threads if d < n_cores and d <= n_cores - d]


@dataclass
class Layout:
    """What runs on which threads and cores during the benchmarks."""
    cores: list[int]
    gpu: bool
    draft_threads: list[int]   # thread counts of the draft benchmarks
    splits: list[int]          # of which those also measured against the target at once (interference)
    main_threads: int          # the target's threads on all of its cores (on a GPU: torch's own count)
    seq_threads: int           # the target's threads in the calibration decodes
    grid: list[tuple]          # (context, target threads, ns) of the verification passes

    @property
    def n(self) -> int:
        return len(self.cores)

    @classmethod
    def of(cls, tm, cores, s: Settings) -> "Layout":
        import torch

        cores = sorted(cores)
        n = len(cores)
        gpu = tm.device.type == "cuda"
        d_threads = sorted(set(s.draft_threads or default_draft_threads(n)))
        d_threads = [t for t in d_threads if 1 <= t <= n] or [1]
        main_t = torch.get_num_threads() if gpu else n
        t_threads = [main_t] if gpu else sorted({n} | {n - d for d in overlap_splits(n, d_threads, gpu)},
                                                reverse=True)
        grid = [(c, t, s.ns if (c == s.contexts[0] and t == main_t) else s.other_ns if c == s.contexts[0]
                 else s.context_ns) for c in s.contexts for t in t_threads if c == s.contexts[0] or t == main_t]
        return cls(cores, gpu, d_threads, overlap_splits(n, d_threads, gpu) if s.interference else [], main_t,
                   n if gpu else main_t, grid)

    def steps(self) -> int:
        """Progress steps of the passes, the tree mask, the draft benchmarks, the interference and the channel."""
        return sum(len(g) for *_, g in self.grid) + 1 + len(self.draft_threads) + len(self.splits) + 1


def run_benchmarks(tm, draft_gguf: str | Path, prompts: list[dict], s: Settings, progress: bool = True,
                   cores: list[int] | None = None) -> dict:
    """All measurements for the `measurements` section of a profile (see configs/profile-format.md)."""
    s = dataclasses.replace(s, contexts=measured_contexts(s, tm.device, getattr(tm, "max_context", None)))
    lay = Layout.of(tm, cores or os.sched_getaffinity(0), s)
    prompt_ids = encode_prompts(tm.tokenizer, prompts[:s.max_prompts] if s.max_prompts else prompts)
    tokens = filler(prompt_ids, max(s.contexts) + 70)
    out: dict = dict(device=str(tm.device), gpu=lay.gpu, cores=lay.cores, n_cores=lay.n,
                     supports_tree=tm.supports_tree, settings=asdict(s), draft=[], verify=[], interference=[])
    bar = progress_bar(lay.steps() + s.decode_jobs(len(prompt_ids)), progress)
    t_start = time.perf_counter()
    try:
        tb = TargetBencher(tm, tokens)
        alone = verify_passes(tb, lay, s, bar, out["verify"])
        mask = tree_mask(tb, lay, s, bar)
        if mask is not None:
            out["tree_mask"] = mask
        out["draft"] = draft_steps(draft_gguf, lay.draft_threads, lay.cores, tokens, s, bar,
                                   then=both_at_once(tb, lay, alone, tokens, s, bar, out["interference"]))
        out.update(decode_calibration(tm, draft_gguf, prompt_ids, s, min(lay.n, 8), lay.seq_threads, bar))
        out["sources"] = measure_free_sources(prompt_ids)
        out["acceptance"].update(draft_threads=min(lay.n, 8), target_threads=lay.seq_threads)
    finally:
        bar.close()
    out["wall_s"] = round(time.perf_counter() - t_start, 2)
    return out


def verify_passes(tb: TargetBencher, lay: Layout, s: Settings, bar, rows: list) -> dict:
    """The target's verification passes over the layout's grid, appended to `rows` (the `verify` rows); a
    quick profile stops a curve once a pass costs `stop_ratio` times the n=1 one. {(context, threads, n): ms}."""
    alone: dict = {}
    for i, (c, t, ns) in enumerate(lay.grid):
        bar.set_description(f"target forward ctx {c}, {t} thread{'s' * (t > 1)}")
        tb.cache(c)
        with target_threads(t, None if lay.gpu or t == lay.n else lay.cores[:t]):
            v1 = None
            for k in ns:
                tmg = tb.measure(c, k, s)
                alone[(c, t, k)] = tmg.ms
                rows.append(tmg.row(threads=t, context=c, n=k))
                bar.update(1)
                v1 = v1 or tmg.ms
                if s.stop_ratio and k >= 16 and tmg.ms > s.stop_ratio * v1:
                    bar.update(len([x for x in ns if x > k]))
                    break
        if c != lay.grid[0][0] and all(g[0] != c for g in lay.grid[i + 1:]):
            tb.drop(c)   # a later context's cache is not used again (the interference runs at the first)
    return alone


def tree_mask(tb: TargetBencher, lay: Layout, s: Settings, bar) -> dict | None:
    """The `tree_mask` measurement: a pass over 4 branches vs a chain of as many tokens (None when the target
    verifies chains only, or the passes are too short to branch)."""
    c0 = s.contexts[0]
    k_tree = max([k for k in s.ns if k <= 16] or [s.ns[0]])
    bar.set_description("target tree mask")
    mask = None
    with target_threads(lay.main_threads, None):
        if k_tree >= 3 and tb.tm.supports_tree:
            chain = tb.measure(c0, k_tree, s).ms
            tree = tb.measure(c0, k_tree, s, branches=4).ms
            mask = dict(n=k_tree, chain_ms=round(chain, 4), tree_ms=round(tree, 4), factor=round(tree / chain, 4))
    bar.update(1)
    return mask


def both_at_once(tb: TargetBencher, lay: Layout, alone: dict, tokens: list[int], s: Settings, bar, rows: list):
    """draft_steps' `then`: while the draft child of a split's thread count is up, its interference with the
    target (appended to `rows`, the `interference` rows)."""
    def step(db, d: int, res: dict) -> None:
        if d in lay.splits:
            bar.set_description(f"interference, draft {d} / target {lay.n - d if not lay.gpu else lay.main_threads}")
            rows.append(interference(tb, db, d, lay.n, lay.cores, lay.gpu, lay.main_threads, alone, res[1].ms,
                                     tokens, s))
            bar.update(1)
    return step
