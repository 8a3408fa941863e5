"""A LoRA adapter in llama.cpp's GGUF format (what `llama_adapter_lora_init` reads), and its check.

    general.type = "adapter", general.architecture = the draft's, adapter.type = "lora",
    adapter.lora.alpha = alpha (llama.cpp scales B·A by alpha / rank)
    <blk.N.attn_q.weight>.lora_a   numpy (rank, in)   = peft's lora_A.weight
    <blk.N.attn_q.weight>.lora_b   numpy (out, rank)  = peft's lora_B.weight
    duo.draft = the draft GGUF's fingerprint (buffer.fingerprint), duo.* = how it was trained

The llama architecture stores q and k with their rows permuted (rotary halves interleaved) in the GGUF
and transformers undoes it on loading; B's rows get the same permutation here, so B·A lands on the
GGUF's rows. Qwen2 stores them as they are.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..gguf_file import read_gguf_metadata
from ..registry import ModelError
from .buffer import fingerprint

HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
PERMUTED_ARCHS = ("llama",)


def gguf_tensor_name(hf_module: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'blk.3.attn_q.weight'."""
    parts = hf_module.split(".")
    layer = parts[parts.index("layers") + 1]
    kind = ".".join(parts[parts.index("layers") + 2:])
    if kind not in HF_TO_GGUF:
        raise ValueError(f"no llama.cpp tensor for {hf_module}")
    return f"blk.{layer}.{HF_TO_GGUF[kind]}.weight"


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The llama GGUF's q/k row order: per head, the two rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_lora_gguf(path: Path, lora: dict[str, tuple[np.ndarray, np.ndarray]], *, draft_gguf: Path, alpha: float,
                    n_head: int, n_head_kv: int, meta: dict | None = None) -> Path:
    """Write {hf module name: (A (r, in), B (out, r))} as a llama.cpp LoRA for `draft_gguf` (atomically)."""
    import gguf

    arch = read_gguf_metadata(Path(draft_gguf), {"general.architecture"})["general.architecture"]
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    w.add_string("duo.draft", fingerprint(draft_gguf))
    w.add_string("duo.draft_name", Path(draft_gguf).name)
    for k, v in (meta or {}).items():
        w.add_string(f"duo.{k}", str(v))
    for module, (a, b) in sorted(lora.items()):
        name = gguf_tensor_name(module)
        b = np.asarray(b, np.float32)
        if arch in PERMUTED_ARCHS and name.endswith(("attn_q.weight", "attn_k.weight")):
            b = permute_rows(b, n_head if "attn_q" in name else n_head_kv)
        w.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, np.float32))
        w.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


def check_adapter(path: str | Path, draft_gguf: str | Path) -> dict:
    """The adapter's duo metadata; a UsageError naming the fix when it is not a LoRA for this draft."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"no adapter file {path}: train one with `duo adapt`, or use --adapter off")
    try:
        meta = read_gguf_metadata(p, {"general.type", "adapter.type", "duo.draft", "duo.draft_name",
                                      "duo.agreement_before", "duo.agreement_after"})
    except ModelError as e:
        raise UsageError(f"{path} is not a usable adapter: {e}; train it again with `duo adapt`") from None
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise UsageError(f"{path} is not a LoRA adapter (general.type={meta.get('general.type')!r}): give a file "
                         f"`duo adapt` wrote, or use --adapter off")
    want = fingerprint(draft_gguf)
    if meta.get("duo.draft") != want:
        raise UsageError(f"{path} was trained for another draft ({meta.get('duo.draft_name') or 'unknown'}), not "
                         f"{Path(draft_gguf).name}: run `duo adapt` for this draft, or use --adapter off")
    return meta
