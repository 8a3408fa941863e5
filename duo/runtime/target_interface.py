"""The target side's interface: what the decode loop, the Engine and the profiler ask of a target.

Two implementations: `target.TargetModel` (a transformers model in torch, on the CPU or a GPU) and
`simulate.SimulatedTarget` (SIMULATION: the real target's recorded output, timed like an accelerator).
The decode loop calls nothing else; no caller tells them apart.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ..sampling import SamplingParams
from .tree import Tree


class Target(Protocol):
    name: str
    tokenizer: Any
    vocab_size: int               # rows of the output layer (may exceed len(tokenizer))
    max_context: int
    eos_ids: frozenset[int]
    supports_tree: bool           # False: the model ignores a 4D mask, drafts are verified as chains
    uses_host_cores: bool         # its passes run on this machine's CPU cores (a draft beside it competes)
    counters: Any                 # the simulated accelerator's counters (busy, idle, gaps); None for a real target

    def prepare(self, prompt: list[int], max_new_tokens: int, sampling: SamplingParams) -> None:
        """Before a generation (the simulation records the prompt once); raises ValueError for what it cannot do."""

    def new_cache(self) -> Any:
        """An empty KV cache."""

    def cache_length(self, cache) -> int:
        """Tokens the cache holds."""

    def prefill(self, cache, tokens: list[int]):
        """Append `tokens`; the logits after the last one: [1, vocab] (the first generated token's)."""

    def forward_tree(self, cache, root: int, tree: Tree):
        """One pass over [root] + tree (tree attention mask); logits [1 + n, vocab], row 0 after the root."""

    def choose_tokens(self, logits, sampling: SamplingParams, u: np.ndarray | None) -> np.ndarray:
        """The target's token at every row: argmax (greedy) or the inverse CDF at u[row]. int64 [rows]."""

    def token_logprobs(self, logits, rows: list[int], tokens: list[int], top: int) -> list[tuple]:
        """(logprob of tokens[i], [(token, logprob)] * top) under the target at logits[rows[i]]; [] if the
        target has no distribution to give (the simulated accelerator)."""

    def compact_cache(self, cache, n_keep: int, path: list[int]) -> None:
        """Keep the first n_keep entries and the accepted tree nodes `path`, in order; drop the rest."""
