"""A draft token tree, and merging / trimming trees (several candidate sources share one round's budget).

The tree hangs under a *root*: the last committed token, which the target has
not processed yet. Nodes are stored flat in topological order (a parent always
comes before its children), so node i's parent index is in [-1, i); -1 means
"child of the root".
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SOURCE_IDS = {"model": 0, "lookup": 1, "datastore": 2, "cache": 3}   # Tree.source: the candidate source of a node
SOURCE_NAMES = {code: name for name, code in SOURCE_IDS.items()}


@dataclass
class Tree:
    tokens: np.ndarray   # int32 [n]   drafted token ids
    parents: np.ndarray  # int32 [n]   parent node index, -1 = the root
    probs: np.ndarray    # float32 [n] draft probability of the token given its path
    source: np.ndarray = field(default=None)  # int8 [n] the candidate source of each node (SOURCE_IDS)

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

    def top_path(self) -> list[int]:
        """Greedy descent: node ids from the root down, always to the most probable child (ties: the earlier)."""
        kids = self.children()
        path, cur = [], -1
        while kids[cur + 1]:
            cur = max(kids[cur + 1], key=lambda c: (self.probs[c], -c))
            path.append(cur)
        return path

    def top_chain(self) -> "Tree":
        """The top path as a chain (for targets that can't verify trees)."""
        path = self.top_path()
        return Tree(self.tokens[path], np.arange(-1, len(path) - 1), self.probs[path], self.source[path])


# ------------------------------------------------------------------------------- accepting
def accept_path(tree: Tree, choices: np.ndarray) -> tuple[list[int], int]:
    """Walk from the root following children equal to the target's choice; return (node path, bonus token).

    choices[0] is the target's token after the root, choices[k + 1] its token after node k.
    """
    kids = tree.children()
    path: list[int] = []
    cur = -1
    while True:
        want = int(choices[cur + 1])
        nxt = next((c for c in kids[cur + 1] if int(tree.tokens[c]) == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        cur = nxt


# ------------------------------------------------------------------------------- merging and trimming
def merge_trees(a: Tree, b: Tree, budget: int, at: int = -1) -> Tree:
    """Union of two trees (shared paths merged), trimmed to the `budget` best nodes. b hangs under a's
    node `at` (-1: both have the same root; a node: b continues a's path to it).

    A node's score is the product of probabilities along its path; children never outscore their
    parent, so the top-`budget` nodes by score always form a tree.
    """
    if len(b) == 0 and len(a) <= budget:
        return a
    tokens, parents, probs, source = list(a.tokens), list(a.parents), list(a.probs), list(a.source)
    index = {(int(p), int(t)): i for i, (p, t) in enumerate(zip(a.parents, a.tokens))}
    remap = {-1: at}
    for k in range(len(b)):
        key = (remap[int(b.parents[k])], int(b.tokens[k]))
        if key in index:
            i = index[key]
            probs[i] = max(probs[i], float(b.probs[k]))
        else:
            i = len(tokens)
            index[key] = i
            tokens.append(key[1]); parents.append(key[0]); probs.append(float(b.probs[k])); source.append(int(b.source[k]))
        remap[k] = i
    merged = Tree(tokens, parents, probs, source)
    return top_nodes(merged, budget)


def path_scores(tree: Tree) -> np.ndarray:
    score = np.zeros(len(tree))
    for k, p in enumerate(tree.parents):
        score[k] = tree.probs[k] * (score[p] if p >= 0 else 1.0)
    return score


def top_nodes(tree: Tree, budget: int) -> Tree:
    """Keep the `budget` highest-scoring nodes (ties broken towards earlier nodes), in topological order."""
    if len(tree) <= budget:
        return tree
    score = path_scores(tree)
    # a parent must survive whenever its child does: make scores non-increasing down the tree
    for k, p in enumerate(tree.parents):
        if p >= 0:
            score[k] = min(score[k], score[p] - 1e-12 * (k - p))
    keep = np.zeros(len(tree), bool)
    keep[np.argsort(-score, kind="stable")[:budget]] = True
    new_index = np.cumsum(keep) - 1
    par = tree.parents[keep]
    par = np.where(par < 0, -1, new_index[np.maximum(par, 0)])
    return Tree(tree.tokens[keep], par, tree.probs[keep], tree.source[keep])


def prune_depth(tree: Tree, max_depth: int) -> Tree:
    """Drop nodes deeper than max_depth (they could never be emitted)."""
    if len(tree) == 0:
        return tree
    keep = tree.depths() <= max_depth
    if keep.all():
        return tree
    new_index = np.cumsum(keep) - 1
    parents = np.where(tree.parents[keep] < 0, -1, new_index[np.maximum(tree.parents[keep], 0)])
    return Tree(tree.tokens[keep], parents, tree.probs[keep], tree.source[keep])
