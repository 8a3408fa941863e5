"""Candidate sources: where a round's draft tree comes from. One interface, one file per source.

    propose(history, budget) -> Tree     history: the committed tokens (prompt included; the last is the
                                         root); at most `budget` nodes, hung under the root; node.source
                                         = SOURCE_IDS[name]

    model.py         ModelDraft: the draft model in its llama.cpp worker process (the governor may pause it)
    lookup.py        PromptLookup: n-gram matches in the prompt and the output so far
    datastore.py     DatastoreDraft: continuations retrieved from a corpus (REST; `duo datastore build`)
    output_cache.py  OutputCacheDraft: continuations found in earlier generations (SuffixDecoding)
    ledger.py        what each source is worth on this text: trust, skipping, free-only rounds

The round (decode.py) asks the free sources first (those that cost the target next to nothing), then,
unless the free tree alone is worth more, the model draft; every tree is merged into one under the
round's budget (tree.merge_trees: shared paths merged, the best-scoring nodes kept), and the free
sources continue the merged tree's most likely path, their continuations competing for the budget by
score. A new source is one more entry in `free_sources`.
"""
from __future__ import annotations

import time
from typing import Protocol

from ..tree import Tree, merge_trees
from .datastore import DatastoreDraft
from .ledger import SourceLedger
from .lookup import PromptLookup
from .output_cache import OutputCacheDraft


class CandidateSource(Protocol):
    name: str   # a key of tree.SOURCE_IDS

    def propose(self, history: list[int], budget: int) -> Tree:
        """Candidates after history[-1], at most `budget` nodes."""
        ...


def free_sources(lookup: bool, datastore=None, output_cache=None) -> list[CandidateSource]:
    """The sources asked in every speculative round besides the model draft (in this order)."""
    return ([PromptLookup()] if lookup else []) + ([DatastoreDraft(datastore)] if datastore is not None else []) \
        + ([OutputCacheDraft(output_cache)] if output_cache is not None and output_cache.docs else [])


def propose_free(sources, ledger: SourceLedger, history: list[int], budget: int) -> tuple[Tree, dict[str, Tree]]:
    """The free sources' merged tree (each scaled by its measured trust) and each one's own tree."""
    merged, own = Tree.empty(), {}
    for src in sources:
        if not ledger.should_ask(src.name):
            ledger.record_of(src.name).skipped += 1
            continue
        t = time.perf_counter()
        tree = src.propose(history, budget)
        ledger.proposed(src.name, tree, time.perf_counter() - t)
        own[src.name] = tree
        merged = merge_trees(merged, ledger.trusted(src.name, tree), budget)
    return merged, own


def extend_top_path(tree: Tree, sources, ledger: SourceLedger, history: list[int], budget: int) -> Tree:
    """The free sources continue the tree's most likely path (its tokens read as committed); the continuations
    compete with the tree's other nodes for the budget by score (a deep likely path beats a weak branch)."""
    path = tree.top_path()
    if not path:
        return tree
    context = history + [int(tree.tokens[k]) for k in path]
    for src in sources:
        if ledger.should_ask(src.name):
            t = time.perf_counter()
            more = src.propose(context, budget)
            ledger.record_of(src.name).seconds += time.perf_counter() - t   # its cost per round: both proposals
            tree = merge_trees(tree, ledger.trusted(src.name, more), budget, at=path[-1])
    return tree
