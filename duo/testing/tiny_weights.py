"""The tiny pair's weights and GGUF files: random weights in transformers layout (peaked logits), the draft's
noisy copy, optional Q4_0/Q8_0 quantization of the draft's 2-D weights, and the GGUF writer (weights plus
the tokenizer metadata of duo.testing.tiny_vocab). duo.testing.tiny_pair builds the pair from these.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .tiny_vocab import QWEN2_CHAT_TEMPLATE, SPECIAL_TOKENS

# draft_quant value -> the GGML type its 2-D weights are stored in (see build_tiny_pair).
DRAFT_QUANTS = {"q8_0": "Q8_0", "q4_0": "Q4_0"}
# Dimensions for a quantized draft that llama.cpp's CPU_REPACK (and AMX) buffer types take:
# every weight matrix has rows % 32 == 0 and K % 256 == 0 (q4_0 8x8 repack wants rows % 8, AMX
# out_features % 32, K a whole number of blocks).
QUANT_DIMS = dict(hidden=256, ffn=768)

# Std of the target's logits; sets the top-2 gaps (median ~0.2 * this).
LOGIT_SCALE = 12.0


def hf_weights(rng: np.random.Generator, *, arch, vocab, n_layers, hidden, n_heads, n_kv_heads, ffn,
                logit_scale=LOGIT_SCALE) -> dict:
    """Random weights in transformers layout (out_features, in_features), keyed by GGUF name."""
    hd = hidden // n_heads

    def lin(out_f, in_f, gain=1.0):
        return rng.standard_normal((out_f, in_f)) * (gain / np.sqrt(in_f))

    def norm(n):
        return 1.0 + 0.1 * rng.standard_normal(n)

    w = {"token_embd.weight": rng.standard_normal((vocab, hidden))}
    for i in range(n_layers):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm(hidden)
        w[p + "attn_q.weight"] = lin(n_heads * hd, hidden, 2.0)  # sharper attention than pure noise
        w[p + "attn_k.weight"] = lin(n_kv_heads * hd, hidden, 2.0)
        w[p + "attn_v.weight"] = lin(n_kv_heads * hd, hidden)
        if arch == "qwen2":
            w[p + "attn_q.bias"] = 0.5 * rng.standard_normal(n_heads * hd)
            w[p + "attn_k.bias"] = 0.5 * rng.standard_normal(n_kv_heads * hd)
            w[p + "attn_v.bias"] = 0.5 * rng.standard_normal(n_kv_heads * hd)
        w[p + "attn_output.weight"] = lin(hidden, n_heads * hd, 1.5)
        w[p + "ffn_norm.weight"] = norm(hidden)
        w[p + "ffn_gate.weight"] = lin(ffn, hidden)
        w[p + "ffn_up.weight"] = lin(ffn, hidden)
        w[p + "ffn_down.weight"] = lin(hidden, ffn, 1.5)
    w["output_norm.weight"] = norm(hidden)
    # Logit std ~ LOGIT_SCALE: top-2 gaps of order 1 (greedy never hinges on rounding).
    w["output.weight"] = lin(vocab, hidden, logit_scale)
    return w


_HF_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if gguf_name in top:
        return top[gguf_name]
    _, layer, module, kind = gguf_name.split(".")
    return f"model.layers.{layer}.{_HF_NAMES[module]}.{kind}"


def _qtype(draft_quant: str):
    import gguf

    return gguf.GGMLQuantizationType[DRAFT_QUANTS[draft_quant]]


def _quantizes(arr: np.ndarray) -> bool:
    """Which tensors a quantized draft stores quantized: the 2-D weight matrices (not norms/biases)."""
    return arr.ndim == 2


def roundtrip(arr: np.ndarray, draft_quant: str) -> np.ndarray:
    """``arr`` as the quantized draft stores it, dequantized (identity for norms and biases)."""
    if not _quantizes(arr):
        return arr
    from gguf import quants

    qt = _qtype(draft_quant)
    return quants.dequantize(quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qt), qt)


def draft_weights(target: dict, draft_noise: float, seed: int) -> dict:
    noise_rng = np.random.default_rng([seed, 1])
    return {
        k: v + draft_noise * float(v.std() if v.size > 1 else 1.0) * noise_rng.standard_normal(v.shape)
        for k, v in target.items()
    }


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Llama q/k rows (HF rotate-half -> interleaved rope)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, *, arch, name, weights, tokens, merges, hp, quant: str | None = None) -> None:
    """Write one model; with ``quant`` ("q4_0"/"q8_0") its 2-D weight matrices are stored quantized."""
    import gguf
    from gguf import quants

    special = {t: i for i, t in enumerate(tokens) if t in SPECIAL_TOKENS}
    types = [
        int(gguf.TokenType.CONTROL) if t in special else int(gguf.TokenType.NORMAL) for t in tokens
    ]
    hd = hp["hidden"] // hp["n_heads"]

    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("model")
    w.add_name(name)
    w.add_block_count(hp["n_layers"])
    w.add_context_length(hp["ctx"])
    w.add_embedding_length(hp["hidden"])
    w.add_feed_forward_length(hp["ffn"])
    w.add_head_count(hp["n_heads"])
    w.add_head_count_kv(hp["n_kv_heads"])
    w.add_rope_freq_base(hp["rope_theta"])
    w.add_layer_norm_rms_eps(1e-6)
    if arch == "llama":
        w.add_rope_dimension_count(hd)
        w.add_vocab_size(len(tokens))
    qtype = _qtype(quant) if quant else None
    w.add_file_type(int(gguf.LlamaFileType[f"MOSTLY_{qtype.name}"] if quant else gguf.LlamaFileType.ALL_F32))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(special["<|im_end|>"])
    w.add_pad_token_id(special["<|endoftext|>"])
    w.add_bos_token_id(special["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(QWEN2_CHAT_TEMPLATE)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    for tname, arr in weights.items():
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arch == "llama" and tname.endswith("attn_q.weight"):
            arr = _permute_qk(arr, hp["n_heads"])
        elif arch == "llama" and tname.endswith("attn_k.weight"):
            arr = _permute_qk(arr, hp["n_kv_heads"])
        arr = np.ascontiguousarray(arr)
        if qtype is not None and _quantizes(arr):
            w.add_tensor(tname, quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(tname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
