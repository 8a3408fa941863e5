"""Soak: 300 consecutive generations on one Engine (tiny pair): lengths 1..64, greedy and sampled, every mode
and tree shape, prompts as text, chat messages and token ids.

Checked: every greedy and every seeded output equals the target alone (a separate mode="target" Engine; a
generation of n tokens is the first n of the reference's 64, as both are position-keyed); no fallback, the
same worker process and channel throughout; no growth of file descriptors (either process) or of our
/dev/shm segments; resident memory growth after warm-up below RSS_BOUND_MB in each process.
`pytest -s` prints the numbers (time, RSS growth in MB, fds, segments).
"""
from __future__ import annotations

import gc
import os
import time

import numpy as np
import psutil

from duo import Engine
from duo.plan import Plan

N_GEN = 300
WARMUP = 30
RSS_BOUND_MB = 50.0     # generous (allocator noise is a few MB) but far below a leak of 0.2 MB per generation
PROMPTS = [
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "List three colors:"}],
    "class Stack:\n    def __init__(self):",
    "a b c d e f g a b c d",
    "import numpy as np\nx = np.",
    "Once upon a time",
    [{"role": "user", "content": "1, 2, 3, 4, 5,"}],
]
SAMPLING = [  # (temperature, top_p, top_k, seed); None seed: fresh randomness (only the length is checked)
    (0.0, 1.0, 0, None),
    (0.0, 1.0, 0, None),
    (0.8, 0.95, 0, 1),
    (1.0, 1.0, 40, 2),
    (0.7, 0.9, 0, None),
]
OVERRIDES = [  # per-call plan overrides: mode, shape, budget (None: the engine's, adaptive)
    dict(),
    dict(mode="overlap"),
    dict(mode="sequential", shape="chain", budget=4),
    dict(mode="overlap", shape="eagle", budget=12),
    dict(mode="sequential", shape="dynamic", budget=16, lookup=False),
    dict(mode="target"),
]


def my_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"duo_{os.getpid()}_")}


def usage(procs) -> tuple[list[float], list[int]]:
    gc.collect()
    return [p.memory_info().rss / 2**20 for p in procs], [p.num_fds() for p in procs]


def test_soak(tiny_pair):
    rng = np.random.default_rng(0)
    t_start = time.monotonic()
    plan = Plan(mode="sequential", budget=8, source="test")  # one thread each: steady under a loaded machine
    with Engine(str(tiny_pair.target_hf_dir), str(tiny_pair.draft_gguf), device="cpu", plan=plan,
                progress=False) as e, \
            Engine(str(tiny_pair.target_hf_dir), device="cpu", plan=Plan(mode="target", source="test"),
                   progress=False) as alone:
        refs: dict = {}

        def reference(p, temp, top_p, top_k, seed):
            key = (repr(p), temp, top_p, top_k, seed)
            if key not in refs:
                refs[key] = alone.generate(p, max_new_tokens=64, temperature=temp, top_p=top_p, top_k=top_k,
                                           seed=seed).token_ids
            return refs[key]

        worker_pid, chan_name = e._draft.worker_pid, e._draft._chan.spec.name
        procs = [psutil.Process(), psutil.Process(worker_pid)]
        segs0 = my_segments()
        checked = drafted = 0
        series = []
        for i in range(N_GEN):
            if i == WARMUP:
                rss0, fds0 = usage(procs)
                t_warm = time.monotonic()
            p = PROMPTS[i % len(PROMPTS)]
            temp, top_p, top_k, seed = SAMPLING[int(rng.integers(len(SAMPLING)))]
            n = int(rng.integers(1, 65))
            over = OVERRIDES[int(rng.integers(len(OVERRIDES)))]
            res = e.generate(p, max_new_tokens=n, temperature=temp, top_p=top_p, top_k=top_k, seed=seed, **over)
            assert res.stats["fallback"] is None, (i, res.stats["fallback"])
            assert 1 <= len(res.token_ids) <= n
            if temp == 0.0 or seed is not None:
                assert res.token_ids == reference(p, temp, top_p, top_k, seed)[:n], (i, p, temp, seed, n, over)
                checked += 1
            drafted += res.stats["drafted"]
            if i >= WARMUP and i % 30 == 0:
                series.append(usage(procs)[0])
        rss1, fds1 = usage(procs)
        elapsed = time.monotonic() - t_start
        assert e._draft.worker_pid == worker_pid and e._draft._chan.spec.name == chan_name, "worker restarted"
        assert my_segments() == segs0
        growth = [b - a for a, b in zip(rss0, rss1)]
        print(f"\nsoak: {N_GEN} generations ({checked} checked against the target alone, {drafted} tokens drafted) "
              f"in {elapsed:.1f} s ({time.monotonic() - t_warm:.1f} s after {WARMUP} warm-up)")
        print(f"soak: RSS target process {rss0[0]:.1f} -> {rss1[0]:.1f} MB ({growth[0]:+.1f}), "
              f"draft worker {rss0[1]:.1f} -> {rss1[1]:.1f} MB ({growth[1]:+.1f}); bound {RSS_BOUND_MB} MB")
        print(f"soak: RSS every 30 generations (target, worker): "
              + " ".join(f"{a:.0f}/{b:.0f}" for a, b in series))
        print(f"soak: fds target {fds0[0]} -> {fds1[0]}, worker {fds0[1]} -> {fds1[1]}; "
              f"/dev/shm segments of this pid {len(segs0)} -> {len(my_segments())}")
        assert checked >= N_GEN // 2 and drafted > 0
        assert fds1 == fds0, f"file descriptors grew: {fds0} -> {fds1}"
        assert max(growth) < RSS_BOUND_MB, f"resident memory grew by {growth} MB"
        late = [b - a for a, b in zip(series[len(series) // 2], rss1)]  # a slow leak shows as a trend
        assert max(late) < RSS_BOUND_MB / 5, f"resident memory still growing over the second half: {late} MB"
