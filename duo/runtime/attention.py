"""The target's attention for verification: the tree masks (sliding windows included) and sdpa without copies
of the KV cache.

Tree mask (target.py's module docstring): node i at position n_past + depth(i) sees the prefix and its own
path. A layer with a sliding window W also sees nothing more than W - 1 positions behind the query:
    allowed[i, j] = (j < n_past or j is an ancestor of i)  and  pos(j) > pos(i) - W
    pos(j) = j for the prefix, n_past + depth(j) for a tree node      (transformers' sliding_window_overlay)
Models that name a kind per layer (config.layer_types: Qwen2, Gemma 2/3...) take one mask per kind, a dict
{"full_attention": m, "sliding_attention": m_w}; the others (Mistral, Phi-3) one mask, windowed if the config
has a window. The cache (DynamicCache without a config) keeps every position in every layer, so cache index
n_past + k is still tree node k and compaction stays exact.

GQA without repeat_kv: each of a layer's Hkv key/value heads serves n_rep = Hq / Hkv query heads. With a
mask over several query rows transformers' sdpa copies K and V to every query head (repeat_kv) in every
layer of every pass. "duo_sdpa" stacks the n_rep query heads of a group as extra query rows instead:
    q [B, Hq, L, D] -> [B, Hkv, n_rep * L, D]          mask [B, 1, L, S] -> [B, 1, n_rep * L, S]
    row r * L + i of group g = query i of head g * n_rep + r; the output is reshaped back to [B, L, Hq, D]
the same dot products over the same keys row by row, with no copy of the cache (torch's enable_gqa=True is
not used: with a mask some CUDA builds serve it with the math kernel, which repeats K and V itself).
Everything else (no mask, one query row, biases, softcaps) goes to transformers' own sdpa.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

NAME = "duo_sdpa"       # the attn_implementation load_target asks transformers for
PROBE_WINDOW = 8        # check_tree_support's window: a short probe then reaches well past it


def attn_implementation() -> str:
    """Register duo_sdpa (and sdpa's mask builder under its name) with transformers; its name, or "sdpa"
    where this transformers has no attention registry."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return "sdpa"
    AttentionInterface.register(NAME, duo_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def duo_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
             **kwargs):
    """transformers' sdpa attention function, without repeating K/V for a masked multi-row pass (see above)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n_rep = getattr(module, "num_key_value_groups", 1)
    b, hq, rows, _ = query.shape
    special = any(kwargs.get(k) is not None for k in ("position_bias", "softcap")) or kwargs.get("output_attentions")
    if n_rep == 1 or rows == 1 or attention_mask is None or special or not isinstance(attention_mask, torch.Tensor):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    hkv = key.shape[1]
    q = query.reshape(b, hkv, n_rep * rows, query.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=stacked_mask(attention_mask, n_rep),
                                                           dropout_p=dropout, scale=scaling)
    return out.reshape(b, hq, rows, value.shape[-1]).transpose(1, 2).contiguous(), None


_own: list = []     # [[mask, {n_rep: stacked}]] for the masks of the latest verify_mask (never changed in place)


def stacked_mask(mask: torch.Tensor, n_rep: int) -> torch.Tensor:
    """The mask for n_rep stacked query heads per KV head; for verify_mask's masks made once per pass, not once
    per layer (any other mask, e.g. a static buffer rewritten in place, is stacked at every call)."""
    if not torch.compiler.is_compiling():
        for m, done in _own:
            if m is mask:
                if n_rep not in done:
                    done[n_rep] = stack_rows(mask, n_rep)
                return done[n_rep]
    return stack_rows(mask, n_rep)


def stack_rows(mask: torch.Tensor, n_rep: int) -> torch.Tensor:
    b, h, rows, keys = mask.shape
    if h == 1:   # one mask for every head: repeat its rows
        return mask[:, :, None].expand(b, 1, n_rep, rows, keys).reshape(b, 1, n_rep * rows, keys)
    return mask.reshape(b, h // n_rep, n_rep * rows, keys)   # per query head: group g's heads are its rows


# ---------------------------------------------------------------- masks


def text_config(config):
    """The decoder's config (a multimodal model keeps it apart)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def layer_windows(config) -> tuple[list[str] | None, int | None]:
    """(the kinds of layer when the model takes one mask per kind, else None; the sliding window, or None)."""
    cfg = text_config(config)
    window = getattr(cfg, "sliding_window", None)
    kinds = getattr(cfg, "layer_types", None)
    if kinds and set(kinds) != {"full_attention"}:
        return sorted(set(kinds)), window
    return None, None if kinds else window


def ancestor_matrix(parents: np.ndarray) -> np.ndarray:
    """anc[i, j] = node j is node i or one of its ancestors; index 0 is the root, node k is k + 1."""
    n = len(parents) + 1
    anc = np.zeros((n, n), dtype=bool)
    anc[0, 0] = True
    for k, p in enumerate(parents):
        anc[k + 1] = anc[p + 1]
        anc[k + 1, k + 1] = True
    return anc


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[rows, keys] bool -> [1, 1, rows, keys]: 0 where allowed, dtype's most negative value elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]   # out of place: traceable in a graph


def tree_allowed(parents: np.ndarray, n_past: int, device, window: int | None = None) -> torch.Tensor:
    """allowed [1 + n, n_past + 1 + n] (module docstring); with `window`, only keys inside each query's window."""
    anc = torch.as_tensor(ancestor_matrix(parents), device=device)
    allowed = torch.cat([torch.ones(anc.shape[0], n_past, dtype=torch.bool, device=device), anc], dim=1)
    if window is None:
        return allowed
    from transformers.masking_utils import sliding_window_overlay
    pos = n_past + anc.sum(dim=1) - 1     # query positions: n_past + depth
    key_pos = torch.cat([torch.arange(n_past, device=device), pos])
    return allowed & sliding_window_overlay(window)(0, 0, pos[:, None], key_pos[None, :])


def tree_attention_mask(parents: np.ndarray, n_past: int, dtype: torch.dtype, device,
                        window: int | None = None) -> torch.Tensor:
    """Additive 4D mask [1, 1, 1 + n, n_past + 1 + n]: 0 where attention is allowed, -inf-like elsewhere."""
    return additive(tree_allowed(parents, n_past, device, window), dtype)


def verify_mask(config, parents: np.ndarray, n_past: int, dtype: torch.dtype, device):
    """The attention_mask of a tree pass for this model: one 4D mask, or one per kind of layer."""
    kinds, window = layer_windows(config)
    unknown = set(kinds or ()) - {"full_attention", "sliding_attention"}
    if unknown:   # (check_tree_support: no trees for this model)
        raise ValueError(f"no tree mask for {', '.join(sorted(unknown))} layers")
    if kinds is None:
        masks = tree_attention_mask(parents, n_past, dtype, device, window)
    else:
        masks = {"sliding_attention": tree_attention_mask(parents, n_past, dtype, device, window)}
        if "full_attention" in kinds:
            masks["full_attention"] = tree_attention_mask(parents, n_past, dtype, device)
    _own[:] = [[m, {}] for m in (masks.values() if isinstance(masks, dict) else [masks])]
    return masks


@contextlib.contextmanager
def probe_window(config, window: int = PROBE_WINDOW):
    """Shrink the model's sliding window to `window` for the duration (transformers' masks and verify_mask read
    it at every pass), so that a probe a few windows long stays short; nothing for a model without one.
    Yields the window in force (None: none)."""
    saved = layer_windows(config)[1]
    if saved is None or saved <= window:
        yield saved
        return
    cfg = text_config(config)
    cfg.sliding_window = window
    try:
        yield window
    finally:
        cfg.sliding_window = saved
