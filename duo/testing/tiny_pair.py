"""A tiny random-weight target/draft pair for tests, built locally in seconds.

``build_tiny_pair(out_dir)`` writes

* ``target.gguf`` -- a small Qwen2 (or Llama) model with random F32 weights and a
  ~512-token byte-level BPE vocabulary whose tokenizer metadata mirrors Qwen2.5's
  (``gpt2`` model, ``qwen2`` pre-tokenizer, ``<|endoftext|>``/``<|im_start|>``/
  ``<|im_end|>`` control tokens, eos ``<|im_end|>``, the Qwen2.5 chat template);
* ``draft.gguf`` -- the same model with every weight perturbed by relative noise
  ``draft_noise``, so its greedy choice agrees with the target's only part of the
  time (at the default 0.07: ~53% for qwen2, ~43% for llama on random token
  sequences; see ``tests/test_tiny_pair.py``);
* ``target_hf/`` -- the target loaded by transformers from ``target.gguf`` (the
  same path real GGUF targets go through) and saved with ``save_pretrained``,
  tokenizer included.

With ``draft_quant="q4_0"`` or ``"q8_0"`` the draft's 2-D weight matrices (embedding, attention,
FFN, output) are stored quantized (norms and biases stay F32), so llama.cpp runs its quantized
CPU kernels on the draft -- including its CPU "extra buffer types", which an F32 draft never
touches: CPU_REPACK (Q4_0 interleaved as q4_0_8x8 for AVX2/AVX-512; Q8_0 is repacked on ARM
only) and, on Intel CPUs with AMX, the AMX buffer type (Q4_0 and Q8_0). Use ``hidden=256,
ffn=768`` (``QUANT_DIMS``): every weight matrix then has rows a multiple of 32 and K a multiple
of 256, which all those kernels take. The target stays F32. With q4_0 at the default noise the
draft's greedy choice agrees with the target's ~38% of the time (qwen2).

The logits are peaked (logit std ~12, median top-1/top-2 gap ~2.5, 1st percentile
~0.06) so greedy decoding is insensitive to float rounding. Everything is deterministic in ``seed``.
A finished build is cached: calling again with the same parameters and
``out_dir`` returns the existing files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

__all__ = [
    "TinyPair",
    "build_tiny_pair",
    "build_vocab",
    "SPECIAL_TOKENS",
    "QWEN2_CHAT_TEMPLATE",
    "DEFAULT_DRAFT_NOISE",
    "reference_weights",
    "DRAFT_QUANTS",
    "QUANT_DIMS",
]

# Bump when the output for the same parameters changes (invalidates caches).
FORMAT_VERSION = 1

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
DEFAULT_DRAFT_NOISE = 0.07
DEFAULT_VOCAB_SIZE = 512  # including the 3 special tokens

# draft_quant value -> the GGML type its 2-D weights are stored in (see build_tiny_pair).
DRAFT_QUANTS = {"q8_0": "Q8_0", "q4_0": "Q4_0"}
# Dimensions for a quantized draft that llama.cpp's CPU_REPACK (and AMX) buffer types take:
# every weight matrix has rows % 32 == 0 and K % 256 == 0 (q4_0 8x8 repack wants rows % 8, AMX
# out_features % 32, K a whole number of blocks).
QUANT_DIMS = dict(hidden=256, ffn=768)

# Qwen2's pre-tokenizer split (llama.cpp's "qwen2" pre-tokenizer uses the same regex).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Verbatim from Qwen2.5(-Coder)-Instruct's GGUF (tokenizer.chat_template).
QWEN2_CHAT_TEMPLATE = (
'{%- if tools %}\n    {{- \'<|im_start|>system\\n\' }}\n    {%- if messages[0][\'role\'] == \'system\' %}\n        {{- messages[0][\'content\'] }}\n    {%- else %}\n        {{- \'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.\' }}\n    {%- endif %}\n    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n    {%- for tool in tools %}\n        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n{%- else %}\n    {%- if messages[0][\'role\'] == \'system\' %}\n        {{- \'<|im_start|>system\\n\' + messages[0][\'content\'] + \'<|im_end|>\\n\' }}\n    {%- else %}\n        {{- \'<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n\' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}\n        {{- \'<|im_start|>\' + message.role + \'\\n\' + message.content + \'<|im_end|>\' + \'\\n\' }}\n    {%- elif message.role == "assistant" %}\n        {{- \'<|im_start|>\' + message.role }}\n        {%- if message.content %}\n            {{- \'\\n\' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- \'\\n<tool_call>\\n{"name": "\' }}\n            {{- tool_call.name }}\n            {{- \'", "arguments": \' }}\n            {{- tool_call.arguments | tojson }}\n            {{- \'}\\n</tool_call>\' }}\n        {%- endfor %}\n        {{- \'<|im_end|>\\n\' }}\n    {%- elif message.role == "tool" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n            {{- \'<|im_start|>user\' }}\n        {%- endif %}\n        {{- \'\\n<tool_response>\\n\' }}\n        {{- message.content }}\n        {{- \'\\n</tool_response>\' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n            {{- \'<|im_end|>\\n\' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- \'<|im_start|>assistant\\n\' }}\n{%- endif %}\n'
)

# Small built-in corpus (English prose + Python) the BPE merges are learned from.
_TRAIN_TEXT = r'''
The quick brown fox jumps over the lazy dog. A speculative decoder guesses several
tokens with a small draft model and then asks the large target model to check all of
them in one forward pass. When the draft is right, the target accepts the whole run of
tokens and the text is produced faster; when the draft is wrong, the target rejects the
rest of the guess, keeps its own token, and the draft starts again from there.
The output must be exactly what the target would have written on its own.
It was the best of times, it was the worst of times, it was the age of wisdom, it was
the age of foolishness, it was the epoch of belief, it was the epoch of incredulity.
In the beginning there was the word, and the word was a token, and the token was a
number between zero and the size of the vocabulary. There are many ways to write a
program, and most of them are wrong; the right one is usually the simplest one that
still works. Please answer the question below in one short sentence, and then explain
your reasoning step by step. The user asked for a list of the three largest cities in
the country, their population, and the year in which each of them was founded.
Thank you for your help! I would like to know how this works, and why it is faster
than the normal way of generating text with a language model on a single machine.
Memory is the main limit: the weights must be read once for every step, so reading
them once for many tokens at the same time is nearly free. This is why it works.

def fibonacci(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    a, b = 0, 1
    for _ in range(n - 1):
        a, b = b, a + b
    return b


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from empty stack")
        return self.items.pop()

    def __len__(self):
        return len(self.items)


def read_config(path: str) -> dict:
    import json
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description="Run the model on a prompt.")
    parser.add_argument("--model", type=str, required=True, help="path to the model")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)
    config = read_config(args.model)
    for key, value in sorted(config.items()):
        print(f"{key} = {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

import numpy as np
import torch

def softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)

def accept_tokens(draft_tokens, target_logits):
    accepted = []
    for i, token in enumerate(draft_tokens):
        best = int(torch.argmax(target_logits[i]))
        if best != token:
            accepted.append(best)
            break
        accepted.append(token)
    return accepted

result = {"status": "ok", "count": 42, "values": [1, 2, 3, 4, 5], "name": "test"}
numbers = [x * x for x in range(10) if x % 2 == 0]
total = sum(numbers) + len(result["values"])
print("The total is", total, "and the result is", result)
'''


@dataclasses.dataclass(frozen=True)
class TinyPair:
    """Paths of a built tiny pair (all inside one directory)."""

    target_gguf: Path
    draft_gguf: Path
    target_hf_dir: Path
    arch: str = "qwen2"
    vocab_size: int = 0
    eos_token_id: int = -1
    bos_token_id: int = -1
    draft_noise: float = DEFAULT_DRAFT_NOISE
    draft_quant: str | None = None  # None: F32 draft; "q4_0" / "q8_0": quantized 2-D weights
    params: dict = dataclasses.field(default_factory=dict, hash=False)  # build_tiny_pair's arguments

    @property
    def root(self) -> Path:
        return self.target_gguf.parent


# --------------------------------------------------------------------------- vocab


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (in GPT-2's vocab order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_vocab(vocab_size: int = DEFAULT_VOCAB_SIZE, text: str = _TRAIN_TEXT) -> tuple[list[str], list[str]]:
    """Deterministically learn a byte-level BPE vocabulary.

    Returns ``(tokens, merges)``: ``tokens`` are the 256 byte symbols (GPT-2 order), then one
    token per merge in merge order, then ``SPECIAL_TOKENS``; ``merges`` are ``"left right"``
    strings in rank order, as GGUF stores them. The trainer is a plain greedy BPE (most frequent
    adjacent pair; ties broken by the pair's text) over words split with Qwen2's pre-tokenizer
    regex, so llama.cpp and transformers tokenize with these merges identically.
    """
    import regex

    byte_map = bytes_to_unicode()
    tokens = list(byte_map.values())
    n_target = vocab_size - len(SPECIAL_TOKENS)
    if n_target < len(tokens):
        raise ValueError(f"vocab_size must be at least {len(tokens) + len(SPECIAL_TOKENS)}")

    words = Counter("".join(byte_map[b] for b in w.encode("utf-8")) for w in regex.findall(_QWEN2_SPLIT, text))
    corpus = [(list(w), c) for w, c in sorted(words.items())]
    known = set(tokens)
    merges: list[str] = []
    while len(tokens) < n_target:
        pairs: Counter = Counter()
        for syms, c in corpus:
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < 2:
            break
        merges.append(f"{a} {b}")
        new = a + b
        if new not in known:
            known.add(new)
            tokens.append(new)
        for syms, _ in corpus:
            i = 0
            while i < len(syms) - 1:
                if syms[i] == a and syms[i + 1] == b:
                    syms[i : i + 2] = [new]
                i += 1
    if len(tokens) < n_target:
        raise ValueError(f"training text too small for vocab_size={vocab_size} (got {len(tokens)} tokens)")
    return tokens + list(SPECIAL_TOKENS), merges


# --------------------------------------------------------------------------- weights


# Std of the target's logits; sets the top-2 gaps (median ~0.2 * this).
_LOGIT_SCALE = 12.0


def _hf_weights(rng: np.random.Generator, *, arch, vocab, n_layers, hidden, n_heads, n_kv_heads, ffn,
                logit_scale=_LOGIT_SCALE) -> dict:
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
    # Logit std ~ _LOGIT_SCALE: top-2 gaps of order 1 (greedy never hinges on rounding).
    w["output.weight"] = lin(vocab, hidden, logit_scale)
    return w


_HF_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str:
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if gguf_name in top:
        return top[gguf_name]
    _, layer, module, kind = gguf_name.split(".")
    return f"model.layers.{layer}.{_HF_NAMES[module]}.{kind}"


def reference_weights(pair: "TinyPair", which: str = "target") -> dict[str, np.ndarray]:
    """The weights ``pair`` was generated from, in transformers naming and layout (float32).

    Independent of the GGUF files, so tests can check that what transformers (and llama.cpp)
    read back is what was meant -- e.g. that Llama q/k were permuted the way the loaders expect.
    """
    p = pair.params
    shape = dict(arch=p["arch"], vocab=pair.vocab_size, n_layers=p["n_layers"], hidden=p["hidden"],
                 n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"], ffn=p["ffn"],
                 logit_scale=p.get("logit_scale", _LOGIT_SCALE))
    target = _hf_weights(np.random.default_rng([p["seed"], 0]), **shape)
    weights = target
    if which == "draft":
        weights = _draft_weights(target, p["draft_noise"], p["seed"])
        if p.get("draft_quant"):  # what llama.cpp computes with: the quantized values
            weights = {k: _roundtrip(v, p["draft_quant"]) for k, v in weights.items()}
    return {_hf_name(k): v.astype(np.float32) for k, v in weights.items()}


def _qtype(draft_quant: str):
    import gguf

    return gguf.GGMLQuantizationType[DRAFT_QUANTS[draft_quant]]


def _quantizes(arr: np.ndarray) -> bool:
    """Which tensors a quantized draft stores quantized: the 2-D weight matrices (not norms/biases)."""
    return arr.ndim == 2


def _roundtrip(arr: np.ndarray, draft_quant: str) -> np.ndarray:
    """``arr`` as the quantized draft stores it, dequantized (identity for norms and biases)."""
    if not _quantizes(arr):
        return arr
    from gguf import quants

    qt = _qtype(draft_quant)
    return quants.dequantize(quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qt), qt)


def _draft_weights(target: dict, draft_noise: float, seed: int) -> dict:
    noise_rng = np.random.default_rng([seed, 1])
    return {
        k: v + draft_noise * float(v.std() if v.size > 1 else 1.0) * noise_rng.standard_normal(v.shape)
        for k, v in target.items()
    }


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Llama q/k rows (HF rotate-half -> interleaved rope)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, *, arch, name, weights, tokens, merges, hp, quant: str | None = None) -> None:
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


# --------------------------------------------------------------------------- build


def _export_hf(root: Path, gguf_name: str, hf_dir: Path) -> None:
    """Load the GGUF with transformers (dense float32) and save model + tokenizer to ``hf_dir``.

    Mirrors ``duo.models._convert``, the path real GGUF targets take (nothing is patched up
    afterwards, so the tiny target sees exactly what a converted real one does).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # newer transformers: ask for plain dense weights explicitly, never packed GGUF blocks
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    from ..models import _quiet_transformers

    with _quiet_transformers(verbose=False):
        tok = AutoTokenizer.from_pretrained(str(root), gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=gguf_name, dtype=torch.float32, **kwargs)
        # The weights are dense; drop the GGUF quantizer marker so save_pretrained accepts the model.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(str(hf_dir))
        tok.save_pretrained(str(hf_dir))


def build_tiny_pair(
    out_dir,
    *,
    arch: str = "qwen2",
    seed: int = 0,
    n_layers: int = 2,
    hidden: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn: int = 128,
    ctx: int = 2048,
    draft_noise: float = DEFAULT_DRAFT_NOISE,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    logit_scale: float = _LOGIT_SCALE,
    draft_quant: str | None = None,
) -> TinyPair:
    """Build (or return the cached) tiny target/draft pair in ``out_dir``.

    ``arch`` is ``"qwen2"`` (q/k/v biases, NEOX rope) or ``"llama"`` (no biases; q/k rows
    permuted for llama.cpp's interleaved rope, as convert_hf_to_gguf does, which transformers'
    GGUF loader undoes). The draft is the target with each tensor ``W`` replaced by
    ``W + draft_noise * std(W) * N(0, 1)`` (noise drawn from its own stream of ``seed``).

    ``draft_quant`` (``None``, ``"q8_0"`` or ``"q4_0"``) stores the draft's 2-D weight matrices
    quantized to that GGML type (norms and biases stay F32); the quantization error adds to the
    noise (relative ~0.085 for q4_0, ~0.005 for q8_0). Needs ``hidden`` and ``ffn`` multiples of
    32; ``QUANT_DIMS`` are sizes llama.cpp's repack/AMX buffer types take.
    """
    if arch not in ("qwen2", "llama"):
        raise ValueError(f"arch must be 'qwen2' or 'llama', not {arch!r}")
    if hidden % n_heads or n_heads % n_kv_heads or (hidden // n_heads) % 2:
        raise ValueError("need hidden % n_heads == 0, n_heads % n_kv_heads == 0 and an even head_dim")
    if draft_quant is not None:
        if draft_quant not in DRAFT_QUANTS:
            raise ValueError(f"draft_quant must be None or one of {sorted(DRAFT_QUANTS)}, not {draft_quant!r}")
        if hidden % 32 or ffn % 32:
            raise ValueError("a quantized draft needs hidden and ffn multiples of 32 (the quant block size)")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = dict(
        format=FORMAT_VERSION, arch=arch, seed=seed, n_layers=n_layers, hidden=hidden, n_heads=n_heads,
        n_kv_heads=n_kv_heads, ffn=ffn, ctx=ctx, draft_noise=float(draft_noise), vocab_size=vocab_size,
        logit_scale=float(logit_scale),
    )
    if draft_quant is not None:  # only when set: F32 builds keep the key (and caches) they always had
        params["draft_quant"] = draft_quant
    manifest = out / "tiny_pair.json"

    from filelock import FileLock

    with FileLock(str(out / ".tiny_pair.lock")):
        if manifest.exists():
            try:
                info = json.loads(manifest.read_text())
            except ValueError:
                info = None
            if info is not None and info.get("params") == params:
                pair = _pair_from_info(out, info)
                if pair.target_gguf.exists() and pair.draft_gguf.exists() and (pair.target_hf_dir / "config.json").exists():
                    return pair
            manifest.unlink()

        tokens, merges = build_vocab(vocab_size)
        V = len(tokens)
        hp = dict(n_layers=n_layers, hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn=ffn, ctx=ctx,
                  rope_theta=1_000_000.0 if arch == "qwen2" else 10_000.0)
        shape = dict(arch=arch, vocab=V, n_layers=n_layers, hidden=hidden, n_heads=n_heads,
                     n_kv_heads=n_kv_heads, ffn=ffn)
        target_w = _hf_weights(np.random.default_rng([seed, 0]), **shape, logit_scale=logit_scale)
        draft_w = _draft_weights(target_w, draft_noise, seed)

        for stale in out.glob(".build-*"):  # left by an interrupted build
            shutil.rmtree(stale, ignore_errors=True)
        # Write into a scratch dir inside out_dir, then move into place.
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
        try:
            _write_gguf(tmp / "target.gguf", arch=arch, name=f"tiny-{arch}-target", weights=target_w,
                        tokens=tokens, merges=merges, hp=hp)
            _write_gguf(tmp / "draft.gguf", arch=arch, name=f"tiny-{arch}-draft", weights=draft_w,
                        tokens=tokens, merges=merges, hp=hp, quant=draft_quant)
            _export_hf(tmp, "target.gguf", tmp / "target_hf")
            for name in ("target.gguf", "draft.gguf", "target_hf"):
                dst = out / name
                if dst.is_dir():
                    shutil.rmtree(dst)
                elif dst.exists():
                    dst.unlink()
                os.replace(tmp / name, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

        info = dict(
            params=params,
            target_gguf="target.gguf",
            draft_gguf="draft.gguf",
            target_hf_dir="target_hf",
            vocab_size=V,
            eos_token_id=tokens.index("<|im_end|>"),
            bos_token_id=tokens.index("<|endoftext|>"),
        )
        manifest.write_text(json.dumps(info, indent=1))
        return _pair_from_info(out, info)


def _pair_from_info(out: Path, info: dict) -> TinyPair:
    return TinyPair(
        target_gguf=out / info["target_gguf"],
        draft_gguf=out / info["draft_gguf"],
        target_hf_dir=out / info["target_hf_dir"],
        arch=info["params"]["arch"],
        vocab_size=info["vocab_size"],
        eos_token_id=info["eos_token_id"],
        bos_token_id=info["bos_token_id"],
        draft_noise=info["params"]["draft_noise"],
        draft_quant=info["params"].get("draft_quant"),
        params=dict(info["params"]),
    )
