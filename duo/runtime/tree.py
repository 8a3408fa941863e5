"""A draft token tree and the tensors the target needs to verify it in one pass.

The tree hangs under a *root*: the last committed token, which the target has
not processed yet. Nodes are stored flat in topological order (a parent always
comes before its children), so node i's parent index is in [-1, i); -1 means
"child of the root".
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Tree:
    tokens: np.ndarray   # int32 [n]   drafted token ids
    parents: np.ndarray  # int32 [n]   parent node index, -1 = the root
    probs: np.ndarray    # float32 [n] draft probability of the token given its path
    source: np.ndarray = field(default=None)  # int8 [n] 0 = draft model, 1 = n-gram lookup

    def __post_init__(self):
        self.tokens = np.asarray(self.tokens, dtype=np.int32)
        self.parents = np.asarray(self.parents, dtype=np.int32)
        self.probs = np.asarray(self.probs, dtype=np.float32)
        if self.source is None:
            self.source = np.zeros(len(self.tokens), dtype=np.int8)
        self.source = np.asarray(self.source, dtype=np.int8)

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def empty() -> "Tree":
        return Tree(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32))

    @staticmethod
    def chain(tokens, probs=None) -> "Tree":
        n = len(tokens)
        probs = np.ones(n, np.float32) if probs is None else probs
        return Tree(np.asarray(tokens), np.arange(-1, n - 1), np.asarray(probs))

    def depths(self) -> np.ndarray:
        """Depth of each node: 1 for children of the root."""
        d = np.zeros(len(self), dtype=np.int64)
        for i, p in enumerate(self.parents):
            d[i] = 1 if p < 0 else d[p] + 1
        return d

    def children(self) -> list[list[int]]:
        """children[0] = children of the root, children[i + 1] = children of node i."""
        out: list[list[int]] = [[] for _ in range(len(self) + 1)]
        for i, p in enumerate(self.parents):
            out[p + 1].append(i)
        return out

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError on a malformed tree (e.g. a corrupt channel message)."""
        n = len(self)
        if not (len(self.parents) == len(self.probs) == len(self.source) == n):
            raise ValueError("tree arrays differ in length")
        if n and (self.tokens.min() < 0 or self.tokens.max() >= vocab_size):
            raise ValueError("tree token id out of range")
        if n and np.any((self.parents < -1) | (self.parents >= np.arange(n))):
            raise ValueError("tree parent index out of range")

    def top_chain(self) -> "Tree":
        """The single path that always follows the most probable child (for targets that can't verify trees)."""
        kids = self.children()
        path, cur = [], -1
        while kids[cur + 1]:
            cur = max(kids[cur + 1], key=lambda c: self.probs[c])
            path.append(cur)
        return Tree(self.tokens[path], np.arange(-1, len(path) - 1), self.probs[path], self.source[path])
