"""The draft worker process: answers START / TREE / PING / STOP requests on the shared-memory channel.

    START(prompt)      prefill prompt[:-1] (reusing any KV prefix still held); overlap: draft ahead the first tree
    TREE(delta, spec)  commit delta, draft the tree ``spec`` asks for after the root (or hand over the one
                       drafted ahead, if it guessed the delta right); spec.budget 0: only keep up
    ADAPTER(path)      apply a llama.cpp LoRA adapter (an empty path: remove it); the KV cache is cleared
    PING / STOP        a round trip / the end

Overlap (PEARL-style): after answering, the worker drafts the *next* tree ahead, assuming the target
accepts the top path and its bonus token is the draft's own top prediction; a request that arrives
meanwhile interrupts it at the next llama_decode. Counters live in the channel's ctrl block (DraftStats).
"""
from __future__ import annotations

import os
import signal
import time
import traceback
from dataclasses import dataclass

import numpy as np

from ..plan import TreeSpec
from . import channel as ch
from .channel import Channel
from .drafter import DraftConfig, Drafter, LlamaError, run, sync
from .llama_probe import DraftUnusable, resolve_config
from .tree import Tree
from .tree_shapes import SHAPES


def draft_tree(d: Drafter, committed: list[int], spec: TreeSpec):
    """Sync seq 0 to ``committed``, then draft ``spec``'s tree after its last token (generator)."""
    root = yield from sync(d, committed)
    if spec.budget == 0:
        return Tree.empty()
    return (yield from SHAPES[spec.shape](d, root, len(committed), spec.budget, spec.width))


@dataclass
class Prep:
    """A tree drafted ahead for the predicted next request."""
    spec: TreeSpec                  # the tree it drafts
    gen: object
    delta: list[int] | None = None  # predicted delta: top path + predicted bonus, once known
    path: list[int] | None = None   # the top path's tokens (known before the bonus)
    tree: Tree | None = None        # set when drafting finished

    def step(self) -> None:
        try:
            next(self.gen)
        except StopIteration as stop:
            self.tree = stop.value


def draft_ahead(d: Drafter, committed: list[int], spec: TreeSpec, prep: Prep):
    """PEARL-style: assume the target accepts the top path and its bonus token is the draft's own
    top prediction after the leaf; draft the next tree from there."""
    path = prep.path
    logits = yield from sync(d, committed + path)  # decodes (at least) the leaf
    bonus = int(np.argmax(logits))
    prep.delta = path + [bonus]
    return (yield from draft_tree(d, committed + prep.delta, spec))


def _parent_gone(parent_pid: int) -> bool:
    return os.getppid() != parent_pid


class Worker:
    """The request loop of one worker process; ``c`` is the channel's ctrl block (its counters included)."""

    def __init__(self, chan: Channel, d: Drafter, parent_pid: int):
        self.chan, self.d, self.parent_pid = chan, d, parent_pid
        self.c = chan.ctrl
        self.committed: list[int] = []
        self.overlap = False
        self.prep: Prep | None = None
        self.pending = False  # a request was taken off the semaphore while drafting ahead

    def loop(self) -> None:
        while True:
            if not self.pending:
                if self.prep is not None and self.prep.tree is None:
                    if not self.step_ahead():
                        return
                    continue
                t0 = time.perf_counter_ns()
                got = self.chan.req.acquire(timeout=0.5)
                self.c[ch.IDLE_NS] += time.perf_counter_ns() - t0
                if not got:
                    if _parent_gone(self.parent_pid):
                        return
                    continue
            self.pending = False
            t0 = time.perf_counter_ns()
            req = self.chan.read_request()
            stop = self.handle(req, t0)
            if stop:
                return

    def step_ahead(self) -> bool:
        """Draft ahead until a request arrives or the prepared tree is done. False: parent gone."""
        t0 = time.perf_counter_ns()
        prep = self.prep
        try:
            while True:
                if _parent_gone(self.parent_pid):
                    return False
                if self.chan.req.acquire(block=False):
                    self.pending = True
                    break
                prep.step()
                if prep.tree is not None:
                    break
        except Exception:
            self.prep = None  # e.g. context full: draft on request instead
        finally:
            self.c[ch.BUSY_NS] += time.perf_counter_ns() - t0
        return True

    def reply(self, t0: int) -> None:
        """Wake the target; the request's time (from t0) counted as busy first, so the stats it reads are whole."""
        self.c[ch.BUSY_NS] += time.perf_counter_ns() - t0
        self.chan.resp.release()

    def handle(self, req: ch.Request, t0: int) -> bool:
        chan = self.chan
        if req.cmd in (ch.CMD_STOP, ch.CMD_PING):
            chan.write_status(req.round, ch.STATUS_OK)
            self.reply(t0)
            return req.cmd == ch.CMD_STOP
        try:
            if req.cmd == ch.CMD_ADAPTER:      # its tokens are bytes of a path, not token ids
                self.prep, self.committed = None, []
                self.d.set_adapter(bytes(req.tokens).decode("utf-8") if req.tokens else None)
                chan.write_status(req.round, ch.STATUS_OK)
                self.reply(t0)
                return False
            if req.tokens and (min(req.tokens) < 0 or max(req.tokens) >= self.d.n_vocab):
                raise LlamaError("token id out of range", ch.ERR_BAD_REQUEST)
            if req.spec.shape not in SHAPES:
                raise LlamaError(f"unknown tree shape {req.spec.shape!r}", ch.ERR_BAD_REQUEST)
            if req.cmd == ch.CMD_START:
                self.start(req.tokens, bool(req.flags & ch.FLAG_OVERLAP), req.spec)
                chan.write_status(req.round, ch.STATUS_OK)
            elif req.cmd == ch.CMD_TREE:
                tree = self.tree(req.tokens, req.spec)
                chan.write_tree(req.round, tree)
                if self.d.fault is not None:
                    self.d.fault.corrupt_reply(chan, req.round, len(tree))
                if self.overlap and req.spec.budget > 0:
                    self.prep = Prep(req.spec, None, path=[int(tree.tokens[i]) for i in tree.top_path()])
                    self.prep.gen = draft_ahead(self.d, list(self.committed), req.spec, self.prep)
            else:
                raise LlamaError(f"unknown command {req.cmd}", ch.ERR_BAD_REQUEST)
        except Exception as e:
            self.prep = None
            self.d.reset()  # the mirror may be off: recompute from the committed tokens next time
            code = e.code if isinstance(e, LlamaError) else ch.ERR_INTERNAL
            chan.write_error(req.round, code, "".join(traceback.format_exception_only(e)).strip()
                             if isinstance(e, LlamaError) else traceback.format_exc())
        self.reply(t0)
        return False

    def start(self, prompt: list[int], overlap: bool, spec: TreeSpec) -> None:
        self.prep = None
        if len(prompt) + 1 > self.d.n_ctx:
            raise LlamaError(f"prompt of {len(prompt)} tokens does not fit n_ctx={self.d.n_ctx}", ch.ERR_CTX_FULL)
        self.committed = list(prompt)
        self.overlap = overlap
        run(sync(self.d, self.committed[:-1], need_logits=False))  # reuses any prefix still in the cache
        if overlap and spec.budget > 0:   # the target emits its first token from its prefill: guess it, draft after it
            self.prep = Prep(spec, None, path=[])
            self.prep.gen = draft_ahead(self.d, list(self.committed), spec, self.prep)

    def tree(self, delta: list[int], spec: TreeSpec) -> Tree:
        self.c[ch.N_REQUESTS] += 1
        if not self.committed:
            raise LlamaError("TREE before START", ch.ERR_BAD_REQUEST)
        room = self.d.n_ctx - len(self.committed) - len(delta) - 1  # KV cells left after the root
        if room < 0:
            raise LlamaError(f"context full ({len(self.committed) + len(delta)} committed, n_ctx={self.d.n_ctx})",
                             ch.ERR_CTX_FULL)
        if spec.budget * spec.cells_per_node > room:  # near the end of the context: a smaller tree, not an error
            spec = spec.replace(budget=room // spec.cells_per_node)
        self.committed.extend(delta)
        prep, self.prep = self.prep, None
        if prep is not None and prep.delta is None and prep.spec == spec and delta[:-1] == prep.path:
            while prep.delta is None and prep.tree is None:  # the request beat the bonus prediction
                prep.step()
        if prep is not None and prep.spec == spec and prep.delta == delta:
            self.c[ch.HITS] += 1
            return prep.tree if prep.tree is not None else run(prep.gen)
        if prep is not None:
            self.c[ch.MISSES] += 1
            prep.gen.close()
        return run(draft_tree(self.d, list(self.committed), spec))


def worker_main(spec: ch.ChannelSpec, cfg: DraftConfig, parent_pid: int) -> None:
    """Entry point of the spawned draft process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the target's business; it stops us
    chan = Channel.attach(spec)
    d = None
    try:
        try:
            if cfg.cores:
                os.sched_setaffinity(0, cfg.cores)
            d = Drafter(resolve_config(cfg))   # the llama.cpp configuration that runs on this CPU (probed once)
            if cfg.fault:   # tests only
                from ..testing.faults import Fault
                d.fault = Fault(cfg.fault)
            d.counters = chan.ctrl
        except Exception as e:
            msg = str(e) if isinstance(e, (LlamaError, DraftUnusable)) else traceback.format_exc()
            chan.write_error(0, ch.ERR_LOAD, msg)
            chan.resp.release()
            return
        chan.ctrl[ch.N_VOCAB], chan.ctrl[ch.WORKER_PID] = d.n_vocab, os.getpid()
        chan.write_status(0, ch.STATUS_READY)
        chan.resp.release()
        Worker(chan, d, parent_pid).loop()
    finally:
        if d is not None:
            d.counters = None  # drop the view before the channel unmaps
            d.close()
        chan.close()
