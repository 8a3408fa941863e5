"""The free candidate sources' cost per round on this machine: prompt lookup and the output cache, timed
on the calibration prompts' tokens (the profile's `sources` measurement, the cost model's sources_ms).

A datastore's own retrieval time is measured when it is built (`duo datastore build`, its meta.json).
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from ..runtime.sources.lookup import PromptLookup
from ..runtime.sources.output_cache import OutputCache, OutputCacheDraft


def measure_free_sources(prompt_ids: list[list[int]], budget: int = 16, reps: int = 3) -> dict:
    """{lookup_ms, cache_ms, ms}: the median ms of one round's proposals over windows of the prompts, the
    output cache holding the other prompts (repeated to ~200k tokens, a full morning's answers)."""
    prompts = [list(p) for p in prompt_ids if len(p) > 8]
    if not prompts:
        return dict(lookup_ms=0.0, cache_ms=0.0, ms=0.0)
    cache = OutputCache()
    rng = np.random.default_rng(0)
    while cache.n_tokens < 200_000:
        cache.add(prompts[int(rng.integers(len(prompts)))] + list(rng.integers(0, 1000, 64)))
    out = {}
    for name, source in (("lookup", PromptLookup()), ("cache", OutputCacheDraft(cache))):
        times = []
        for _ in range(reps):
            for p in prompts:
                for end in range(8, len(p), max(1, len(p) // 8)):
                    t = time.perf_counter()
                    source.propose(p[:end], budget)
                    times.append(1e3 * (time.perf_counter() - t))
        out[f"{name}_ms"] = round(statistics.median(times), 4)
    out["ms"] = round(out["lookup_ms"] + out["cache_ms"], 4)
    return out
