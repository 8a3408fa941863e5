"""The draft model's process (llama.cpp on the CPU) and its target-side handle.

Target side: ``DraftClient`` spawns the worker, talks to it through a shared-memory
``Channel`` and owns every resource (process, segment, semaphores).

Worker side: ``worker_main`` loads the GGUF with the low-level llama.cpp API and
answers START / TREE / PING / STOP requests. Its KV cache mirrors what each
llama.cpp sequence holds (``Drafter.seqs``); on every request it keeps the longest
still-valid prefix of the committed tokens (from whichever sequence has the most)
and decodes only the new tokens, so the prefix is never re-evaluated.

Drafting code is written as generators that yield after every ``llama_decode``:
run to completion they draft on request, stepped between non-blocking checks of
the request semaphore they draft ahead (PEARL-style overlap) and stop as soon as
the real request arrives.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field

import numpy as np

from duo.runtime import channel as ch
from duo.runtime.channel import Channel
from duo.runtime.tree import Tree


class DraftError(RuntimeError):
    """The draft worker reported an error (bad GGUF, llama.cpp failure, bad request)."""


class DraftTimeout(DraftError):
    """No tree within the timeout; the request stays outstanding and is drained later."""


class DraftDied(DraftError):
    """The worker process is gone."""


@dataclass
class DraftConfig:
    gguf_path: str
    n_threads: int = 1
    cores: list[int] | None = None   # os.sched_setaffinity in the worker
    n_ctx: int = 4096
    max_nodes: int = 256             # tree capacity per round
    max_seqs: int = 8                # llama.cpp sequences (branches) available
    load_timeout_s: float = 120.0
    extra_bufts: bool | None = None  # llama.cpp's extra buffer types (repack/AMX); None: as probed (llama_probe)
    fault: str | None = None         # tests only: inject a fault in the worker, see Fault (None: off)


@dataclass
class DraftStats:
    busy_s: float = 0.0        # worker time spent decoding / drafting (overlap included)
    idle_s: float = 0.0        # worker time blocked waiting for a request
    n_decoded: int = 0         # tokens llama_decode'd into the KV cache
    rollbacks: int = 0         # times seq 0 was cut back to the committed prefix
    overlap_hits: int = 0      # prepared tree was the one requested
    overlap_misses: int = 0    # prepared tree thrown away
    n_requests: int = 0


DEFAULT_KEY = (16, 4, "dynamic")  # (budget, width, shape) drafted ahead before any request


# =============================================================================== target side
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
        ctx = mp.get_context("spawn")
        self._chan = Channel.create(self.cfg.n_ctx, self.cfg.max_nodes, ctx)
        self._proc = ctx.Process(target=worker_main, args=(self._chan.spec, self.cfg, os.getpid()),
                                 name="duo-draft", daemon=True)
        self._dead = threading.Event()
        self._round = 0
        self._outstanding = None          # round id of a request whose response we still owe a read
        self._unsent: list[int] = []      # delta of calls that failed before sending
        self._key = DEFAULT_KEY
        self._hung = [False]              # the last wait timed out on a live worker: kill it, don't ask
        self._closed = False
        try:
            with _main_not_reimported():
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

    def __enter__(self) -> "DraftClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stats(self) -> DraftStats:
        if self._closed:
            return self._last_stats
        c = self._chan.ctrl
        return DraftStats(float(c[ch.BUSY_NS]) / 1e9, float(c[ch.IDLE_NS]) / 1e9, int(c[ch.N_DECODED]), int(c[ch.ROLLBACKS]),
                          int(c[ch.HITS]), int(c[ch.MISSES]), int(c[ch.N_REQUESTS]))

    # ---------------------------------------------------------------- requests
    def start(self, prompt: list[int], *, overlap: bool, budget: int | None = None, width: int | None = None,
              shape: str | None = None) -> None:
        """New generation: the worker prefills ``prompt[:-1]`` (reusing any KV prefix it still
        holds) while the caller prefills the target. Returns at once. With ``overlap`` the worker
        then drafts the first tree ahead with (budget, width, shape), by default the last used."""
        if len(prompt) < 1:
            raise ValueError("empty prompt")
        self._check_open()
        self._drain(time.monotonic() + self.cfg.load_timeout_s)
        b, w, s = self._key
        self._key = (b if budget is None else budget, w if width is None else width, s if shape is None else shape)
        self._check_key(*self._key)
        self._unsent = []
        b, w, s = self._key
        self._outstanding = self._send(ch.CMD_START, prompt, b, w, s, ch.FLAG_OVERLAP if overlap else 0)

    def request_tree(self, delta: list[int], budget: int, width: int, timeout: float, shape: str = "dynamic") -> Tree:
        """Tree rooted at the last committed token; ``delta`` = tokens committed since the previous
        request ([] for the first one after ``start``). Raises DraftTimeout / DraftDied / DraftError.
        A delta whose request could not be sent is kept and sent with the next one."""
        self._check_open()
        self._check_key(budget, width, shape)
        self._unsent.extend(int(t) for t in delta)
        deadline = self._drain(time.monotonic() + timeout, timeout)
        self._key = (budget, width, shape)
        rnd = self._send(ch.CMD_TREE, self._unsent, budget, width, shape)
        self._unsent = []
        self._wait(rnd, deadline, timeout)
        _, tree = self._chan.read_tree()
        tree.validate(self.n_vocab)
        if len(tree) > budget:
            raise DraftError(f"worker returned {len(tree)} nodes for a budget of {budget}")
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
            self._outstanding = self._send(ch.CMD_TREE, self._unsent, 0, self._key[1], self._key[2])
            self._unsent = []
        return True

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

    def _check_key(self, budget: int, width: int, shape: str) -> None:
        if shape not in ch.SHAPES:
            raise ValueError(f"shape must be one of {list(ch.SHAPES)}, not {shape!r}")
        if not 0 <= budget <= self.cfg.max_nodes:
            raise ValueError(f"budget {budget} outside [0, {self.cfg.max_nodes}]")
        if not 1 <= width <= self.cfg.max_seqs:
            raise ValueError(f"width {width} outside [1, {self.cfg.max_seqs}]")

    def _send(self, cmd: int, tokens=(), budget: int = 0, width: int = 1, shape: str = "chain", flags: int = 0) -> int:
        self._round += 1
        self._chan.write_request(self._round, cmd, tokens, budget, width, shape, flags)
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


# =============================================================================== worker side
_LOG_TAIL: collections.deque = collections.deque(maxlen=32)  # last llama.cpp log lines, for error messages


def _quiet_llama(llama_cpp, buffer_sink: list | None = None) -> None:
    """Route llama.cpp's log into _LOG_TAIL instead of stderr (unless DUO_VERBOSE=1); with
    `buffer_sink`, collect the buffer types that hold the model's weights ("CPU_REPACK", "CPU", ...)."""
    if os.environ.get("DUO_VERBOSE") == "1" and buffer_sink is None:
        return

    keep = [False]

    def log(level, text, user_data):
        # ggml levels: 2 INFO, 3 WARN, 4 ERROR, 5 CONT (continues the previous line)
        line = text.decode("utf-8", "replace") if text else ""
        if buffer_sink is not None and "model buffer size" in line:
            buffer_sink.append(line.split("model buffer size")[0].split(":")[-1].strip())
        keep[0] = level in (3, 4) or (level == 5 and keep[0])
        if keep[0]:
            _LOG_TAIL.append(line)

    global _LOG_CB
    _LOG_CB = llama_cpp.llama_log_callback(log)  # keep a reference: C holds only the pointer
    llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


def _log_tail() -> str:
    tail = "".join(_LOG_TAIL).strip()
    return f"\nllama.cpp log:\n{tail}" if tail else ""


class LlamaError(RuntimeError):
    def __init__(self, msg: str, code: int = ch.ERR_LLAMA):
        super().__init__(msg)
        self.code = code


FAULTS = ("raise_at_decode", "hang_at_decode", "exit_at_decode", "slow_decode", "bad_round", "bad_token",
          "bad_parent", "bad_length")


class Fault:
    """Fault injection for tests: ``DraftConfig.fault = "<kind>:<n>"`` (None, the default, injects
    nothing and costs one attribute test per llama_decode and per reply).

    raise_at_decode:n  from the n-th llama_decode on (counted from the worker's start), every call
                       raises, as a failing llama.cpp would
    hang_at_decode:n   the n-th llama_decode never returns (the process stays alive, sleeping)
    exit_at_decode:n   the process exits at the n-th llama_decode (a crash inside llama.cpp)
    slow_decode:n      every llama_decode takes n ms longer (slow, not hung)
    bad_round:n        the n-th tree reply names another round
    bad_token:n        the n-th tree reply holds a token id outside the vocabulary
    bad_parent:n       the n-th tree reply holds a parent index that is not an earlier node
    bad_length:n       the n-th tree reply claims more nodes than the channel holds
    """

    def __init__(self, spec: str):
        kind, _, n = spec.partition(":")
        if kind not in FAULTS or not n.isdigit() or int(n) < 1:
            raise ValueError(f"fault must be '<kind>:<n>' with kind in {FAULTS} and n >= 1, not {spec!r}")
        self.kind, self.n, self.count = kind, int(n), 0
        self.at_decode = kind.endswith("_decode")
        self.parent = os.getppid()

    def before_decode(self) -> None:
        if not self.at_decode:
            return
        if self.kind == "slow_decode":
            time.sleep(self.n / 1000)
            return
        self.count += 1
        if self.count < self.n:
            return
        if self.kind == "raise_at_decode":
            raise LlamaError(f"injected fault: llama_decode call {self.count} failed")
        if self.kind == "exit_at_decode":
            os._exit(70)
        while os.getppid() == self.parent:  # hang_at_decode (but never outlive the target)
            time.sleep(0.5)
        os._exit(71)

    def corrupt_reply(self, chan: Channel, rnd: int, n_nodes: int) -> None:
        if self.at_decode:
            return
        self.count += 1
        if self.count != self.n:
            return
        c = chan.ctrl
        if self.kind == "bad_round":
            c[ch.RESP_ROUND] = rnd + 1000
        elif self.kind == "bad_length":
            c[ch.N_NODES] = chan.max_nodes + 1
        else:
            if n_nodes == 0:
                chan.tree_tokens[0], chan.tree_parents[0], chan.tree_probs[0], chan.tree_source[0] = 0, -1, 1.0, 0
                c[ch.N_NODES] = n_nodes = 1
            if self.kind == "bad_token":
                chan.tree_tokens[n_nodes - 1] = 1 << 30
            else:  # bad_parent
                chan.tree_parents[n_nodes - 1] = n_nodes + 5


class Drafter:
    """llama.cpp model + context + batch; ``seqs[s]`` mirrors the tokens at positions 0.. of sequence s."""

    def __init__(self, cfg: DraftConfig, log_sink: list | None = None):
        import llama_cpp as L
        self.L = L
        extra = cfg.extra_bufts
        if extra is None:   # the configuration that runs (and runs fastest) on this CPU, probed once
            from .llama_probe import DraftUnusable, extra_bufts_for
            try:
                extra = extra_bufts_for(cfg.gguf_path)
            except DraftUnusable as e:
                raise LlamaError(str(e), ch.ERR_LOAD) from e
        _quiet_llama(L, log_sink)
        L.llama_backend_init()
        mp_ = L.llama_model_default_params()
        mp_.n_gpu_layers = 0  # the draft lives on the CPU, even in a GPU build
        mp_.use_extra_bufts = bool(extra)
        self.extra_bufts = bool(extra)
        self.model = L.llama_model_load_from_file(os.fsencode(cfg.gguf_path), mp_)
        if not self.model:
            raise LlamaError(f"failed to load GGUF {cfg.gguf_path!r}{_log_tail()}", ch.ERR_LOAD)
        self.n_batch = min(cfg.n_ctx, 512)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = cfg.n_ctx, self.n_batch, self.n_batch
        cp.n_seq_max = cfg.max_seqs
        cp.n_threads = cp.n_threads_batch = cfg.n_threads
        cp.kv_unified = True  # one KV buffer: branches share the prefix cells via seq_cp
        cp.offload_kqv = False
        cp.op_offload = False
        cp.no_perf = True
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise LlamaError(f"failed to create a llama.cpp context{_log_tail()}", ch.ERR_LOAD)
        self.mem = L.llama_get_memory(self.ctx)
        self.n_vocab = int(L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model)))
        self.n_ctx = int(L.llama_n_ctx(self.ctx))
        self.max_seqs = cfg.max_seqs
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self.seqs: list[list[int]] = [[] for _ in range(cfg.max_seqs)]
        self.n_decoded = 0
        self.rollbacks = 0
        self.fault: Fault | None = None
        self.heartbeat: np.ndarray | None = None  # a 1-slot view of the channel's HEARTBEAT

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)

    # ---------------------------------------------------------------- KV cache
    def reset(self) -> None:
        self.L.llama_memory_clear(self.mem, True)
        self.seqs = [[] for _ in range(self.max_seqs)]

    def cut(self, s: int, n: int) -> None:
        """Keep positions [0, n) of sequence s."""
        if n < len(self.seqs[s]):
            if not self.L.llama_memory_seq_rm(self.mem, s, n, -1):
                raise LlamaError(f"llama_memory_seq_rm({s}, {n}) failed")
            del self.seqs[s][n:]

    def drop(self, s: int) -> None:
        if self.seqs[s]:
            self.L.llama_memory_seq_rm(self.mem, s, -1, -1)
            self.seqs[s] = []

    def fork(self, src: int, dst: int, n: int | None = None) -> None:
        """Sequence dst := positions [0, n) of src (metadata only in a unified cache)."""
        n = len(self.seqs[src]) if n is None else n
        self.drop(dst)
        self.L.llama_memory_seq_cp(self.mem, src, dst, 0, n)
        self.seqs[dst] = self.seqs[src][:n]

    def decode(self, items: list[tuple[int, int]], last_logits_only: bool = False) -> None:
        """One llama_decode of (token, seq) pairs, each at the next position of its sequence;
        logits for every row (or only the last)."""
        b, n = self.batch, len(items)
        nxt = {s: len(self.seqs[s]) for _, s in items}  # next position of each sequence
        for i, (t, s) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = t, nxt[s], 1, s
            b.logits[i] = (i == n - 1) or not last_logits_only
            nxt[s] += 1
        b.n_tokens = n
        if self.fault is not None:
            self.fault.before_decode()
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            code = ch.ERR_CTX_FULL if rc == 1 else ch.ERR_LLAMA
            raise LlamaError(f"llama_decode returned {rc} for {n} tokens{_log_tail()}", code)
        for t, s in items:
            self.seqs[s].append(t)
        self.n_decoded += n
        if self.heartbeat is not None:
            self.heartbeat[0] += 1

    def logits(self, i: int) -> np.ndarray:
        """Row i of the last batch (a view, valid until the next decode)."""
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        if not ptr:
            raise LlamaError(f"no logits for batch row {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely token ids, best first (ties: lower id), and their softmax probabilities."""
    m = float(logits.max())
    z = np.exp(logits - m).sum(dtype=np.float64)  # softmax denominator at temperature 1
    if k == 1:
        ids = np.array([int(np.argmax(logits))])
    else:
        k = min(k, len(logits))
        ids = np.argpartition(-logits, k - 1)[:k]
        ids = ids[np.lexsort((ids, -logits[ids]))]
    probs = np.exp(logits[ids].astype(np.float64) - m) / z
    return ids.astype(np.int64), probs


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


# ------------------------------------------------------------------------------- drafting
# Every function below is a generator: it yields after each llama_decode and returns its result.

def sync(d: Drafter, committed: list[int], need_logits: bool = True):
    """Make seq 0 hold ``committed`` and clear every other sequence, decoding only what no
    sequence already holds. Returns the logits after the last committed token (a copy), or None."""
    n = len(committed)
    lcps = [common_prefix(toks, committed) for toks in d.seqs]
    best = int(np.argmax(lcps))
    keep = min(lcps[best], n - 1) if need_logits else lcps[best]  # the root must be re-decoded for its logits
    keep0 = min(lcps[0], keep)
    if len(d.seqs[0]) > keep0:
        d.rollbacks += 1
    d.cut(0, keep0)
    if keep > keep0:  # another branch holds more of the committed tokens: share its cells
        d.L.llama_memory_seq_cp(d.mem, best, 0, keep0, keep)
        d.seqs[0] = list(committed[:keep])
    for s in range(1, d.max_seqs):
        d.drop(s)
    tail = committed[keep:]
    if not tail:
        return None
    for i in range(0, len(tail), d.n_batch):
        chunk = tail[i:i + d.n_batch]
        d.decode([(t, 0) for t in chunk], last_logits_only=True)
        if i + d.n_batch < len(tail):
            yield
    out = d.logits(len(chunk) - 1).copy()
    yield
    return out


def draft_chain(d: Drafter, committed: list[int], budget: int):
    """Greedy chain of ``budget`` tokens in seq 0."""
    root = yield from sync(d, committed)
    (t,), (p,) = top_k(root, 1)
    toks, probs = [int(t)], [p]
    while len(toks) < budget:
        d.decode([(toks[-1], 0)])
        (t,), (p,) = top_k(d.logits(0), 1)
        toks.append(int(t))
        probs.append(p)
        yield
    return Tree.chain(toks, probs)


def split_budget(budget: int, weights) -> list[int]:
    """Branch lengths: each >= 1, summing to ``budget``; the rest shared in proportion to the
    weights (largest remainder, ties to the earlier branch)."""
    w = np.asarray(weights, dtype=np.float64)
    share = (budget - len(w)) * w / w.sum()
    n = np.floor(share).astype(int)
    rest = budget - len(w) - int(n.sum())
    order = np.lexsort((np.arange(len(w)), -(share - n)))
    n[order[:rest]] += 1
    return (n + 1).tolist()


def draft_dynamic(d: Drafter, committed: list[int], budget: int, width: int):
    """DuoDecoding: branch at the first position on every token with p > p1 * p2 (p1: top first
    token, p2: top second step after it), up to ``width`` branches; each branch extends greedily,
    all branches decoded in one batch per step; ``budget`` nodes split across branches in
    proportion to their first-token probability."""
    n = len(committed)
    root = yield from sync(d, committed)
    ids, ps = top_k(root, min(width, d.max_seqs))
    t1, p1 = int(ids[0]), float(ps[0])
    if budget == 1:
        return Tree.chain([t1], [p1])
    d.decode([(t1, 0)])
    (t2,), (p2,) = top_k(d.logits(0), 1)
    yield
    keep = [i for i in range(len(ids)) if i == 0 or ps[i] > p1 * p2][:budget]  # p > p1 * p2 opens a branch
    lengths = split_budget(budget, ps[keep])
    # branch b: tokens, probs, seq; the last token of an unfinished branch is not yet decoded
    toks = [[t1, int(t2)][:lengths[0]]]
    probs = [[p1, float(p2)][:lengths[0]]]
    seqs = [0]
    for j, i in enumerate(keep[1:], start=1):
        d.fork(0, j, n)  # share the committed prefix, not t1
        toks.append([int(ids[i])])
        probs.append([float(ps[i])])
        seqs.append(j)
    while True:
        active = [b for b in range(len(toks)) if len(toks[b]) < lengths[b]]
        if not active:
            break
        d.decode([(toks[b][-1], seqs[b]) for b in active])
        for row, b in enumerate(active):
            (t,), (p,) = top_k(d.logits(row), 1)
            toks[b].append(int(t))
            probs[b].append(float(p))
        yield
    tokens, parents, out_probs = [], [], []
    for b in range(len(toks)):
        for k, (t, p) in enumerate(zip(toks[b], probs[b])):
            parents.append(-1 if k == 0 else len(tokens) - 1)
            tokens.append(t)
            out_probs.append(p)
    return Tree(tokens, parents, out_probs)


def draft_eagle(d: Drafter, committed: list[int], budget: int, width: int):
    """EAGLE-2 style: score = product of draft probabilities along the path. Layer by layer,
    expand the top-``width`` frontier nodes (one batch, one sequence each), adding their
    top-``width`` children; stop once no frontier node can beat the budget-th best score;
    return the top-``budget`` nodes (ancestor-closed, since scores never grow with depth)."""
    root = yield from sync(d, committed)
    k = min(width, d.max_seqs)
    ids, ps = top_k(root, k)
    tok, par, score, prob, depth = [], [], [], [], []

    def add(t, parent, p):
        tok.append(int(t))
        par.append(parent)
        prob.append(float(p))
        score.append((score[parent] if parent >= 0 else 1.0) * float(p))  # cumulative path probability
        depth.append(depth[parent] + 1 if parent >= 0 else 1)

    for t, p in zip(ids, ps):
        add(t, -1, p)
    frontier = list(range(len(tok)))
    owner = {0: -1}  # seq -> node whose path it holds (-1: the root)
    seq_of = {-1: 0}
    while frontier and depth[frontier[0]] < budget:
        kth = sorted(score, reverse=True)[budget - 1] if len(score) >= budget else -1.0
        sel = sorted((i for i in frontier if score[i] > kth), key=lambda i: (-score[i], i))[:k]
        if not sel:
            break
        parents = {par[i] for i in sel}
        for s in [s for s, node in owner.items() if node not in parents]:
            d.drop(s)
            del owner[s]
        free = [s for s in range(d.max_seqs) if s not in owner]
        items, taken = [], set()
        for i in sel:  # the first child continues its parent's sequence, siblings fork it
            sp = seq_of[par[i]]
            if par[i] in taken:
                s = free.pop(0)
                d.fork(sp, s)
            else:
                s = sp
                taken.add(par[i])
            items.append((tok[i], s))
        for i, (_, s) in zip(sel, items):
            owner[s] = i
            seq_of[i] = s
        d.decode(items)
        frontier = []
        for row, i in enumerate(sel):
            cids, cps = top_k(d.logits(row), k)
            for t, p in zip(cids, cps):
                frontier.append(len(tok))
                add(t, i, p)
        yield
    best = sorted(range(len(tok)), key=lambda i: (-score[i], depth[i], i))[:budget]
    best.sort(key=lambda i: (depth[i], -score[i], i))  # topological order
    new = {old: j for j, old in enumerate(best)}
    return Tree([tok[i] for i in best], [new[par[i]] if par[i] >= 0 else -1 for i in best], [prob[i] for i in best])


def draft_tree(d: Drafter, committed: list[int], budget: int, width: int, shape: str):
    if budget == 0:
        yield from sync(d, committed)
        return Tree.empty()
    if shape == "chain":
        return (yield from draft_chain(d, committed, budget))
    if shape == "dynamic":
        return (yield from draft_dynamic(d, committed, budget, width))
    if shape == "eagle":
        return (yield from draft_eagle(d, committed, budget, width))
    raise LlamaError(f"unknown tree shape {shape!r}", ch.ERR_BAD_REQUEST)


def top_path(tree: Tree) -> list[int]:
    """Greedy descent: from the root, follow the most likely child down to a leaf (node ids)."""
    kids = tree.children()
    path, cur = [], -1
    while kids[cur + 1]:
        cur = max(kids[cur + 1], key=lambda i: (tree.probs[i], -i))
        path.append(cur)
    return path


def run(gen):
    """Drive a drafting generator to completion; return its result."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


@dataclass
class Prep:
    """A tree drafted ahead for the predicted next request."""
    key: tuple                      # (budget, width, shape)
    gen: object
    delta: list[int] | None = None  # predicted delta: top path + predicted bonus, once known
    path: list[int] | None = None   # the top path's tokens (known before the bonus)
    tree: Tree | None = None        # set when drafting finished

    def step(self) -> None:
        try:
            next(self.gen)
        except StopIteration as stop:
            self.tree = stop.value


def draft_ahead(d: Drafter, committed: list[int], key: tuple, prep: Prep):
    """PEARL-style: assume the target accepts the top path and its bonus token is the draft's own
    top prediction after the leaf; draft the next tree from there."""
    path = prep.path
    logits = yield from sync(d, committed + path)  # decodes (at least) the leaf
    bonus = int(np.argmax(logits))
    prep.delta = path + [bonus]
    return (yield from draft_tree(d, committed + prep.delta, *key))


def _parent_gone(parent_pid: int) -> bool:
    return os.getppid() != parent_pid


class Worker:
    def __init__(self, chan: Channel, d: Drafter, parent_pid: int):
        self.chan, self.d, self.parent_pid = chan, d, parent_pid
        self.committed: list[int] = []
        self.overlap = False
        self.prep: Prep | None = None
        self.pending = False  # a request was taken off the semaphore while drafting ahead
        self.busy_ns = self.idle_ns = 0
        self.hits = self.misses = self.n_requests = 0

    def loop(self) -> None:
        while True:
            if not self.pending:
                if self.prep is not None and self.prep.tree is None:
                    if not self.step_ahead():
                        return
                    continue
                t0 = time.perf_counter_ns()
                got = self.chan.req.acquire(timeout=0.5)
                self.idle_ns += time.perf_counter_ns() - t0
                if not got:
                    if _parent_gone(self.parent_pid):
                        return
                    continue
            self.pending = False
            t0 = time.perf_counter_ns()
            req = self.chan.read_request()
            stop = self.handle(req)
            self.busy_ns += time.perf_counter_ns() - t0
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
            self.busy_ns += time.perf_counter_ns() - t0
        return True

    def publish(self) -> None:
        c, d = self.chan.ctrl, self.d
        c[ch.BUSY_NS], c[ch.IDLE_NS], c[ch.N_DECODED], c[ch.ROLLBACKS] = self.busy_ns, self.idle_ns, d.n_decoded, d.rollbacks
        c[ch.HITS], c[ch.MISSES], c[ch.N_REQUESTS] = self.hits, self.misses, self.n_requests

    def handle(self, req: ch.Request) -> bool:
        chan = self.chan
        if req.cmd == ch.CMD_STOP:
            self.publish()
            chan.write_status(req.round, ch.STATUS_OK)
            chan.resp.release()
            return True
        if req.cmd == ch.CMD_PING:
            chan.write_status(req.round, ch.STATUS_OK)
            chan.resp.release()
            return False
        try:
            if req.tokens and (min(req.tokens) < 0 or max(req.tokens) >= self.d.n_vocab):
                raise LlamaError("token id out of range", ch.ERR_BAD_REQUEST)
            key = (req.budget, req.width, req.shape)
            if req.cmd == ch.CMD_START:
                self.start(req.tokens, bool(req.flags & ch.FLAG_OVERLAP), key)
                self.publish()
                chan.write_status(req.round, ch.STATUS_OK)
            elif req.cmd == ch.CMD_TREE:
                tree = self.tree(req.tokens, key)
                self.publish()
                chan.write_tree(req.round, tree)
                if self.d.fault is not None:
                    self.d.fault.corrupt_reply(chan, req.round, len(tree))
                if self.overlap and req.budget > 0:
                    self.prep = Prep(key, None, path=[int(tree.tokens[i]) for i in top_path(tree)])
                    self.prep.gen = draft_ahead(self.d, list(self.committed), key, self.prep)
            else:
                raise LlamaError(f"unknown command {req.cmd}", ch.ERR_BAD_REQUEST)
        except Exception as e:
            self.prep = None
            self.d.reset()  # the mirror may be off: recompute from the committed tokens next time
            self.publish()
            code = e.code if isinstance(e, LlamaError) else ch.ERR_INTERNAL
            chan.write_error(req.round, code, "".join(traceback.format_exception_only(e)).strip()
                             if isinstance(e, LlamaError) else traceback.format_exc())
        chan.resp.release()
        return False

    def start(self, prompt: list[int], overlap: bool, key: tuple) -> None:
        self.prep = None
        if len(prompt) + 1 > self.d.n_ctx:
            raise LlamaError(f"prompt of {len(prompt)} tokens does not fit n_ctx={self.d.n_ctx}", ch.ERR_CTX_FULL)
        self.committed = list(prompt)
        self.overlap = overlap
        run(sync(self.d, self.committed[:-1], need_logits=False))  # reuses any prefix still in the cache
        if overlap and key[0] > 0:   # the target emits its first token from its prefill: guess it, draft after it
            self.prep = Prep(key, None, path=[])
            self.prep.gen = draft_ahead(self.d, list(self.committed), key, self.prep)

    def tree(self, delta: list[int], key: tuple) -> Tree:
        self.n_requests += 1
        if not self.committed:
            raise LlamaError("TREE before START", ch.ERR_BAD_REQUEST)
        room = self.d.n_ctx - len(self.committed) - len(delta) - 1  # KV cells left after the root
        if room < 0:
            raise LlamaError(f"context full ({len(self.committed) + len(delta)} committed, n_ctx={self.d.n_ctx})",
                             ch.ERR_CTX_FULL)
        per_node = key[1] if key[2] == "eagle" else 1  # eagle's live branches may hold width cells per node
        if key[0] * per_node > room:  # near the end of the context: a smaller tree, not an error
            key = (room // per_node, key[1], key[2])
        self.committed.extend(delta)
        prep, self.prep = self.prep, None
        if prep is not None and prep.delta is None and prep.key == key and delta[:-1] == prep.path:
            while prep.delta is None and prep.tree is None:  # the request beat the bonus prediction
                prep.step()
        if prep is not None and prep.key == key and prep.delta == delta:
            self.hits += 1
            return prep.tree if prep.tree is not None else run(prep.gen)
        if prep is not None:
            self.misses += 1
            prep.gen.close()
        return run(draft_tree(self.d, list(self.committed), *key))


def worker_main(spec: ch.ChannelSpec, cfg: DraftConfig, parent_pid: int) -> None:
    """Entry point of the spawned draft process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the target's business; it stops us
    chan = Channel.attach(spec)
    d = None
    try:
        try:
            if cfg.cores:
                os.sched_setaffinity(0, cfg.cores)
            d = Drafter(cfg)
            d.fault = Fault(cfg.fault) if cfg.fault else None
            d.heartbeat = chan.ctrl[ch.HEARTBEAT:ch.HEARTBEAT + 1]
        except Exception as e:
            msg = str(e) if isinstance(e, LlamaError) else traceback.format_exc()
            chan.write_error(0, ch.ERR_LOAD, msg)
            chan.resp.release()
            return
        chan.ctrl[ch.N_VOCAB], chan.ctrl[ch.WORKER_PID] = d.n_vocab, os.getpid()
        chan.write_status(0, ch.STATUS_READY)
        chan.resp.release()
        Worker(chan, d, parent_pid).loop()
    finally:
        if d is not None:
            d.heartbeat = None  # drop the view before the channel unmaps
            d.close()
        chan.close()
