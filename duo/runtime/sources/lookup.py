"""Prompt lookup: candidates from n-gram matches in the prompt and the text so far. Costs ~nothing.

Answers often repeat their prompt (code, quotes, lists). The last n tokens are searched for earlier
in the history; the tokens that followed each match become candidate continuations, arranged as a
trie. A node's probability is the share of matches through its parent that continue with it,
discounted by how short the matched n-gram was, so it ranks against the draft's own probabilities.
"""
from __future__ import annotations

import numpy as np

from ..tree import SOURCE_IDS, Tree

NGRAM_TRUST = {1: 0.3, 2: 0.6, 3: 0.8, 4: 0.9}   # confidence in a continuation after an n-gram match


def find_matches(history: list[int], n: int, max_matches: int, window: int = 8192) -> list[int]:
    """Start indices (most recent first) of the tokens that followed earlier occurrences of the last n tokens."""
    h = np.asarray(history[-window:], dtype=np.int64)
    if len(h) <= n:
        return []
    key = h[-n:]
    # candidate starts i with h[i:i+n] == key, excluding the suffix itself
    hits = np.flatnonzero(h[: len(h) - n] == key[0])
    out = []
    for i in hits[::-1]:
        if i + n < len(h) and np.array_equal(h[i:i + n], key):
            out.append(len(history) - len(h) + i + n)
            if len(out) >= max_matches:
                break
    return out


def lookup_tree(history: list[int], max_nodes: int = 8, max_ngram: int = 4, max_matches: int = 4) -> Tree:
    """A trie of the continuations after the longest n-gram (n <= max_ngram) that recurs in history."""
    for n in range(max_ngram, 0, -1):
        starts = find_matches(history, n, max_matches)
        if starts:
            break
    else:
        return Tree.empty()
    trust = NGRAM_TRUST[min(n, 4)]
    depth = max(1, max_nodes // len(starts))
    tokens, parents, probs = [], [], []
    children: dict[tuple[int, int], int] = {}   # (parent node, token) -> node
    count: dict[int, int] = {-1: len(starts)}  # matches passing through each node
    for s in starts:
        cur = -1
        for tok in history[s:s + depth]:
            key = (cur, int(tok))
            if key not in children:
                if len(tokens) >= max_nodes:
                    break
                children[key] = len(tokens)
                tokens.append(int(tok)); parents.append(cur); probs.append(0.0)
                count[children[key]] = 0
            cur = children[key]
            count[cur] += 1
    for k, p in enumerate(parents):
        probs[k] = trust * count[k] / count[p]
    return Tree(tokens, parents, probs, np.full(len(tokens), SOURCE_IDS["lookup"], np.int8))


class PromptLookup:
    """The candidate source: a trie of the continuations after the longest recurring n-gram."""
    name = "lookup"

    def propose(self, history: list[int], budget: int) -> Tree:
        return lookup_tree(history, max_nodes=max(4, budget // 2))
