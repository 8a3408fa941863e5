"""Verify-time cost of a tree of n nodes vs a chain of n tokens, same target, same context.

    python -m bench.verify_cost [--model M] [--device D] [--dtype T] [--context 512] [--sizes 4,8,16,32] [--compile]

--compile also times the static, compiled verify pass (duo.runtime.static_target: a static KV cache,
torch.compile per bucket, CUDA graphs on a GPU), compiled for exactly the measured pass sizes (n + 1
tokens: the root and n nodes, no padding), next to the eager one: the measurement behind
static_target.use_static's "auto".
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from duo import models
from duo.runtime.target import load_target, storage_dtype
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


def sync(target) -> None:
    if target.device.type == "cuda":
        torch.cuda.synchronize(target.device)


def time_forward(target, cache, root: int, tree, reps: int) -> float:
    """Median seconds of one verification pass over root + tree on a prefilled cache (one warm-up pass;
    the cache is cut back to the prefix after each pass, untimed). `target`: anything with the Target
    interface (the eager TargetModel, a StaticTarget)."""
    n_past, ts = target.cache_length(cache), []
    for i in range(reps + 1):
        sync(target)
        t = time.perf_counter()
        target.forward_tree(cache, root, tree)
        sync(target)
        if i:
            ts.append(time.perf_counter() - t)
        target.compact_cache(cache, n_past, [])
    return statistics.median(ts)


def pass_costs(target, prefix: list[int], sizes: list[int], reps: int) -> dict[int, tuple[float, float]]:
    """{n: (chain ms, tree ms)} of passes over a prefilled `prefix`."""
    cache = target.new_cache()
    target.prefill(cache, prefix[:-1])
    vocab = target.vocab_size
    out = {}
    for n in sizes:
        chain = Tree.chain([min(100 + i, vocab - 1) for i in range(n)])
        tree = wide_tree(n)
        tree.tokens %= vocab
        out[n] = (time_forward(target, cache, prefix[-1], chain, reps) * 1e3,
                  time_forward(target, cache, prefix[-1], tree, reps) * 1e3)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="the target's precision: auto, float32, bfloat16, float16, int8, w8a8")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--sizes", default="1,4,8,16,32,64")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compile", action="store_true",
                    help="also time the static, compiled verify pass (compiling takes a while per size)")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    ref = models.resolve_target(args.model, dtype=storage_dtype(args.device, args.dtype))
    tm = load_target(ref.hf_dir, device=args.device, dtype=args.dtype)
    prefix = [int(t) % tm.vocab_size for t in np.random.default_rng(1).integers(100, 20000, args.context)]
    print(f"target {tm.name} on {tm.device} ({tm.precision}), context {args.context}")
    eager = pass_costs(tm, prefix, sizes, args.reps)
    compiled = {}
    if args.compile:
        from duo.runtime.static_target import StaticTarget
        t = time.perf_counter()
        st = StaticTarget(tm, max_cache_len=args.context + max(sizes) + 2, buckets=[n + 1 for n in sizes],
                          compile=True)
        st.warm_up(progress=True)
        print(f"compiled {len(sizes)} pass sizes in {time.perf_counter() - t:.0f}s")
        compiled = pass_costs(st, prefix, sizes, args.reps)
    head = "| n | chain ms | tree ms (width 4) | tree / chain | vs n=1 |"
    if compiled:
        head += " compiled chain ms | compiled tree ms | eager / compiled (chain) |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    base = eager[sizes[0]][0]
    for n in sizes:
        chain, tree = eager[n]
        row = f"| {n} | {chain:.1f} | {tree:.1f} | {tree / chain:.2f} | {chain / base:.2f}x |"
        if compiled:
            c_chain, c_tree = compiled[n]
            row += f" {c_chain:.2f} | {c_tree:.2f} | {chain / c_chain:.2f}x |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
