"""One generation, round by round: draft a tree, verify it in one target pass, accept, commit.

    committed = prompt                       cache holds committed[:-1], root = committed[-1]
    logits = target.prefill(prompt)          the first token comes from the prefill, emitted at once
    loop:
      free    = each free source's tree      prompt lookup, datastore, output cache (sources/), by measured trust
      tree    = draft.propose(history)       CPU worker; in overlap mode it was drafted while we verified;
                                             skipped when the free tree alone commits more per second
              + free, merged under the round's budget; budget left: the free sources continue its top path
      logits  = target.forward_tree(root + tree)   one target pass, tree attention mask
      choices = target's own token at every node (argmax, or inverse CDF at u[position])
      path, bonus = walk the tree along nodes the target agrees with
      compact the cache to prefix + root + path; commit path + bonus
      governor: slower than the target alone? decode plainly for a while (governor.py)

Every emitted token is the target's choice given the committed prefix, so the output equals
target-only decoding: in float32 token for token (sampling: the same tokens for the same seed); in
bfloat16/float16/int8 a (1+n)-row pass may round a logit differently from a 1-row one, so the two part
only at near-ties (top-2 gap within the precision's bound, measured by tests/test_precision.py).
`target` is anything with the Target interface (target_interface.py): the torch model or the
simulated accelerator.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..plan import TreeSpec
from ..sampling import SamplingParams, UniformStream
from .governor import Governor
from .sources import extend_top_path, free_sources, propose_free
from .sources.ledger import SourceLedger
from .sources.model import ModelDraft
from .target_interface import Target
from .tree import SOURCE_IDS, Tree, accept_path, merge_trees, prune_depth


@dataclass
class DecodeConfig:
    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    mode: str = "sequential"        # overlap | sequential | target (duo.plan.MODES)
    tree: TreeSpec = field(default_factory=TreeSpec)   # the model draft's tree; its budget bounds the merged tree
    lookup: bool = True             # add prompt-lookup (n-gram) candidates to the tree
    model_draft: bool = True        # False: draft from the free sources alone, no model (REST as its authors run it)
    datastore: object = None        # a duo.datastore.index.SuffixIndex: retrieved candidates (REST)
    output_cache: object = None     # a sources.output_cache.OutputCache: candidates from earlier generations
    logprobs: int | None = None     # record each emitted token's logprob under the target, and this many top ones
    record_top_k: int = 0           # > 0: keep the target's top-K at every emitted token (duo adapt learns from it)
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
    free_rounds: int = 0             # speculative rounds on the free sources' tree alone (no model draft)
    sources: dict = field(default_factory=dict)   # per candidate source: sources.ledger.SourceRecord fields
    token_logprobs: list = field(default_factory=list)   # with cfg.logprobs: (logprob, [(token, logprob)]) per token
    target_top_k: list = field(default_factory=list)     # with cfg.record_top_k: the same, K likeliest, per token
    rejected_at: list = field(default_factory=list)      # with cfg.record_top_k: indices of the emitted tokens
                                                         # where the draft model's tree held another token
    pauses: int = 0                  # times speculation was paused for being slower than the target alone
    adapter: str | None = None       # the draft's LoRA adapter file (duo adapt), None: the plain draft
    record_s: float = 0.0            # with cfg.record_top_k: time spent taking the target's top-K (its overhead)
    verify: str = "eager"            # the target's verify pass: eager, or compiled (runtime/static_target.py)
    fallback: str | None = None
    stop_reason: str = ""

    def record_round(self, tree: Tree, path: list[int], budget: int) -> None:
        self.rounds += 1
        self.drafted += len(tree)
        self.budget_sum += budget
        self.accepted += len(path)
        self.accepted_from_lookup += int(sum(tree.source[k] == SOURCE_IDS["lookup"] for k in path))
        self.accepted_per_position += [0] * (len(path) - len(self.accepted_per_position))
        for d in range(len(path)):
            self.accepted_per_position[d] += 1

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        for big in ("token_logprobs", "target_top_k", "rejected_at"):
            d.pop(big)
        d["acceptance_rate"] = self.accepted / self.drafted if self.drafted else 0.0
        d["mean_budget"] = d.pop("budget_sum") / self.rounds if self.rounds else 0.0
        # tokens per target pass after the prefill (whose token is the first): path + bonus, 1 for a plain step
        d["mean_accepted_len"] = (self.new_tokens - 1) / self.rounds if self.rounds else 0.0
        d["tokens_per_s"] = self.new_tokens / self.wall_s if self.wall_s else 0.0
        d["accepted_per_position"] = [a / self.rounds for a in self.accepted_per_position] if self.rounds else []
        return d


def adapt_budget(accepted_ema: float, lo: int, hi: int) -> int:
    """Next round's budget: about twice the recent accepted depth plus slack, within [lo, hi].

    Easy text (long accepted paths) earns a bigger tree; hard text stops paying for nodes it rejects.
    """
    return int(min(hi, max(lo, round(2 * accepted_ema + 4))))


def logprobs_of(tm: Target, logits, rows: list[int], tokens: list[int], top: int | None) -> list:
    """The emitted tokens' logprobs under the target (at the logits row before each), [] when not asked."""
    return tm.token_logprobs(logits, rows, tokens, top) if top is not None else []


def model_rejected(tree: Tree, path: list[int]) -> bool:
    """Did the draft model propose a child of the accepted path's end (one the target did not choose)?"""
    end = path[-1] if path else -1
    return bool(np.any((tree.parents == end) & (tree.source == SOURCE_IDS["model"])))


def generate_tokens(tm: Target, draft, prompt: list[int], cfg: DecodeConfig, stats: Stats,
                    ) -> Iterator[list[int]]:
    """Yield the tokens committed by each round until EOS or max_new_tokens. `draft` (a DraftClient) may be None."""
    t0 = time.perf_counter()
    free_drafting = cfg.mode != "target" and not cfg.model_draft      # the free sources alone, no model
    stats.mode = "free" if free_drafting else cfg.mode if draft is not None else "target"
    u = UniformStream(cfg.sampling.seed)
    model = None if stats.mode in ("target", "free") else ModelDraft(
        draft, cfg.tree, overlap=cfg.mode == "overlap", timeout_s=cfg.draft_timeout_s, vocab_size=tm.vocab_size,
        budget_range=cfg.budget_range, alongside=cfg.draft_prefill_alongside, stats=stats)
    sources = free_sources(cfg.lookup, cfg.datastore, cfg.output_cache) if model is not None or free_drafting else []
    ledger = SourceLedger()
    gov = Governor()
    if model is not None and cfg.draft_prefill_alongside:   # the draft has cores of its own: prefill side by side
        model.start(prompt)
    # 0. prefill the whole prompt: its last position's logits are the first token, emitted at once
    cache = tm.new_cache()
    logits = tm.prefill(cache, prompt)
    new = [int(tm.choose_tokens(logits, cfg.sampling, None if cfg.sampling.greedy else u.take([0]))[0])]
    new_logprobs = logprobs_of(tm, logits, [0], new, cfg.logprobs)
    rows, new_top, rejected = [0], logprobs_of(tm, logits, [0], new, cfg.record_top_k or None), False
    stats.prefill_s = time.perf_counter() - t0
    history = list(prompt)
    budget, accepted_ema = cfg.tree.budget, cfg.tree.budget / 2
    n_new = 0
    while True:
        # 4. commit (the prefill's token, then each round's path + bonus): emit up to EOS / the limit
        eos_at = next((i for i, tok in enumerate(new) if tok in tm.eos_ids), None)
        new = new[:eos_at + 1 if eos_at is not None else len(new)][:cfg.max_new_tokens - n_new]
        stats.token_logprobs += new_logprobs[:len(new)]
        stats.target_top_k += new_top[:len(new)]
        if rejected and len(new) == len(rows):   # the bonus token, where the draft was wrong
            stats.rejected_at.append(n_new + len(new) - 1)
        n_new += len(new)
        stats.new_tokens = n_new
        history.extend(new)
        if model is not None:
            model.commit(new)
        root = new[-1]
        if n_new == len(new):
            stats.ttft_s = time.perf_counter() - t0
        stats.wall_s = time.perf_counter() - t0
        yield new
        if eos_at is not None or n_new >= cfg.max_new_tokens:
            stats.stop_reason = "eos" if eos_at is not None else "length"
            break
        remaining = cfg.max_new_tokens - n_new
        t_round = time.perf_counter()
        # 1. draft: the free sources' tree, then the model's (unless the governor paused it, or, sequential,
        #    the free tree alone commits more per second), merged; budget left: extend the top path
        speculate = remaining > 1 and (free_drafting or model is not None and (gov.speculate() or not model.alive))
        free, own = propose_free(sources, ledger, history, budget) if speculate else (Tree.empty(), {})
        free_only = speculate and (free_drafting or model.alive and gov.speculate() and cfg.mode == "sequential"
                                   and ledger.free_is_enough(free))
        drafting = speculate and not free_only and model.alive and gov.speculate()
        stats.free_rounds += free_only
        round_budget = model.round_budget(budget) if drafting else 0
        tree = model.propose(history, round_budget) if drafting else Tree.empty()
        if drafting:
            own["model"] = tree
            ledger.proposed("model", tree, model.wait_s)
            ledger.waited(model.wait_s)
        elif model is not None:
            model.keep_up()
        tree = extend_top_path(merge_trees(tree, free, budget), sources, ledger, history, budget)
        if not tm.supports_tree and len(tree):
            tree = tree.top_chain()
        tree = prune_depth(tree, remaining - 1)
        # 2. verify: one target pass over root + tree
        t = time.perf_counter()
        n_past = tm.cache_length(cache)
        logits = tm.forward_tree(cache, root, tree)
        # 3. accept: the target's own choice at every node, followed down the tree
        depth = np.concatenate([[0], tree.depths()]).astype(np.int64)
        choices = tm.choose_tokens(logits, cfg.sampling, None if cfg.sampling.greedy else u.take(n_new + depth))
        path, bonus = accept_path(tree, choices)
        tm.compact_cache(cache, n_past + 1, path)
        verify_s = time.perf_counter() - t
        stats.verify_s += verify_s
        new = [int(tree.tokens[k]) for k in path] + [bonus]
        rows = [0] + [k + 1 for k in path]                     # the logits row before each new token
        new_logprobs = logprobs_of(tm, logits, rows, new, cfg.logprobs)
        if cfg.record_top_k:   # what duo adapt learns from (timed: the recording's overhead)
            t = time.perf_counter()
            new_top, rejected = logprobs_of(tm, logits, rows, new, cfg.record_top_k), model_rejected(tree, path)
            stats.record_s += time.perf_counter() - t
        stats.record_round(tree, path, round_budget)
        ledger.settle(own, tree, path, new, verify_s, free_only=free_only)
        # the next round's plan: faster than the target alone? how big a tree?
        if model is not None and model.alive and cfg.pause_when_slower:
            gov.record(speculate, len(new), time.perf_counter() - t_round)
        if drafting and cfg.budget_range:
            accepted_ema = 0.7 * accepted_ema + 0.3 * len(path)
            budget = adapt_budget(accepted_ema, *cfg.budget_range)
        if drafting:
            model.after_verify(round_budget, verify_s)
    stats.wall_s = time.perf_counter() - t0
    stats.plain_steps, stats.pauses = gov.plain_steps, gov.pauses
    stats.sources = ledger.summary()
    if model is not None:
        model.finish()
