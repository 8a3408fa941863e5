"""Tree shapes: how the draft model spends a round's budget of nodes. A name -> function registry.

Each shape is a generator over a ``Drafter`` whose sequence 0 holds the committed tokens (``sync``):

    shape(d, root, n, budget, width) -> Tree      root: logits after the last committed token (the root),
                                                  n: committed tokens in seq 0; yields after every llama_decode

Run to completion it drafts on request; stepped between checks of the request semaphore it drafts
ahead (the worker's overlap) and stops as soon as the real request arrives.

    chain    the draft's greedy continuation
    dynamic  DuoDecoding: branch at the first position on every token with p > p1 * p2, budget split
             across branches in proportion to their first-token probability (``split_budget``)
    eagle    EAGLE-2: expand the top-width frontier by path score (product of draft probabilities)
"""
from __future__ import annotations

import numpy as np

from .tree import Tree


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely token ids, best first (ties: lower id), and their softmax probabilities."""
    m = float(logits.max())
    z = np.exp(logits - m).sum(dtype=np.float64)  # softmax denominator at temperature 1
    if k == 1:
        ids = np.array([int(np.argmax(logits))])
    else:
        k = min(k, len(logits))
        ids = np.argpartition(-logits, k - 1)[:k]
        ids = ids[np.lexsort((ids, -logits[ids]))]
    probs = np.exp(logits[ids].astype(np.float64) - m) / z
    return ids.astype(np.int64), probs


def draft_chain(d, root: np.ndarray, n: int, budget: int, width: int):
    """Greedy chain of ``budget`` tokens in seq 0 (width unused)."""
    (t,), (p,) = top_k(root, 1)
    toks, probs = [int(t)], [p]
    while len(toks) < budget:
        d.decode([(toks[-1], 0)])
        (t,), (p,) = top_k(d.logits(0), 1)
        toks.append(int(t))
        probs.append(p)
        yield
    return Tree.chain(toks, probs)


def split_budget(budget: int, weights) -> list[int]:
    """Branch lengths: each >= 1, summing to ``budget``; the rest shared in proportion to the
    weights (largest remainder, ties to the earlier branch)."""
    w = np.asarray(weights, dtype=np.float64)
    share = (budget - len(w)) * w / w.sum()
    n = np.floor(share).astype(int)
    rest = budget - len(w) - int(n.sum())
    order = np.lexsort((np.arange(len(w)), -(share - n)))
    n[order[:rest]] += 1
    return (n + 1).tolist()


def draft_dynamic(d, root: np.ndarray, n: int, budget: int, width: int):
    """DuoDecoding: branch at the first position on every token with p > p1 * p2 (p1: top first
    token, p2: top second step after it), up to ``width`` branches; each branch extends greedily,
    all branches decoded in one batch per step; ``budget`` nodes split across branches in
    proportion to their first-token probability."""
    ids, ps = top_k(root, min(width, d.max_seqs))
    t1, p1 = int(ids[0]), float(ps[0])
    if budget == 1:
        return Tree.chain([t1], [p1])
    d.decode([(t1, 0)])
    (t2,), (p2,) = top_k(d.logits(0), 1)
    yield
    keep = [i for i in range(len(ids)) if i == 0 or ps[i] > p1 * p2][:budget]  # p > p1 * p2 opens a branch
    lengths = split_budget(budget, ps[keep])
    # branch b: tokens, probs, seq; the last token of an unfinished branch is not yet decoded
    toks = [[t1, int(t2)][:lengths[0]]]
    probs = [[p1, float(p2)][:lengths[0]]]
    seqs = [0]
    for j, i in enumerate(keep[1:], start=1):
        d.fork(0, j, n)  # share the committed prefix, not t1
        toks.append([int(ids[i])])
        probs.append([float(ps[i])])
        seqs.append(j)
    while True:
        active = [b for b in range(len(toks)) if len(toks[b]) < lengths[b]]
        if not active:
            break
        d.decode([(toks[b][-1], seqs[b]) for b in active])
        for row, b in enumerate(active):
            (t,), (p,) = top_k(d.logits(row), 1)
            toks[b].append(int(t))
            probs[b].append(float(p))
        yield
    tokens, parents, out_probs = [], [], []
    for b in range(len(toks)):
        for k, (t, p) in enumerate(zip(toks[b], probs[b])):
            parents.append(-1 if k == 0 else len(tokens) - 1)
            tokens.append(t)
            out_probs.append(p)
    return Tree(tokens, parents, out_probs)


def draft_eagle(d, root: np.ndarray, n: int, budget: int, width: int):
    """EAGLE-2 style: score = product of draft probabilities along the path. Layer by layer,
    expand the top-``width`` frontier nodes (one batch, one sequence each), adding their
    top-``width`` children; stop once no frontier node can beat the budget-th best score;
    return the top-``budget`` nodes (ancestor-closed, since scores never grow with depth)."""
    k = min(width, d.max_seqs)
    ids, ps = top_k(root, k)
    tok, par, score, prob, depth = [], [], [], [], []

    def add(t, parent, p):
        tok.append(int(t))
        par.append(parent)
        prob.append(float(p))
        score.append((score[parent] if parent >= 0 else 1.0) * float(p))  # cumulative path probability
        depth.append(depth[parent] + 1 if parent >= 0 else 1)

    for t, p in zip(ids, ps):
        add(t, -1, p)
    frontier = list(range(len(tok)))
    owner = {0: -1}  # seq -> node whose path it holds (-1: the root)
    seq_of = {-1: 0}
    while frontier and depth[frontier[0]] < budget:
        kth = sorted(score, reverse=True)[budget - 1] if len(score) >= budget else -1.0
        sel = sorted((i for i in frontier if score[i] > kth), key=lambda i: (-score[i], i))[:k]
        if not sel:
            break
        parents = {par[i] for i in sel}
        for s in [s for s, node in owner.items() if node not in parents]:
            d.drop(s)
            del owner[s]
        free = [s for s in range(d.max_seqs) if s not in owner]
        items, taken = [], set()
        for i in sel:  # the first child continues its parent's sequence, siblings fork it
            sp = seq_of[par[i]]
            if par[i] in taken:
                s = free.pop(0)
                d.fork(sp, s)
            else:
                s = sp
                taken.add(par[i])
            items.append((tok[i], s))
        for i, (_, s) in zip(sel, items):
            owner[s] = i
            seq_of[i] = s
        d.decode(items)
        frontier = []
        for row, i in enumerate(sel):
            cids, cps = top_k(d.logits(row), k)
            for t, p in zip(cids, cps):
                frontier.append(len(tok))
                add(t, i, p)
        yield
    best = sorted(range(len(tok)), key=lambda i: (-score[i], depth[i], i))[:budget]
    best.sort(key=lambda i: (depth[i], -score[i], i))  # topological order
    new = {old: j for j, old in enumerate(best)}
    return Tree([tok[i] for i in best], [new[par[i]] if par[i] >= 0 else -1 for i in best], [prob[i] for i in best])


SHAPES = {"chain": draft_chain, "dynamic": draft_dynamic, "eagle": draft_eagle}   # name -> drafting generator
