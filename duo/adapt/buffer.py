"""The record buffer: what `duo adapt` learns from, one compressed file per generation, bounded, per model pair.

    <cache>/adapt/<pair>/records/<time>-<pid>-<n_out>.npz   one generation:
        tokens      (n_prompt + n_out,) int32   the prompt and the target's answer
        n_prompt    ()                  int32
        top_ids     (n_out, K)          int32   the target's K likeliest tokens at each emitted token
        top_logp    (n_out, K)          float16 their log-probabilities (full softmax, not renormalised)
        rejected    (n_out,)            bool    the draft's tree proposed another token here (OSD's positions)
    <cache>/adapt/<pair>/adapters/               accepted adapters (store.py)

The oldest records go first when the buffer holds more than max_tokens answer tokens. The held-out split
is by file name hash, so a record stays on its side as the buffer grows (`split`).
"""
from __future__ import annotations

import functools
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..registry import cache_dir

DEFAULT_MAX_TOKENS = 500_000     # answer tokens kept (~40 MB with K = 10)
TOP_K = 10                       # HASS's K


@dataclass
class Record:
    tokens: np.ndarray       # (n_prompt + n_out,) int32
    n_prompt: int
    top_ids: np.ndarray      # (n_out, K) int32
    top_logp: np.ndarray     # (n_out, K) float32
    rejected: np.ndarray     # (n_out,) bool
    name: str = ""

    @property
    def n_out(self) -> int:
        return len(self.tokens) - self.n_prompt


def fingerprint(path: str | Path) -> str:
    """A short identity of a model file: its size and the sha256 of its first and last MiB (seconds faster
    than hashing a whole GGUF, and a different model or quantisation differs in both); remembered per
    (path, size, mtime)."""
    st = Path(path).stat()
    return _fingerprint(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _fingerprint(path: str, size: int, mtime_ns: int) -> str:
    p = Path(path)
    h = hashlib.sha256(str(p.stat().st_size).encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, p.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def pair_dir(target_name: str, draft_gguf: str | Path) -> Path:
    """Where one (target, draft) pair's records and adapters live."""
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in f"{target_name}--{Path(draft_gguf).stem}")
    return cache_dir() / "adapt" / f"{safe}-{fingerprint(draft_gguf)}"


class RecordBuffer:
    def __init__(self, root: Path, max_tokens: int = DEFAULT_MAX_TOKENS):
        self.dir = Path(root) / "records"
        self.max_tokens = max_tokens

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("*.npz")) if self.dir.is_dir() else []

    def append(self, tokens: list[int], n_prompt: int, top: list, rejected: list[int]) -> Path | None:
        """One generation: `top` holds (logprob, [(token, logprob), ...]) per answer token (Stats.target_top_k),
        `rejected` the answer indices where the draft was rejected. Nothing is written for an empty answer."""
        n_out = len(tokens) - n_prompt
        if n_out <= 0 or len(top) < n_out:
            return None
        k = max(len(t[1]) for t in top[:n_out])
        ids = np.zeros((n_out, k), np.int32)
        logp = np.full((n_out, k), -np.inf, np.float16)
        for i, (_, pairs) in enumerate(top[:n_out]):
            ids[i, :len(pairs)] = [t for t, _ in pairs]
            logp[i, :len(pairs)] = [lp for _, lp in pairs]
        rej = np.zeros(n_out, bool)
        rej[[r for r in rejected if 0 <= r < n_out]] = True
        self.dir.mkdir(parents=True, exist_ok=True)
        out = self.dir / f"{time.time_ns()}-{os.getpid()}-{n_out}.npz"
        tmp = out.with_name(out.name + ".part")
        with open(tmp, "wb") as f:
            np.savez_compressed(f, tokens=np.asarray(tokens, np.int32), n_prompt=np.int32(n_prompt), top_ids=ids,
                                top_logp=logp, rejected=rej)
        os.replace(tmp, out)
        self._bound()
        return out

    def n_tokens(self) -> int:
        """Answer tokens held (read from the file names)."""
        return sum(_n_out(f) for f in self.files())

    def _bound(self) -> None:
        """Drop the oldest records while the answers kept exceed max_tokens."""
        files = self.files()
        sizes = [_n_out(f) for f in files]
        total = sum(sizes)
        for f, n in zip(files, sizes):
            if total <= self.max_tokens:
                break
            f.unlink(missing_ok=True)
            total -= n

    def load(self) -> list[Record]:
        """Every readable record, oldest first (a damaged file is skipped)."""
        out = []
        for f in self.files():
            try:
                with np.load(f) as z:
                    out.append(Record(z["tokens"].astype(np.int64), int(z["n_prompt"]), z["top_ids"].astype(np.int64),
                                      z["top_logp"].astype(np.float32), z["rejected"].astype(bool), f.name))
            except (OSError, ValueError, KeyError):
                continue
        return out


def _n_out(f: Path) -> int:
    tail = f.name.split(".")[0].rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def split(records: list[Record], held_out: float = 0.2, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, held-out) by a hash of each record's name and the seed: stable as the buffer grows."""
    def side(r: Record) -> float:
        return int(hashlib.sha256(f"{seed}:{r.name}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    test = [r for r in records if side(r) < held_out]
    train = [r for r in records if side(r) >= held_out]
    if not test and len(train) > 1:      # tiny buffers: keep at least one record out
        test, train = train[-1:], train[:-1]
    return train, test
