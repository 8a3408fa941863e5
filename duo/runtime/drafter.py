"""The draft model in llama.cpp: model + context + batch, and a mirror of what its KV cache holds.

``Drafter.seqs[s]`` mirrors the tokens at positions 0.. of llama.cpp sequence s. ``sync`` makes sequence 0
hold the committed tokens, keeping the longest still-valid prefix any sequence holds and decoding only
the rest: a prefix is never evaluated twice. Every llama.cpp call the draft side makes is here; the tree
shapes (tree_shapes.py) draft through ``decode`` / ``fork`` / ``drop`` / ``logits``.

Runs in the worker process (and in the profiler's and the probe's throwaway children): no torch.
"""
from __future__ import annotations

import collections
import ctypes
import os
import re
from dataclasses import dataclass

import numpy as np

from . import channel as ch


@dataclass
class DraftConfig:
    gguf_path: str
    n_threads: int = 1
    cores: list[int] | None = None   # os.sched_setaffinity in the worker
    n_ctx: int = 4096
    max_nodes: int = 256             # tree capacity per round
    max_seqs: int = 8                # llama.cpp sequences (branches) available
    load_timeout_s: float = 120.0
    extra_bufts: bool | None = None  # llama.cpp's extra buffer types (repack/AMX); None: as probed (llama_probe.resolve_config)
    fault: str | None = None         # tests only: inject a fault in the worker (duo.testing.faults; None: off)


class LlamaError(RuntimeError):
    def __init__(self, msg: str, code: int = ch.ERR_LLAMA):
        super().__init__(msg)
        self.code = code


# ------------------------------------------------------------------------------- llama.cpp's log
_LOG_TAIL: collections.deque = collections.deque(maxlen=32)  # last llama.cpp log lines, for error messages


def _quiet_llama(llama_cpp, log_sink: list | None = None) -> None:
    """Route llama.cpp's log into _LOG_TAIL instead of stderr (unless DUO_VERBOSE=1); with `log_sink`,
    keep every line there too (``weight_buffers`` / ``repacked_tensors`` read them)."""
    if os.environ.get("DUO_VERBOSE") == "1" and log_sink is None:
        return

    keep = [False]

    def log(level, text, user_data):
        # ggml levels: 2 INFO, 3 WARN, 4 ERROR, 5 CONT (continues the previous line)
        line = text.decode("utf-8", "replace") if text else ""
        if log_sink is not None:
            log_sink.append(line)
        keep[0] = level in (3, 4) or (level == 5 and keep[0])
        if keep[0]:
            _LOG_TAIL.append(line)

    global _LOG_CB
    _LOG_CB = llama_cpp.llama_log_callback(log)  # keep a reference: C holds only the pointer
    llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


def _log_tail() -> str:
    tail = "".join(_LOG_TAIL).strip()
    return f"\nllama.cpp log:\n{tail}" if tail else ""


def weight_buffers(lines) -> dict[str, float]:
    """MiB of model weights per llama.cpp buffer type ("CPU_Mapped", "CPU_REPACK", "AMX", ...), from its load log."""
    out: dict[str, float] = {}
    for m in (re.search(r"(\S+) model buffer size\s*=\s*([0-9.]+) MiB", line) for line in lines):
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def repacked_tensors(lines) -> dict[str, str]:
    """Tensor -> the interleaved layout the CPU backend repacked it into ("q4_0_8x8"), from its load log."""
    out = {}
    for line in lines:
        m = re.search(r"repack tensor (\S+) with (\S+)", line) or re.search(r"amx repack tensor (\S+) of type (\S+)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


# ------------------------------------------------------------------------------- the drafter

class Drafter:
    """llama.cpp model + context + batch; ``seqs[s]`` mirrors the tokens at positions 0.. of sequence s."""

    def __init__(self, cfg: DraftConfig, log_sink: list | None = None):
        import llama_cpp as L
        self.L = L
        extra = cfg.extra_bufts
        if extra is None:
            raise ValueError("DraftConfig.extra_bufts is not set: resolve it first (llama_probe.resolve_config)")
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
        self.fault = None    # duo.testing.faults.Fault (tests only)
        self.adapter = None  # the LoRA adapter applied (llama.cpp pointer) and its path
        self.adapter_path: str | None = None
        self.counters = np.zeros(ch.CTRL_LEN, np.int64)  # the worker points it at the channel's ctrl block

    def close(self) -> None:
        L = self.L
        self.set_adapter(None)
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)

    def set_adapter(self, path: str | None, scale: float = 1.0) -> None:
        """Apply the llama.cpp LoRA adapter at `path` (None: none). The KV cache is cleared: it holds keys and
        values computed with the weights before the swap (the next START prefills again)."""
        L = self.L
        if path == self.adapter_path:
            return
        new = None
        if path is not None:
            new = L.llama_adapter_lora_init(self.model, os.fsencode(path))
            if not new:
                raise LlamaError(f"llama.cpp could not load the adapter {path!r}{_log_tail()}", ch.ERR_BAD_REQUEST)
        adapters = (L.llama_adapter_lora_p_ctypes * 1)(new) if new else None
        scales = (ctypes.c_float * 1)(scale) if new else None
        if L.llama_set_adapters_lora(self.ctx, adapters, 1 if new else 0, scales):
            if new:
                L.llama_adapter_lora_free(new)
            raise LlamaError(f"llama.cpp could not apply the adapter {path!r}{_log_tail()}", ch.ERR_BAD_REQUEST)
        if self.adapter:
            L.llama_adapter_lora_free(self.adapter)
        self.adapter, self.adapter_path = new, path
        self.reset()

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
        self.counters[ch.N_DECODED] += n
        self.counters[ch.HEARTBEAT] += 1     # progress: a slow worker is not a hung one

    def logits(self, i: int) -> np.ndarray:
        """Row i of the last batch (a view, valid until the next decode)."""
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        if not ptr:
            raise LlamaError(f"no logits for batch row {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


# ------------------------------------------------------------------------------- keeping in step
# A generator, like the tree shapes: it yields after each llama_decode and returns its result.

def sync(d: Drafter, committed: list[int], need_logits: bool = True):
    """Make seq 0 hold ``committed`` and clear every other sequence, decoding only what no
    sequence already holds. Returns the logits after the last committed token (a copy), or None."""
    n = len(committed)
    lcps = [common_prefix(toks, committed) for toks in d.seqs]
    best = int(np.argmax(lcps))
    keep = min(lcps[best], n - 1) if need_logits else lcps[best]  # the root must be re-decoded for its logits
    keep0 = min(lcps[0], keep)
    if len(d.seqs[0]) > keep0:
        d.counters[ch.ROLLBACKS] += 1
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


def run(gen):
    """Drive a drafting generator to completion; return its result."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
