"""A cache of earlier generations as a candidate source (SuffixDecoding's global tree, Oliaro et al.).

Every finished generation of an Engine (its prompt and output) is added as one document. The cache is
a few suffix indexes (duo/datastore/index.py), merged like a log-structured tree: a new document is a
segment of its own, and two neighbouring segments are merged when the newer is at least half the
older's size, so adding costs O(log n) rebuilds amortised and a search asks O(log n) segments. It
holds at most `max_tokens` tokens: past that, the oldest documents go until a quarter is free, and what
is left is indexed as one segment. It can be saved and reloaded.

    docs      list of int32 [len]      the documents, oldest first
    segments  list of (first doc, SuffixIndex)   covering docs[first:next first]
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...datastore.index import Match, SuffixIndex
from ..tree import Tree
from .retrieval import continuation_tree, match_trust


class OutputCache:
    def __init__(self, max_tokens: int = 2_000_000):
        self.max_tokens = max_tokens
        self.docs: list[np.ndarray] = []
        self.segments: list[tuple[int, SuffixIndex]] = []
        self.n_tokens = 0                          # tokens in docs

    def _set_docs(self, docs: list[np.ndarray]) -> None:
        """Keep `docs` (oldest first), indexed as one segment."""
        self.docs, self.n_tokens = docs, sum(len(d) for d in docs)
        self.segments = [(0, SuffixIndex.build(docs))] if docs else []

    def add(self, tokens) -> None:
        """Index one finished generation (prompt + output)."""
        doc = np.asarray(tokens, dtype=np.int32)
        if len(doc) < 2:
            return
        self.docs.append(doc)
        self.n_tokens += len(doc)
        if self.n_tokens > self.max_tokens:        # drop the oldest documents, re-index what is left
            keep, total = len(self.docs), self.n_tokens
            while total > 0.75 * self.max_tokens and keep > 1:
                total -= len(self.docs[len(self.docs) - keep])
                keep -= 1
            self._set_docs(self.docs[len(self.docs) - keep:])
            return
        self.segments.append((len(self.docs) - 1, SuffixIndex.build([doc])))
        while len(self.segments) > 1 and 2 * len(self.segments[-1][1]) >= len(self.segments[-2][1]):
            first = self.segments[-2][0]
            self.segments[-2:] = [(first, SuffixIndex.build(self.docs[first:]))]

    def search(self, history, max_len: int = 16, min_len: int = 2) -> tuple[int, list[tuple[SuffixIndex, Match]]]:
        """The longest suffix of history found in any segment, and its match in each segment having it."""
        best, found = 0, []
        for _, seg in self.segments:
            m = seg.longest_suffix(history, max_len, max(min_len, best))
            if m.length > best:
                best, found = m.length, [(seg, m)]
            elif m.length == best and m.length:
                found.append((seg, m))
        return best, found

    def save(self, path: Path) -> None:
        """One .npz file: the documents (the index is rebuilt on load, in milliseconds per million tokens)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        flat = np.concatenate(self.docs) if self.docs else np.zeros(0, np.int32)
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb") as f:
            np.savez(f, tokens=flat, lengths=np.array([len(d) for d in self.docs], np.int64),
                     meta=np.frombuffer(json.dumps({"format": 1}).encode(), np.uint8))
        tmp.replace(path)

    @staticmethod
    def load(path: Path, max_tokens: int = 2_000_000) -> "OutputCache":
        """ValueError if the file is not a saved cache."""
        cache = OutputCache(max_tokens)
        try:
            with np.load(path) as z:
                flat, lengths = z["tokens"].astype(np.int32), z["lengths"]
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{path} is not a saved output cache ({e}); delete it or pass another file") from None
        if lengths.sum() != len(flat) or (lengths < 0).any():
            raise ValueError(f"{path} is a damaged output cache: delete it")
        docs = np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []
        kept, total = [], 0
        for d in reversed(docs):                  # the newest documents that fit
            if total + len(d) > max_tokens:
                break
            kept.append(d)
            total += len(d)
        cache._set_docs(kept[::-1])
        return cache


class OutputCacheDraft:
    """The candidate source: continuations of the context in earlier generations."""
    name = "cache"

    def __init__(self, cache: OutputCache):
        self.cache = cache

    def propose(self, history: list[int], budget: int) -> Tree:
        length, found = self.cache.search(history)
        if not length:
            return Tree.empty()
        depth = min(12, budget)
        conts = np.concatenate([seg.continuations(m, depth, 64) for seg, m in found])
        return continuation_tree(conts, match_trust(length), budget, self.name)
