"""An adapter merged into the draft's weights, so the adapted draft costs what the plain one costs.

A LoRA applied at run time adds two small matmuls to every tensor it touches, outside llama.cpp's repacked
Q4_0 buffers: on GSM8K it made the 0.5B draft 0.81x as fast in tokens/s for +0.02 P(depth >= 1)
(bench/results/issue19-adapt-lr1e-4.md). Merged, the draft runs at the Q4_0 copy's speed, but requantized to
Q4_0 it loses what the adapter learned and more (GSM8K, 6 held-out prompts: acceptance 0.65 before, 0.19
merged, 0.73 as a LoRA; top-1 agreement with the draft's own GGUF over 1,000 tokens 0.81 for the Q4_0 copy,
0.68 merged, 0.80 with the LoRA): the Q4_0 step is about 14x the adapter's largest change, and the requantized
tensors differ from the Q4_0 copy's by as much as either differs from the source. So merging is opt-in
(Adaptation.merge); the math is right (merged in F32 the draft agrees with the LoRA on 99.3% of tokens).

    W' = W + (alpha / rank) * B @ A      W float32 (out, in) dequantized from the draft GGUF,
                                         A (rank, in) and B (out, rank) from the adapter
    merged tensors are written as F16 (F32 without quantize); untouched ones (embeddings, norms) as stored;
    every metadata key is copied and duo.merged_adapter names the adapter; then llama.cpp's quantizer
    (`python -m duo.draft_quant`) makes the Q4_0 file the worker runs.

    merged_path(adapter)   <cache>/drafts/merged-<sha256 of the adapter, 16 hex>.q4_0.gguf: one per adapter
                           content, wherever the adapter file is copied
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import DuoError
from ..registry import cache_dir
from .lora_gguf import check_adapter

SKIP_KEYS = ("GGUF.", "general.architecture")     # the reader's own fields; GGUFWriter writes the architecture


def merged_path(adapter: str | Path) -> Path:
    st = Path(adapter).stat()
    return _merged_path(str(Path(adapter).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _merged_path(adapter: str, size: int, mtime_ns: int) -> Path:
    h = hashlib.sha256()
    with open(adapter, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return cache_dir() / "drafts" / f"merged-{h.hexdigest()[:16]}.q4_0.gguf"


def lora_deltas(adapter: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """{draft tensor name: (A (rank, in), B (out, rank))} and alpha, from a llama.cpp LoRA GGUF."""
    from gguf import GGUFReader
    r = GGUFReader(str(adapter))
    alpha = float(r.fields["adapter.lora.alpha"].contents())
    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in r.tensors:
        base, _, kind = t.name.rpartition(".")
        parts.setdefault(base, {})[kind] = np.asarray(t.data, np.float32)
    return {name: (p["lora_a"], p["lora_b"]) for name, p in parts.items()}, alpha


def write_merged(draft_gguf: Path, adapter: Path, out: Path, dtype=np.float16) -> int:
    """The draft GGUF with the adapter merged into its tensors, at `out`; returns the tensors merged."""
    import gguf
    from gguf.quants import dequantize

    deltas, alpha = lora_deltas(adapter)
    src = gguf.GGUFReader(str(draft_gguf))
    arch = src.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(out), arch)
    for key, field in src.fields.items():
        if key.startswith(SKIP_KEYS):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    w.add_string("duo.merged_adapter", Path(adapter).name)
    merged = 0
    for t in src.tensors:
        if t.name not in deltas:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
            continue
        a, b = deltas[t.name]
        weight = dequantize(t.data, t.tensor_type).astype(np.float32)         # (out, in)
        if weight.shape != (b.shape[0], a.shape[1]):
            raise DuoError(f"adapter {adapter} does not fit {t.name} of {draft_gguf} ({a.shape}, {b.shape} against "
                           f"{weight.shape}): train it again with `duo adapt`")
        weight += (alpha / a.shape[0]) * (b @ a)
        w.add_tensor(t.name, weight.astype(dtype))
        merged += 1
    if merged != len(deltas):
        raise DuoError(f"adapter {adapter} names tensors {draft_gguf} lacks: train it again with `duo adapt`")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return merged


def merged_draft(draft_gguf: str | Path, adapter: str | Path, progress: bool = True) -> Path:
    """The cached Q4_0 draft with `adapter` merged in, made now if missing (a minute for a 0.5B draft)."""
    from ..draft_quant import made_once, quantize_q4_0

    draft_gguf, adapter = Path(draft_gguf), Path(adapter)
    check_adapter(adapter, draft_gguf)

    def make(dst: Path) -> None:
        t0 = time.monotonic()
        tmp = dst.with_name(f"{dst.stem}.f16-{os.getpid()}.gguf")
        try:
            write_merged(draft_gguf, adapter, tmp)
            quantize_q4_0(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        if progress:
            print(f"duo: merged in {time.monotonic() - t0:.0f} s -> {dst}", file=sys.stderr, flush=True)
    return made_once(merged_path(adapter), make, progress,
                     f"duo: merging the adapter {adapter.name} into a Q4_0 copy of the draft (once per adapter)...")
