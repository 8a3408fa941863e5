"""Verification without launch overhead: a static KV cache, tree sizes padded to a few buckets, and one
torch.compile'd pass per bucket (CUDA graphs on a GPU: mode "reduce-overhead").

    st = StaticTarget(tm, max_cache_len=4096, buckets=(1, 2, 4, 8, 16, 32, 64), compile=True)
    st.warm_up()          # compiles (and on a GPU records) every bucket once

`StaticTarget` implements the Target interface (target_interface.py) over a loaded target.TargetModel, so
the decode loop, the Engine and the profiler use it as they use the eager one. A pass over [root] + tree,
n = 1 + len(tree) tokens, runs in the smallest bucket b >= n:

    ids       [root, tree tokens, root * (b - n)]         pads: any token
    position  n_past + depth                              pads: n_past
    slots     n_past + arange(b)                          pads write past the committed length
    mask[i, j] = 0 if j < n_past or slot j holds an ancestor of row i (or i itself), else the dtype's min;
                 a pad row sees its own slot only (no row is all masked: no NaN)
    logits    rows [:n] of the pass, float32

so every real row sees what the eager pass (target.forward_tree) shows it; the padding changes none of them.
Sliding-window layers get a mask that also hides keys `window` or more positions back (as transformers'
own). Everything a pass needs goes to the device in one copy (ids, positions, n_past, the ancestor flags);
the mask is built on the device inside the compiled graph. The cache is compacted with one indexed copy
(static_cache.compact). A tree larger than the largest bucket, or whose padding would not fit the cache,
runs eagerly at its exact size; the prefill always runs eagerly (in chunks, into the same cache).
Compiled kernels reorder reductions: the logits equal the eager pass's within float rounding
(tests/test_static_verify.py measures the bound).
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable

import numpy as np
import torch

from ..errors import DuoError, is_oom, release_after_oom
from ..sampling import choose_tokens, token_logprobs
from .attention import additive, ancestor_matrix, layer_windows
from .static_cache import StaticKV, SlabPool, Upload, compact, slab_bytes
from .target import TargetError, TargetModel
from .tree import Tree

log = logging.getLogger("duo")

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)    # tokens per pass (root + tree) the compiled graphs take
PREFILL_CHUNK = 512
SETTINGS = ("auto", "on", "off")


class CacheFull(TargetError, DuoError):
    """A prompt or a pass that does not fit the static KV cache (the user can change the context or --compile)."""


def use_static(setting: str, device: torch.device) -> bool:
    """Whether verification runs on the static, compiled path: "on", "off", or "auto".

    auto: on for CUDA, where a pass of eager HF decoding is bound by its hundreds of kernel launches and
    CUDA graphs replay them at once; off on the CPU: measured on 2 cores (bench/results/issue20-verify-*),
    compiled passes are 4x faster for the tiny test model (Python-bound) but 2x slower for the 1.5B (the
    eager path's oneDNN linears beat inductor's), and each bucket takes 40-50 s to compile.
    `python -m bench.verify_cost --compile` measures eager against compiled per tree size."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown compile setting {setting!r}: use auto, on or off")
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return setting == "on"


def mask_layout(config) -> tuple[int | None, str]:
    """(sliding window, layout), as attention.verify_mask decides: "full" (one mask), "sliding" (one mask,
    windowed: Mistral v0.1), "mixed" (one per kind of layer, {"full_attention", "sliding_attention"}: Gemma
    2/3, Qwen2 with use_sliding_window), "sliding-only" (the dict with the sliding kind alone)."""
    kinds, window = layer_windows(config)
    if kinds is None:
        return (int(window), "sliding") if window else (None, "full")
    unknown = set(kinds) - {"full_attention", "sliding_attention"}
    if unknown or not window:
        raise TargetError(f"no static tree mask for {', '.join(sorted(unknown)) or 'windowless'} layers; "
                          f"use --compile off")
    return int(window), "mixed" if "full_attention" in kinds else "sliding-only"


def tree_masks(anc: torch.Tensor, pos: torch.Tensor, n_past, n_keys: int, dtype: torch.dtype,
               window: int | None, layout: str):
    """The attention mask(s) of a pass whose q rows sit at slots n_past + [0, q), over slots [0, n_keys).

    anc [q, q] bool: row i may see row j's slot (its ancestors and itself); pos [q]: the rows' positions.
    Row i sees slot s < n_past, or s = n_past + j with anc[i, j]; with a window, only keys whose position
    is within `window` of its own (a committed slot's position is its index).
    """
    q = anc.shape[0]
    slot = torch.arange(n_keys, device=anc.device)
    rel = slot - n_past                                  # the pass's row that slot holds, if 0 <= rel < q
    in_pass = (rel >= 0) & (rel < q)
    row = rel.clamp(0, q - 1)
    allowed = (rel < 0)[None, :] | (anc[:, row] & in_pass[None, :])
    if layout == "full":
        return additive(allowed, dtype)
    key_pos = torch.where(in_pass, pos[row], slot)
    sliding = additive(allowed & (pos[:, None] - key_pos[None, :] < window), dtype)
    if layout == "sliding":
        return sliding
    masks = {"sliding_attention": sliding}
    if layout == "mixed":
        masks["full_attention"] = additive(allowed, dtype)
    return masks


def verify_pass(model, cache, staging: torch.Tensor, b: int, big: int, n_keys: int, dtype: torch.dtype,
                window: int | None, layout: str) -> torch.Tensor:
    """One pass of b tokens from the staging buffer; logits [b, vocab] in the model's dtype. This is the
    function compiled per bucket (b, and everything but the tensors, are constants of its graph).

    staging (int64): [0] n_past, [1, 1 + b) ids, [1 + big, 1 + big + b) positions, then the ancestor
    flags as a [big, big] matrix whose [:b, :b] block is this pass's.
    """
    n_past = staging[0]
    ids, pos = staging[1:1 + b], staging[1 + big:1 + big + b]
    anc = staging[1 + 2 * big:].view(big, big)[:b, :b] != 0
    cache.slots = n_past + torch.arange(b, device=staging.device)
    cache.n_keys = n_keys
    masks = tree_masks(anc, pos, n_past, n_keys, dtype, window, layout)
    out = model(input_ids=ids[None], position_ids=pos[None], attention_mask=masks, cache=cache, use_cache=True)
    return out.logits[0]


def plain_linears(model: torch.nn.Module) -> int:
    """Undo target.use_onednn_linears (an instance `forward` calling a oneDNN op, which inductor cannot
    lower): every Linear back to its class's forward, the same fp32 math. Returns the layers restored."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and "forward" in m.__dict__:
            del m.forward
            n += 1
    return n


def staging_size(big: int) -> int:
    return 1 + 2 * big + big * big


def fill_staging(h: np.ndarray, big: int, b: int, n_past: int, root: int, tree: Tree) -> None:
    """Write one pass of n = 1 + len(tree) tokens, padded to b, into the host staging buffer h."""
    n = len(tree) + 1
    depth = np.concatenate([[0], tree.depths()]).astype(np.int64)
    h[0] = n_past
    h[1:1 + b] = root
    h[2:1 + n] = tree.tokens
    h[1 + big:1 + big + b] = n_past
    h[1 + big:1 + big + n] += depth
    anc = h[1 + 2 * big:].reshape(big, big)
    anc[:b, :b] = 0
    anc[:n, :n] = ancestor_matrix(tree.parents)
    pads = np.arange(n, b)
    anc[pads, pads] = 1


class StaticTarget:
    """The Target interface over `tm` (a target.TargetModel) with a static KV cache and, with `compile`,
    one torch.compile'd verify pass per bucket.

    max_cache_len: KV slots per cache (prompt + answer + the largest pass must fit; max_context is what
    is left for prompt + answer). buckets: tokens per pass (root + tree) the passes are padded to.
    """

    def __init__(self, tm: TargetModel, max_cache_len: int = 4096, buckets=DEFAULT_BUCKETS,
                 compile: bool = True, check: bool = True):
        buckets = tuple(sorted({int(b) for b in buckets}))
        if not buckets or buckets[0] < 1 or buckets[-1] >= max_cache_len:
            raise ValueError(f"buckets must be >= 1 and below max_cache_len ({max_cache_len}), got {buckets}")
        self.tm, self.model, self.tokenizer = tm, tm.model, tm.tokenizer
        self.name, self.vocab_size, self.eos_ids = tm.name, tm.vocab_size, tm.eos_ids
        self.device, self.dtype, self.precision = tm.device, tm.dtype, tm.precision
        self.supports_tree, self.uses_host_cores, self.counters = tm.supports_tree, tm.uses_host_cores, tm.counters
        self.footprint, self.threads, self.extra = tm.footprint, tm.threads, tm.extra
        self.max_cache_len, self.buckets, self.compiled = int(max_cache_len), buckets, bool(compile)
        self.max_context = min(tm.max_context, self.max_cache_len - buckets[-1])
        self.verify = f"{'compiled' if compile else 'static, eager'} (buckets {buckets[0]}-{buckets[-1]})"
        cfg = tm.model.config
        self.window, self.layout = mask_layout(cfg)
        devices = {p.device for p in tm.model.parameters()}
        if len(devices) > 1:
            raise TargetError(f"the static verify path keeps the KV cache on one device, and {tm.name} is spread "
                              f"over {len(devices)}; use --compile off")
        self.cuda_graphs = compile and self.device.type == "cuda"
        try:
            self.pool = SlabPool(cfg, self.max_cache_len, self.dtype, self.device)
            self.staging = Upload(staging_size(buckets[-1]), self.device)
            self.indices = Upload(max(64, buckets[-1]), self.device)
            self.pool.acquire()    # the first slab, allocated now (and free again at once)
        except (RuntimeError, MemoryError) as e:
            if not is_oom(e):
                raise
            release_after_oom(self.device)
            gib = slab_bytes(cfg, self.max_cache_len, self.dtype) / 2**30
            raise TargetError(f"out of memory allocating the static KV cache ({gib:.2f} GiB for "
                              f"{self.max_cache_len} tokens): use a shorter context or --compile off") from e
        if self.device.type == "cuda":
            torch._dynamo.mark_static_address(self.staging.dev)
        self._pass = verify_pass
        if compile:
            if self.device.type == "cpu":
                plain_linears(tm.model)
            # every bucket is a graph of the one compiled function (plus those of other targets in
            # this process): raise dynamo's per-function limit (8) past that, never lower it
            cfg_dynamo = torch._dynamo.config
            cfg_dynamo.recompile_limit = max(cfg_dynamo.recompile_limit, 4 * len(buckets) + 8)
            self._pass = torch.compile(verify_pass, dynamic=False, fullgraph=True,
                                       mode="reduce-overhead" if self.cuda_graphs else None)
        if check:
            self.check_against_eager()

    # -- the Target interface -----------------------------------------------------------------
    def prepare(self, prompt, max_new_tokens, sampling) -> None:
        pass

    def new_cache(self) -> StaticKV:
        return self.pool.acquire()

    def cache_length(self, cache: StaticKV) -> int:
        return cache.slab.length

    @torch.inference_mode()
    def prefill(self, cache: StaticKV, tokens, chunk: int = PREFILL_CHUNK) -> torch.Tensor | None:
        """Append `tokens` causally, eagerly, in chunks; float32 logits [1, vocab] after the last one."""
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=self.device)
        out = None
        for s in range(0, len(ids), chunk):
            piece = ids[s:s + chunk]
            q, n_past = len(piece), cache.slab.length
            self._check_room(n_past, q, "a prompt")
            causal = torch.ones(q, q, dtype=torch.bool, device=self.device).tril_()
            pos = torch.arange(n_past, n_past + q, device=self.device)
            out = self._eager(cache.slab, piece, pos, causal, n_past, logits_to_keep=1)
        return None if out is None else out[-1:].float()

    @torch.inference_mode()
    def forward_tree(self, cache: StaticKV, root: int, tree: Tree) -> torch.Tensor:
        """One pass over [root] + tree; float32 logits [1 + n, vocab] (row 0 = after the root)."""
        slab, n = cache.slab, len(tree) + 1
        n_past = slab.length
        self._check_room(n_past, n, f"a pass of {n} tokens")
        b = next((b for b in self.buckets if b >= n), None)
        if b is None or n_past + b > self.max_cache_len:   # too big for every graph: eagerly, at its size
            logits = self._eager_tree(slab, root, tree).float()
        else:
            big = self.buckets[-1]
            fill_staging(self.staging.hold(), big, b, n_past, root, tree)
            staging = self.staging.send()
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            out = self._pass(self.model, slab, staging, b, big, self.max_cache_len, self.dtype, self.window,
                             self.layout)
            logits = out[:n].float()
            if self.cuda_graphs and logits.data_ptr() == out.data_ptr():
                logits = logits.clone()    # the graph's output buffer is overwritten by its next replay
            slab.slots = None              # (so is the slots tensor the pass left there)
        slab.length = n_past + n
        return logits

    def choose_tokens(self, logits, sampling, u):
        return choose_tokens(logits, sampling, u)

    def token_logprobs(self, logits, rows, tokens, top):
        return token_logprobs(logits, rows, tokens, top)

    def compact_cache(self, cache: StaticKV, n_keep: int, path: list[int]) -> None:
        compact(cache.slab, n_keep, path, self.indices)

    # -- compiling, checking ------------------------------------------------------------------
    @torch.inference_mode()
    def warm_up(self, progress: bool | Callable[[str], None] = False) -> None:
        """Compile every bucket's graph (on a GPU: record its CUDA graph) before the first generation, on
        the slab the next cache gets; a progress line per bucket (progress: True = on stderr, or a function
        taking the line). Raises TargetError when compiling fails."""
        if not self.compiled:
            return
        say = progress if callable(progress) else (
            (lambda s: print(f"duo: {s}", file=sys.stderr, flush=True)) if progress else (lambda s: None))
        cache = self.new_cache()
        for i, b in enumerate(self.buckets):
            t = time.perf_counter()
            try:
                for _ in range(3 if self.cuda_graphs else 1):   # CUDA graphs: warm-up, record, replay
                    self.forward_tree(cache, 0, Tree.chain(np.zeros(b - 1, np.int64)))
                    cache.slab.length = 0
            except Exception as e:  # noqa: BLE001 - torch.compile's failures (dynamo, inductor, a C++ compiler)
                raise failure(e, f"compiling the verify pass for {b} tokens", self.device) from e
            say(f"compiled the verify pass for {b} tokens in {time.perf_counter() - t:.1f}s "
                f"({i + 1}/{len(self.buckets)})")

    @torch.inference_mode()
    def check_against_eager(self) -> None:
        """Uncompiled, on a small branched tree and after a compaction: the static path's logits against
        the eager target's; TargetError if they part (a model whose attention does not go through
        Cache.update, or ignores the mask)."""
        v = self.vocab_size - 1
        prefix = [min(17 + 31 * i, v) for i in range(6)]
        tree = Tree([min(t, v) for t in (101, 202, 303, 404, 505)], [-1, -1, 0, 1, 2], np.ones(5))
        ours, eager = self.new_cache(), self.tm.new_cache()
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        pass_ = self._pass
        self._pass = verify_pass
        try:
            for t, c in ((self, ours), (self.tm, eager)):
                t.prefill(c, prefix[:-1])
            for step in range(2):
                got = self.forward_tree(ours, prefix[-1], tree)
                want = self.tm.forward_tree(eager, prefix[-1], tree)
                if not (got - want).abs().max() <= tol * want.abs().max():
                    raise TargetError(f"the static verify path does not reproduce {self.name}'s eager logits "
                                      f"(max difference {float((got - want).abs().max()):.3g}); use --compile off")
                n_keep = len(prefix)
                self.compact_cache(ours, n_keep, [0, 2])
                self.tm.compact_cache(eager, n_keep, [0, 2])
                prefix = prefix + [int(tree.tokens[0]), int(tree.tokens[2]), min(7, v)]
        except TargetError:
            raise
        except Exception as e:  # noqa: BLE001 - a model whose forward does not take this cache or mask
            raise failure(e, f"checking the static verify path on {self.name}", self.device) from e
        finally:
            self._pass = pass_

    # -- helpers ------------------------------------------------------------------------------
    def _check_room(self, n_past: int, n: int, what: str) -> None:
        if n_past + n > self.max_cache_len:
            raise CacheFull(f"the static KV cache holds {self.max_cache_len} tokens: {what} after {n_past} does not "
                            f"fit; use a larger context (max_cache_len), a smaller --budget or --compile off")

    def _eager_tree(self, slab, root: int, tree: Tree) -> torch.Tensor:
        n_past = slab.length
        ids = torch.as_tensor(np.concatenate([[root], tree.tokens]).astype(np.int64), device=self.device)
        depth = np.concatenate([[0], tree.depths()]).astype(np.int64)
        pos = torch.as_tensor(n_past + depth, device=self.device)
        anc = torch.as_tensor(ancestor_matrix(tree.parents), device=self.device)
        return self._eager(slab, ids, pos, anc, n_past)

    def _eager(self, slab, ids, pos, anc, n_past: int, logits_to_keep: int = 0) -> torch.Tensor:
        """An uncompiled pass of q = len(ids) rows at slots n_past + [0, q), over the first n_past + q keys;
        advances the committed length by q. Logits [q or logits_to_keep, vocab] in the model's dtype."""
        q = len(ids)
        n_keys = n_past + q
        slab.slots, slab.n_keys = torch.arange(n_past, n_keys, device=self.device), n_keys
        masks = tree_masks(anc, pos, n_past, n_keys, self.dtype, self.window, self.layout)
        out = self.model(input_ids=ids[None], position_ids=pos[None], attention_mask=masks, cache=slab,
                         use_cache=True, logits_to_keep=logits_to_keep)
        slab.length, slab.n_keys = n_keys, slab.max_len
        return out.logits[0]


def failure(e: Exception, what: str, device) -> TargetError:
    """The TargetError (naming --compile off) for an exception while building or compiling the static path;
    a device failure (a CUDA error) is not the static path's: it propagates as it is."""
    if is_oom(e):
        release_after_oom(device)
        return TargetError(f"out of memory {what}: use --compile off")
    if isinstance(e, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(e):
        raise e
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return TargetError(f"{what} failed ({type(e).__name__}: {first}); use --compile off")


def with_static_verify(target, setting: str, context: int, max_tree: int, progress: bool = False):
    """The Engine's target: `target` wrapped in a compiled StaticTarget when use_static(setting) says so
    (a real torch target only; the simulated accelerator and a StaticTarget stay as they are), warmed up.
    The cache holds `context` tokens plus the largest pass (max_tree: the most tree nodes a round drafts).
    A failure to compile is an error with "on", a warning and the eager target with "auto"."""
    if not isinstance(target, TargetModel) or not use_static(setting, target.device):
        return target
    try:
        # room past the context for the largest pass: max_tree + 1 tokens, and at least two largest buckets
        # (another engine sharing this target may draft bigger trees)
        st = StaticTarget(target, max_cache_len=context + max(2 * DEFAULT_BUCKETS[-1], max_tree + 1),
                          buckets=DEFAULT_BUCKETS, compile=True)
        st.warm_up(progress=progress)
    except TargetError as e:
        if setting == "on":
            raise
        log.warning("verification stays eager: %s", e)
        return target
    return st
