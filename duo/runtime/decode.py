"""One generation, round by round: draft a tree, verify it in one target pass, accept, commit.

    committed = prompt                     cache holds committed[:-1], root = committed[-1]
    loop:
      tree    = draft.request_tree(delta)  CPU worker; in overlap mode it was drafted while we verified
      logits  = forward_tree(root + tree)  one target pass, tree attention mask
      choices = target's own token at every node (argmax, or inverse CDF at u[position])
      path, bonus = walk the tree along nodes the target agrees with
      compact the cache to prefix + root + path; commit path + bonus; delta = path + bonus

Every emitted token is the target's choice given the committed prefix, so the output equals
target-only decoding (greedy: token for token; sampling: the same tokens for the same seed).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..sampling import SamplingParams, UniformStream, choose_tokens
from .governor import Governor, cap_budget
from .lookup import lookup_tree, merge_trees
from .target import TargetModel, accept_path, cache_length, compact_cache, forward_tree, new_cache, prefill
from .tree import Tree

MODES = ("overlap", "sequential", "target")


@dataclass
class DecodeConfig:
    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    mode: str = "sequential"        # overlap | sequential | target
    budget: int = 16                # drafted nodes per round (model + lookup)
    width: int = 4                  # max branches of the model's tree
    shape: str = "dynamic"          # chain | dynamic | eagle
    lookup: bool = True             # add prompt-lookup (n-gram) candidates to the tree
    draft_timeout_s: float = 10.0   # a round's draft taking longer means the worker hangs
    budget_range: tuple[int, int] | None = None   # adapt the budget within this range as acceptance changes
    draft_prefill_alongside: bool = False  # the draft has cores of its own: it prefills while the target does
    pause_when_slower: bool = True  # decode plainly while speculation is slower than the target alone (governor)


@dataclass
class Stats:
    mode: str = "target"
    new_tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_position: list = field(default_factory=list)   # rounds whose path reached depth d+1
    ttft_s: float = 0.0
    wall_s: float = 0.0
    prefill_s: float = 0.0
    verify_s: float = 0.0
    target_idle_s: float = 0.0       # target waiting for the draft
    draft_idle_s: float = 0.0        # draft worker waiting for the target
    accepted_from_lookup: int = 0
    budget_sum: int = 0              # drafted-node budgets asked for, summed over rounds
    plain_steps: int = 0             # rounds decoded by the target alone while speculation was paused
    pauses: int = 0                  # times speculation was paused for being slower than the target alone
    fallback: str | None = None
    stop_reason: str = ""

    def record_round(self, tree: Tree, path: list[int], budget: int) -> None:
        self.rounds += 1
        self.drafted += len(tree)
        self.budget_sum += budget
        self.accepted += len(path)
        self.accepted_from_lookup += int(sum(tree.source[k] == 1 for k in path))
        self.accepted_per_position += [0] * (len(path) - len(self.accepted_per_position))
        for d in range(len(path)):
            self.accepted_per_position[d] += 1

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["acceptance_rate"] = self.accepted / self.drafted if self.drafted else 0.0
        d["mean_budget"] = d.pop("budget_sum") / self.rounds if self.rounds else 0.0
        # tokens per target pass after the prefill (whose token is the first): path + bonus, 1 for a plain step
        d["mean_accepted_len"] = (self.new_tokens - 1) / self.rounds if self.rounds else 0.0
        d["tokens_per_s"] = self.new_tokens / self.wall_s if self.wall_s else 0.0
        d["accepted_per_position"] = [a / self.rounds for a in self.accepted_per_position] if self.rounds else []
        return d


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


def adapt_budget(accepted_ema: float, lo: int, hi: int) -> int:
    """Next round's budget: about twice the recent accepted depth plus slack, within [lo, hi].

    Easy text (long accepted paths) earns a bigger tree; hard text stops paying for nodes it rejects.
    """
    return int(min(hi, max(lo, round(2 * accepted_ema + 4))))


def target_ops(tm):
    """The target's operations: duo.runtime.target's, or those a stand-in brings as `tm.ops`
    (duo.runtime.simulate.SimulatedTarget: the recorded target, timed like an accelerator)."""
    ops = getattr(tm, "ops", None)
    if ops is None:
        return new_cache, prefill, cache_length, forward_tree, choose_tokens, compact_cache
    return ops.new_cache, ops.prefill, ops.cache_length, ops.forward_tree, ops.choose_tokens, ops.compact_cache


def generate_tokens(tm: TargetModel, draft, prompt: list[int], cfg: DecodeConfig, stats: Stats,
                    ) -> Iterator[list[int]]:
    """Yield the tokens committed by each round until EOS or max_new_tokens. `draft` may be None."""
    new_cache, prefill, cache_length, forward_tree, choose_tokens, compact_cache = target_ops(tm)
    t0 = time.perf_counter()
    stats.mode = cfg.mode if draft is not None else "target"
    u = UniformStream(cfg.sampling.seed)
    use_draft, started = stats.mode != "target", False
    gov = Governor()
    idle0 = draft.stats.idle_s if use_draft else 0.0

    def start_draft(committed: list[int]) -> bool:
        nonlocal use_draft
        try:   # returns at once: the worker prefills `committed` while we go on
            draft.start(committed, overlap=cfg.mode == "overlap", budget=cfg.budget, width=cfg.width,
                        shape=cfg.shape)
            return True
        except Exception as e:  # noqa: BLE001 - any worker failure means: go on without it
            use_draft, stats.fallback = False, f"draft worker failed to start: {e}"
            return False

    if use_draft and cfg.draft_prefill_alongside:   # the draft has cores of its own: prefill side by side
        started = start_draft(list(prompt))
    # 0. prefill the whole prompt: its last position's logits are the first token, emitted at once
    cache = new_cache()
    logits = prefill(tm, cache, prompt)
    new = [int(choose_tokens(logits, cfg.sampling, None if cfg.sampling.greedy else u.take([0]))[0])]
    stats.prefill_s = time.perf_counter() - t0
    history, pending = list(prompt), []       # pending: committed since the draft's last request
    budget, accepted_ema, cap = cfg.budget, cfg.budget / 2, cfg.budget
    n_new = 0
    while True:
        # 4. commit (the prefill's token, then each round's path + bonus): emit up to EOS / the limit
        eos_at = next((i for i, tok in enumerate(new) if tok in tm.eos_ids), None)
        new = new[:eos_at + 1 if eos_at is not None else len(new)][:cfg.max_new_tokens - n_new]
        n_new += len(new)
        stats.new_tokens = n_new
        history.extend(new)
        pending.extend(new)
        root = new[-1]
        if n_new == len(new):
            stats.ttft_s = time.perf_counter() - t0
        stats.wall_s = time.perf_counter() - t0
        yield new
        if eos_at is not None or n_new >= cfg.max_new_tokens:
            stats.stop_reason = "eos" if eos_at is not None else "length"
            break
        remaining = cfg.max_new_tokens - n_new
        speculate = use_draft and remaining > 1 and gov.speculate()
        t_round, round_budget = time.perf_counter(), min(budget, cap)
        # 1. draft: a tree rooted at the last committed token (empty when not speculating)
        tree = Tree.empty()
        if speculate and not started:   # the draft prefills after the target's first token, not alongside
            started, pending = start_draft(list(history)), []
        if speculate and use_draft:
            t = time.perf_counter()
            try:
                tree = draft.request_tree(pending, round_budget, cfg.width, cfg.draft_timeout_s, cfg.shape)
                tree.validate(tm.vocab_size)
                pending = []
            except Exception as e:  # noqa: BLE001 - died, hung, raised or sent garbage: finish alone
                use_draft, tree = False, Tree.empty()
                stats.fallback = f"{type(e).__name__}: {e}"
            wait = time.perf_counter() - t
            stats.target_idle_s += wait
        elif use_draft and started and cfg.draft_prefill_alongside and pending:
            try:   # paused, the draft on cores of its own: it decodes what we commit meanwhile (no wait)
                if draft.catch_up(pending, cfg.draft_timeout_s):
                    pending = []
            except Exception as e:  # noqa: BLE001
                use_draft, stats.fallback = False, f"{type(e).__name__}: {e}"
        if cfg.lookup and stats.mode != "target" and remaining > 1 and (speculate or not use_draft):
            tree = merge_trees(tree, lookup_tree(history, max_nodes=max(4, budget // 2)), budget)
        if not tm.supports_tree and len(tree):
            tree = tree.top_chain()
        tree = prune_depth(tree, remaining - 1)
        # 2. verify: one target pass over root + tree
        t = time.perf_counter()
        n_past = cache_length(cache)
        logits = forward_tree(tm, cache, root, tree)
        # 3. accept: the target's own choice at every node, followed down the tree
        depth = np.concatenate([[0], tree.depths()]).astype(np.int64)
        choices = choose_tokens(logits, cfg.sampling, None if cfg.sampling.greedy else u.take(n_new + depth))
        path, bonus = accept_path(tree, choices)
        compact_cache(cache, n_past + 1, path)
        verify_s = time.perf_counter() - t
        stats.verify_s += verify_s
        new = [int(tree.tokens[k]) for k in path] + [bonus]
        stats.record_round(tree, path, round_budget if speculate else 0)
        # the next round's plan: faster than the target alone? how big a tree?
        if use_draft and cfg.pause_when_slower:
            gov.record(speculate, len(new), time.perf_counter() - t_round)
        if speculate and cfg.budget_range:
            accepted_ema = 0.7 * accepted_ema + 0.3 * len(path)
            budget = adapt_budget(accepted_ema, *cfg.budget_range)
        if speculate and use_draft and cfg.mode == "overlap" and cfg.budget_range:   # (a fixed budget stays)
            cap = cap_budget(cap, round_budget, *cfg.budget_range, verify_s, wait)
    stats.wall_s = time.perf_counter() - t0
    stats.plain_steps, stats.pauses = gov.plain_steps, gov.pauses
    if started and use_draft:
        stats.draft_idle_s = draft.stats.idle_s - idle0
