"""Shared-memory channel between the target process and the draft worker.

One ``SharedMemory`` block named ``duo_<pid>_<hex>`` holds fixed-size numpy arrays:

* ``ctrl``   int64  [CTRL_LEN]   round ids, command, status, lengths, worker stats
* ``tokens`` int32  [n_ctx]      request payload: the prompt or the committed delta
* tree buffers [max_nodes]       tokens int32, parents int32, probs float32, source int8
* ``msg``    uint8  [MSG_BYTES]  an error message (utf-8)

Two semaphores wake the other side: ``req`` (target -> worker) and ``resp``
(worker -> target). Only one request is in flight at a time, so a release/acquire
pair is all the synchronisation needed (semaphore operations are full memory
barriers). On Linux they are eventfds the spawned child inherits (``EventSemaphore``):
nameless, so the kernel frees them with the last process that holds them. (The
named semaphores of ``multiprocessing``, /dev/shm/sem.mp-*, leak when the whole
process group, its resource tracker included, is SIGKILLed.)

The parent creates and finally unlinks the block; the child only attaches. The
owner holds a shared ``flock`` on the block while it lives; ``sweep_stale_segments``
(run by ``Channel.create``) unlinks ``duo_<pid>_*`` blocks whose owner was killed
before it could unlink them: pid gone and no lock held.
"""
from __future__ import annotations

import fcntl
import math
import multiprocessing as mp
import os
import re
import secrets
import select
import time
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from ..plan import TreeSpec
from .tree import Tree
from .tree_shapes import SHAPES

# Control block slots (int64).
ROUND = 0        # request round id, written by the target
CMD = 1          # command of the request
N_TOKENS = 2     # tokens in the request payload
BUDGET = 3       # max tree nodes
WIDTH = 4        # max branches / frontier width
SHAPE = 5        # tree shape code (SHAPES)
FLAGS = 6        # FLAG_* bits
RESP_ROUND = 7   # round id the response answers
STATUS = 8       # STATUS_* of the response
ERROR = 9        # ERR_* code when STATUS == STATUS_ERROR
N_NODES = 10     # nodes in the tree buffers
MSG_LEN = 11     # bytes of the error message
N_VOCAB = 12     # draft vocabulary size, published at READY
WORKER_PID = 13
BUSY_NS = 14     # worker stats, updated after every command
IDLE_NS = 15
N_DECODED = 16   # tokens llama_decode'd into the KV cache
ROLLBACKS = 17   # times seq 0's KV had to be cut back to the committed prefix
HITS = 18        # overlap: prepared tree was the one asked for
MISSES = 19      # overlap: prepared tree thrown away
N_REQUESTS = 20
HEARTBEAT = 21   # bumped by the worker after every llama_decode: a slow worker is not a hung one
CTRL_LEN = 32

CMD_NONE, CMD_PING, CMD_START, CMD_TREE, CMD_STOP, CMD_ADAPTER = 0, 1, 2, 3, 4, 5
# CMD_ADAPTER's tokens are the adapter file's path, one UTF-8 byte per cell (none: remove the adapter)
STATUS_NONE, STATUS_OK, STATUS_READY, STATUS_ERROR = 0, 1, 2, 3
ERR_NONE, ERR_LOAD, ERR_BAD_REQUEST, ERR_LLAMA, ERR_CTX_FULL, ERR_INTERNAL = 0, 1, 2, 3, 4, 5
FLAG_OVERLAP = 1

SHAPE_CODES = {name: i for i, name in enumerate(SHAPES)}   # a tree shape travels as its index in SHAPES
SHAPE_NAMES = tuple(SHAPES)
NO_TREE = TreeSpec(0, 1, "chain")                          # the spec of requests that ask for no tree

MSG_BYTES = 4096

SHM_DIR = "/dev/shm"
_SEGMENT = re.compile(r"duo_(\d+)_[0-9a-f]{12}")   # names made by Channel.create


class EventSemaphore:
    """A counting semaphore on a Linux eventfd (EFD_SEMAPHORE): ``release`` adds 1, ``acquire``
    takes 1, waiting up to ``timeout`` seconds (rounded up to the millisecond). One process
    acquires, any releases. It reaches the spawned worker as an inherited file descriptor (it
    pickles only while a spawn-context Process starts) and has no name, so nothing is left
    behind when processes die, however they die."""

    def __init__(self, fd: int):
        self.fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    @classmethod
    def create(cls) -> "EventSemaphore":
        return cls(os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_NONBLOCK | os.EFD_CLOEXEC))

    def release(self) -> None:
        if self.fd >= 0:
            os.eventfd_write(self.fd, 1)

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while True:
            try:
                os.eventfd_read(self.fd)
                return True
            except BlockingIOError:
                pass
            if not block:
                return False
            if deadline is None:
                self._poll.poll()
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._poll.poll(math.ceil(left * 1000))

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __reduce__(self):
        popen = mp.context.get_spawning_popen()
        if popen is None:
            raise RuntimeError("an EventSemaphore is handed to a child process only while spawning it")
        return EventSemaphore, (popen.duplicate_for_child(self.fd),)


def _semaphore(ctx):
    return EventSemaphore.create() if hasattr(os, "eventfd") else ctx.Semaphore(0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as someone else's
        return True
    return True


def sweep_stale_segments() -> list[str]:
    """Unlink the shared-memory blocks of channels whose owner died without unlinking them (a
    SIGKILL that took its resource tracker too). Only names made by ``Channel.create``
    (duo_<pid>_<12 hex>), only ours (uid), only when that pid no longer exists, and only when no
    process holds the owner's lock on it (a live owner in another pid namespace). Returns the
    names removed."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    removed = []
    for name in names:
        m = _SEGMENT.fullmatch(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_uid != os.getuid():
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
            removed.append(name)
        except OSError:  # locked by a live owner, or gone meanwhile
            pass
        finally:
            os.close(fd)
    return removed


@dataclass
class Request:
    round: int
    cmd: int
    tokens: list[int]        # the prompt (START) or the tokens committed since the last request (TREE)
    spec: TreeSpec           # the tree asked for
    flags: int


@dataclass
class DraftStats:
    """The worker's counters, kept in the ctrl block (the worker adds to them; the client reads them)."""
    busy_s: float = 0.0        # worker time spent decoding / drafting (overlap included)
    idle_s: float = 0.0        # worker time blocked waiting for a request
    n_decoded: int = 0         # tokens llama_decode'd into the KV cache
    rollbacks: int = 0         # times seq 0 was cut back to the committed prefix
    overlap_hits: int = 0      # prepared tree was the one requested
    overlap_misses: int = 0    # prepared tree thrown away
    n_requests: int = 0

    @classmethod
    def read(cls, c: np.ndarray) -> "DraftStats":
        return cls(float(c[BUSY_NS]) / 1e9, float(c[IDLE_NS]) / 1e9, int(c[N_DECODED]), int(c[ROLLBACKS]),
                   int(c[HITS]), int(c[MISSES]), int(c[N_REQUESTS]))


@dataclass
class ChannelSpec:
    """Everything the child needs to attach (picklable while spawning)."""
    name: str
    n_ctx: int
    max_nodes: int
    req: object
    resp: object


def _layout(n_ctx: int, max_nodes: int) -> list[tuple[str, np.dtype, int]]:
    return [
        ("ctrl", np.dtype(np.int64), CTRL_LEN),
        ("tokens", np.dtype(np.int32), n_ctx),
        ("tree_tokens", np.dtype(np.int32), max_nodes),
        ("tree_parents", np.dtype(np.int32), max_nodes),
        ("tree_probs", np.dtype(np.float32), max_nodes),
        ("tree_source", np.dtype(np.int8), max_nodes),
        ("msg", np.dtype(np.uint8), MSG_BYTES),
    ]


def _nbytes(n_ctx: int, max_nodes: int) -> int:
    return sum(_align(dt.itemsize * n) for _, dt, n in _layout(n_ctx, max_nodes))


def _align(n: int) -> int:
    return (n + 63) // 64 * 64


class Channel:
    """Fixed-size arrays in one shared-memory block plus the two wake-up semaphores."""

    def __init__(self, shm: shared_memory.SharedMemory, spec: ChannelSpec, owner: bool):
        self.shm, self.spec, self.owner = shm, spec, owner
        self.n_ctx, self.max_nodes = spec.n_ctx, spec.max_nodes
        self.req, self.resp = spec.req, spec.resp
        off = 0
        for name, dt, n in _layout(spec.n_ctx, spec.max_nodes):
            setattr(self, name, np.ndarray((n,), dtype=dt, buffer=shm.buf, offset=off))
            off += _align(dt.itemsize * n)
        self._closed = False

    # ---------------------------------------------------------------- life cycle
    @staticmethod
    def create(n_ctx: int, max_nodes: int, ctx=None) -> "Channel":
        ctx = ctx or mp.get_context("spawn")
        sweep_stale_segments()
        name = f"duo_{os.getpid()}_{secrets.token_hex(6)}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=_nbytes(n_ctx, max_nodes))
        fd = getattr(shm, "_fd", -1)
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # "my owner is alive", for sweep_stale_segments
        spec = ChannelSpec(name, n_ctx, max_nodes, _semaphore(ctx), _semaphore(ctx))
        chan = Channel(shm, spec, owner=True)
        chan.ctrl[:] = 0
        return chan

    @staticmethod
    def attach(spec: ChannelSpec) -> "Channel":
        # A spawn child shares its parent's resource tracker (the tracker fd is inherited),
        # so attaching re-registers the same name in the same set: a no-op. We must NOT
        # unregister here: that would drop the parent's registration too, and a SIGKILLed
        # parent would then leak the segment instead of the tracker unlinking it.
        shm = shared_memory.SharedMemory(name=spec.name, create=False)
        return Channel(shm, spec, owner=False)

    def close(self) -> None:
        """Detach; the owner also unlinks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for name, _, _ in _layout(self.n_ctx, self.max_nodes):
            setattr(self, name, None)  # drop the views before closing the mapping
        try:
            self.shm.close()
        except BufferError:
            pass
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass
        for sem in (self.req, self.resp):
            if isinstance(sem, EventSemaphore):
                sem.close()

    # ---------------------------------------------------------------- requests
    def write_request(self, round: int, cmd: int, tokens=(), spec: TreeSpec = NO_TREE, flags: int = 0) -> None:
        n = len(tokens)
        if n > self.n_ctx:
            raise ValueError(f"request of {n} tokens exceeds the channel capacity {self.n_ctx}")
        if n:
            self.tokens[:n] = np.asarray(tokens, dtype=np.int32)
        c = self.ctrl
        c[CMD], c[N_TOKENS], c[BUDGET], c[WIDTH] = cmd, n, spec.budget, spec.width
        c[SHAPE], c[FLAGS] = SHAPE_CODES[spec.shape], flags
        c[ROUND] = round

    def read_request(self) -> Request:
        c = self.ctrl
        n = int(c[N_TOKENS])
        shape = int(c[SHAPE])
        spec = TreeSpec(int(c[BUDGET]), int(c[WIDTH]), SHAPE_NAMES[shape] if 0 <= shape < len(SHAPE_NAMES) else "?")
        return Request(int(c[ROUND]), int(c[CMD]), self.tokens[:n].tolist(), spec, int(c[FLAGS]))

    # ---------------------------------------------------------------- responses
    def write_status(self, round: int, status: int) -> None:
        self.ctrl[STATUS], self.ctrl[ERROR], self.ctrl[N_NODES] = status, ERR_NONE, 0
        self.ctrl[RESP_ROUND] = round

    def write_tree(self, round: int, tree: Tree) -> None:
        n = len(tree)
        if n > self.max_nodes:
            raise ValueError(f"tree of {n} nodes exceeds the channel capacity {self.max_nodes}")
        self.tree_tokens[:n] = tree.tokens
        self.tree_parents[:n] = tree.parents
        self.tree_probs[:n] = tree.probs
        self.tree_source[:n] = tree.source
        self.ctrl[N_NODES] = n
        self.ctrl[STATUS], self.ctrl[ERROR] = STATUS_OK, ERR_NONE
        self.ctrl[RESP_ROUND] = round

    def read_tree(self) -> tuple[int, Tree]:
        n = int(self.ctrl[N_NODES])
        if not 0 <= n <= self.max_nodes:
            raise ValueError(f"corrupt tree length {n}")
        tree = Tree(self.tree_tokens[:n].copy(), self.tree_parents[:n].copy(),
                    self.tree_probs[:n].copy(), self.tree_source[:n].copy())
        return int(self.ctrl[RESP_ROUND]), tree

    def write_error(self, round: int, code: int, message: str) -> None:
        raw = message.encode("utf-8", "replace")[-MSG_BYTES:]  # keep the tail: the exception line
        self.msg[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        self.ctrl[MSG_LEN], self.ctrl[ERROR], self.ctrl[N_NODES] = len(raw), code, 0
        self.ctrl[STATUS] = STATUS_ERROR
        self.ctrl[RESP_ROUND] = round

    def read_error(self) -> tuple[int, str]:
        n = int(min(max(self.ctrl[MSG_LEN], 0), MSG_BYTES))
        return int(self.ctrl[ERROR]), bytes(self.msg[:n]).decode("utf-8", "replace")


# -------------------------------------------------------------------- latency probe
def _echo_main(spec: ChannelSpec) -> None:
    """Minimal worker: answer every request until CMD_STOP (or 5 s without one)."""
    chan = Channel.attach(spec)
    try:
        while chan.req.acquire(timeout=5.0):
            r = chan.read_request()
            chan.write_status(r.round, STATUS_OK)
            chan.resp.release()
            if r.cmd == CMD_STOP:
                break
    finally:
        chan.close()


def measure_round_trip(n: int = 200) -> np.ndarray:
    """Round-trip seconds of ``n`` PING exchanges with a bare spawned echo process
    (the channel's own latency, no llama.cpp)."""
    ctx = mp.get_context("spawn")
    chan = Channel.create(16, 1, ctx)
    proc = ctx.Process(target=_echo_main, args=(chan.spec,), daemon=True)
    proc.start()
    try:
        out = np.zeros(n)
        for i in range(n + 1):
            t0 = time.perf_counter()
            chan.write_request(i + 1, CMD_PING if i < n else CMD_STOP)
            chan.req.release()
            if not chan.resp.acquire(timeout=10.0):
                raise TimeoutError("echo process did not answer")
            if i < n:
                out[i] = time.perf_counter() - t0
        proc.join(5.0)
        return out
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        chan.close()


if __name__ == "__main__":
    rt = measure_round_trip(500)
    print(f"round trip: median {np.median(rt) * 1e6:.1f} us, p90 {np.percentile(rt, 90) * 1e6:.1f} us")
