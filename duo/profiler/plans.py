"""From the cost model to a Plan, for a profile (duo.profiler.profile) and a simulated accelerator
(duo.profiler.simulated) alike.

    choose            the best cost.Choice within a user's mode and budget
    plan_from_choice  the duo.plan.Plan of a choice: threads, cores, the draft's ms per token
"""
from __future__ import annotations

from ..plan import MODES
from . import cost


def choose(m: cost.Measurements, mode: str = "auto", budget: int | None = None) -> cost.Choice:
    """The best configuration allowed by a user's mode and budget. A budget asks for drafting (with mode
    auto: sequential or overlap) and is capped at the largest the measurements cover; a budget they cannot
    serve in these modes leaves the modes' best settings otherwise."""
    if mode not in ("auto",) + MODES:
        raise ValueError(f"unknown mode {mode!r}")
    modes = MODES if mode == "auto" else (mode,)
    if budget is not None and mode == "auto":
        modes = ("sequential", "overlap")  # a budget asks for drafting
    if budget is not None and mode != "target":
        top = max(max(v) for v in m.verify_ms.values()) - 1   # the largest budget a measured pass covers
        try:
            return cost.choose_budget(m, modes=modes, budgets=[min(budget, top)])
        except ValueError:  # beyond what was measured for these modes: their best settings otherwise
            pass
    return cost.choose_budget(m, modes=modes)


def plan_from_choice(m: cost.Measurements, c: cost.Choice, budget: int | None, source: str, *,
                     cores: list[int] | None, target_mode_budget: int | None = None):
    """The Plan running choice `c` (made on `m`); a user's `budget` is kept as given.

    cores: the CPUs that the overlap schedule splits between the draft (the last `draft_threads`) and the target;
    None when the target needs no core (a simulated accelerator): the draft unpinned, the target on 1 thread.
    A target-only choice keeps the best sequential draft settings for a later per-call override, and as its
    budget `target_mode_budget` (None: the best sequential one)."""
    from ..plan import Plan

    seq = c if c.mode != "target" else cost.choose_budget(m, modes=("sequential",))
    if c.mode != "target":
        plan_budget = c.budget
    else:
        plan_budget = seq.budget if target_mode_budget is None else target_mode_budget
    plan = Plan(mode=c.mode, budget=budget or plan_budget, width=c.width, shape="dynamic" if c.width > 1 else "chain",
                draft_threads=seq.draft_threads, target_threads=c.target_threads if cores is not None else 1,
                source=source)
    step = m.step(seq.draft_threads, 1)
    if cores is not None and c.mode == "overlap" and 0 < c.draft_threads < len(cores):
        plan.draft_cores, plan.target_cores = cores[-c.draft_threads:], cores[:-c.draft_threads]
        step *= m.interference.get(c.draft_threads, (1.0, 1.0))[0]
    plan.draft_ms_per_token = round(step, 3)
    return plan
