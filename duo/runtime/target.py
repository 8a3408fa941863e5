"""The target model in torch: load it, prefill, verify a draft tree in one forward pass, compact the KV cache.

`TargetModel` implements the Target interface (target_interface.py) with the functions below.

The cache always holds the committed tokens except the last one (the *root*).
A verification forward feeds [root] + tree nodes with
  position = n_past + depth            (root depth 0)
  mask[i, j] = j < n_past or j is an ancestor of i (or i itself)
so every node sees the prefix and its own path, as if it were decoded alone.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..sampling import choose_tokens, token_logprobs
from .precision import Precision, PrecisionError, footprint_bytes, quantize_int8, resolve_precision
from .tree import Tree

log = logging.getLogger("duo")


class TargetError(RuntimeError):
    """The target could not be loaded or run (device, memory, files)."""


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


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks cuda when a GPU is visible; 'cuda' without one is an error."""
    d = str(device)
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(d)
    except (RuntimeError, ValueError) as e:
        raise TargetError(f"unknown device {d!r}: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TargetError(f"--device {d} was asked for but no CUDA GPU is visible to torch; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TargetError(f"--device {d}: only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type != "cpu":
        raise TargetError(f"unsupported device {d!r}: use auto, cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> Precision:
    """The target's precision (precision.py): 'auto' is float32 on the CPU, bfloat16 (or float16) on a GPU."""
    try:
        return resolve_precision(dtype, device)
    except PrecisionError as e:
        raise TargetError(str(e)) from e


def storage_dtype(device: str = "auto", dtype: str = "auto") -> str:
    """The dtype a converted GGUF target is cached in for this precision (float32, bfloat16, float16)."""
    return resolve_dtype(dtype, resolve_device(device)).storage


def load_target(hf_dir: str | Path, device: str = "auto", dtype: str = "auto", name: str | None = None,
                threads: int | None = None, progress: bool = True) -> TargetModel:
    """Load a transformers causal LM and its tokenizer from a local directory (progress: transformers' bars)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    prec = resolve_dtype(dtype, dev)
    dt = prec.dtype
    if threads:
        torch.set_num_threads(threads)
    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        with quiet_loading(progress):
            model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dt, attn_implementation="sdpa")
        model.to(dev).eval()
        if prec.weights == "int8":
            quantize_int8(model, dt)
    except torch.OutOfMemoryError as e:
        raise TargetError(f"out of memory loading the target on {dev}: try a smaller model, --dtype bfloat16, "
                          f"or --device cpu") from e
    except MemoryError as e:
        raise TargetError("out of host memory loading the target: close other programs or use a smaller model") from e
    cfg = model.config
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        eos_ids.add(tok.eos_token_id)
    for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i is not None and i < cfg.vocab_size:
            eos_ids.add(i)
    if dev.type == "cpu":
        use_onednn_linears(model)
    tm = TargetModel(model=model, tokenizer=tok, device=dev, dtype=dt, vocab_size=cfg.vocab_size,
                     max_context=int(getattr(cfg, "max_position_embeddings", 4096) or 4096),
                     eos_ids=frozenset(eos_ids), name=name or Path(hf_dir).name, threads=threads,
                     precision=prec.name, footprint=footprint_bytes(model))
    tm.supports_tree = check_tree_support(tm)
    if not tm.supports_tree:
        log.warning("target %s does not verify trees correctly with a 4D mask; drafting chains only", tm.name)
    return tm


@contextlib.contextmanager
def quiet_loading(progress: bool):
    """Without progress: no transformers progress bars ("Loading weights") while the target loads."""
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not progress:
            hf_logging.enable_progress_bar()


def use_onednn_linears(model: torch.nn.Module) -> int:
    """On the CPU, run every Linear through oneDNN instead of the default BLAS call.

    Same fp32 math; on a 2-core AVX-512 machine a 16-row matmul then costs ~2x one row instead of
    ~4x, i.e. verifying a tree is nearly as cheap as one decoding step. Returns the layers switched.
    """
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return 0

    def forward(self, x):
        return op(x, self.weight, self.bias, "none", [], "")

    n = 0
    for m in model.modules():
        if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32:
            try:
                op(torch.zeros(1, m.in_features), m.weight, m.bias, "none", [], "")
            except RuntimeError:
                return n
            m.forward = forward.__get__(m)
            n += 1
    return n


def new_cache():
    from transformers import DynamicCache
    return DynamicCache()


def cache_length(cache) -> int:
    return cache.get_seq_length()


@torch.inference_mode()
def prefill(tm: TargetModel, cache, tokens, chunk: int = 512) -> torch.Tensor | None:
    """Append `tokens` to the cache (causal, in chunks to bound attention memory); returns the float32
    logits [1, vocab] after the last token (the first generated token's), None for no tokens."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=tm.device)
    out = None
    for s in range(0, len(ids), chunk):
        piece = ids[s:s + chunk][None]
        n_past = cache_length(cache)
        pos = torch.arange(n_past, n_past + piece.shape[1], device=tm.device)
        out = tm.model(input_ids=piece, position_ids=pos[None], cache_position=pos, past_key_values=cache,
                       use_cache=True, logits_to_keep=1)
    return None if out is None else out.logits[0, -1:].float()


def ancestor_matrix(parents: np.ndarray) -> np.ndarray:
    """anc[i, j] = node j is node i or one of its ancestors; index 0 is the root, node k is k + 1."""
    n = len(parents) + 1
    anc = np.zeros((n, n), dtype=bool)
    anc[0, 0] = True
    for k, p in enumerate(parents):
        anc[k + 1] = anc[p + 1]
        anc[k + 1, k + 1] = True
    return anc


def tree_attention_mask(parents: np.ndarray, n_past: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive 4D mask [1, 1, 1 + n, n_past + 1 + n]: 0 where attention is allowed, -inf-like elsewhere."""
    anc = torch.as_tensor(ancestor_matrix(parents), device=device)
    allowed = torch.cat([torch.ones(anc.shape[0], n_past, dtype=torch.bool, device=device), anc], dim=1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


@torch.inference_mode()
def forward_tree(tm: TargetModel, cache, root: int, tree: Tree) -> torch.Tensor:
    """One target pass over [root] + tree; returns float32 logits [1 + n, vocab] (row 0 = after the root)."""
    n_past = cache_length(cache)
    ids = torch.as_tensor(np.concatenate([[root], tree.tokens]).astype(np.int64), device=tm.device)[None]
    depth = np.concatenate([[0], tree.depths()]) if len(tree) else np.zeros(1, np.int64)
    pos = torch.as_tensor(n_past + depth, device=tm.device)[None]
    cache_pos = torch.arange(n_past, n_past + ids.shape[1], device=tm.device)
    is_chain = bool(np.all(tree.parents == np.arange(-1, len(tree) - 1)))
    mask = None if is_chain else tree_attention_mask(tree.parents, n_past, tm.dtype, tm.device)
    out = tm.model(input_ids=ids, position_ids=pos, cache_position=cache_pos, attention_mask=mask,
                   past_key_values=cache, use_cache=True)
    return out.logits[0].float()


def _layers(cache):
    if hasattr(cache, "layers"):
        return [(layer, "keys", "values") for layer in cache.layers]
    raise TargetError("unsupported transformers cache (needs DynamicCache with .layers, transformers >= 4.56)")


@torch.inference_mode()
def compact_cache(cache, n_keep: int, path: list[int]) -> None:
    """Keep the first n_keep entries (prefix + root) and the accepted nodes, drop the rest of the tree.

    Accepted node k sits at cache index n_keep + k; it moves to n_keep + (its rank in path).
    """
    src = [n_keep + k for k in path]
    moved = src != list(range(n_keep, n_keep + len(path)))
    new_len = n_keep + len(path)
    for layer, kname, vname in _layers(cache):
        for name in (kname, vname):
            t = getattr(layer, name)
            if moved:
                idx = torch.as_tensor(src, device=t.device)
                t[:, :, n_keep:new_len] = t.index_select(2, idx)
            setattr(layer, name, t[:, :, :new_len])


@torch.inference_mode()
def check_tree_support(tm: TargetModel) -> bool:
    """Verify a small branched tree against plain causal runs of each branch; False if the model ignores the mask."""
    v = tm.vocab_size - 1
    prefix = [min(17 + 31 * i, v) for i in range(5)]
    tree = Tree(tokens=[min(101, v), min(202, v), min(303, v), min(404, v)], parents=[-1, -1, 0, 1],
                probs=[1, 1, 1, 1])
    try:
        cache = new_cache()
        prefill(tm, cache, prefix[:-1])
        got = forward_tree(tm, cache, prefix[-1], tree)
        for branch in ([0, 2], [1, 3]):
            seq = prefix + [int(tree.tokens[b]) for b in branch]
            ref = tm.model(input_ids=torch.as_tensor(seq, device=tm.device)[None]).logits[0].float()
            rows = [0] + [b + 1 for b in branch]
            tol = 1e-3 if tm.dtype == torch.float32 else 5e-2
            if (got[rows] - ref[len(prefix) - 1:]).abs().max() > tol * ref.abs().max():
                return False
        return True
    except Exception as e:  # a model whose forward rejects 4D masks or position ids
        log.debug("tree check failed: %s", e)
        return False
