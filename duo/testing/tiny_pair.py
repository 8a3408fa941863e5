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

This module holds ``TinyPair``, ``build_tiny_pair`` and ``reference_weights``; the vocabulary is built in
duo.testing.tiny_vocab, the weights and the GGUF files in duo.testing.tiny_weights (their public names
are re-exported here).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .tiny_vocab import DEFAULT_VOCAB_SIZE, QWEN2_CHAT_TEMPLATE, SPECIAL_TOKENS, build_vocab
from .tiny_weights import (
    DRAFT_QUANTS, LOGIT_SCALE, QUANT_DIMS, draft_weights, hf_name, hf_weights, roundtrip, write_gguf,
)

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

DEFAULT_DRAFT_NOISE = 0.07


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


def reference_weights(pair: "TinyPair", which: str = "target") -> dict[str, np.ndarray]:
    """The weights ``pair`` was generated from, in transformers naming and layout (float32).

    Independent of the GGUF files, so tests can check that what transformers (and llama.cpp)
    read back is what was meant -- e.g. that Llama q/k were permuted the way the loaders expect.
    """
    p = pair.params
    shape = dict(arch=p["arch"], vocab=pair.vocab_size, n_layers=p["n_layers"], hidden=p["hidden"],
                 n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"], ffn=p["ffn"],
                 logit_scale=p.get("logit_scale", LOGIT_SCALE))
    target = hf_weights(np.random.default_rng([p["seed"], 0]), **shape)
    weights = target
    if which == "draft":
        weights = draft_weights(target, p["draft_noise"], p["seed"])
        if p.get("draft_quant"):  # what llama.cpp computes with: the quantized values
            weights = {k: roundtrip(v, p["draft_quant"]) for k, v in weights.items()}
    return {hf_name(k): v.astype(np.float32) for k, v in weights.items()}


def _export_hf(root: Path, gguf_name: str, hf_dir: Path) -> None:
    """Load the GGUF with transformers (dense float32) and save model + tokenizer to ``hf_dir``.

    The path real GGUF targets take (duo.models' conversion: duo.gguf_file.to_transformers; nothing is
    patched up afterwards, so the tiny target sees exactly what a converted real one does).
    """
    from ..gguf_file import to_transformers

    to_transformers(Path(root) / gguf_name, Path(hf_dir), verbose=False)


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
    logit_scale: float = LOGIT_SCALE,
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
        target_w = hf_weights(np.random.default_rng([seed, 0]), **shape, logit_scale=logit_scale)
        draft_w = draft_weights(target_w, draft_noise, seed)

        for stale in out.glob(".build-*"):  # left by an interrupted build
            shutil.rmtree(stale, ignore_errors=True)
        # Write into a scratch dir inside out_dir, then move into place.
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
        try:
            write_gguf(tmp / "target.gguf", arch=arch, name=f"tiny-{arch}-target", weights=target_w,
                        tokens=tokens, merges=merges, hp=hp)
            write_gguf(tmp / "draft.gguf", arch=arch, name=f"tiny-{arch}-draft", weights=draft_w,
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
