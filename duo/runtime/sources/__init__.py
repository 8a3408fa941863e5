"""Candidate sources: where a round's draft tree comes from. One interface, one file per source.

    propose(history, budget) -> Tree     history: the committed tokens (prompt included; the last is the
                                         root); at most `budget` nodes, hung under the root; node.source
                                         = SOURCE_IDS[name]

    model.py   ModelDraft: the draft model in its llama.cpp worker process (the governor may pause it)
    lookup.py  PromptLookup: n-gram matches in the prompt and the output so far

The round (decode.py) asks the model draft first, then each free source (those that cost the target
next to nothing), merging every tree into one under the round's budget (tree.merge_trees: shared
paths merged, the best-scoring nodes kept). A new source is one more entry in `free_sources`.
"""
from __future__ import annotations

from typing import Protocol

from ..tree import Tree
from .lookup import PromptLookup


class CandidateSource(Protocol):
    name: str   # a key of tree.SOURCE_IDS

    def propose(self, history: list[int], budget: int) -> Tree:
        """Candidates after history[-1], at most `budget` nodes."""
        ...


def free_sources(lookup: bool) -> list[CandidateSource]:
    """The sources asked in every speculative round besides the model draft (in this order)."""
    return [PromptLookup()] if lookup else []
