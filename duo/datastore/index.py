"""A token-level suffix index: the longest suffix of a context found in a corpus, and what followed it there.

    tokens  int32 [n]   the corpus: documents one after another, each followed by SEP (never a token id)
    sa      int32 [n]   suffix array: the positions sorted by the token sequence starting there (pydivsufsort)

Searching is a binary search over `sa` comparing raw bytes: the tokens are also kept as big-endian
uint32 bytes, whose byte order is their numeric order, so each comparison is one memcmp of a slice
(about a microsecond in Python). A pattern of L tokens matches a range sa[lo:hi] of suffixes; a longer
suffix of the context can only match where a shorter one does, so the longest match is a binary
search over L as well: ~log2(16) x 2 x log2(n) comparisons, well under a millisecond at 30M tokens.

On disk (a datastore directory): tokens.be (big-endian uint32), sa.i32 (native int32), meta.json;
both arrays are memory-mapped, so opening costs nothing and the OS shares their pages.
"""
from __future__ import annotations

import json
import mmap
import threading
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEP = 2**31 - 1              # ends every document; larger than every token id, so it sorts last
FORMAT = 1                   # meta.json "format": bump when the files change meaning
MAX_TOKENS = 2**31 - 2       # int32 positions


@dataclass
class Match:
    length: int    # tokens of the context's suffix found (0: none)
    lo: int        # sa[lo:hi] are its occurrences
    hi: int

    @property
    def count(self) -> int:
        return self.hi - self.lo


class SuffixIndex:
    """Search a corpus of token ids for the continuations of a context."""

    def __init__(self, be: bytes | mmap.mmap, sa, meta: dict | None = None, files=()):
        self._be = be                                   # big-endian uint32 bytes of the tokens
        self.sa = sa                                    # int32 [n] (an array or a memoryview cast to 'i')
        self.tokens = np.frombuffer(be, dtype=">u4")    # uint32 [n] view (SEP included)
        self.meta = meta or {}
        self._files = list(files)                       # open files / mmaps, closed by close()
        self._warming = None                            # threading.Event stopping the page-cache warmer

    def __len__(self) -> int:
        return len(self.tokens)

    # -- building and storing -----------------------------------------------------------------
    @staticmethod
    def build(documents) -> "SuffixIndex":
        """An in-memory index over documents (sequences of token ids), each ended by SEP."""
        corpus = join_documents(documents)
        return SuffixIndex(corpus.astype(">u4").tobytes(), memoryview(suffix_array(corpus)))

    def save(self, out: Path, meta: dict) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokens.be").write_bytes(bytes(self._be))
        np.asarray(self.sa, dtype=np.int32).tofile(out / "sa.i32")
        meta = {**meta, "format": FORMAT, "n_tokens": len(self)}
        (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        self.meta = meta

    @staticmethod
    def open(path: Path, warm: bool = True) -> "SuffixIndex":
        """Memory-map a datastore directory written by save(); ValueError if it is not one. warm: read the
        files once in a background thread, so that no round waits on a page fault from the disk later (a
        search touches ~200 scattered pages: cold, 1-150 ms; warm, 0.05-0.5 ms)."""
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
        except FileNotFoundError:
            raise ValueError(f"{path} is not a datastore (no meta.json): build one with `duo datastore build`") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}/meta.json cannot be read ({e}): rebuild the datastore") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is a datastore of format {meta.get('format')}, this duo reads format "
                             f"{FORMAT}: rebuild it with `duo datastore build`")
        n = int(meta.get("n_tokens", -1))
        files, maps = [], []
        for name, size in (("tokens.be", 4 * n), ("sa.i32", 4 * n)):
            p = path / name
            if not p.is_file() or p.stat().st_size != size or n <= 0:
                raise ValueError(f"{p} is missing or has the wrong size: rebuild the datastore")
            f = open(p, "rb")
            files.append(f)
            maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        sa = memoryview(maps[1]).cast("i")
        index = SuffixIndex(maps[0], sa, meta, files=[sa, *maps, *files])
        if warm:
            index._warming = warm_page_cache([path / "sa.i32", path / "tokens.be"])
        return index

    def close(self) -> None:
        if self._warming is not None:
            self._warming.set()
        self.tokens = np.zeros(0, ">u4")
        for f in self._files:
            f.release() if isinstance(f, memoryview) else f.close()
        self._files = []

    # -- searching ----------------------------------------------------------------------------
    def range_of(self, pattern: bytes) -> tuple[int, int]:
        """sa[lo:hi]: the suffixes starting with `pattern` (big-endian uint32 bytes)."""
        be, m = self._be, len(pattern)
        key = lambda s: be[4 * s:4 * s + m]   # noqa: E731 - the first len(pattern) bytes of suffix s
        lo = bisect_left(self.sa, pattern, key=key)
        hi = bisect_right(self.sa, pattern, lo=lo, key=key)
        return lo, hi

    def longest_suffix(self, context, max_len: int = 16, min_len: int = 1) -> Match:
        """The longest suffix of `context` (token ids, the last is the newest), of min_len..max_len tokens,
        that occurs in the corpus; Match(0, 0, 0) if none does."""
        ctx = np.asarray(context[-max_len:], dtype=np.int64)
        if len(ctx) < min_len or len(self) == 0:
            return Match(0, 0, 0)
        pat = ctx.astype(">u4").tobytes()
        found = Match(0, 0, 0)
        lo_len, hi_len = min_len, len(ctx)       # invariant: lengths < lo_len occur (or are too short), > hi_len do not
        while lo_len <= hi_len:
            mid = (lo_len + hi_len) // 2
            lo, hi = self.range_of(pat[4 * (len(ctx) - mid):])
            if hi > lo:
                found, lo_len = Match(mid, lo, hi), mid + 1
            else:
                hi_len = mid - 1
        return found

    def continuations(self, match: Match, depth: int, max_occurrences: int = 64) -> np.ndarray:
        """int64 [k, depth]: the tokens that followed up to max_occurrences occurrences of the match (spread
        evenly over all of them), -1 after a document's end."""
        if match.count == 0 or depth <= 0:
            return np.zeros((0, max(depth, 0)), np.int64)
        step = max(1, match.count // max_occurrences)
        starts = np.array([self.sa[i] for i in range(match.lo, match.hi, step)[:max_occurrences]], np.int64)
        idx = np.minimum(starts[:, None] + match.length + np.arange(depth), len(self) - 1)
        cont = self.tokens[idx].astype(np.int64)
        cont[np.maximum.accumulate(cont == SEP, axis=1)] = -1   # nothing after a document's end
        return cont


def warm_page_cache(paths, chunk: int = 16 << 20) -> threading.Event:
    """Read the files through once in a daemon thread (into the OS page cache); set the event to stop."""
    stop = threading.Event()

    def read() -> None:
        buf = bytearray(chunk)
        for p in paths:
            try:
                with open(p, "rb", buffering=0) as f:
                    while not stop.is_set() and f.readinto(buf):
                        pass
            except OSError:
                return
    threading.Thread(target=read, name="duo-datastore-warm", daemon=True).start()
    return stop


def join_documents(documents) -> np.ndarray:
    """int32 [n]: each document's tokens followed by SEP."""
    parts = []
    for doc in documents:
        a = np.asarray(doc, dtype=np.int64)
        if len(a) and (a.min() < 0 or a.max() >= SEP):
            raise ValueError("token ids must be in [0, 2**31 - 1)")
        parts += [a.astype(np.int32), np.array([SEP], np.int32)]
    corpus = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    if len(corpus) > MAX_TOKENS:
        raise ValueError(f"{len(corpus)} tokens is more than a datastore holds ({MAX_TOKENS})")
    return corpus


def suffix_array(corpus: np.ndarray) -> np.ndarray:
    """int32 [n]: the suffix array of an int32 corpus (libdivsufsort through pydivsufsort)."""
    if len(corpus) == 0:
        return np.zeros(0, np.int32)
    from pydivsufsort import divsufsort
    return np.asarray(divsufsort(np.ascontiguousarray(corpus, dtype=np.int32)), dtype=np.int32)


def timed_search(index: SuffixIndex, contexts, max_len: int = 16, depth: int = 8) -> dict:
    """Median and worst milliseconds of one round's retrieval (longest suffix + continuations) over contexts."""
    times = []
    for ctx in contexts:
        t = time.perf_counter()
        index.continuations(index.longest_suffix(ctx, max_len), depth)
        times.append(1e3 * (time.perf_counter() - t))
    times.sort()
    return {"median_ms": times[len(times) // 2] if times else 0.0, "max_ms": times[-1] if times else 0.0,
            "n": len(times)}
