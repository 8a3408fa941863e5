"""Speculate or decode plainly, round by round: whichever commits tokens faster on the text at hand.

    rate_spec  = tokens / seconds over the last `window` speculative rounds (draft wait + verify + commit)
    rate_plain = 1 / seconds of one plain step (the target alone), measured in this generation
    speculating and rate_spec < rate_plain  -> plain for `backoff` tokens, then probe `window` rounds again
    a probe that loses doubles the backoff (up to max_backoff); one that wins by 10% resets it (no flapping)
    while paused, a draft with cores of its own keeps decoding the committed tokens (no catch-up later)

The first speculative round after the draft (re)starts carries the draft's prefill: it is not counted.
In the overlapped schedule the round's budget is also capped at what the draft produced within one
target pass (`cap_budget`): a bigger tree only makes the target wait.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


WIN = 1.1   # a window this much faster than the target alone resets the backoff (a near-tie keeps it)


@dataclass
class Governor:
    window: int = 4                 # speculative rounds per estimate
    min_backoff: int = 8            # plain tokens before the first probe back
    max_backoff: int = 128
    plain_s: float | None = None    # seconds per plain step (EMA over this generation)
    speculating: bool = True
    spec: deque = field(default_factory=deque)   # (tokens, seconds) of the last `window` counted rounds
    plain_left: int = 0             # plain steps still to take before probing
    backoff: int = 0
    skip: int = 1                   # speculative rounds still not to count (the draft's prefill)
    pauses: int = 0                 # times speculation was paused for losing
    plain_steps: int = 0            # plain steps taken while the draft was available

    def __post_init__(self):
        self.backoff = self.backoff or self.min_backoff

    def speculate(self) -> bool:
        """Speculate this round?"""
        return self.speculating

    def measure_plain(self, steps: int) -> None:
        """Take `steps` plain steps now (to learn the target-alone rate), then speculate."""
        self.speculating, self.plain_left = False, steps

    def record(self, speculated: bool, tokens: int, seconds: float) -> None:
        """One round done: `tokens` committed in `seconds`."""
        if not speculated:
            self.plain_steps += 1
            self.plain_s = seconds if self.plain_s is None else 0.7 * self.plain_s + 0.3 * seconds
            self.plain_left -= 1
            if self.plain_left <= 0:           # probe back
                self.speculating, self.spec, self.skip = True, deque(), 1
            return
        if self.skip > 0:
            self.skip -= 1
            return
        self.spec.append((tokens, seconds))
        if len(self.spec) > self.window:
            self.spec.popleft()
        if len(self.spec) < self.window:
            return
        if self.plain_s is None:               # learn the target-alone rate on this text: two plain steps
            self.measure_plain(2)
            return
        if self.rate_spec() < 1.0 / self.plain_s:   # losing to the target alone: pause
            self.speculating, self.plain_left = False, self.backoff
            self.backoff = min(2 * self.backoff, self.max_backoff)
            self.pauses += 1
        elif self.rate_spec() > WIN / self.plain_s:  # clearly winning: the next pause starts short again
            self.backoff = self.min_backoff

    def rate_spec(self) -> float:
        tokens, seconds = sum(t for t, _ in self.spec), sum(s for _, s in self.spec)
        return tokens / seconds if seconds > 0 else float("inf")


def cap_budget(cap: int, used: int, lo: int, hi: int, verify_s: float, wait_s: float) -> int:
    """Overlap: the next round's budget cap, from how long the target waited for this round's tree of
    `used` nodes.

    waited (wait > 5% of a pass) -> cap = used * verify / (verify + wait): what the draft made in one pass;
    else the cap grows by one, up to hi.
    """
    if verify_s > 0 and wait_s > 0.05 * verify_s:
        return max(lo, int(used * verify_s / (verify_s + wait_s)))
    return max(lo, min(cap + 1, hi))
