"""Cost model: predicted tokens/s of every schedule from measured latencies and acceptance. Pure functions.

One round commits E tokens (the accepted path plus the target's bonus token) and takes T ms:

    E(budget, width)  = 1 + sum_{d=1..L0} S(d) + sum_{r=1..w-1} q_r * sum_{d=1..L_r} C(d)
        S(d) = P(the draft's greedy chain is accepted to depth >= d)   (measured acceptance curve)
        q_r  = P(the path enters through the root's rank-r alternative)   (measured on dynamic trees)
        C(d) = P(a branch entered at depth 1 reaches depth d) = S(d) / S(1)
        L_r  = the budget split over the w branches as the drafter splits it (each >= 1, pro rata:
               duo.runtime.tree_shapes.split_budget itself)
    target-only:  T = verify(1) + overhead
    sequential:   T = draft(budget, width) + verify(1 + budget) + channel + overhead + sources
    overlap:      T = p * max(verify', draft' + step') + (1 - p) * (verify' + draft) + channel + overhead + sources
        The worker drafts the next tree while the target verifies, assuming the whole top path and the
        draft's own guess of the bonus token are accepted; p = S(L0 + 1) is the probability of that hit
        (p = 1 gives the plain max(draft, verify)). On a miss it drafts again while the target waits.
        verify' and draft' include the slowdown measured while both run at once (shared cores, memory
        bandwidth); step' is the extra decode of the leaf that predicts the bonus token.
    sources: the free candidate sources' proposals (prompt lookup, output cache), measured per round.

draft(budget, width) sums the measured ms per llama.cpp decode step, by batch width, over the steps the
drafter takes: a chain decodes `budget` steps of one token; a tree decodes the root and the first token,
then all unfinished branches together, one step per depth. Each side runs with its own thread count:
sequential gives both all cores in turn, overlap splits the cores between them (on a GPU the target's
time does not depend on CPU threads).

`choose_budget` maximises E / T over modes x budgets x widths x thread splits; a drafting schedule must
beat target-only by `margin` (relative) to be chosen.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

from ..plan import MODES
from ..runtime.tree_shapes import split_budget

WIDTHS = (1, 2, 4)
DEFAULT_MARGIN = 0.03


# ------------------------------------------------------------------------------------------- acceptance
@dataclass
class Acceptance:
    """hazard[d-1] = P(the depth-d node of the greedy chain is accepted | its parent was), d = 1..D.

    rank[r] = P(the accepted path starts with the root's r-th most likely draft token); rank[0] is
    taken to be hazard[0]. Beyond depth D the hazard is `tail` (default: mean of the last 3)."""
    hazard: list[float]
    rank: list[float] = field(default_factory=list)
    tail: float | None = None

    def __post_init__(self):
        self.hazard = [min(max(float(h), 0.0), 1.0) for h in self.hazard]
        self.rank = [min(max(float(q), 0.0), 1.0) for q in self.rank]
        if self.tail is None:
            last = self.hazard[-3:]
            self.tail = sum(last) / len(last) if last else 0.0
        self.tail = min(max(float(self.tail), 0.0), 0.99)

    @classmethod
    def from_survival(cls, survival: Iterable[float], rank: Iterable[float] = (), tail: float | None = None
                      ) -> "Acceptance":
        """From S(1), S(2), ... (non-increasing)."""
        hz, prev = [], 1.0
        for s in survival:
            hz.append(s / prev if prev > 0 else 0.0)
            prev = s
        return cls(hz, list(rank), tail)

    def h(self, d: int) -> float:
        return self.hazard[d - 1] if d <= len(self.hazard) else self.tail

    def survival(self, d: int) -> float:
        """S(d) = P(accepted depth >= d) along the greedy chain; S(0) = 1."""
        s = 1.0
        for k in range(1, d + 1):
            s *= self.h(k)
        return s

    def curve(self, depth: int) -> list[float]:
        return [self.survival(d) for d in range(1, depth + 1)]

    def first(self, r: int) -> float:
        """P(enter through the root's rank-r branch)."""
        if r == 0:
            return self.h(1)
        return self.rank[r] if r < len(self.rank) else 0.0

    def cont(self, d: int) -> float:
        """C(d): P(reach depth d | depth 1 accepted) = h(2) ... h(d)."""
        c = 1.0
        for k in range(2, d + 1):
            c *= self.h(k)
        return c

    def to_dict(self) -> dict:
        return asdict(self)


def branch_lengths(acc: Acceptance, budget: int, width: int) -> list[int]:
    """Branch lengths of a dynamic tree: branch 0 is the greedy chain, branch r the rank-r alternative."""
    if budget <= 0:
        return []
    w = min(width, budget)
    weights = [acc.first(0)] + [acc.first(r) for r in range(1, w)]
    while len(weights) > 1 and weights[-1] <= 0:
        weights.pop()
    if len(weights) == 1:
        return [budget]
    if weights[0] <= 0:
        weights[0] = 1e-9
    return split_budget(budget, weights)


def expected_tokens(acc: Acceptance, budget: int, width: int = 1) -> float:
    """E: tokens committed per round (accepted path + bonus)."""
    lengths = branch_lengths(acc, budget, width)
    if not lengths:
        return 1.0
    e = 1.0 + sum(acc.survival(d) for d in range(1, lengths[0] + 1))
    for r, L in enumerate(lengths[1:], start=1):
        e += acc.first(r) * sum(acc.cont(d) for d in range(1, L + 1))
    return e


def hit_probability(acc: Acceptance, budget: int, width: int = 1) -> float:
    """Overlap: P(the whole top path and the draft's guess of the bonus are accepted)."""
    lengths = branch_lengths(acc, budget, width)
    return acc.survival(lengths[0] + 1) if lengths else 0.0


# ------------------------------------------------------------------------------------------- latencies
def interp(points: dict, x: float) -> float:
    """Piecewise linear through {x: y}; constant below the first point, linear slope (>= 0) beyond the last."""
    xs = sorted(points)
    if not xs:
        raise ValueError("no measurements to interpolate")
    if x <= xs[0]:
        return float(points[xs[0]])
    for a, b in zip(xs, xs[1:]):
        if x <= b:
            return float(points[a] + (points[b] - points[a]) * (x - a) / (b - a))
    if len(xs) == 1:
        return float(points[xs[0]])
    a, b = xs[-2], xs[-1]
    slope = max(0.0, (points[b] - points[a]) / (b - a))
    return float(points[b] + slope * (x - b))


def running_max(points: dict) -> dict:
    """Running maximum in x: more tokens (or a wider batch) never cost less (smooths measurement noise)."""
    out, top = {}, 0.0
    for x in sorted(points):
        top = max(top, float(points[x]))
        out[x] = top
    return out


@dataclass
class Measurements:
    """What the cost model needs, in ms. Keys are thread counts, then width (draft) or tokens n (verify)."""
    n_cores: int
    draft_ms: dict            # {threads: {width: ms per llama.cpp decode step}}
    verify_ms: dict           # {threads: {n: ms per target pass over n tokens, accept included}}
    acceptance: Acceptance
    gpu: bool = False         # target on a GPU: its time does not depend on CPU threads
    channel_ms: float = 0.0   # request/response exchange with the worker
    overhead_ms: float = 0.0  # host work per round outside the forward pass and the draft
    sources_ms: float = 0.0   # the free candidate sources' proposals per speculative round
    tree_factor: float = 1.0  # verify time of a branched tree / a chain of as many tokens
    interference: dict = field(default_factory=dict)  # {draft threads: (draft factor, target factor)}
    supports_tree: bool = True
    loop_factor: float = 1.0  # sequential: a pass right after the draft ran / one back to back (in-loop measured)
    host_cores: int = 1       # on a GPU: cores the target's host thread keeps while the draft overlaps it
                              # (0 for a simulated accelerator: duo.runtime.simulate)

    def __post_init__(self):
        self.draft_ms = {int(t): running_max({int(w): float(v) for w, v in d.items()})
                         for t, d in self.draft_ms.items()}
        self.verify_ms = {int(t): running_max({int(n): float(v) for n, v in d.items()})
                          for t, d in self.verify_ms.items()}
        self.tree_factor = max(1.0, float(self.tree_factor))  # a mask never makes a pass cheaper: noise
        self.interference = {int(k): (float(v[0]), float(v[1])) for k, v in self.interference.items()}
        if not self.draft_ms or not self.verify_ms:
            raise ValueError("need draft and verify measurements")

    # -- latencies --------------------------------------------------------------------------------
    def verify_threads(self, threads: int) -> int:
        """The verify curve used for `threads` (on a GPU: the one measured)."""
        if self.gpu:
            return max(self.verify_ms)
        return threads

    def max_n(self, threads: int) -> int:
        return max(self.verify_ms[self.verify_threads(threads)])

    def verify(self, n: int, threads: int) -> float:
        return interp(self.verify_ms[self.verify_threads(threads)], n)

    def step(self, threads: int, width: int) -> float:
        return interp(self.draft_ms[threads], width)

    def draft(self, budget: int, width: int, threads: int) -> float:
        """ms to draft a tree of `budget` nodes with up to `width` branches."""
        lengths = branch_lengths(self.acceptance, budget, width)
        if not lengths:
            return 0.0
        if len(lengths) == 1:
            return budget * self.step(threads, 1)
        needs = [max(0, lengths[0] - 2)] + [L - 1 for L in lengths[1:]]
        t = 2 * self.step(threads, 1)  # the root (for its logits), then the first token (for the second)
        for k in range(1, max(needs) + 1):
            t += self.step(threads, sum(n >= k for n in needs))
        return t

    # -- schedules --------------------------------------------------------------------------------
    def splits(self, mode: str) -> list[tuple[int, int]]:
        """(draft threads, target threads) pairs the schedule can use with what was measured."""
        if mode == "target":
            return [(0, t) for t in sorted(self.verify_ms)] if not self.gpu else [(0, self.n_cores)]
        if mode == "sequential":
            full = self.n_cores if self.gpu else max(self.verify_ms)
            return [(d, full) for d in sorted(self.draft_ms)]
        if mode == "overlap":
            if self.gpu:
                return [(d, max(1, self.n_cores - d)) for d in sorted(self.draft_ms)
                        if d <= max(1, self.n_cores - self.host_cores)]
            return [(d, self.n_cores - d) for d in sorted(self.draft_ms)
                    if d < self.n_cores and (self.n_cores - d) in self.verify_ms]
        raise ValueError(f"unknown mode {mode!r}")

    def budgets(self) -> list[int]:
        return list(range(1, max(max(d) for d in self.verify_ms.values())))

    def widths(self) -> list[int]:
        return list(WIDTHS) if self.supports_tree else [1]


@dataclass
class Row:
    mode: str
    budget: int
    width: int
    draft_threads: int
    target_threads: int
    expected_tokens: float
    round_ms: float
    draft_ms: float
    verify_ms: float
    hit: float
    tps: float


def evaluate(m: Measurements, mode: str, budget: int, width: int, draft_threads: int, target_threads: int, *,
             expected: float | None = None, hit: float | None = None, verify_n: float | None = None) -> Row:
    """Predicted round of one configuration. expected / hit / verify_n replace the model's E, overlap hit
    probability and tokens per pass by observed ones (pipeline efficiency of a measured run)."""
    if mode == "target":
        v = m.verify(1, target_threads)
        t = v + m.overhead_ms
        return Row(mode, 0, 1, 0, target_threads, 1.0, t, 0.0, v, 0.0, 1000.0 / t)
    acc = m.acceptance
    width = width if m.supports_tree else 1
    e = expected_tokens(acc, budget, width) if expected is None else expected
    n = budget + 1 if verify_n is None else verify_n
    v = m.verify(n, target_threads) * (m.tree_factor if width > 1 and len(branch_lengths(acc, budget, width)) > 1
                                       else 1.0)
    d = m.draft(budget, width, draft_threads)
    if mode == "sequential":
        v *= m.loop_factor                   # the target starts cold after the draft had the cores
        t, hit = d + v, 0.0
    elif mode == "overlap":
        fd, ft = m.interference.get(draft_threads, (1.0, 1.0))
        hit = hit_probability(acc, budget, width) if hit is None else hit
        v2, d2, s2 = v * ft, d * fd, m.step(draft_threads, 1) * fd
        t = hit * max(v2, d2 + s2) + (1 - hit) * (v2 + d)
        v, d = v2, d2
    else:
        raise ValueError(f"unknown mode {mode!r}")
    t += m.channel_ms + m.overhead_ms + m.sources_ms
    return Row(mode, budget, width, draft_threads, target_threads, e, t, d, v, hit, 1000.0 * e / t)


def grid(m: Measurements, modes=MODES, budgets=None, widths=None) -> Iterable[tuple]:
    """Every (mode, budget, width, draft threads, target threads) the measurements cover."""
    for mode in modes:
        for dt, tt in m.splits(mode):
            if mode == "target":
                yield mode, 0, 1, dt, tt
                continue
            for b in (budgets or m.budgets()):
                if b < 1 or b + 1 > m.max_n(tt):
                    continue
                for w in (widths or m.widths()):
                    if w > 1 and (w > b or not m.supports_tree):
                        continue
                    yield mode, b, w, dt, tt


@dataclass
class Choice:
    mode: str
    budget: int
    width: int
    draft_threads: int
    target_threads: int
    predicted_tps: float
    predicted_speedup: float
    expected_tokens: float = 1.0
    target_tps: float = 0.0
    table: list = field(default_factory=list, repr=False)   # every Row evaluated

    def to_dict(self, table: bool = False) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "table"}
        if table:
            d["table"] = [asdict(r) for r in self.table]
        return d


def choose_budget(m: Measurements, modes=MODES, budgets=None, widths=None, margin: float = DEFAULT_MARGIN) -> Choice:
    """The fastest predicted configuration. Target-only unless a drafting schedule beats it by `margin`.

    modes / budgets / widths restrict the search (a user's --mode or --budget)."""
    rows = [evaluate(m, *cfg) for cfg in grid(m, modes, budgets, widths)]
    if not rows:
        raise ValueError(f"no configuration covered by the measurements for modes={modes} budgets={budgets}")
    base_rows = [r for r in rows if r.mode == "target"]
    base = max(base_rows, key=lambda r: r.tps) if base_rows else None
    target_tps = base.tps if base else max(evaluate(m, "target", 0, 1, 0, tt).tps for _, tt in m.splits("target"))
    spec = [r for r in rows if r.mode != "target"]
    # exact ties: the smaller tree, then the simpler schedule (sequential)
    best = max(spec, key=lambda r: (r.tps, -r.budget, -r.width, r.mode == "sequential")) if spec else None
    if best is None or (base is not None and best.tps <= base.tps * (1 + margin)):
        best = base
    return Choice(best.mode, best.budget, best.width, best.draft_threads, best.target_threads, best.tps,
                  best.tps / target_tps, best.expected_tokens, target_tps, rows)


def summary(choice: Choice) -> dict:
    """Best row per (mode, budget) over widths and thread splits, for tables and plots."""
    best: dict = {}
    for r in choice.table:
        k = (r.mode, r.budget)
        if k not in best or r.tps > best[k].tps:
            best[k] = r
    return best
