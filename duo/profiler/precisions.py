"""The target in each precision this machine runs (duo.runtime.precision): its verification curve, and the
target-only and duo tokens/s the cost model predicts with it.

Precision changes the target's numerics, so duo never switches it by itself: `duo profile` measures the other
precisions too and reports them side by side; the user chooses (--dtype). The Engine's automatic quick profile
does not measure them (create_profile(precisions=False), the default).

    measure_precisions  measurements["precisions"]: {name: {verify, footprint_bytes, load_s}} for every precision
                        of available_precisions(device); the others loaded one at a time (cast or quantized from
                        the same weights), their passes timed like the main curve, then freed
    add_predictions     profile["precisions"]: per precision, target-only and duo's best predicted tokens/s
    report_lines        the table and the recommendation line of `duo profile`'s text report
    plot_curves         the measured verify curve of each precision, for the plot

The prediction of another precision keeps everything of the profile's own precision (draft steps, acceptance,
channel, overhead, interference, tree mask, in-loop factor) but the verify curve. Acceptance is assumed the same
across precisions: the draft proposes the same tokens and the target's greedy choices rarely move with its
rounding. Only the first context at all cores is measured in the other precisions; the own precision's rows at the
other contexts and thread counts are scaled by the other's ratio to the own curve at the same n, and the result
gets the main curve's corrections (context scaling, min over larger n: profile.measurements_from_profile).

Module level imports stay light (no torch).
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time

from . import cost

log = logging.getLogger("duo")

PRECISION_NS = (1, 2, 4, 8, 16, 32)   # tokens per verification pass measured in the other precisions
GIB = 1 << 30
NUMERICS = "precision changes the target's numerics: duo never switches it by itself"


# ------------------------------------------------------------------------------------------- measuring
class _Prefixed:
    """A progress bar whose descriptions say which precision is being measured."""

    def __init__(self, bar, prefix: str):
        self.bar, self.prefix = bar, prefix

    def set_description(self, text: str) -> None:
        self.bar.set_description(f"{self.prefix}: {text}")

    def update(self, k: int = 1) -> None:
        self.bar.update(k)


def own_entry(tm, verify_rows: list[dict], context: int, threads: int) -> dict:
    """The profile's own precision: its main verify rows at (context, threads) and the loaded target's footprint."""
    rows = [dict(r) for r in verify_rows if r["context"] == context and r["threads"] == threads]
    return {"verify": rows, "footprint_bytes": int(getattr(tm, "footprint", 0)), "load_s": None, "own": True}


def free_memory(device) -> None:
    gc.collect()
    if getattr(device, "type", str(device)).startswith("cuda"):
        import torch
        torch.cuda.empty_cache()


def cache_tokens(tokenizer, prompts: list[dict], s) -> list[int]:
    """The tokens of the passes: the same filler as the main benchmarks' (bench.run_benchmarks), long enough."""
    from .calibration_prompts import encode_prompts, filler

    ids = encode_prompts(tokenizer, prompts[:s.max_prompts] if s.max_prompts else prompts)
    return filler(ids, s.contexts[0] + max(PRECISION_NS) + 8)


def measure_one(hf_dir, name: str, precision: str, device, tokens: list[int], lay, s, bar) -> dict:
    """Load the target in `precision`, time its passes over lay.grid (bench.verify_passes), free it."""
    from ..runtime.target import load_target
    from .bench import verify_passes
    from .benchers import TargetBencher

    bar.set_description("loading the target")
    t0 = time.perf_counter()
    tm = load_target(hf_dir, device=str(device), dtype=precision, name=name, threads=lay.n, progress=False)
    load_s = time.perf_counter() - t0
    bar.update(1)
    try:
        rows: list[dict] = []
        verify_passes(TargetBencher(tm, tokens), lay, s, bar, rows)
        return {"verify": rows, "footprint_bytes": int(tm.footprint), "load_s": round(load_s, 2)}
    finally:
        del tm
        free_memory(device)


def measure_precisions(tref, tm, prompts: list[dict], s, verify_rows: list[dict], progress: bool = True,
                       cores: list[int] | None = None) -> dict:
    """{"precisions": {name: entry}}: `tm`'s own precision (from its main `verify_rows`) and every other one
    available on its device, loaded from tref.hf_dir (a duo.models.TargetRef) and measured at the first context
    of `s` with all cores (a failed one: {"error"})."""
    from ..runtime.precision import available_precisions
    from .bench import Layout
    from .timing import progress_bar

    lay = Layout.of(tm, cores or os.sched_getaffinity(0), s)
    c0 = s.contexts[0]
    lay = dataclasses.replace(lay, grid=[(c0, lay.main_threads, PRECISION_NS)])
    tokens = cache_tokens(tm.tokenizer, prompts, s)
    own = tm.precision
    out = {own: own_entry(tm, verify_rows, c0, lay.main_threads)}
    others = [p for p in available_precisions(tm.device) if p != own]
    bar = progress_bar(len(others) * (1 + len(PRECISION_NS)), progress)
    try:
        for p in others:
            done = bar.n
            try:
                sub = _Prefixed(bar, f"target in {p}")
                out[p] = measure_one(tref.hf_dir, tref.name, p, tm.device, tokens, lay, s, sub)
            except Exception as e:  # noqa: BLE001 - one precision failing never fails the profile
                log.warning("could not measure the target in %s: %s: %s", p, type(e).__name__, e)
                out[p] = {"error": f"{type(e).__name__}: {e}"}
            bar.update(done + 1 + len(PRECISION_NS) - bar.n)
    finally:
        bar.close()
    return {"precisions": out}


# ------------------------------------------------------------------------------------------- predicting
def ratio_at(ratio: dict, n: int) -> float:
    """The precision's time over the own one at n: interpolated, constant beyond the measured ends."""
    return cost.interp(ratio, n) if n <= max(ratio) else float(ratio[max(ratio)])


def scaled_rows(own_rows: list[dict], rows: list[dict]) -> list[dict]:
    """A full set of verify rows for another precision: its measured `rows` (one context, one thread count) and
    the own precision's rows at the other contexts and thread counts, scaled by the ratio at the same n."""
    c0, t0 = rows[0]["context"], rows[0]["threads"]
    mine = {r["n"]: r["ms"] for r in rows}
    ref = {r["n"]: r["ms"] for r in own_rows if r["context"] == c0 and r["threads"] == t0}
    ratio = {n: mine[n] / ref[n] for n in mine if ref.get(n, 0) > 0}
    out = [dict(r) for r in rows]
    if not ratio:
        return out
    for r in own_rows:
        if (r["context"], r["threads"]) != (c0, t0):
            out.append(dict(r, ms=r["ms"] * ratio_at(ratio, r["n"])))
    return out


def measurements_for(profile: dict, rows: list[dict], m_own: cost.Measurements) -> cost.Measurements:
    """The cost model's view of the profile with another precision's verify rows (the in-loop factor kept)."""
    from .measured import measurements_from_profile

    meas = profile["measurements"]
    m = measurements_from_profile(dict(meas, verify=scaled_rows(meas["verify"], rows)))
    m.loop_factor = m_own.loop_factor   # measured in the own precision's decodes; a ratio, assumed the same
    return m


def verify_ms(rows: list[dict], n: int) -> float | None:
    return next((float(r["ms"]) for r in rows if r["n"] == n), None)


def prediction(name: str, entry: dict, c: cost.Choice | None) -> dict:
    """One row of profile["precisions"]."""
    size = int(entry.get("footprint_bytes", 0))
    row = {"precision": name, "own": bool(entry.get("own")), "footprint_bytes": size,
           "footprint_gib": round(size / GIB, 3)}
    if c is None:
        return dict(row, error=entry.get("error", "no verify measurements"))
    rows = entry["verify"]
    return dict(row, target_tps=round(c.target_tps, 3), duo_tps=round(c.predicted_tps, 3), mode=c.mode,
                budget=c.budget, width=c.width, draft_threads=c.draft_threads, target_threads=c.target_threads,
                verify_n1_ms=verify_ms(rows, 1), verify_n16_ms=verify_ms(rows, 16))


def add_predictions(profile: dict, m_own: cost.Measurements, c_own: cost.Choice) -> None:
    """profile["precisions"] from measurements["precisions"] (nothing when they were not measured)."""
    from ..plan import PRECISIONS

    entries = profile["measurements"].get("precisions")
    if not entries:
        return
    out = []
    for name in sorted(entries, key=lambda p: PRECISIONS.index(p) if p in PRECISIONS else len(PRECISIONS)):
        e = entries[name]
        c = None
        if e.get("own"):
            c = c_own
        elif e.get("verify") and not e.get("error"):
            c = cost.choose_budget(measurements_for(profile, e["verify"], m_own))
        out.append(prediction(name, e, c))
    profile["precisions"] = out


def recommended(profile: dict) -> str | None:
    """The precision with the best predicted duo tokens/s."""
    rows = [r for r in profile.get("precisions", []) if "duo_tps" in r]
    return max(rows, key=lambda r: r["duo_tps"])["precision"] if rows else None


# ------------------------------------------------------------------------------------------- report, plot
def _plan(r: dict) -> str:
    return "target-only" if r["mode"] == "target" else f"{r['mode']} b{r['budget']} w{r['width']}"


def _ms(x) -> str:
    return "-" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.3f}"


def report_lines(profile: dict) -> list[str]:
    """The precision table and the recommendation line ([] for a profile without precisions)."""
    rows = profile.get("precisions")
    if not rows:
        return []
    entries = profile["measurements"].get("precisions", {})
    first = next((e["verify"][0] for e in entries.values() if e.get("verify")), None)
    where = f" at context {first['context']}, {first['threads']} threads" if first else ""
    lines = [f"target precision: verification measured in each{where}; same draft and acceptance assumed",
             f"  {'precision':<11}{'weights GiB':>12}{'verify n=1 / n=16 ms':>23}{'target alone tok/s':>20}"
             f"{'duo predicted tok/s (plan)':>34}"]
    for r in rows:
        name = r["precision"] + (" *" if r.get("own") else "")
        if "error" in r:
            lines.append(f"  {name:<11}{'-':>12}  not measured: {r['error']}")
            continue
        v = f"{_ms(r['verify_n1_ms'])} / {_ms(r['verify_n16_ms'])}"
        duo = f"{r['duo_tps']:.2f} ({_plan(r)})"
        lines.append(f"  {name:<11}{r['footprint_gib']:>12.2f}{v:>23}{r['target_tps']:>20.2f}{duo:>34}")
    lines.append("  * the profile's own precision (the plan above)")
    best = recommended(profile)
    if best:
        lines.append(f"recommended: {best} (run with --dtype {best}); {NUMERICS}")
    return lines


def plot_curves(profile: dict) -> list[tuple[str, list[int], list[float]]]:
    """(precision, ns, ms) of each other precision's measured verify curve (its first context, all cores)."""
    out = []
    for name, e in profile.get("measurements", {}).get("precisions", {}).items():
        if e.get("own"):
            continue   # plotted as the main curve
        rows = sorted(e.get("verify") or [], key=lambda r: r["n"])
        if rows:
            out.append((name, [r["n"] for r in rows], [r["ms"] for r in rows]))
    return out
