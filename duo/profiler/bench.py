"""Micro-benchmarks: draft decode steps, target verification passes, the channel, and acceptance.

Each timing is repeated until stable (median, min, max over the repetitions):

* draft: ms per llama.cpp decode step by thread count and batch width (1, 2, 4 sequences), in a
  spawned process pinned to the cores the worker would get (the last `threads` cores);
* target: ms of one verification pass over n = 1, 2, 4 ... 64 new tokens (forward_tree over a chain on
  a prefilled cache, argmax and cache compaction included) at a couple of context lengths and at the
  thread counts the schedules use; plus the extra cost of a branched tree mask;
* interference: both at once (draft process spinning on its cores, target on the others), the
  slowdown of each side, as the overlap schedule would see it;
* channel: DraftClient.ping round trip;
* acceptance: duo's own decoding (sequential, no prompt lookup) with a chain and with the dynamic tree
  on calibration prompts; every verified node whose parent was accepted is one trial, giving the
  acceptance hazard by depth and the share of paths through each root branch rank.

Module level imports stay light: the benchmark child process imports this module.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..models import CONFIG_DIR

CALIBRATION_PROMPTS = CONFIG_DIR / "calibration_prompts.jsonl"


class BenchError(RuntimeError):
    """A benchmark could not run (model failed to load, worker died)."""


# ------------------------------------------------------------------------------------------- timing
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


# ------------------------------------------------------------------------------------------- settings
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


# ------------------------------------------------------------------------------------------- prompts
def load_prompts(path: str | Path | None = None) -> list[dict]:
    """Calibration prompts: JSONL, one object per line with "messages" (chat) or "prompt" (text)."""
    path = Path(path) if path else CALIBRATION_PROMPTS
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise BenchError(f"cannot read prompts {path}: {e.strerror}") from e
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            msgs = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BenchError(f"{path} line {i + 1}: need a JSON object with \"prompt\" or \"messages\"") from e
        out.append({"id": str(r.get("id", i)), "category": r.get("category", ""), "messages": msgs})
    if not out:
        raise BenchError(f"{path} has no prompts")
    return out


def encode_prompts(tokenizer, prompts: list[dict]) -> list[list[int]]:
    from ..engine import encode_chat, encode_plain

    if getattr(tokenizer, "chat_template", None):
        return [encode_chat(tokenizer, p["messages"]) for p in prompts]
    return [encode_plain(tokenizer, "\n".join(m["content"] for m in p["messages"])) for p in prompts]


def filler(prompt_ids: list[list[int]], n: int) -> list[int]:
    """n realistic token ids: the prompts concatenated and repeated."""
    flat = [t for ids in prompt_ids for t in ids] or [0]
    return (flat * (n // len(flat) + 1))[:n]


# ------------------------------------------------------------------------------------------- draft
def _draft_child(conn, gguf: str, threads: int, cores, n_ctx: int, max_seqs: int) -> None:
    """Benchmark process: a llama.cpp context with `threads` threads pinned to `cores`."""
    try:
        if cores:
            os.sched_setaffinity(0, cores)
        from duo.runtime.draft_worker import DraftConfig, Drafter
        d = Drafter(DraftConfig(gguf_path=gguf, n_threads=threads, cores=cores, n_ctx=n_ctx, max_seqs=max_seqs))
    except BaseException as e:  # noqa: BLE001 - report, then exit
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", d.n_vocab))
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "bench":
                conn.send(("ok", _child_bench(d, *msg[1:])))
            elif msg[0] == "spin":
                conn.send(("ok", _child_spin(d, conn, msg[1])))
            else:
                break
    except EOFError:
        pass
    finally:
        d.close()


def _child_bench(d, tokens, widths, steps, min_reps, max_reps, tol) -> dict:
    from duo.runtime.draft_worker import run, sync, top_k

    d.reset()
    run(sync(d, list(tokens), need_logits=True))
    n0 = len(d.seqs[0])
    out = {}
    for w in widths:
        def one(w=w):
            for s in range(1, w):
                d.fork(0, s, n0)
            t0 = time.perf_counter()
            for k in range(steps):
                d.decode([(tokens[(k * 7 + s) % len(tokens)], s) for s in range(w)])
                for row in range(w):
                    top_k(d.logits(row), 1)
            ms = (time.perf_counter() - t0) * 1000 / steps
            d.cut(0, n0)
            for s in range(1, w):
                d.drop(s)
            return ms
        out[w] = asdict(measure(one, min_reps, max_reps, tol))
    return out


def _child_spin(d, conn, tokens) -> list:
    """Decode one token at a time until told to stop; (monotonic end time, ms) per step."""
    from duo.runtime.draft_worker import top_k

    n0 = len(d.seqs[0])
    samples, k = [], 0
    while not conn.poll():
        t0 = time.perf_counter()
        d.decode([(tokens[k % len(tokens)], 0)])
        top_k(d.logits(0), 1)
        samples.append((time.monotonic(), (time.perf_counter() - t0) * 1000))
        k += 1
        if len(d.seqs[0]) > n0 + 64:
            d.cut(0, n0)
    conn.recv()
    return samples


class DraftBencher:
    """A benchmark child process for one thread count."""

    def __init__(self, gguf: str, threads: int, cores: list[int] | None, n_ctx: int = 1024, max_seqs: int = 8,
                 timeout: float = 180.0):
        from ..runtime.draft_worker import _main_not_reimported

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_draft_child, args=(child, gguf, threads, cores, n_ctx, max_seqs),
                                name="duo-profile-draft", daemon=True)
        with _main_not_reimported():
            self.proc.start()
        child.close()
        self.threads = threads
        self._recv(timeout)

    def _recv(self, timeout: float):
        if not self.conn.poll(timeout):
            self.close()
            raise BenchError(f"draft benchmark process gave no answer within {timeout:.0f} s")
        try:
            kind, value = self.conn.recv()
        except EOFError:
            self.close()
            raise BenchError(f"draft benchmark process died (exit code {self.proc.exitcode})") from None
        if kind == "error":
            self.close()
            raise BenchError(f"draft benchmark process failed: {value}")
        return value

    def bench(self, tokens, widths, steps, min_reps, max_reps, tol) -> dict[int, Timing]:
        self.conn.send(("bench", list(tokens), list(widths), steps, min_reps, max_reps, tol))
        return {int(w): Timing(**t) for w, t in self._recv(600).items()}

    def spin(self, tokens) -> None:
        self.conn.send(("spin", list(tokens)))

    def stop_spin(self) -> list[tuple[float, float]]:
        self.conn.send(("stop",))
        return self._recv(60)

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError, BrokenPipeError):
                self.conn.send(("close",))
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------- target
@contextlib.contextmanager
def target_threads(threads: int, cores: list[int] | None):
    """torch threads and (on a CPU schedule) the cores the target keeps, for the duration."""
    import torch

    saved_t = torch.get_num_threads()
    saved_aff = os.sched_getaffinity(0) if cores else None
    torch.set_num_threads(threads)
    if cores:
        os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        torch.set_num_threads(saved_t)
        if saved_aff:
            os.sched_setaffinity(0, saved_aff)


class TargetBencher:
    """Verification passes of `tm` on prefilled caches (one per context length)."""

    def __init__(self, tm, tokens: list[int]):
        self.tm, self.tokens, self.caches = tm, tokens, {}

    def cache(self, context: int):
        from ..runtime.target import new_cache, prefill

        if context not in self.caches:
            c = new_cache()
            prefill(self.tm, c, self.tokens[:context])
            self.caches[context] = c
        return self.caches[context]

    def tree(self, context: int, n: int, branches: int = 1):
        """n - 1 nodes after the root: a chain, or `branches` chains side by side."""
        import numpy as np

        from ..runtime.tree import Tree

        toks = self.tokens[context + 1:context + n]
        if branches <= 1 or n - 1 < 2:
            return Tree.chain(toks)
        lengths = [len(a) for a in np.array_split(np.arange(n - 1), min(branches, n - 1))]
        parents, i = [], 0
        for L in lengths:
            parents += [-1] + list(range(i, i + L - 1))
            i += L
        return Tree(toks, parents, np.ones(n - 1, np.float32))

    def once(self, context: int, tree) -> float:
        """ms of one verification: forward, argmax, compaction (the cache is restored afterwards, untimed)."""
        import torch

        from ..runtime.target import accept_path, cache_length, compact_cache, forward_tree

        cache = self.cache(context)
        n_past = cache_length(cache)
        sync = torch.cuda.synchronize if self.tm.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        logits = forward_tree(self.tm, cache, self.tokens[context], tree)
        choices = logits.argmax(dim=-1).cpu().numpy()
        path, _ = accept_path(tree, choices)
        compact_cache(cache, n_past + 1, path)
        sync()
        ms = (time.perf_counter() - t0) * 1000
        compact_cache(cache, n_past, [])
        return ms

    def measure(self, context: int, n: int, s: Settings, branches: int = 1) -> Timing:
        tree = self.tree(context, n, branches)
        return measure(lambda: self.once(context, tree), s.min_reps, s.max_reps, s.tol)


# ------------------------------------------------------------------------------------------- acceptance
class Recorder:
    """Stands in for the DraftClient in generate_tokens and keeps every tree it hands out."""

    def __init__(self, client):
        self.client = client
        self.trees: list = []
        self.draft_s = 0.0

    @property
    def stats(self):
        return self.client.stats

    def start(self, *args, **kw):
        return self.client.start(*args, **kw)

    def request_tree(self, delta, budget, width, timeout, shape="dynamic"):
        t0 = time.perf_counter()
        tree = self.client.request_tree(delta, budget, width, timeout, shape)
        self.draft_s += time.perf_counter() - t0
        self.trees.append(tree)
        return tree


@dataclass
class AcceptanceCounts:
    """Trials: a node whose parent (or the root) was accepted, so the target judged it."""
    tested: dict = field(default_factory=dict)        # depth -> greedy (rank 0) nodes judged
    accepted: dict = field(default_factory=dict)      # depth -> of which accepted
    rank_seen: dict = field(default_factory=dict)     # root branch rank -> rounds where it existed
    rank_accepted: dict = field(default_factory=dict)  # root branch rank -> rounds whose path went through it
    tree_rounds: int = 0                               # rounds of the dynamic-tree runs
    rounds: int = 0

    def add_round(self, tree, new: list[int], is_tree: bool) -> None:
        """`tree` as verified, `new` = the committed tokens of that round (path + bonus)."""
        kids = tree.children()
        depth = tree.depths()
        path, cur = [], -1
        for tok in new:
            nxt = next((c for c in kids[cur + 1] if int(tree.tokens[c]) == int(tok)), None)
            if nxt is None:
                break
            path.append(nxt)
            cur = nxt
        on_path = set(path)
        self.rounds += 1
        self.tree_rounds += is_tree
        for p in [-1] + path:
            ranked = sorted(kids[p + 1], key=lambda c: (-float(tree.probs[c]), c))
            for r, c in enumerate(ranked):
                ok = c in on_path
                if r == 0:
                    d = int(depth[c])
                    self.tested[d] = self.tested.get(d, 0) + 1
                    self.accepted[d] = self.accepted.get(d, 0) + ok
                if p == -1 and is_tree:
                    self.rank_seen[r] = self.rank_seen.get(r, 0) + 1
                    self.rank_accepted[r] = self.rank_accepted.get(r, 0) + ok

    def hazards(self, prior_weight: float = 2.0) -> tuple[list[float], float]:
        """h(d) = (accepted + w * pooled) / (tested + w), pooled = all depths >= 2; and the tail hazard."""
        if not self.tested:
            return [], 0.0
        deep_t = sum(v for d, v in self.tested.items() if d >= 2)
        deep_a = sum(v for d, v in self.accepted.items() if d >= 2)
        all_t, all_a = sum(self.tested.values()), sum(self.accepted.values())
        pooled = deep_a / deep_t if deep_t else (all_a / all_t if all_t else 0.0)
        hz = []
        for d in range(1, max(self.tested) + 1):
            t, a = self.tested.get(d, 0), self.accepted.get(d, 0)
            hz.append((a + prior_weight * pooled) / (t + prior_weight))
        return hz, pooled

    def ranks(self, width: int) -> list[float]:
        n = max(self.tree_rounds, 1)
        return [self.rank_accepted.get(r, 0) / n for r in range(width)]


def run_acceptance(tm, client, prompt_ids: list[list[int]], s: Settings, seq_threads: int, tick=None) -> dict:
    """Decode every calibration prompt (sequential, lookup off) with a chain and a dynamic tree."""
    from ..runtime.decode import DecodeConfig, Stats, generate_tokens, prune_depth

    counts = AcceptanceCounts()
    runs = {}
    jobs = []
    for i, ids in enumerate(prompt_ids):
        shapes = ("chain", "tree") if s.both_shapes else (("chain", "tree")[i % 2],)
        jobs += [(ids, shape) for shape in shapes]
    for ids, shape in jobs:
        budget, width = (s.chain_budget, 1) if shape == "chain" else (s.tree_budget, s.tree_width)
        cfg = DecodeConfig(max_new_tokens=s.max_new_tokens, mode="sequential", budget=budget, width=width,
                           shape="chain" if shape == "chain" else "dynamic", lookup=False, draft_timeout_s=120.0,
                           pause_when_slower=False)   # every round speculates: each is a trial
        rec, stats, news = Recorder(client), Stats(), []
        with target_threads(seq_threads, None):
            for new in generate_tokens(tm, rec, ids, cfg, stats):
                news.append(new)
        if stats.fallback:
            raise BenchError(f"the draft worker failed during calibration: {stats.fallback}")
        done = len(news[0])   # the first token comes from the prefill, each later commit from one round's tree
        for k, (tree, new) in enumerate(zip(rec.trees, news[1:])):
            remaining = s.max_new_tokens - done
            done += len(new)
            if k == len(news) - 2 or any(t in tm.eos_ids for t in new):
                continue  # truncated by EOS or the token limit: not a clean trial
            verified = prune_depth(tree if tm.supports_tree else tree.top_chain(), remaining - 1)
            counts.add_round(verified, new, shape == "tree")
        r = runs.setdefault(shape, dict(budget=budget, width=width, prompts=0, rounds=0, tokens=0, decode_s=0.0,
                                        verify_s=0.0, draft_wait_s=0.0, other_s=0.0,
                                        accepted_per_position=[]))
        r["prompts"] += 1
        r["rounds"] += stats.rounds
        r["tokens"] += stats.new_tokens - 1       # the rounds' tokens (the first one is the prefill's)
        r["decode_s"] += stats.wall_s - stats.prefill_s
        r["verify_s"] += stats.verify_s
        r["draft_wait_s"] += stats.target_idle_s
        r["other_s"] += max(0.0, stats.wall_s - stats.prefill_s - stats.verify_s - stats.target_idle_s)
        app = r["accepted_per_position"]
        app += [0] * (len(stats.accepted_per_position) - len(app))
        for d, a in enumerate(stats.accepted_per_position):
            app[d] += a
        if tick:
            tick()
    for r in runs.values():
        n = max(r["rounds"], 1)
        r["tokens_per_round"] = r["tokens"] / n
        r["tokens_per_s"] = r["tokens"] / r["decode_s"] if r["decode_s"] > 0 else 0.0
        r["P_depth"] = [a / n for a in r["accepted_per_position"]]  # P(accepted depth >= d), this run
        for k in ("verify_s", "draft_wait_s", "other_s"):
            r[k.replace("_s", "_ms_per_round")] = 1000 * r[k] / n
    hz, tail = counts.hazards()
    return dict(hazard=hz, tail=tail, rank=counts.ranks(s.tree_width),
                tested=[counts.tested.get(d, 0) for d in range(1, len(hz) + 1)],
                accepted=[counts.accepted.get(d, 0) for d in range(1, len(hz) + 1)],
                rank_seen=[counts.rank_seen.get(r, 0) for r in range(s.tree_width)],
                rank_accepted=[counts.rank_accepted.get(r, 0) for r in range(s.tree_width)],
                rounds=counts.rounds, tree_rounds=counts.tree_rounds, prompts=len(prompt_ids),
                max_new_tokens=s.max_new_tokens, runs=runs)


# ------------------------------------------------------------------------------------------- all of it
def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, disable=not enabled, unit="step", leave=False,
                bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")


def run_benchmarks(tm, draft_gguf: str | Path, prompts: list[dict], s: Settings, progress: bool = True,
                   cores: list[int] | None = None) -> dict:
    """All measurements for the `measurements` section of a profile (see configs/profile-format.md)."""
    import torch

    from ..runtime.draft_worker import DraftClient, DraftConfig

    cores = sorted(cores or os.sched_getaffinity(0))
    n = len(cores)
    gpu = tm.device.type == "cuda"
    prompt_ids = encode_prompts(tm.tokenizer, prompts[:s.max_prompts] if s.max_prompts else prompts)
    tokens = filler(prompt_ids, max(s.contexts) + 70)
    d_threads = sorted(set(s.draft_threads or default_draft_threads(n)))
    d_threads = [t for t in d_threads if 1 <= t <= n] or [1]
    splits = overlap_splits(n, d_threads, gpu) if s.interference else []
    main_t = torch.get_num_threads() if gpu else n
    t_threads = [main_t] if gpu else sorted({n} | {n - d for d in overlap_splits(n, d_threads, gpu)}, reverse=True)
    seq_threads = n if gpu else main_t
    n_jobs = len(prompt_ids) * (2 if s.both_shapes else 1)
    grid = [(c, t, s.ns if (c == s.contexts[0] and t == main_t) else s.other_ns if c == s.contexts[0]
             else s.context_ns) for c in s.contexts for t in t_threads if c == s.contexts[0] or t == main_t]
    total = sum(len(g) for *_, g in grid) + 1 + len(d_threads) + len(splits) + 1 + n_jobs
    out: dict = dict(device=str(tm.device), gpu=gpu, cores=cores, n_cores=n, supports_tree=tm.supports_tree,
                     settings=asdict(s), draft=[], verify=[], interference=[])
    bar = _progress(total, progress)
    t_start = time.perf_counter()
    try:
        # 1. target verification passes
        tb = TargetBencher(tm, tokens)
        alone: dict = {}
        for c, t, ns in grid:
            bar.set_description(f"target forward ctx {c}, {t} thread{'s' * (t > 1)}")
            tb.cache(c)
            with target_threads(t, None if gpu or t == n else cores[:t]):
                v1 = None
                for k in ns:
                    tm_ = tb.measure(c, k, s)
                    alone[(c, t, k)] = tm_.ms
                    out["verify"].append(tm_.row(threads=t, context=c, n=k))
                    bar.update(1)
                    v1 = v1 or tm_.ms
                    if s.stop_ratio and k >= 16 and tm_.ms > s.stop_ratio * v1:
                        bar.update(len([x for x in ns if x > k]))
                        break
        c0 = s.contexts[0]
        k_tree = max([k for k in s.ns if k <= 16] or [s.ns[0]])
        bar.set_description("target tree mask")
        with target_threads(main_t, None):
            if k_tree >= 3 and tm.supports_tree:
                chain = tb.measure(c0, k_tree, s).ms
                tree = tb.measure(c0, k_tree, s, branches=4).ms
                out["tree_mask"] = dict(n=k_tree, chain_ms=round(chain, 4), tree_ms=round(tree, 4),
                                        factor=round(tree / chain, 4))
        bar.update(1)
        # 2. draft steps, and both sides at once
        for d in d_threads:
            bar.set_description(f"draft steps, {d} thread{'s' * (d > 1)}")
            with DraftBencher(str(draft_gguf), d, cores[-d:], n_ctx=max(1024, s.draft_context + 256)) as db:
                res = db.bench(tokens[:s.draft_context], s.widths, s.draft_steps, s.min_reps, s.max_reps, s.tol)
                for w, tmg in res.items():
                    out["draft"].append(tmg.row(threads=d, width=w))
                bar.update(1)
                if d in splits:
                    bar.set_description(f"interference, draft {d} / target {n - d if not gpu else main_t}")
                    out["interference"].append(_interference(tb, db, d, n, cores, gpu, main_t, alone, res[1].ms,
                                                             tokens, s))
                    bar.update(1)
        # 3. the channel, then acceptance by decoding the calibration prompts
        bar.set_description("channel round trip")
        longest = max(len(p) for p in prompt_ids) + s.max_new_tokens + max(s.chain_budget, s.tree_budget) + 8
        cfg = DraftConfig(gguf_path=str(draft_gguf), n_threads=min(n, 8), n_ctx=max(512, longest), max_nodes=64,
                          max_seqs=max(8, s.tree_width + 1))
        with DraftClient(cfg) as client:
            for _ in range(3):
                client.ping()
            rtts = [client.ping() * 1000 for _ in range(s.ping_reps)]
            out["channel"] = dict(ms=round(statistics.median(rtts), 4), min_ms=round(min(rtts), 4),
                                  max_ms=round(max(rtts), 4), reps=len(rtts))
            bar.update(1)
            bar.set_description("acceptance (decoding calibration prompts)")
            out["acceptance"] = run_acceptance(tm, client, prompt_ids, s, seq_threads, tick=lambda: bar.update(1))
            out["acceptance"]["draft_threads"] = cfg.n_threads
            out["acceptance"]["target_threads"] = seq_threads
    finally:
        bar.close()
    runs = out["acceptance"]["runs"].values()
    out["overhead_ms"] = round(sum(r["other_s"] for r in runs) * 1000 / max(1, sum(r["rounds"] for r in runs)), 4)
    out["wall_s"] = round(time.perf_counter() - t_start, 2)
    return out


def _interference(tb: TargetBencher, db: DraftBencher, d: int, n: int, cores, gpu: bool, main_t: int,
                  alone: dict, draft_alone_ms: float, tokens, s: Settings) -> dict:
    """Slowdown of each side while the other runs (draft on cores[-d:], target on the rest)."""
    c0 = tb_c0 = s.contexts[0]
    t = main_t if gpu else n - d
    ks = [k for k in (1, 16) if (c0, t, k) in alone]
    db.spin(tokens[:64])
    time.sleep(0.05)
    t0 = time.monotonic()
    ratios = []
    with target_threads(t, None if gpu else cores[:t]):
        for k in ks:
            tree = tb.tree(tb_c0, k)
            tmg = measure(lambda: tb.once(c0, tree), s.min_reps, s.max_reps, s.tol)
            ratios.append(tmg.ms / alone[(c0, t, k)])
    t1 = time.monotonic()
    samples = [ms for at, ms in db.stop_spin() if t0 <= at <= t1]
    draft_ms = statistics.median(samples) if samples else draft_alone_ms
    return dict(draft_threads=d, target_threads=t, draft_factor=round(max(1.0, draft_ms / draft_alone_ms), 4),
                target_factor=round(max(1.0, statistics.mean(ratios)) if ratios else 1.0, 4),
                draft_ms=round(draft_ms, 4), draft_alone_ms=round(draft_alone_ms, 4), steps=len(samples))
