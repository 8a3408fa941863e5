"""The timed sides: the draft in a benchmark child process, the target's verification passes, both at once,
and the channel.

    DraftBencher     a spawned process with a llama.cpp context of `threads` threads pinned to its cores:
                     ms per decode step by batch width, or decoding one token at a time until told to stop
    draft_steps      a DraftBencher per thread count (on the last `threads` cores): the profile's `draft` rows
    target_threads   torch threads (and the cores the target keeps), for the duration
    TargetBencher    ms of one verification pass (forward_tree, argmax, accept, compaction) on a prefilled cache
    device_sync      wait for the target's device (a CUDA pass returns before it ran): before each clock reading
    interference     the slowdown of each side while the other runs, the target pinned as the overlap runs it
    channel_round_trip  DraftClient.ping round trips: the profile's `channel`

Module level imports stay light: the draft benchmark child process imports this module (no torch).
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import statistics
import time
from dataclasses import asdict

from .timing import BenchError, Settings, Timing, measure


# ------------------------------------------------------------------------------------------- draft
def _draft_child(conn, gguf: str, threads: int, cores, n_ctx: int, max_seqs: int) -> None:
    """Benchmark process: a llama.cpp context with `threads` threads pinned to `cores`."""
    try:
        if cores:
            os.sched_setaffinity(0, cores)
        from duo.runtime.drafter import DraftConfig, Drafter
        from duo.runtime.llama_probe import resolve_config
        d = Drafter(resolve_config(DraftConfig(gguf_path=gguf, n_threads=threads, cores=cores, n_ctx=n_ctx,
                                               max_seqs=max_seqs)))   # the llama.cpp configuration the worker runs
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
    from duo.runtime.drafter import run, sync
    from duo.runtime.tree_shapes import top_k

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
    from duo.runtime.tree_shapes import top_k

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
        from ..runtime.draft_client import _main_not_reimported
        from ..runtime.llama_probe import gpus_hidden

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_draft_child, args=(child, gguf, threads, cores, n_ctx, max_seqs),
                                name="duo-profile-draft", daemon=True)
        with _main_not_reimported(), gpus_hidden():   # llama.cpp in the child sees no GPU, as in the worker
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


def draft_steps(draft_gguf, threads: list[int], cores: list[int], tokens: list[int], s: Settings, bar,
                then=None) -> list[dict]:
    """ms per decode step by batch width (`s.widths`), with `s.draft_context` of `tokens` in the cache, for each
    thread count in `threads` (a DraftBencher on the last `d` of `cores`): the `draft` rows {threads, width, ms, ...}.
    then(bencher, d, {width: Timing}), if given, runs while that bencher is still up (the interference)."""
    rows: list[dict] = []
    for d in threads:
        bar.set_description(f"draft steps, {d} thread{'s' * (d > 1)}")
        with DraftBencher(str(draft_gguf), d, cores[-d:], n_ctx=max(1024, s.draft_context + 256)) as db:
            res = db.bench(tokens[:s.draft_context], s.widths, s.draft_steps, s.min_reps, s.max_reps, s.tol)
            rows += [tmg.row(threads=d, width=w) for w, tmg in res.items()]
            bar.update(1)
            if then is not None:
                then(db, d, res)
    return rows


# ------------------------------------------------------------------------------------------- target
def device_sync(device) -> None:
    """Wait until `device` has run what was queued on it (CUDA kernels run asynchronously: without this a
    clock reads launches, not work); a no-op on the CPU. The device is named: a bare synchronize() waits for
    the current device, which is not the target's on cuda:1."""
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def target_threads(threads: int, cores: list[int] | None):
    """torch threads and (None: unpinned) the cores the target keeps, for the duration."""
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
    """Verification passes of `tm` (a torch target: duo.runtime.target.TargetModel, through the Target interface
    of duo.runtime.target_interface) on prefilled caches (one per context length)."""

    def __init__(self, tm, tokens: list[int]):
        self.tm, self.tokens, self.caches = tm, tokens, {}

    def cache(self, context: int):
        if context not in self.caches:
            c = self.tm.new_cache()
            self.tm.prefill(c, self.tokens[:context])
            device_sync(self.tm.device)   # the prefill done before any pass is timed
            self.caches[context] = c
        return self.caches[context]

    def drop(self, context: int) -> None:
        """Free the cache of `context` (a long one, measured: its memory serves the next)."""
        self.caches.pop(context, None)

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
        from ..runtime.tree import accept_path

        tm, cache = self.tm, self.cache(context)
        n_past = tm.cache_length(cache)
        device_sync(tm.device)
        t0 = time.perf_counter()
        logits = tm.forward_tree(cache, self.tokens[context], tree)
        choices = logits.argmax(dim=-1).cpu().numpy()
        path, _ = accept_path(tree, choices)
        tm.compact_cache(cache, n_past + 1, path)
        device_sync(tm.device)
        ms = (time.perf_counter() - t0) * 1000
        tm.compact_cache(cache, n_past, [])
        return ms

    def measure(self, context: int, n: int, s: Settings, branches: int = 1) -> Timing:
        tree = self.tree(context, n, branches)
        return measure(lambda: self.once(context, tree), s.min_reps, s.max_reps, s.tol)


# ------------------------------------------------------------------------------------------- both at once
def interference(tb: TargetBencher, db: DraftBencher, d: int, n: int, cores, gpu: bool, main_t: int,
                 alone: dict, draft_alone_ms: float, tokens, s: Settings) -> dict:
    """Slowdown of each side while the other runs: the draft on cores[-d:], the target pinned to the rest, as
    the overlap schedule runs them (duo.profiler.plans.plan_from_choice; on a GPU too, with its own threads).

    alone: {(context, target threads, n): ms} of the passes measured alone."""
    c0 = s.contexts[0]
    t = main_t if gpu else n - d
    ks = [k for k in (1, 16) if (c0, t, k) in alone]
    db.spin(tokens[:64])
    time.sleep(0.05)
    t0 = time.monotonic()
    ratios = []
    with target_threads(t, cores[:n - d] or None):
        for k in ks:
            tree = tb.tree(c0, k)
            tmg = measure(lambda: tb.once(c0, tree), s.min_reps, s.max_reps, s.tol)
            ratios.append(tmg.ms / alone[(c0, t, k)])
    t1 = time.monotonic()
    samples = [ms for at, ms in db.stop_spin() if t0 <= at <= t1]
    draft_ms = statistics.median(samples) if samples else draft_alone_ms
    return dict(draft_threads=d, target_threads=t, draft_factor=round(max(1.0, draft_ms / draft_alone_ms), 4),
                target_factor=round(max(1.0, statistics.mean(ratios)) if ratios else 1.0, 4),
                draft_ms=round(draft_ms, 4), draft_alone_ms=round(draft_alone_ms, 4), steps=len(samples))


# ------------------------------------------------------------------------------------------- channel
def channel_round_trip(client, reps: int) -> dict:
    """`reps` DraftClient.ping round trips (after 3 untimed ones): {ms, min_ms, max_ms, reps}."""
    for _ in range(3):
        client.ping()
    rtts = [client.ping() * 1000 for _ in range(reps)]
    return dict(ms=round(statistics.median(rtts), 4), min_ms=round(min(rtts), 4), max_ms=round(max(rtts), 4),
                reps=len(rtts))
