"""Prompt-lookup candidates (n-gram matches in the prompt and the text so far) and tree merging.

Answers often repeat their prompt (code, quotes, lists). The last n tokens are searched for earlier
in the history; the tokens that followed each match become candidate continuations, arranged as a
trie. A node's probability is the share of matches through its parent that continue with it,
discounted by how short the matched n-gram was, so it ranks against the draft's own probabilities.
"""
from __future__ import annotations

import numpy as np

from .tree import Tree

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
    return Tree(tokens, parents, probs, np.ones(len(tokens), np.int8))


def merge_trees(a: Tree, b: Tree, budget: int) -> Tree:
    """Union of two trees with the same root (shared paths merged), trimmed to the `budget` best nodes.

    A node's score is the product of probabilities along its path; children never outscore their
    parent, so the top-`budget` nodes by score always form a tree.
    """
    if len(b) == 0 and len(a) <= budget:
        return a
    tokens, parents, probs, source = list(a.tokens), list(a.parents), list(a.probs), list(a.source)
    index = {(int(p), int(t)): i for i, (p, t) in enumerate(zip(a.parents, a.tokens))}
    remap = {-1: -1}
    for k in range(len(b)):
        key = (remap[int(b.parents[k])], int(b.tokens[k]))
        if key in index:
            i = index[key]
            probs[i] = max(probs[i], float(b.probs[k]))
        else:
            i = len(tokens)
            index[key] = i
            tokens.append(key[1]); parents.append(key[0]); probs.append(float(b.probs[k])); source.append(1)
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
