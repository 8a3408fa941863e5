"""GGUF files: the key/value header read directly, the vocabulary check of a draft against a target
tokenizer, and loading a GGUF target in transformers to save it as dense torch weights.

duo.models re-exports these (`models.check_vocab`, `models.read_gguf_vocab`, ...); its
`ensure_torch_weights` runs `to_transformers` once per GGUF and caches the result. (Named gguf_file,
not gguf, so that it is never mistaken for the `gguf` package this project also uses.)
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .registry import ModelError

GGUF_MAGIC = b"GGUF"


class VocabMismatchError(ModelError):
    """The draft and target tokenize differently, so the target cannot verify the draft's tokens."""


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer metadata of a GGUF file."""

    tokens: list[str]
    eos_id: int | None
    bos_id: int | None


# ---------------------------------------------------------------- header

# GGUF value type -> struct format of one scalar; 8 is STRING and 9 is ARRAY.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: Path, keys: set[str]) -> dict[str, Any]:
    """The values of `keys` from a GGUF file's key/value header (tensors are never touched).

    A direct struct parse of the header: gguf.GGUFReader builds numpy views of every field and takes
    ~13 s on a 150k-token vocabulary, this takes well under a second.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ModelError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return _parse_kv(m, keys)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror} (check its permissions)") from exc
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not a valid GGUF file ({exc}); download it again") from exc


def _parse_kv(m: mmap.mmap, keys: set[str]) -> dict[str, Any]:
    order = "<"
    (version,) = struct.unpack_from("<I", m, 4)
    if version & 0xFFFF == 0:  # written on a big-endian machine
        order = ">"
        (version,) = struct.unpack_from(">I", m, 4)
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    _n_tensors, n_kv = struct.unpack_from(order + "QQ", m, 8)
    u32, u64 = struct.Struct(order + "I"), struct.Struct(order + "Q")

    def string(off: int, want: bool) -> tuple[str | None, int]:
        (n,) = u64.unpack_from(m, off)
        end = off + 8 + n
        if end > len(m):
            raise ValueError("string runs past the end of the file")
        return (m[off + 8:end].decode("utf-8", "replace") if want else None), end

    def value(vtype: int, off: int, want: bool) -> tuple[Any, int]:
        if vtype == _GGUF_STRING:
            return string(off, want)
        if vtype in _GGUF_SCALARS:
            fmt = order + _GGUF_SCALARS[vtype]
            return (struct.unpack_from(fmt, m, off)[0] if want else None), off + struct.calcsize(fmt)
        if vtype == _GGUF_ARRAY:
            (itype,) = u32.unpack_from(m, off)
            (n,) = u64.unpack_from(m, off + 4)
            off += 12
            if itype in _GGUF_SCALARS:
                fmt = f"{order}{n}{_GGUF_SCALARS[itype]}"
                return (list(struct.unpack_from(fmt, m, off)) if want else None), off + struct.calcsize(fmt)
            items = []
            for _ in range(n):
                item, off = value(itype, off, want)
                items.append(item)
            return (items if want else None), off
        raise ValueError(f"unknown GGUF value type {vtype}")

    found: dict[str, Any] = {}
    off = 24
    for _ in range(n_kv):
        key, off = string(off, True)
        (vtype,) = u32.unpack_from(m, off)
        val, off = value(vtype, off + 4, key in keys)
        if key in keys:
            found[key] = val
            if len(found) == len(keys):
                break
    return found


# ---------------------------------------------------------------- vocabulary


def read_gguf_vocab(path: Path) -> GGUFVocab:
    """Token strings and eos/bos ids of a GGUF file."""
    keys = {"tokenizer.ggml.tokens", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id"}
    meta = read_gguf_metadata(path, keys)
    if "tokenizer.ggml.tokens" not in meta:
        raise ModelError(f"{path} has no tokenizer.ggml.tokens metadata; it cannot be used as a draft")
    return GGUFVocab(
        tokens=meta["tokenizer.ggml.tokens"],
        eos_id=meta.get("tokenizer.ggml.eos_token_id"),
        bos_id=meta.get("tokenizer.ggml.bos_token_id"),
    )


def _is_padding(token: str, token_id: int) -> bool:
    # llama.cpp pads a vocabulary up to the embedding rows with placeholders named [PAD<id>].
    return token == f"[PAD{token_id}]"


def _sample_ids(n: int, tokenizer, count: int = 200) -> list[int]:
    """About `count` ids spread evenly over [0, n), plus the special and added tokens."""
    ids = {round(i * (n - 1) / (count - 1)) for i in range(count)} if n > 1 else set(range(n))
    ids.update(getattr(tokenizer, "all_special_ids", []) or [])
    added = sorted(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ids.update(added[:32] + added[-32:])
    for name in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
            ids.add(tid)
    for tid in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if 0 <= i < n)


def check_vocab(draft_gguf: Path, tokenizer, draft_name: str, target_name: str) -> None:
    """Raise VocabMismatchError unless the draft GGUF and the target tokenizer share one vocabulary.

    Compares the vocabulary size, eos (and bos where both have one) and the token strings at ~200 ids.
    A draft vocabulary longer than the tokenizer only by llama.cpp [PAD<id>] placeholders is accepted.
    """
    vocab = read_gguf_vocab(draft_gguf)
    pair = f"the draft {draft_name!r} and the target {target_name!r}"
    fix = "use a draft and a target from the same model family"
    n_draft, n_target = len(vocab.tokens), len(tokenizer)
    if n_draft != n_target:
        padded = n_draft > n_target and all(
            _is_padding(vocab.tokens[i], i) for i in range(n_target, n_draft)
        )
        if not padded:
            raise VocabMismatchError(
                f"{pair} have different vocabularies: the draft has {n_draft} tokens, the target "
                f"tokenizer {n_target}; {fix}"
            )
    n = min(n_draft, n_target)

    def show(tid: int | None) -> str:
        return "none" if tid is None else f"{tid} {vocab.tokens[tid]!r}" if 0 <= tid < n_draft else str(tid)

    if vocab.eos_id != tokenizer.eos_token_id:
        raise VocabMismatchError(
            f"{pair} end generation on different tokens: draft eos {show(vocab.eos_id)}, "
            f"target eos {show(tokenizer.eos_token_id)}; {fix}"
        )
    if vocab.bos_id is not None and tokenizer.bos_token_id is not None and vocab.bos_id != tokenizer.bos_token_id:
        raise VocabMismatchError(
            f"{pair} have different bos tokens: draft {show(vocab.bos_id)}, "
            f"target {show(tokenizer.bos_token_id)}; {fix}"
        )
    ids = _sample_ids(n, tokenizer)
    for tid, target_token in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        if vocab.tokens[tid] != target_token:
            raise VocabMismatchError(
                f"{pair} have different vocabularies: token {tid} is {vocab.tokens[tid]!r} in the draft "
                f"and {target_token!r} in the target; {fix}"
            )


# ---------------------------------------------------------------- to transformers


@contextlib.contextmanager
def quiet_transformers(verbose: bool):
    """Silence transformers' logging, warnings and progress bars (including the GGUF dequantization bar)."""
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The GGUF loader calls tqdm directly, outside transformers' own progress-bar switch.
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    old_tqdm = getattr(gguf_utils, "tqdm", None)
    if old_tqdm is not None:
        gguf_utils.tqdm = functools.partial(old_tqdm, disable=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if old_tqdm is not None:
            gguf_utils.tqdm = old_tqdm
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def to_transformers(gguf: Path, out: Path, verbose: bool, dtype: str = "float32") -> None:
    """Load a GGUF with transformers (dequantized, then cast to `dtype`) and save tokenizer + model to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:  # newer transformers: ask for plain dense weights explicitly, never packed GGUF blocks
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    with quiet_transformers(verbose):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype), **kwargs
        )
        # The weights are dense now; drop the GGUF quantizer marker so save_pretrained accepts the model.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
