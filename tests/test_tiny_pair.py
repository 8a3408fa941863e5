"""The tiny random-weight pair: vocabulary, tokenizer parity, weight layout, agreement, peakedness.

These checks are what make the tiny pair trustworthy as a stand-in for a real target/draft pair:
transformers and llama.cpp must read the same GGUF as the same tokenizer and the same function.
"""

import functools
import time

import numpy as np
import pytest
import torch

from duo.testing.tiny_pair import SPECIAL_TOKENS, build_tiny_pair, build_vocab, reference_weights
from duo.models import _quiet_transformers

llama_cpp = pytest.importorskip("llama_cpp")

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "  leading spaces,\ttabs\tand\n\nnewlines   trailing  ",
    "naïve café — 日本語のテキスト, emoji 🙂 and ümlauts: äöü ß",
    "numbers 1234567890 and 3.14159, x**2 >= 42; it's they'll we're I'M",
    "literal <|im_end|> and <|im_start|>user and <|endoftext|> inside text",
]


def _llama(path, **kw):
    kw.setdefault("n_ctx", 512)
    return llama_cpp.Llama(model_path=str(path), n_threads=1, n_threads_batch=1, verbose=False, **kw)


def _hf_tokenizer(pair):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(pair.target_hf_dir))


@functools.lru_cache(maxsize=2)
def _load_hf_model(path):
    from transformers import AutoModelForCausalLM

    with _quiet_transformers(verbose=False):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_model(pair):
    return _load_hf_model(str(pair.target_hf_dir))


def _llama_logits(path, tokens, **kw):
    llm = _llama(path, logits_all=True, **kw)
    llm.eval(list(tokens))
    out = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    llm.close()
    return out


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([list(tokens)])).logits[0].double().numpy()


def _random_tokens(pair, n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, pair.vocab_size - len(SPECIAL_TOKENS), n).tolist()


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def pair(request):
    return request.getfixturevalue("tiny_pair" if request.param == "qwen2" else "tiny_pair_llama")


# --------------------------------------------------------------------------- files


def test_vocab_is_deterministic_byte_level_bpe():
    tokens, merges = build_vocab()
    assert (tokens, merges) == build_vocab()
    assert len(tokens) == 512 and len(set(tokens)) == 512
    assert tuple(tokens[-3:]) == SPECIAL_TOKENS
    assert len(merges) >= 512 - 256 - 3
    vocab = set(tokens)
    for m in merges:  # every merge joins two known tokens into a known token
        a, b = m.split(" ")
        assert a in vocab and b in vocab and a + b in vocab


def test_gguf_metadata_mirrors_qwen2(pair):
    import gguf

    for path in (pair.target_gguf, pair.draft_gguf):
        r = gguf.GGUFReader(str(path))
        f = {k: v.contents() for k, v in r.fields.items()}
        assert f["general.architecture"] == pair.arch
        assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
        tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
        assert len(tokens) == pair.vocab_size == 512
        assert [t for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL] == list(SPECIAL_TOKENS)
        assert tokens[f["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
        assert tokens[f["tokenizer.ggml.bos_token_id"]] == "<|endoftext|>"
        assert tokens[f["tokenizer.ggml.padding_token_id"]] == "<|endoftext|>"
        assert f["tokenizer.ggml.add_bos_token"] is False
        assert "<|im_start|>" in f["tokenizer.chat_template"]
        a = pair.arch
        assert (f[f"{a}.block_count"], f[f"{a}.embedding_length"], f[f"{a}.feed_forward_length"]) == (2, 64, 128)
        assert (f[f"{a}.attention.head_count"], f[f"{a}.attention.head_count_kv"]) == (4, 2)
        assert f[f"{a}.context_length"] == 2048
        shapes = {t.name: [int(x) for x in t.shape] for t in r.tensors}  # ggml order: ne[0] first
        assert shapes["token_embd.weight"] == [64, 512]
        assert shapes["output.weight"] == [64, 512]
        assert shapes["blk.0.attn_k.weight"] == [64, 32]
        assert shapes["blk.1.ffn_down.weight"] == [128, 64]
        assert ("blk.0.attn_q.bias" in shapes) == (pair.arch == "qwen2")
        assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)


def test_cached_build_is_reused(tiny_pair):
    mtimes = [p.stat().st_mtime_ns for p in (tiny_pair.target_gguf, tiny_pair.draft_gguf)]
    t0 = time.monotonic()
    again = build_tiny_pair(tiny_pair.root, arch="qwen2")
    assert time.monotonic() - t0 < 2.0
    assert again == tiny_pair
    assert [p.stat().st_mtime_ns for p in (again.target_gguf, again.draft_gguf)] == mtimes


def test_hf_export_config(tiny_pair):
    model = _hf_model(tiny_pair)
    cfg = model.config
    assert cfg.model_type == "qwen2" and not cfg.tie_word_embeddings
    assert cfg.vocab_size == 512 and cfg.max_position_embeddings == 2048
    assert getattr(cfg, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert cfg.eos_token_id == tiny_pair.eos_token_id
    tok = _hf_tokenizer(tiny_pair)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# --------------------------------------------------------------------------- tokenizer parity


def test_tokenizer_matches_llama_cpp(tiny_pair):
    from transformers import AutoTokenizer

    hf = _hf_tokenizer(tiny_pair)
    from_gguf = AutoTokenizer.from_pretrained(str(tiny_pair.root), gguf_file=tiny_pair.target_gguf.name)
    llm = _llama(tiny_pair.draft_gguf, vocab_only=True)
    special_ids = {hf.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert special_ids == {509, 510, 511}
    for text in TEXTS:
        # Special tokens written in the text stay text (llama.cpp special=False).
        ref = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == ref, text
        assert from_gguf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == ref, text
        assert not special_ids & set(ref)
        assert llm.detokenize(ref).decode() == text
        assert hf.decode(ref) == text
        # ... and become control tokens when parsed as special (llama.cpp special=True).
        ref_special = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert hf(text, add_special_tokens=False)["input_ids"] == ref_special, text
    chat = "<|im_start|>user\nwrite fibonacci<|im_end|>\n<|im_start|>assistant\n"
    ids = llm.tokenize(chat.encode(), add_bos=False, special=True)
    assert ids[0] == 510 and ids.count(511) == 1 and ids.count(510) == 2
    assert hf(chat, add_special_tokens=False)["input_ids"] == ids
    assert llm.token_eos() == 511
    llm.close()


# --------------------------------------------------------------------------- weights


def test_torch_target_has_the_generated_weights(pair):
    """What transformers reads from target.gguf is what was generated (catches a wrong dimension
    order or a wrong Llama q/k permutation in the writer; the loader undoes llama.cpp's)."""
    state = {k: v.numpy() for k, v in _hf_model(pair).state_dict().items()}
    ref = reference_weights(pair)
    assert set(ref) == set(state)
    for name, w in ref.items():
        np.testing.assert_array_equal(state[name], w, err_msg=name)
    assert not np.array_equal(reference_weights(pair, "draft")["lm_head.weight"], ref["lm_head.weight"])


def test_llama_cpp_and_torch_compute_the_same_function(pair):
    """Same logits from llama.cpp (target.gguf) and torch (target_hf): proves the weight layout,
    including the rope convention (q/k permutation for llama), which only shows past position 0."""
    tokens = _random_tokens(pair, 48, seed=1)
    ref = _torch_logits(_hf_model(pair), tokens)
    # F32 KV cache: the default F16 one alone moves logits by ~1e-3 relative.
    got = _llama_logits(pair.target_gguf, tokens, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    scale = np.abs(ref).max()
    err = np.abs(got - ref).max()
    print(f"\n[{pair.arch}] max |llama.cpp - torch| = {err:.2e} (max |logit| {scale:.1f})")
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * scale)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def _agreement(pair, what: str) -> float:
    """How often the draft's greedy token (llama.cpp) is the target's (torch) on random token sequences."""
    tokens = _random_tokens(pair, 256, seed=2)
    target = _torch_logits(_hf_model(pair), tokens).argmax(-1)
    draft = _llama_logits(pair.draft_gguf, tokens).argmax(-1)
    rate = float((target == draft).mean())
    print(f"\n[{what}] draft/target greedy agreement: {rate:.3f} over {len(tokens)} positions")
    return rate


def test_draft_agrees_with_target_part_of_the_time(pair):
    assert 0.35 <= _agreement(pair, pair.arch) <= 0.75


def test_target_logits_are_peaked(pair):
    tokens = _random_tokens(pair, 256, seed=3)
    logits = _torch_logits(_hf_model(pair), tokens)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    print(f"\n[{pair.arch}] top-2 gap: median {np.median(gap):.3f}, 1st pct {np.percentile(gap, 1):.4f}, "
          f"min {gap.min():.2e}")
    assert np.median(gap) > 0.5
    assert (gap < 1e-3).mean() < 0.01


# --------------------------------------------------------------------------- quantized draft


def test_quantized_draft_gguf(tiny_pair, tiny_pair_q):
    """The Q4_0 draft stores its weight matrices as Q4_0 blocks (norms/biases F32) holding exactly
    reference_weights(pair, "draft"); the F32 pairs' build key is what it always was."""
    import gguf
    from gguf.quants import dequantize

    from duo.testing.tiny_weights import hf_name as _hf_name

    assert "draft_quant" not in tiny_pair.params and tiny_pair.draft_quant is None
    assert tiny_pair_q.draft_quant == "q4_0" and tiny_pair_q.params["draft_quant"] == "q4_0"
    r = gguf.GGUFReader(str(tiny_pair_q.draft_gguf))
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    assert r.fields["qwen2.embedding_length"].contents() == 256
    ref = reference_weights(tiny_pair_q, "draft")
    for t in r.tensors:
        if len(t.shape) == 2:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0, t.name
            np.testing.assert_array_equal(dequantize(t.data, t.tensor_type), ref[_hf_name(t.name)], err_msg=t.name)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
    target = gguf.GGUFReader(str(tiny_pair_q.target_gguf))
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in target.tensors)
    # built once: the same parameters give the cached pair back
    assert build_tiny_pair(tiny_pair_q.root, **{k: v for k, v in tiny_pair_q.params.items() if k != "format"}) == tiny_pair_q


def test_quantized_draft_agrees_with_target_part_of_the_time(tiny_pair_q, extra_bufts_run):
    assert 0.25 <= _agreement(tiny_pair_q, "q4_0") <= 0.75


def test_quantized_draft_runs_on_cpu_extra_buffer_types(tiny_pair_q_load):
    """llama.cpp's log says a CPU extra buffer type (CPU_REPACK, AMX) holds the Q4_0 draft's weight
    matrices, so tests on tiny_pair_q exercise the repacked (or AMX) kernels, not just plain CPU ones."""
    import platform

    r = tiny_pair_q_load
    if r.crashed:
        pytest.skip(f"llama.cpp with its extra buffer types is {r.crashed} on this CPU (loading the Q4_0 draft)")
    assert r.returncode == 0, f"llama.cpp could not run the Q4_0 draft (exit code {r.returncode}):\n{r.stderr}"
    print("\n" + "\n".join(r.lines[:4]) + f"\n... ({len(r.repacked)} tensors repacked)")
    if not r.extra:
        if not r.has_repack and "AMX_INT8 = 1" not in r.system_info:
            pytest.skip(f"this llama.cpp build has no CPU repack (or AMX) buffer type: {r.system_info.strip()}")
        machine = platform.machine().lower()
        kernel = ("AVX2 = 1" if machine in ("x86_64", "amd64") else
                  "DOTPROD = 1" if machine in ("aarch64", "arm64") else None)
        if kernel is None or kernel not in r.system_info:
            pytest.skip(f"llama.cpp has no repacked Q4_0 kernel for this CPU ({machine}): {r.system_info.strip()}")
    assert r.extra, "no CPU extra buffer type holds any weight; llama.cpp's buffers: " + "; ".join(r.lines)
    assert r.buffers.get("CPU_Mapped", 0) > 0  # the token embedding (get_rows) stays in a plain buffer
    if r.repacked:  # CPU_REPACK logs each tensor it repacks (AMX only at debug level)
        assert {"blk.0.attn_q.weight", "blk.1.ffn_down.weight", "output.weight"} <= set(r.repacked), r.repacked
