"""Retrieved continuations as a draft tree: REST's trie of what followed a context's matches.

Both retrieval sources (datastore.py: a corpus on disk; output_cache.py: earlier generations) find the
longest suffix of the context in a suffix index, read the tokens that followed up to 32 of its
occurrences, and count them into a trie. A node's probability is the share of its parent's
continuations that go through it, times a trust that grows with the match length; branches followed
by fewer than `min_share` of the continuations are pruned (REST keeps the frequent ones).
"""
from __future__ import annotations

import numpy as np

from ..tree import SOURCE_IDS, Tree, top_nodes


def match_trust(length: int) -> float:
    """Prior confidence in a continuation after a match of `length` tokens: 1 token 0.3, 4 tokens 0.75, 16 0.92."""
    return length / (length + 1.5) if length > 1 else 0.3


def continuation_tree(conts: np.ndarray, trust: float, max_nodes: int, source: str,
                      min_share: float = 0.1) -> Tree:
    """The trie of the rows of `conts` (int64 [k, depth], -1 = nothing more), at most max_nodes nodes."""
    if conts.size == 0 or max_nodes <= 0:
        return Tree.empty()
    tokens, parents, counts = [], [], []
    child: dict[tuple[int, int], int] = {}     # (parent node, token) -> node
    for row in conts.tolist():                  # Python ints (walking numpy scalars costs more)
        cur = -1
        for tok in row:
            if tok < 0:
                break
            key = (cur, tok)
            node = child.get(key)
            if node is None:
                node = child[key] = len(tokens)
                tokens.append(tok); parents.append(cur); counts.append(0)
            counts[node] += 1
            cur = node
    if not tokens:                                           # every row ended at once (a document's end)
        return Tree.empty()
    counts, par_all = np.asarray(counts, np.float64), np.asarray(parents, np.int64)
    total = np.where(par_all >= 0, counts[np.maximum(par_all, 0)], len(conts))
    share = counts / total                                   # P(child | parent) among the continuations
    probs = share * trust
    keep = (share >= min_share).tolist()
    for k, p in enumerate(parents):                          # a pruned parent takes its subtree along
        if p >= 0 and not keep[p]:                           # (parents come before their children)
            keep[k] = False
    keep = np.asarray(keep)
    idx = np.flatnonzero(keep)
    if len(idx) == 0:
        return Tree.empty()
    new_index = np.cumsum(keep) - 1
    par = par_all[idx]
    par = np.where(par < 0, -1, new_index[np.maximum(par, 0)])
    tree = Tree(np.asarray(tokens)[idx], par, probs[idx], np.full(len(idx), SOURCE_IDS[source], np.int8))
    return top_nodes(tree, max_nodes)


def retrieve(index, history: list[int], max_nodes: int, source: str, *, max_len: int = 16, min_len: int = 2,
             max_occurrences: int = 32, depth: int = 12) -> Tree:
    """The continuation tree of the longest suffix (min_len..max_len tokens) of history found in index."""
    match = index.longest_suffix(history, max_len, min_len)
    if match.length == 0:
        return Tree.empty()
    conts = index.continuations(match, min(depth, max_nodes), max_occurrences)
    return continuation_tree(conts, match_trust(match.length), max_nodes, source)
