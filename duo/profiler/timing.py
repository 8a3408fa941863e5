"""How the benchmarks are timed and shown: `Settings` (what they cover, how often they repeat), `Timing`
(median, min, max of the repetitions), `measure` (repeat until stable), `BenchError` (a benchmark that
could not run) and `progress_bar` (the profiler's one progress bar on stderr).

Light imports only: the draft benchmark child process imports this module (no torch).
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass


class BenchError(RuntimeError):
    """A benchmark could not run (model failed to load, worker died)."""


@dataclass
class Timing:
    ms: float           # median
    min_ms: float
    max_ms: float
    reps: int

    @property
    def spread(self) -> float:
        """Half the range, in ms."""
        return (self.max_ms - self.min_ms) / 2

    def row(self, **keys) -> dict:
        return dict(keys, ms=round(self.ms, 4), min_ms=round(self.min_ms, 4), max_ms=round(self.max_ms, 4),
                    reps=self.reps)


@dataclass
class Settings:
    quick: bool = True
    contexts: tuple = (128, 512)              # tokens already in the cache
    ns: tuple = (1, 2, 4, 8, 16, 32, 64)      # tokens per verification pass (first context, all cores)
    other_ns: tuple = (1, 4, 16)              # other thread counts (first context)
    context_ns: tuple = (1, 16)               # other contexts (all cores)
    stop_ratio: float | None = 8.0            # stop a curve once verify(n) > ratio * verify(1)
    min_reps: int = 2
    max_reps: int = 3
    tol: float = 0.08
    widths: tuple = (1, 2, 4)
    draft_threads: tuple | None = None        # None: 1, 2, 4 ... and all cores
    draft_steps: int = 8                      # decode steps per draft repetition
    draft_context: int = 128
    interference: bool = True
    ping_reps: int = 30
    max_new_tokens: int = 24                  # per calibration prompt and shape
    chain_budget: int = 10
    tree_budget: int = 10
    tree_width: int = 4
    both_shapes: bool = False                 # False: prompts alternate chain / tree
    max_prompts: int | None = None

    @classmethod
    def for_mode(cls, quick: bool) -> "Settings":
        if quick:
            return cls()
        return cls(quick=False, contexts=(128, 1024), other_ns=(1, 2, 4, 8, 16, 32, 64),
                   context_ns=(1, 2, 4, 8, 16, 32, 64), stop_ratio=None,
                   min_reps=3, max_reps=8, tol=0.04, draft_steps=16, ping_reps=100, max_new_tokens=64,
                   chain_budget=16, tree_budget=16, both_shapes=True)

    def decode_jobs(self, n_prompts: int) -> int:
        """Calibration decodes of n_prompts prompts (one per prompt and shape)."""
        return n_prompts * (2 if self.both_shapes else 1)


def measure(fn, min_reps: int = 3, max_reps: int = 8, tol: float = 0.05, warmup: int = 1,
            max_s: float | None = None) -> Timing:
    """Call fn() (which returns the ms of one repetition) until `min_reps` repetitions in a row agree
    within ±tol of their median, or max_reps / max_s is reached; median, min and max of all repetitions."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    t0 = time.perf_counter()
    while True:
        times.append(float(fn()))
        if len(times) >= max_reps or (max_s is not None and time.perf_counter() - t0 > max_s):
            break
        if len(times) >= min_reps:
            last = times[-min_reps:]
            med = statistics.median(last)
            if med <= 0 or (max(last) - min(last)) / 2 <= tol * med:
                break
    return Timing(statistics.median(times), min(times), max(times), len(times))


def progress_bar(total: int, enabled: bool):
    """A tqdm bar of `total` steps on stderr (a no-op one when not enabled); callers set its description."""
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, disable=not enabled, unit="step", leave=False,
                bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
