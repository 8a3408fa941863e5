"""The datastore as a candidate source (REST, He et al.): continuations of the context retrieved from a
corpus indexed by suffix (duo/datastore: `duo datastore build`). Costs the CPU well under a millisecond."""
from __future__ import annotations

from ..tree import Tree
from .retrieval import retrieve


class DatastoreDraft:
    name = "datastore"

    def __init__(self, index):
        self.index = index     # duo.datastore.index.SuffixIndex (memory-mapped)

    def propose(self, history: list[int], budget: int) -> Tree:
        return retrieve(self.index, history, budget, self.name)
