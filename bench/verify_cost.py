"""Verify-time cost of a tree of n nodes vs a chain of n tokens, same target, same context.

    python -m bench.verify_cost [--model M] [--device D] [--context 512] [--sizes 4,8,16,32]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from duo import models
from duo.runtime.target import cache_length, compact_cache, forward_tree, load_target, new_cache, prefill
from duo.runtime.tree import Tree


def wide_tree(n: int, width: int = 4, seed: int = 0) -> Tree:
    """A tree like the dynamic drafter's: `width` branches from the root, extended as chains."""
    rng = np.random.default_rng(seed)
    parents, heads = [], []
    for k in range(n):
        if k < width:
            parents.append(-1)
            heads.append(k)
        else:
            b = (k - width) % width
            parents.append(heads[b])
            heads[b] = k
    return Tree(rng.integers(100, 20000, n), parents, np.ones(n))


def time_forward(tm, cache, root: int, tree, reps: int) -> float:
    """Median seconds of one verification pass over root + tree on a prefilled cache (one warm-up pass;
    the cache is cut back to the prefix after each pass, untimed)."""
    n_past, ts = cache_length(cache), []
    for i in range(reps + 1):
        t = time.perf_counter()
        forward_tree(tm, cache, root, tree)
        if i:
            ts.append(time.perf_counter() - t)
        compact_cache(cache, n_past, [])
    return statistics.median(ts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--sizes", default="1,4,8,16,32,64")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    ref = models.resolve_target(args.model)
    tm = load_target(ref.hf_dir, device=args.device)
    prefix = list(np.random.default_rng(1).integers(100, 20000, args.context))
    print(f"target {tm.name} on {tm.device} ({tm.dtype}), context {args.context}")
    print("| n | chain ms | tree ms (width 4) | tree / chain | vs n=1 |")
    print("|---|---|---|---|---|")
    cache = new_cache()
    prefill(tm, cache, prefix[:-1])
    base = None
    for n in [int(x) for x in args.sizes.split(",")]:
        chain = time_forward(tm, cache, prefix[-1], Tree.chain(list(range(100, 100 + n))), args.reps) * 1e3
        tree = time_forward(tm, cache, prefix[-1], wide_tree(n), args.reps) * 1e3
        base = base or chain
        print(f"| {n} | {chain:.0f} | {tree:.0f} | {tree / chain:.2f} | {chain / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
