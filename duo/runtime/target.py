"""The target model in torch: load it, prefill, verify a draft tree in one forward pass, compact the KV cache.

`TargetModel` implements the Target interface (target_interface.py) with the functions below.

The cache always holds the committed tokens except the last one (the *root*).
A verification forward feeds [root] + tree nodes with
  position = n_past + depth            (root depth 0)
  mask[i, j] = j < n_past or j is an ancestor of i (or i itself)
so every node sees the prefix and its own path, as if it were decoded alone (attention.py: the masks of
sliding-window layers, and the attention that does not copy the KV cache to every query head). Loading:
target_load.py (devices, the free-memory check); load_target below puts them together.

transformers >= 5.24 takes the KV cache as `cache=` (`past_key_values=` is deprecated, removed in 5.40).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import is_oom, release_after_oom
from ..sampling import choose_tokens, token_logprobs
from .attention import ancestor_matrix, attn_implementation, probe_window, tree_attention_mask, verify_mask
from .fused_linears import fuse_shared_inputs
from .precision import footprint_bytes, quantize_linears
from .target_load import (TargetError, check_finite_logits, check_placement, devices_precision, input_device,
                          placement, quiet_loading, resolve_device, resolve_devices, resolve_dtype, storage_dtype,
                          use_onednn_linears, weight_bytes)
from .tree import Tree

__all__ = ["TargetError", "TargetModel", "ancestor_matrix", "cache_length", "check_tree_support", "compact_cache",
           "forward_tree", "load_target", "new_cache", "prefill", "resolve_device", "resolve_devices",
           "resolve_dtype", "storage_dtype", "tree_attention_mask", "use_onednn_linears"]

log = logging.getLogger("duo")


@dataclass
class TargetModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    vocab_size: int          # rows of the output layer (may exceed len(tokenizer))
    max_context: int
    eos_ids: frozenset[int]
    name: str = "target"
    supports_tree: bool = True
    threads: int | None = None
    extra: dict = field(default_factory=dict)
    precision: str = "float32"       # precision.PRECISIONS: dtype above, or int8 weights with dtype activations
    footprint: int = 0               # bytes of weights and buffers
    uses_host_cores: bool = True     # Python drives every pass from a host core, on a GPU too
    counters: None = None            # (a simulated accelerator's; none here)

    # the Target interface (target_interface.py): this module's functions, bound to this model
    def prepare(self, prompt, max_new_tokens, sampling) -> None:
        pass

    def new_cache(self):
        return new_cache()

    def cache_length(self, cache) -> int:
        return cache_length(cache)

    def prefill(self, cache, tokens):
        return prefill(self, cache, tokens)

    def forward_tree(self, cache, root: int, tree: Tree):
        return forward_tree(self, cache, root, tree)

    def choose_tokens(self, logits, sampling, u):
        return choose_tokens(logits, sampling, u)

    def token_logprobs(self, logits, rows, tokens, top):
        return token_logprobs(logits, rows, tokens, top)

    def compact_cache(self, cache, n_keep: int, path: list[int]) -> None:
        compact_cache(cache, n_keep, path)


def load_target(hf_dir: str | Path, device: str = "auto", dtype: str = "auto", name: str | None = None,
                threads: int | None = None, progress: bool = True) -> TargetModel:
    """Load a transformers causal LM and its tokenizer from a local directory, its weights straight onto their
    device(s) (target_load.py: --device, the free-memory check); progress: transformers' bars."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    devs = resolve_devices(device)
    prec = devices_precision(dtype, devs)
    dt = prec.dtype
    if threads:
        torch.set_num_threads(threads)
    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        devs, where = placement(devs, weight_bytes(hf_dir, dt), prec.name, auto=str(device) == "auto")
        with quiet_loading(progress):
            model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dt,
                                                         attn_implementation=attn_implementation(), **where)
        check_placement(model, devs)
        model.eval()
        if prec.weights == "w8a8":
            fuse_shared_inputs(model, dt)         # q/k/v and gate/up as one matmul each, bit for bit the same
        if prec.weights != "dense":
            quantize_linears(model, dt, prec.weights)
    except TargetError:
        raise
    except (RuntimeError, MemoryError) as e:
        if not is_oom(e):
            raise
        release_after_oom(devs[0])
        if devs[0].type == "cpu" or isinstance(e, MemoryError):
            raise TargetError("out of memory loading the target on the host: close other programs, use a smaller "
                              "--dtype or a smaller model") from e
        raise TargetError(f"out of memory loading the target on {', '.join(map(str, devs))}: try a smaller model, "
                          f"--dtype bfloat16 or int8, more GPUs (--device cuda:0,1) or --device cpu") from e
    cfg = model.config
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        eos_ids.add(tok.eos_token_id)
    for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i is not None and i < cfg.vocab_size:
            eos_ids.add(i)
    if devs[0].type == "cpu":
        use_onednn_linears(model)
    tm = TargetModel(model=model, tokenizer=tok, device=devs[0], dtype=dt, vocab_size=cfg.vocab_size,
                     max_context=int(getattr(cfg, "max_position_embeddings", 4096) or 4096),
                     eos_ids=frozenset(eos_ids), name=name or Path(hf_dir).name, threads=threads,
                     precision=prec.name, footprint=footprint_bytes(model))
    if dt == torch.float16:
        check_finite_logits(tm)
    tm.supports_tree = check_tree_support(tm)
    if not tm.supports_tree:
        log.warning("target %s does not verify trees correctly with a 4D mask; drafting chains only", tm.name)
    return tm


def new_cache():
    from transformers import DynamicCache
    return DynamicCache()


def cache_length(cache) -> int:
    return cache.get_seq_length()


@torch.inference_mode()
def prefill(tm: TargetModel, cache, tokens, chunk: int = 512) -> torch.Tensor | None:
    """Append `tokens` to the cache (causal, in chunks to bound attention memory); returns the float32
    logits [1, vocab] after the last token (the first generated token's), None for no tokens."""
    dev = input_device(tm)
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=dev)
    out = None
    for s in range(0, len(ids), chunk):
        piece = ids[s:s + chunk][None]
        n_past = cache_length(cache)
        pos = torch.arange(n_past, n_past + piece.shape[1], device=dev)
        out = tm.model(input_ids=piece, position_ids=pos[None], cache=cache, use_cache=True, logits_to_keep=1)
    return None if out is None else out.logits[0, -1:].float()


@torch.inference_mode()
def forward_tree(tm: TargetModel, cache, root: int, tree: Tree) -> torch.Tensor:
    """One target pass over [root] + tree; returns float32 logits [1 + n, vocab] (row 0 = after the root),
    on the device they come out on (the last GPU of a target spread over several)."""
    dev = input_device(tm)
    n_past = cache_length(cache)
    depth = np.concatenate([[0], tree.depths()]) if len(tree) else np.zeros(1, np.int64)
    tokens_pos = np.stack([np.concatenate([[root], tree.tokens]), n_past + depth]).astype(np.int64)
    ids, pos = torch.as_tensor(tokens_pos, device=dev).split(1)    # one copy to the device for both
    is_chain = bool(np.all(tree.parents == np.arange(-1, len(tree) - 1)))
    mask = None if is_chain else verify_mask(tm.model.config, tree.parents, n_past, tm.dtype, dev)
    out = tm.model(input_ids=ids, position_ids=pos, attention_mask=mask, cache=cache, use_cache=True)
    return out.logits[0].float()


def _layers(cache):
    if hasattr(cache, "layers"):
        return [(layer, "keys", "values") for layer in cache.layers]
    raise TargetError("unsupported transformers cache (needs DynamicCache with .layers, transformers >= 5.24)")


@torch.inference_mode()
def compact_cache(cache, n_keep: int, path: list[int]) -> None:
    """Keep the first n_keep entries (prefix + root) and the accepted nodes, drop the rest of the tree.

    Accepted node k sits at cache index n_keep + k; it moves to n_keep + (its rank in path). The index goes
    to each device the cache is on once (not once per tensor); a contiguous path is only a truncation.
    """
    src = [n_keep + k for k in path]
    moved = src != list(range(n_keep, n_keep + len(path)))
    new_len = n_keep + len(path)
    index: dict[torch.device, torch.Tensor] = {}
    for layer, kname, vname in _layers(cache):
        for name in (kname, vname):
            t = getattr(layer, name)
            if moved:
                if t.device not in index:
                    index[t.device] = torch.as_tensor(src, device=t.device)
                t[:, :, n_keep:new_len] = t.index_select(2, index[t.device])
            setattr(layer, name, t[:, :, :new_len])


# RuntimeError messages of a model that rejects a 4D mask or position ids (shapes that do not broadcast)
MASK_REJECTIONS = ("size of tensor", "shape", "attn_mask", "mask", "expand", "dimension")


def rejects_mask(e: RuntimeError) -> bool:
    """A RuntimeError that means "this model cannot take a 4D mask", not a device failure."""
    text = str(e)
    device_error = isinstance(e, getattr(torch, "AcceleratorError", ())) or "CUDA error" in text
    return not device_error and any(m in text.lower() for m in MASK_REJECTIONS)


def probe_tolerance(tm: TargetModel) -> float:
    """The largest |tree - branch alone| / max |logit| that still passes the probe, per precision.

    w8a8 rounds every linear's input to 1/127 of its row's largest value, so a bf16-sized difference between
    two pass shapes can flip a rounding and grow: measured 0.055 on Qwen2.5-1.5B, where a pass that ignores
    the tree mask is off by 0.25-0.46 (its other precisions pass at 1e-3 fp32 and 5e-2 below).
    """
    if tm.precision == "w8a8":
        return 0.12
    return 1e-3 if tm.dtype == torch.float32 else 5e-2


@torch.inference_mode()
def check_tree_support(tm: TargetModel) -> bool:
    """Verify a small branched tree against plain causal runs of each branch; False if the model ignores the mask.

    A sliding window is shrunk for the probe (attention.probe_window) and the prefix is three windows long,
    so every tree node has keys outside its window. False only for the errors of a model that rejects a 4D
    mask or position ids; out of memory is a TargetError, anything else (a device error) propagates.
    """
    v = tm.vocab_size
    tree = Tree(tokens=[min(101, v - 1), min(202, v - 1), min(303, v - 1), min(404, v - 1)], parents=[-1, -1, 0, 1],
                probs=[1, 1, 1, 1])
    try:
        with probe_window(tm.model.config) as window:
            prefix = [(17 + 31 * i) % v for i in range(5 if window is None else 3 * window + 5)]
            cache = new_cache()
            prefill(tm, cache, prefix[:-1])
            got = forward_tree(tm, cache, prefix[-1], tree)
            for branch in ([0, 2], [1, 3]):
                seq = prefix + [int(tree.tokens[b]) for b in branch]
                ref = tm.model(input_ids=torch.as_tensor(seq, device=input_device(tm))[None]).logits[0].float()
                rows = [0] + [b + 1 for b in branch]
                tol = probe_tolerance(tm)
                if (got[rows] - ref[len(prefix) - 1:]).abs().max() > tol * ref.abs().max():
                    return False
            return True
    except (TypeError, ValueError, NotImplementedError) as e:   # a forward that rejects 4D masks or position ids
        log.debug("tree check failed: %s", e)
        return False
    except (RuntimeError, MemoryError) as e:
        if is_oom(e):
            release_after_oom(tm.device)
            raise TargetError(f"out of memory checking tree verification on {tm.device}: the weights leave too "
                              f"little free; use a smaller --dtype, more GPUs or a smaller model") from e
        if not rejects_mask(e):
            raise
        log.debug("tree check failed: %s", e)
        return False
