"""bench.gpu_check's models and its measuring stages: trees and compaction, exactness, verify time.

    Setup            what every stage shares: the device, the tiny pair, the random-weight 7B-config target
    random_target    a transformers Qwen2 with random weights built on the device, wrapped as load_target does
    tree_errors      tree passes and compactions against per-branch causal runs (and a wrong-mask control)
    exactness        Engine greedy output against one-token decoding of the same target (near-ties measured)
    verify_time      ms per verification pass by tokens n and context, eager against the static/compiled path

A stage returns an Outcome or raises Skipped; any other exception is its FAIL (bench/gpu_check.py).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from duo.runtime.tree import Tree

from .near_ties import NEAR_TIE, rank_of

# Qwen2.5-7B's shape (random weights: nothing is downloaded)
SEVEN_B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
               rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY = dict(SEVEN_B, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=2048, max_position_embeddings=4096)
PROMPTS = ["Write a Python function that checks for primes.", "def fibonacci(n):", "List three colors:",
           "The quick brown fox jumps over the lazy dog. The quick brown fox", "class Stack:\n    def __init__(self):",
           "Once upon a time", "1, 2, 3, 4, 5,", "SELECT * FROM users WHERE"]
MAX_NEW = 32
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class Skipped(Exception):
    """The stage does not apply here (its message says why, e.g. "cpu")."""


@dataclass
class Outcome:
    result: str
    figure: str = ""
    ok: bool = True
    details: dict = field(default_factory=dict)   # into the JSON


@dataclass
class Setup:
    device: torch.device
    quick: bool = False
    compile: bool = False          # torch.compile the static path (CUDA graphs on a GPU)
    pair_dir: Path | None = None   # where the tiny pair is built (a finished build is reused)
    work: Path | None = None       # scratch: the profile's cache
    grid: list = field(default_factory=list)   # verify_time's cells, for the second table and the JSON
    _pair: object = None
    _big: object = None
    _static: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def contexts(self) -> tuple:
        return ((512, 8192) if self.quick else (512, 2048, 8192)) if self.cuda else (64, 128)

    @property
    def ns(self) -> tuple:
        """Tokens in one verification pass (the root and n - 1 tree nodes); also the static path's buckets."""
        return ((1, 4, 16, 64) if self.quick else (1, 2, 4, 8, 16, 32, 64)) if self.cuda else (1, 2, 4, 8, 16)

    @property
    def reps(self) -> int:
        return 3 if self.quick else 5

    @property
    def prompts(self) -> list[str]:
        return PROMPTS[:3] if self.quick else PROMPTS

    @property
    def pair(self):
        if self._pair is None:
            from duo.testing import build_tiny_pair
            self._pair = build_tiny_pair(self.pair_dir, arch="qwen2")
        return self._pair

    @property
    def big(self):
        """The random-weight target: Qwen2.5-7B's config in bf16 on a GPU, a tiny config on the CPU."""
        if self._big is None:
            self._big = random_target(SEVEN_B if self.cuda else TINY, self.device, torch.bfloat16)
        return self._big

    def static(self, tm, key: str):
        """The static-cache target over tm (compiled per bucket when self.compile and key is "big"), built
        once per key: ImportError while duo.runtime.static_target is not there, and a failure to build or
        compile raised again on every later call (not compiled twice)."""
        if key not in self._static:
            t0 = time.perf_counter()
            try:
                from duo.runtime.static_target import StaticTarget
                st = StaticTarget(tm, max_cache_len=max(self.contexts) + max(self.ns) + 32, buckets=self.ns,
                                  compile=self.compile and key == "big")
                if self.compile and key == "big":
                    st.warm_up(progress=False)
                self._static[key] = (st, time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - kept, and raised to every stage that asks
                self._static[key] = (e, time.perf_counter() - t0)
        st = self._static[key][0]
        if isinstance(st, Exception):
            raise st
        return st

    def static_build_s(self, key: str) -> float:
        return self._static[key][1] if key in self._static else 0.0


def random_target(config: dict, device: torch.device, dtype: torch.dtype):
    """A Qwen2 of this shape with small random normal weights (transformers' init, seeded), built directly
    on the device, wrapped in a TargetModel the way load_target builds one (no tokenizer)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from duo.runtime.precision import footprint_bytes
    from duo.runtime.target import TargetModel

    cfg = Qwen2Config(**config)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    return TargetModel(model=model, tokenizer=None, device=device, dtype=dtype, vocab_size=cfg.vocab_size,
                       max_context=cfg.max_position_embeddings, eos_ids=frozenset(),
                       name=f"random {cfg.num_hidden_layers}-layer qwen2", precision=str(dtype).replace("torch.", ""),
                       footprint=footprint_bytes(model))


def tolerance(dtype: torch.dtype) -> float:
    """Max |difference| / max |reference logit| allowed between two ways of computing the same logits."""
    return 1e-3 if dtype == torch.float32 else 5e-2


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


# ------------------------------------------------------------------------------------------- trees
def binary_tree(n: int, vocab: int, seed: int) -> Tree:
    """n nodes, two children per node, two under the root (node k's parent: k // 2 - 1)."""
    rng = np.random.default_rng(seed)
    return Tree(rng.integers(1, vocab, n), [k // 2 - 1 for k in range(n)], np.ones(n))


def branch(tree: Tree, node: int) -> list[int]:
    """The nodes from the root down to `node`."""
    out = []
    while node >= 0:
        out.append(node)
        node = int(tree.parents[node])
    return out[::-1]


def leaves(tree: Tree) -> list[int]:
    kids = tree.children()
    return [k for k in range(len(tree)) if not kids[k + 1]]


@torch.inference_mode()
def causal_logits(model, seq: list[int], device) -> torch.Tensor:
    return model(input_ids=torch.tensor([seq], device=device)).logits[0].float()


@torch.inference_mode()
def expected_rows(model, committed: list[int], tree: Tree, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(what each row of a pass over [root] + tree must be: each branch run causally on its own; what a
    model ignoring the tree mask computes: the tree's tokens run as one chain)."""
    start = len(committed) - 1
    rows = [None] * (len(tree) + 1)
    for leaf in leaves(tree) or [None]:
        path = [] if leaf is None else branch(tree, leaf)
        ref = causal_logits(model, committed + [int(tree.tokens[k]) for k in path], device)[start:]
        for i, k in enumerate([-1] + path):
            rows[k + 1] = ref[i]
    chain = causal_logits(model, committed + [int(t) for t in tree.tokens], device)[start:]
    return torch.stack(rows), chain


@torch.inference_mode()
def tree_errors(target, model, vocab: int, device) -> tuple[float, float]:
    """Three rounds: a 15-node binary tree, compacted to a non-contiguous path; a 7-node tree, compacted
    again; a chain. Returns (max relative error of the passes against per-branch causal runs of `model`,
    the smallest error a wrong (causal) mask would have made: it must exceed the tolerance)."""
    rng = np.random.default_rng(7)
    committed = [int(t) for t in rng.integers(1, vocab, 6)]
    cache = target.new_cache()
    target.prefill(cache, committed[:-1])
    err, control = 0.0, float("inf")
    rounds = [(binary_tree(15, vocab, 1), [0, 2, 6, 14]), (binary_tree(7, vocab, 2), [1, 4]),
              (Tree.chain(rng.integers(1, vocab, 4)), [0, 1])]
    for tree, path in rounds:
        n_keep = len(committed)                 # prefix + root
        got = target.forward_tree(cache, committed[-1], tree).float()
        want, chain = expected_rows(model, committed, tree, device)
        err = max(err, relative(got, want))
        if len(set(tree.parents.tolist())) < len(tree):   # branched: the causal chain differs
            control = min(control, relative(chain, want))
        target.compact_cache(cache, n_keep, path)
        committed += [int(tree.tokens[k]) for k in path] + [int(rng.integers(1, vocab))]
        if target.cache_length(cache) != len(committed) - 1:
            raise AssertionError(f"compaction left {target.cache_length(cache)} entries, not {len(committed) - 1}")
    return err, control


def trees(s: Setup) -> Outcome:
    """tree_errors on the tiny pair's target in fp32 and the random 7B-config target in bf16, eager and (when
    duo.runtime.static_target is there) on the static path."""
    from duo.runtime.target import load_target

    tiny = load_target(s.pair.target_hf_dir, device=str(s.device), dtype="float32", progress=False)
    cases = [("tiny", tiny), ("7B-config" if s.cuda else "tiny-config", s.big)]
    results, ok, missing = [], True, ""
    for key, tm in cases:
        targets = [("eager", tm)]
        try:
            targets.append(("compiled" if s.compile and key != "tiny" else "static", s.static(tm, key)))
        except ImportError as e:   # stage 5 FAILs for it
            missing = f"; static path not built ({e})"
        except Exception as e:  # noqa: BLE001 - building or compiling the static path failed
            ok, missing = False, f"; static path FAILED: {type(e).__name__}: {str(e).strip()[:160]}"
        for path, target in targets:
            err, control = tree_errors(target, tm.model, tm.vocab_size, s.device)
            tol = tolerance(tm.dtype)
            ok = ok and err <= tol < control
            results.append(dict(model=key, dtype=tm.precision, path=path, error=err, wrong_mask=control, tol=tol))
    result = ", ".join(f"{r['model']} {SHORT[r['dtype']]} {r['path']} {r['error']:.1e}" for r in results)
    figure = ("error / max |logit| against per-branch causal runs; tol 1e-3 fp32, 5e-2 bf16; a wrong mask: "
              + ", ".join(f"{r['wrong_mask']:.2g}" for r in results) + missing)
    return Outcome(result, figure, ok, dict(cases=results))


# ------------------------------------------------------------------------------------------- exactness
@torch.inference_mode()
def reference_greedy(tm, ids: list[int], max_new: int) -> tuple[list[int], list[torch.Tensor]]:
    """The target alone, one token at a time (transformers generate), with each step's logits."""
    x = torch.tensor([ids], device=tm.device)
    out = tm.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                            eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(ids):].tolist()
    cut = next((i + 1 for i, t in enumerate(tokens) if t in tm.eos_ids), len(tokens))
    return tokens[:cut], [lg[0].float() for lg in out.logits]


@torch.inference_mode()
def batch_noise(tm, ids: list[int], ref: list[int], logits: list[torch.Tensor]) -> float:
    """max |one-token step logits - one batched pass's| over the same positions (tests/test_precision.py)."""
    batched = causal_logits(tm.model, ids + ref[:-1], tm.device)[len(ids) - 1:]
    steps = torch.stack(logits[:batched.shape[0]])
    return float((batched[:len(steps)] - steps).abs().max())


def divergence(got: list[int], ref: list[int], logits: list[torch.Tensor], bound: float) -> tuple | None:
    """None if got == ref, else (position, the reference's top-2 gap there, near-tie: gap < bound and got's
    token one of the two)."""
    if got == ref:
        return None
    k = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    if k >= len(got) or k >= len(ref):
        return k, float("nan"), False       # one stops early without a different token: never a near-tie
    top = torch.topk(logits[k], 2)
    gap = float(top.values[0] - top.values[1])
    return k, gap, gap < bound and rank_of(logits[k], got[k]) <= 2


def exact_runs(s: Setup, dtype: str) -> list[dict]:
    """One Engine on the tiny pair, each prompt in each mode: greedy output against the same target alone."""
    from duo import Engine

    pair = s.pair
    with Engine(str(pair.target_hf_dir), str(pair.draft_gguf), device=str(s.device), dtype=dtype, mode="overlap",
                budget=8, shape="dynamic", progress=False, profile="off") as e:
        tm = e.target
        refs = []
        for p in s.prompts:
            ids = e.encode(p)
            refs.append((ids, *reference_greedy(tm, ids, MAX_NEW)))
        noise = max(batch_noise(tm, ids, ref, lg) for ids, ref, lg in refs)
        bound = NEAR_TIE if tm.precision == "float32" else max(NEAR_TIE, 2 * noise)
        runs = []
        for mode in ("sequential", "overlap"):
            out = dict(dtype=dtype, mode=mode, verify=getattr(tm, "verify", "eager"), prompts=len(refs), equal=0,
                       near_ties=[], diverged=[], bound=bound, noise=noise, drafted=0, accepted=0, fallbacks=0)
            for ids, ref, logits in refs:
                res = e.generate(ids, max_new_tokens=MAX_NEW, mode=mode)
                d = divergence(res.token_ids, ref, logits, bound)
                if d is None:
                    out["equal"] += 1
                else:
                    out["near_ties" if d[2] else "diverged"].append(dict(position=d[0], gap=d[1]))
                out["drafted"] += res.stats["drafted"]
                out["accepted"] += res.stats["accepted"]
                out["fallbacks"] += res.stats["fallback"] is not None
            runs.append(out)
    return runs


def exactness(s: Setup) -> Outcome:
    runs = exact_runs(s, "float32") + exact_runs(s, "bfloat16")
    ok = all(not r["diverged"] and r["accepted"] > 0 and not r["fallbacks"] for r in runs)
    result = "; ".join(f"{SHORT[r['dtype']]} {r['mode']} {r['equal']}/{r['prompts']} equal"
                       + (f", {len(r['near_ties'])} near-tie" if r["near_ties"] else "")
                       + (f", {len(r['diverged'])} DIVERGED" if r["diverged"] else "") for r in runs)
    gaps = [f"{d['gap']:.2g}" for r in runs for d in r["near_ties"] + r["diverged"]]
    bf16 = max(r["bound"] for r in runs if r["dtype"] == "bfloat16")
    figure = (f"verify {runs[-1]['verify']}; bf16 near-tie bound {bf16:.2g} (2x measured batch noise); accepted "
              f"{sum(r['accepted'] for r in runs)}/{sum(r['drafted'] for r in runs)}"
              + (f"; gaps where they part: {', '.join(gaps)}" if gaps else ""))
    return Outcome(result, figure, ok, dict(runs=runs))


# ------------------------------------------------------------------------------------------- verify time
def median_ms(fn, s: Setup) -> float:
    """Median ms of fn() after one warm-up call: CUDA events on a GPU, the wall clock on the CPU."""
    fn()
    times = []
    for _ in range(s.reps):
        if s.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def time_grid(target, name: str, s: Setup, tokens: list[int], vocab: int, outs: dict) -> None:
    """Append (path, context, n, ms) cells to s.grid; each pass's logits into outs[(name, context, n)]."""
    cache = target.new_cache()
    trees = {n: binary_tree(n - 1, vocab, n) for n in s.ns}
    for ctx in s.contexts:
        target.prefill(cache, tokens[target.cache_length(cache):ctx])
        for n in s.ns:
            def one_pass():   # forward + compaction back to the context (as a round that rejects all)
                outs[(name, ctx, n)] = target.forward_tree(cache, tokens[ctx], trees[n])
                target.compact_cache(cache, ctx, [])
            s.grid.append(dict(path=name, context=ctx, n=n, ms=round(median_ms(one_pass, s), 3)))
            outs[(name, ctx, n)] = outs[(name, ctx, n)].float().clone()   # a CUDA graph reuses its output


def verify_time(s: Setup) -> Outcome:
    tm = s.big
    tokens = [int(t) for t in np.random.default_rng(3).integers(1, tm.vocab_size, max(s.contexts) + 1)]
    outs: dict = {}
    time_grid(tm, "eager", s, tokens, tm.vocab_size, outs)
    fast = "compiled" if s.compile else "static"
    try:
        st = s.static(tm, "big")
    except ImportError as e:
        s.grid += [dict(path=fast, context=c, n=n, ms=None) for c in s.contexts for n in s.ns]
        return Outcome(f"eager {span(s.grid, 'eager')}; {fast} n/a (not built)", str(e), False)
    time_grid(st, fast, s, tokens, tm.vocab_size, outs)
    diff = max(relative(outs[(fast, c, n)].float(), outs[("eager", c, n)].float()) for c in s.contexts for n in s.ns)
    mid = min(s.ns, key=lambda n: abs(n - 16))
    ratios = [cell(s.grid, "eager", c, mid) / cell(s.grid, fast, c, mid) for c in s.contexts]
    return Outcome(f"eager {span(s.grid, 'eager')}; {fast} {span(s.grid, fast)}",
                   f"eager/{fast} at n={mid}: " + " ".join(f"{r:.2f}x" for r in ratios)
                   + f"; build {s.static_build_s('big'):.0f} s; logits {diff:.1e} of max apart (tol {tolerance(tm.dtype):.0e})",
                   diff <= tolerance(tm.dtype), dict(logit_diff=diff))


def cell(grid: list, path: str, ctx: int, n: int) -> float:
    return next(c["ms"] for c in grid if (c["path"], c["context"], c["n"]) == (path, ctx, n))


def span(grid: list, path: str) -> str:
    ms = [c["ms"] for c in grid if c["path"] == path]
    return f"{min(ms):.1f}-{max(ms):.1f} ms"
