"""The draft model as a candidate source: its llama.cpp worker process (draft_client.DraftClient).

Owns what the round needs of the worker: when it starts (after the target's first token, or alongside
the target's prefill when the draft has cores of its own), the tokens committed since its last request
(`pending`), keeping up while speculation is paused, the overlap budget cap, and falling away for good
on any failure (the round goes on with the target alone; stats.fallback says why).
"""
from __future__ import annotations

import time

from ...plan import TreeSpec
from ..governor import cap_budget
from ..tree import Tree


class ModelDraft:
    name = "model"

    def __init__(self, client, spec: TreeSpec, *, overlap: bool, timeout_s: float, vocab_size: int,
                 budget_range: tuple[int, int] | None, alongside: bool, stats):
        self.client, self.spec, self.overlap, self.timeout_s = client, spec, overlap, timeout_s
        self.vocab_size, self.budget_range, self.alongside, self.stats = vocab_size, budget_range, alongside, stats
        self.alive = True          # False for good after a failure
        self.started = False       # the worker was given this generation's prompt
        self.pending: list[int] = []   # committed since the worker's last request
        self.cap = spec.budget     # overlap: the most nodes the draft makes within one target pass
        self.wait_s = 0.0          # the target's wait for this round's tree
        self.idle0 = client.stats.idle_s

    def fail(self, why: str) -> None:
        self.alive, self.stats.fallback = False, why

    def start(self, committed: list[int]) -> None:
        """Returns at once: the worker prefills `committed` while the target goes on."""
        try:
            self.client.start(list(committed), overlap=self.overlap, spec=self.spec)
            self.started = True
        except Exception as e:  # noqa: BLE001 - any worker failure means: go on without it
            self.fail(f"draft worker failed to start: {e}")
        self.pending = []

    def commit(self, new: list[int]) -> None:
        self.pending.extend(new)

    def round_budget(self, budget: int) -> int:
        return min(budget, self.cap)

    def propose(self, history: list[int], budget: int) -> Tree:
        if not self.started:   # the draft prefills after the target's first token, not alongside
            self.start(history)
        if not self.alive:
            return Tree.empty()
        t = time.perf_counter()
        try:
            tree = self.client.request_tree(self.pending, self.spec.replace(budget=budget), self.timeout_s)
            tree.validate(self.vocab_size)
            self.pending = []
        except Exception as e:  # noqa: BLE001 - died, hung, raised or sent garbage: finish alone
            self.fail(f"{type(e).__name__}: {e}")
            tree = Tree.empty()
        self.wait_s = time.perf_counter() - t
        self.stats.target_idle_s += self.wait_s
        return tree

    def keep_up(self) -> None:
        """A round without the model's tree: a worker that died meanwhile is noticed now (the round goes on
        without it, stats.fallback says why); paused with cores of its own, the worker decodes what the
        target commits meanwhile (no wait)."""
        if self.alive and self.started and not self.client.alive():
            self.fail(f"draft worker died (exit code {self.client.exitcode})")
        if not (self.alive and self.started and self.alongside and self.pending):
            return
        try:
            if self.client.catch_up(self.pending, self.timeout_s):
                self.pending = []
        except Exception as e:  # noqa: BLE001
            self.fail(f"{type(e).__name__}: {e}")

    def after_verify(self, used: int, verify_s: float) -> None:
        """Overlap with an adaptive budget: cap the next tree at what the draft made in one pass."""
        if self.alive and self.overlap and self.budget_range:   # (a fixed budget stays)
            self.cap = cap_budget(self.cap, used, *self.budget_range, verify_s, self.wait_s)

    def finish(self) -> None:
        if self.started and self.alive:
            self.stats.draft_idle_s = self.client.stats.idle_s - self.idle0
