"""What each candidate source is worth on the text at hand, measured round by round in one generation.

    gained    its own tree's accepted depth along what the round committed (what it would have given alone)
    claimed   the depth its own probabilities promised (the sum of its nodes' path scores)
    trust     (gained + 1) / (claimed + 1): multiplies a free source's probabilities before merging, so
              its nodes win the round's budget as far as they are accepted on this text, not as far as
              they claim to be
    skip      a source asked WARMUP times that gains less than 0.05 tokens a round is no longer asked,
              except every PROBE_EVERY rounds (the text may change): it stops costing anything

A sequential round may also go without the model's tree: when the free tree alone is expected to commit
more tokens per second than waiting for the draft would (`free_is_enough`, from the measured draft
wait, verify time and the model's own gains in this generation).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..tree import SOURCE_NAMES, Tree, path_scores

WARMUP = 8          # rounds a source is asked before it may be skipped
PROBE_EVERY = 16    # a skipped source is asked again every this many rounds
MIN_GAIN = 0.05     # tokens per round below which a source is worth nothing


@dataclass
class SourceRecord:
    asked: int = 0          # rounds it proposed
    skipped: int = 0        # rounds it was not asked
    proposed: int = 0       # nodes it proposed (its own tree, before merging)
    claimed: float = 0.0    # sum of its own trees' expected accepted depth (by its probabilities)
    gained: int = 0         # sum of its own trees' accepted depth along the committed tokens
    accepted: int = 0       # its nodes on the accepted paths of the merged trees
    gain_ema: float | None = None   # recent gained depth per asked round (EMA)
    seconds: float = 0.0    # time spent proposing, extensions of the top path included (the model: the
                            # target's wait for its tree)

    @property
    def trust(self) -> float:
        return min(2.0, max(0.02, (self.gained + 1.0) / (self.claimed + 1.0)))


def matched_depth(tree: Tree, committed: list[int]) -> int:
    """How many of `committed` (a round's path + bonus) the tree holds as a path from its root."""
    kids = tree.children()
    cur, depth = -1, 0
    for tok in committed:
        cur = next((c for c in kids[cur + 1] if int(tree.tokens[c]) == tok), None)
        if cur is None:
            break
        depth += 1
    return depth


def expected_depth(tree: Tree) -> float:
    """The accepted depth a tree expects by its own probabilities: the sum of its nodes' path scores."""
    return float(path_scores(tree).sum()) if len(tree) else 0.0


class SourceLedger:
    def __init__(self):
        self.records: dict[str, SourceRecord] = {}
        self.rounds = 0
        self.verify_s = None    # EMA of one verification pass
        self.wait_s = None      # EMA of the target's wait for the model's tree
        self.free_claimed = 0.0  # rounds on the free tree alone: the depth their trees expected ...
        self.free_gained = 0     # ... and the depth they got
        self._e_free = 0.0       # this round's free tree's expected depth (free_is_enough)

    def record_of(self, name: str) -> SourceRecord:
        return self.records.setdefault(name, SourceRecord())

    def should_ask(self, name: str) -> bool:
        r = self.record_of(name)
        return r.asked < WARMUP or r.gain_ema is None or r.gain_ema >= MIN_GAIN or self.rounds % PROBE_EVERY == 0

    def trusted(self, name: str, tree: Tree) -> Tree:
        """The tree with its probabilities scaled by the source's measured trust (capped at 1)."""
        if len(tree) == 0:
            return tree
        probs = (tree.probs * self.record_of(name).trust).clip(0.0, 1.0)
        return Tree(tree.tokens, tree.parents, probs, tree.source)

    def proposed(self, name: str, tree: Tree, seconds: float) -> None:
        r = self.record_of(name)
        r.asked += 1
        r.proposed += len(tree)
        r.claimed += expected_depth(tree)
        r.seconds += seconds

    def settle(self, own_trees: dict[str, Tree], merged: Tree, path: list[int], committed: list[int],
               verify_s: float, free_only: bool = False) -> None:
        """After a round: credit each source asked with what its own tree would have gained."""
        self.rounds += 1
        if free_only:
            self.free_claimed += self._e_free
            self.free_gained += len(path)
        for name, tree in own_trees.items():
            r = self.record_of(name)
            gained = matched_depth(tree, committed)
            r.gained += gained
            r.gain_ema = gained if r.gain_ema is None else 0.7 * r.gain_ema + 0.3 * gained
        for k in path:
            self.record_of(SOURCE_NAMES[int(merged.source[k])]).accepted += 1
        self.verify_s = verify_s if self.verify_s is None else 0.7 * self.verify_s + 0.3 * verify_s

    def waited(self, seconds: float) -> None:
        self.wait_s = seconds if self.wait_s is None else 0.7 * self.wait_s + 0.3 * seconds

    def free_is_enough(self, free: Tree) -> bool:
        """Commit more per second with the free tree alone than by waiting for the model's?

            free alone:   (E_free + 1) / verify            E_free: the free tree's trusted expected depth
            with model:   (max(g_model, E_free) + 1) / (wait + verify)   g_model: the model's recent gain
        E_free is scaled by how earlier free-only rounds of this generation did against their expectation
        ((gained + 2) / (expected + 2)), so a free tree that over-promises soon stops replacing the model's.
        """
        model = self.records.get("model")
        if model is None or model.gain_ema is None or model.asked < 2 or self.verify_s is None or self.wait_s is None or len(free) == 0:
            return False
        self._e_free = e_free = expected_depth(free)
        e_free *= (self.free_gained + 2.0) / (self.free_claimed + 2.0)
        return (e_free + 1) / self.verify_s >= (max(model.gain_ema, e_free) + 1) / (self.wait_s + self.verify_s)

    def summary(self) -> dict:
        return {name: {**asdict(r), "trust": r.trust} for name, r in self.records.items()}
