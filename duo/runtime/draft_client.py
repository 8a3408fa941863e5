"""The target side's handle of the draft worker: spawn it, ask it for trees, stop it. It owns every resource.

    client = DraftClient(DraftConfig(gguf_path=...))   spawns the worker (draft_worker.worker_main), waits for READY
    client.start(prompt, overlap=...)                  a new generation; returns at once (the worker prefills)
    client.request_tree(delta, spec, timeout)          commit delta, get the next tree (DraftTimeout / DraftDied / DraftError)
    client.catch_up(delta, timeout)                    commit delta without asking for a tree, without waiting
    client.close()                                     STOP, then terminate / kill; the channel unlinked

One request is in flight at a time; a request that timed out stays owed and is drained before the next.
A watcher thread wakes any waiter when the worker process exits, so no wait polls.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection
import os
import sys
import threading
import time
import weakref
from dataclasses import replace

from ..plan import TreeSpec
from . import channel as ch
from .channel import Channel, DraftStats
from .draft_worker import worker_main
from .drafter import DraftConfig
from .llama_probe import gpus_hidden
from .tree import Tree

__all__ = ["DraftClient", "DraftConfig", "DraftStats", "DraftError", "DraftTimeout", "DraftDied"]


class DraftError(RuntimeError):
    """The draft worker reported an error (bad GGUF, llama.cpp failure, bad request)."""


class DraftTimeout(DraftError):
    """No tree within the timeout; the request stays outstanding and is drained later."""


class DraftDied(DraftError):
    """The worker process is gone."""


class DraftClient:
    """Target-side handle of the draft worker process."""

    def __init__(self, cfg: DraftConfig):
        if cfg.max_seqs < 1 or cfg.max_nodes < 1 or cfg.n_ctx < 8:
            raise ValueError("need max_seqs >= 1, max_nodes >= 1, n_ctx >= 8")
        self.cfg = cfg
        self._closed = True
        self._last_stats = DraftStats()
        self._launch()

    # ---------------------------------------------------------------- life cycle
    def _launch(self) -> None:
        self.adapter: str | None = None      # the LoRA adapter the worker applies (set_adapter); a new one has none
        ctx = mp.get_context("spawn")
        self._chan = Channel.create(self.cfg.n_ctx, self.cfg.max_nodes, ctx)
        self._proc = ctx.Process(target=worker_main, args=(self._chan.spec, self.cfg, os.getpid()),
                                 name="duo-draft", daemon=True)
        self._dead = threading.Event()
        self._round = 0
        self._outstanding = None          # round id of a request whose response we still owe a read
        self._unsent: list[int] = []      # delta of calls that failed before sending
        self._spec = TreeSpec()           # drafted ahead after START unless given (the last used)
        self._hung = [False]              # the last wait timed out on a live worker: kill it, don't ask
        self._closed = False
        try:
            with _main_not_reimported(), gpus_hidden():   # the worker sees no GPU (llama_probe.HIDDEN_GPUS)
                self._proc.start()
        except BaseException:
            self._chan.close()
            self._closed = True
            raise
        self._watcher = threading.Thread(target=_watch, args=(self._proc.sentinel, self._dead, self._chan.resp),
                                         name="duo-draft-watch", daemon=True)
        self._watcher.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._proc, self._chan, self._watcher, self._hung)
        try:
            self._wait(0, time.monotonic() + self.cfg.load_timeout_s)
        except DraftTimeout:
            self.close()
            raise DraftError(f"draft worker did not load {self.cfg.gguf_path} within {self.cfg.load_timeout_s} s")
        except DraftDied as e:
            self.close()
            raise DraftDied(f"draft worker exited while loading {self.cfg.gguf_path}: {e} (see its stderr)")
        except BaseException:
            self.close()
            raise
        self.n_vocab = int(self._chan.ctrl[ch.N_VOCAB])
        self.worker_pid = int(self._chan.ctrl[ch.WORKER_PID])

    def close(self) -> None:
        """Stop the worker (STOP, then terminate / kill) and unlink the shared memory. Idempotent."""
        if self._closed:
            return
        self._last_stats = self.stats
        self._closed = True
        self._finalizer()

    def restart(self) -> None:
        self.close()
        self._launch()

    def alive(self) -> bool:
        return not self._closed and not self._dead.is_set() and self._proc.is_alive()

    @property
    def exitcode(self):
        """The worker process's exit code (None while it runs)."""
        return self._proc.exitcode

    def __enter__(self) -> "DraftClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stats(self) -> DraftStats:
        if self._closed:
            return self._last_stats
        return DraftStats.read(self._chan.ctrl)

    # ---------------------------------------------------------------- requests
    def start(self, prompt: list[int], *, overlap: bool, spec: TreeSpec | None = None) -> None:
        """New generation: the worker prefills ``prompt[:-1]`` (reusing any KV prefix it still
        holds) while the caller prefills the target. Returns at once. With ``overlap`` the worker
        then drafts the first tree ahead as ``spec`` says (by default the last one asked for)."""
        if len(prompt) < 1:
            raise ValueError("empty prompt")
        self._check_open()
        self._drain(time.monotonic() + self.cfg.load_timeout_s)
        self._spec = self._checked(spec or self._spec)
        self._unsent = []
        self._outstanding = self._send(ch.CMD_START, prompt, self._spec, ch.FLAG_OVERLAP if overlap else 0)

    def request_tree(self, delta: list[int], spec: TreeSpec, timeout: float) -> Tree:
        """Tree rooted at the last committed token; ``delta`` = tokens committed since the previous
        request ([] for the first one after ``start``). Raises DraftTimeout / DraftDied / DraftError.
        A delta whose request could not be sent is kept and sent with the next one."""
        self._check_open()
        self._checked(spec)
        self._unsent.extend(int(t) for t in delta)
        deadline = self._drain(time.monotonic() + timeout, timeout)
        self._spec = spec
        rnd = self._send(ch.CMD_TREE, self._unsent, spec)
        self._unsent = []
        self._wait(rnd, deadline, timeout)
        _, tree = self._chan.read_tree()
        tree.validate(self.n_vocab)
        if len(tree) > spec.budget:
            raise DraftError(f"worker returned {len(tree)} nodes for a budget of {spec.budget}")
        return tree

    def catch_up(self, delta: list[int], timeout: float) -> bool:
        """While the target decodes alone: send ``delta`` (committed since the last request) for the worker
        to decode now, asking no tree and not waiting, so the draft keeps up instead of catching up in the
        next round. False (``delta`` kept for the next call) while an earlier request is still unanswered."""
        self._check_open()
        self._unsent.extend(int(t) for t in delta)
        if self._outstanding is not None:
            if not self._chan.resp.acquire(block=False):
                return False
            self._chan.resp.release()          # answered: let _drain consume it
            self._drain(time.monotonic() + timeout, timeout)
        if self._unsent:
            self._outstanding = self._send(ch.CMD_TREE, self._unsent, self._spec.replace(budget=0))
            self._unsent = []
        return True

    def set_adapter(self, path: str | None, timeout: float = 60.0) -> None:
        """Between generations: the worker applies the llama.cpp LoRA adapter at `path` (None: removes it);
        it keeps running, only its KV cache is rebuilt at the next START. DraftError if llama.cpp refuses it."""
        self._check_open()
        data = list(os.fsencode(path)) if path is not None else []
        deadline = self._drain(time.monotonic() + timeout, timeout)
        rnd = self._send(ch.CMD_ADAPTER, data)
        self._wait(rnd, deadline, timeout)
        self.adapter = path

    def set_model(self, gguf_path: str) -> None:
        """Between generations: run another GGUF (the draft with an adapter merged in, or the plain one again);
        the worker restarts on it (no adapter applied)."""
        self._check_open()
        self.cfg = replace(self.cfg, gguf_path=str(gguf_path))
        self.restart()

    def ping(self, timeout: float = 5.0) -> float:
        """One PING exchange; returns the round-trip seconds."""
        self._check_open()
        deadline = self._drain(time.monotonic() + timeout, timeout)
        t0 = time.perf_counter()
        rnd = self._send(ch.CMD_PING)
        self._wait(rnd, deadline, timeout)
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- protocol
    def _check_open(self) -> None:
        if self._closed:
            raise DraftError("draft client is closed")
        if self._dead.is_set():
            raise self._died()

    def _died(self) -> DraftDied:
        self._proc.join(1.0)  # it is gone (the watcher saw its sentinel): reap it for the exit code
        return DraftDied(f"draft worker died (exit code {self._proc.exitcode})")

    def _checked(self, spec: TreeSpec) -> TreeSpec:
        """spec, within this worker's capacity (a UsageError, which is a ValueError, otherwise)."""
        return spec.validate(self.cfg.max_nodes, self.cfg.max_seqs)

    def _send(self, cmd: int, tokens=(), spec: TreeSpec = ch.NO_TREE, flags: int = 0) -> int:
        self._round += 1
        self._chan.write_request(self._round, cmd, tokens, spec, flags)
        self._chan.req.release()
        return self._round

    def _drain(self, deadline: float, period: float | None = None) -> float:
        """Wait for the response still owed by an earlier request (a timed-out one, or START).
        Returns the deadline for the next wait: an answer is progress, so a fresh period after one."""
        if self._outstanding is None:
            return deadline
        self._wait(self._outstanding, deadline, period)
        return deadline if period is None else max(deadline, time.monotonic() + period)

    def _wait(self, rnd: int, deadline: float, period: float | None = None) -> None:
        """Block (no polling: the watcher thread posts ``resp`` when the worker dies) until the
        response to round ``rnd``; raise on timeout, death, a reported error or a reply to
        another round (a corrupt channel). Hung means no progress, not slow: while the worker's
        heartbeat (one per llama_decode, e.g. a long prompt's prefill in batches) moves, the
        deadline moves ``period`` seconds on, up to load_timeout_s past the first one."""
        chan = self._chan
        period = deadline - time.monotonic() if period is None else period
        limit = deadline + self.cfg.load_timeout_s
        beat = int(chan.ctrl[ch.HEARTBEAT])
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not chan.resp.acquire(timeout=left):
                if not self._dead.is_set() and int(chan.ctrl[ch.HEARTBEAT]) != beat and deadline < limit:
                    beat, deadline = int(chan.ctrl[ch.HEARTBEAT]), min(time.monotonic() + period, limit)
                    continue
                self._outstanding = rnd
                if self._dead.is_set():
                    raise self._died()
                self._hung[0] = True
                raise DraftTimeout(f"no answer from the draft worker within the timeout (round {rnd})")
            got, status = int(chan.ctrl[ch.RESP_ROUND]), int(chan.ctrl[ch.STATUS])
            if got == rnd and status != ch.STATUS_NONE:
                break
            if self._dead.is_set():
                self._outstanding = rnd
                raise self._died()
            # one request in flight, each answered once: any other reply is a corrupt channel
            self._outstanding = None
            raise DraftError(f"corrupt reply from the draft worker: round {got} (status {status}), "
                             f"expected round {rnd}")
        self._outstanding = None
        self._hung[0] = False
        status = int(chan.ctrl[ch.STATUS])
        chan.ctrl[ch.STATUS] = ch.STATUS_NONE
        if status == ch.STATUS_ERROR:
            code, msg = chan.read_error()
            raise DraftError(f"draft worker error {code}: {msg}")


@contextlib.contextmanager
def _main_not_reimported():
    """A spawn child normally re-runs the parent's __main__ script (importing torch and whatever
    else it imports, or failing outright without a __main__ guard); the worker needs nothing from
    it, so hide it while the child's preparation data is taken."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        for k in saved:
            setattr(main, k, None) if k == "__spec__" else delattr(main, k)
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


def _watch(sentinel, dead: threading.Event, resp) -> None:
    """Wake any waiter once the worker process exits."""
    mp.connection.wait([sentinel])
    dead.set()
    resp.release()


def _shutdown(proc, chan: Channel, watcher: threading.Thread, hung=(False,)) -> None:
    """Finalizer (also at interpreter exit): stop the worker (kill it at once if it hangs), then
    unlink the channel."""
    try:
        if proc.is_alive() and not hung[0]:
            chan.write_request(-1, ch.CMD_STOP)
            chan.req.release()
            proc.join(2.0)
        if proc.is_alive() and not hung[0]:
            proc.terminate()
            proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join()
        watcher.join(1.0)
    finally:
        chan.close()

