"""The cost model's view of a profile's raw measurements (cost.Measurements), with its corrections:

    min_over_larger   verify(n) = min over m >= n: a pass over fewer tokens is never slower (noise removed)
    in_loop_factors   how much slower a pass is inside the decode loop than back to back (calibration decodes)
    measurements_from_profile   draft steps, verify curves scaled to the measured contexts, acceptance, ...
"""
from __future__ import annotations

from . import cost


def min_over_larger(curve: dict[int, float]) -> dict[int, float]:
    """verify(n) = min over m >= n of the measured verify(m): a pass over fewer tokens is never slower,
    so a larger time at smaller n is noise (another process took a core) and must not steer the choice."""
    out, best = {}, float("inf")
    for n in sorted(curve, reverse=True):
        best = min(best, curve[n])
        out[n] = best
    return dict(sorted(out.items()))


def in_loop_factors(m: dict, verify: dict) -> tuple[float, float]:
    """How much slower a verification pass is inside sequential decoding than back to back in the micro-benchmark,
    from the calibration decodes (runs.chain.verify_ms_per_round at its budget), and the tree's cost over the
    chain's there. On a CPU the target's pass follows the draft's work on the same cores (cold caches, woken
    threads: +10-30% measured on a 2-core VM); on a GPU it is about 1. Both clamped to [1, 2]."""
    runs = m.get("acceptance", {}).get("runs", {})
    chain, tree = runs.get("chain"), runs.get("tree")
    threads = int(m.get("n_cores", 0)) if int(m.get("n_cores", 0)) in verify else max(verify, default=0)
    curve = verify.get(threads)
    if not chain or not curve or chain.get("rounds", 0) < 4 or m.get("gpu"):
        return 1.0, 1.0
    n = chain["budget"] + 1
    lo, hi = max([k for k in curve if k <= n], default=min(curve)), min([k for k in curve if k >= n], default=max(curve))
    model = curve[lo] if hi == lo else curve[lo] + (curve[hi] - curve[lo]) * (n - lo) / (hi - lo)
    factor = min(max(chain["verify_ms_per_round"] / model, 1.0), 2.0)
    tree_factor = 1.0
    if tree and tree.get("rounds", 0) >= 4 and tree.get("budget") == chain["budget"]:
        tree_factor = min(max(tree["verify_ms_per_round"] / chain["verify_ms_per_round"], 1.0), 2.0)
    return factor, tree_factor


def measurements_from_profile(profile: dict) -> cost.Measurements:
    """The cost model's view of a profile's raw measurements.

    verify(n) per thread count is the curve at the first context length, scaled by the mean ratio of all
    measured context lengths to it (so a prediction stands for the middle of the measured contexts)."""
    m = profile["measurements"] if "measurements" in profile else profile
    draft: dict = {}
    for r in m["draft"]:
        draft.setdefault(int(r["threads"]), {})[int(r["width"])] = float(r["ms"])
    by: dict = {}
    for r in m["verify"]:
        by.setdefault(int(r["threads"]), {}).setdefault(int(r["context"]), {})[int(r["n"])] = float(r["ms"])
    contexts = sorted({int(r["context"]) for r in m["verify"]})
    ref = contexts[0]
    factors: dict = {}
    for t, per_ctx in by.items():
        ratios = [sum(per_ctx[c][k] / per_ctx[ref][k] for k in per_ctx[c] if k in per_ctx.get(ref, {})) /
                  max(1, len([k for k in per_ctx[c] if k in per_ctx.get(ref, {})]))
                  for c in per_ctx if c != ref and ref in per_ctx]
        ratios = [x for x in ratios if x > 0]
        if ratios:
            factors[t] = (1 + sum(ratios)) / (1 + len(ratios))
    default_factor = factors[max(factors)] if factors else 1.0
    verify = {t: min_over_larger({k: v * factors.get(t, default_factor) for k, v in per_ctx[ref].items()})
              for t, per_ctx in by.items() if ref in per_ctx}
    in_loop, tree_in_loop = in_loop_factors(m, verify)
    a = m["acceptance"]
    acc = cost.Acceptance(a["hazard"], a.get("rank", []), a.get("tail"))
    inter = {int(r["draft_threads"]): (r["draft_factor"], r["target_factor"]) for r in m.get("interference", [])}
    return cost.Measurements(
        n_cores=int(m["n_cores"]), draft_ms=draft, verify_ms=verify, acceptance=acc, gpu=bool(m.get("gpu")),
        channel_ms=float(m.get("channel", {}).get("ms", 0.0)), overhead_ms=float(m.get("overhead_ms", 0.0)),
        tree_factor=max(float(m.get("tree_mask", {}).get("factor", 1.0)), tree_in_loop), interference=inter,
        loop_factor=in_loop, sources_ms=float(m.get("sources", {}).get("ms", 0.0)),
        supports_tree=bool(m.get("supports_tree", True)))
