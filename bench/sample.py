"""One prompt's answer as a bench method returns it (every method: run(ids, max_new) -> Sample)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sample:
    """One prompt's answer: its tokens, the wall time, the time to the first token, and duo's stats."""
    tokens: list[int]
    wall_s: float
    ttft_s: float
    stats: dict = field(default_factory=dict)
