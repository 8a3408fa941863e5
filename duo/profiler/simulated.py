"""The profiler's view of a SIMULATED accelerator (duo.runtime.simulate).

The cost model (duo.profiler.cost) runs unchanged on measurements made of
  * the accelerator's pass times: verify(n) = forward_ms(n) from configs/accelerators.json, the same for
    any number of CPU threads (a GPU-like target: `gpu=True`, and `host_cores=0`: the simulated target
    uses no core, so the draft may have them all, in both schedules);
  * this machine's draft: ms per llama.cpp decode step by threads and batch width, the channel round
    trip, the loop overhead and the acceptance, taken from this machine's saved `duo profile` for the
    pair if there is one, else from a *calibration*: the same micro-benchmarks of the draft, and the
    acceptance measured by decoding the calibration prompts against the replayed target (the target's
    recordings of them: made once with the real target, cached). The calibration is saved under
    $DUO_CACHE/simulate/calibration-<profile fingerprint>.json.

`plan_for` gives the Engine its Plan (mode, budget, width, draft threads) for an accelerator, and
`efficiency` compares a measured run with the model: the model's time for the same rounds (its round
time with the run's own tokens per pass and overlap hit rate) divided by the measured time, in the
steady state (from the end of the first round on).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from ..draft_quant import prepare as prepare_draft
from . import cost, plans

log = logging.getLogger("duo")

CALIBRATION_FORMAT = "duo-simulation-calibration"
CALIBRATION_VERSION = 1
MAX_N = 64          # tokens per pass the cost model may plan for (budget <= 63), as in a CPU profile


# ------------------------------------------------------------------------------------------- measurements
def measurements(accelerator, meas: dict) -> cost.Measurements:
    """cost.Measurements for `accelerator` with this machine's draft measurements `meas` (a profile's
    `measurements` section or a calibration's)."""
    from ..runtime.simulate import get_accelerator

    acc_ = get_accelerator(accelerator)
    draft: dict = {}
    for r in meas["draft"]:
        draft.setdefault(int(r["threads"]), {})[int(r["width"])] = float(r["ms"])
    n = int(meas["n_cores"])
    a = meas["acceptance"]
    return cost.Measurements(
        n_cores=n, draft_ms=draft, verify_ms={n: acc_.curve(MAX_N)},
        acceptance=cost.Acceptance(a["hazard"], a.get("rank", []), a.get("tail")), gpu=True, host_cores=0,
        channel_ms=float(meas.get("channel", {}).get("ms", 0.0)), overhead_ms=float(meas.get("overhead_ms", 0.0)),
        tree_factor=1.0, interference={}, supports_tree=bool(meas.get("supports_tree", True)))


def calibration_path(fp: str, directory: str | Path | None = None) -> Path:
    from ..models import cache_dir
    return Path(directory or cache_dir() / "simulate") / f"calibration-{fp}.json"


def _fingerprint(tref, dref, device: str, dtype: str) -> str:
    from . import inventory
    from .profile import fingerprint, key_for
    return fingerprint(key_for(tref, dref, inventory.collect(device, dtype)))


def saved_measurements(tref, dref, device: str = "auto", dtype: str = "auto",
                       directory: str | Path | None = None) -> tuple[dict | None, str]:
    """(measurements, where from): the saved `duo profile` of this machine and pair, else a saved
    calibration, else (None, "")."""
    from .profile import load_profile

    fp = _fingerprint(tref, dref, device, dtype)
    prof = load_profile(fp)
    if prof is not None:
        return prof["measurements"], f"profile {fp}"
    path = calibration_path(fp, directory)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, ""
    if data.get("format") != CALIBRATION_FORMAT or data.get("version") != CALIBRATION_VERSION:
        return None, ""
    return data["measurements"], f"calibration {path}"


def calibrate(real_target, draft_gguf, prompts=None, settings=None, progress: bool = True) -> dict:
    """Measure this machine's draft (decode steps by threads and width, channel) and the acceptance
    against the replayed target (calibration prompts decoded sequentially, lookup off). `real_target`: the
    target itself (a SimulatedTarget's `.target`); it makes its recordings of the prompts first if missing,
    its only use."""
    from ..runtime.simulate import Accelerator, SimulatedTarget
    from .acceptance import decode_calibration
    from .bench import default_draft_threads
    from .benchers import draft_steps
    from .calibration_prompts import encode_prompts, filler, load_prompts
    from .timing import Settings, progress_bar

    s = settings or Settings.for_mode(True)
    cores = sorted(os.sched_getaffinity(0))
    n = len(cores)
    zero = SimulatedTarget(real_target, Accelerator("zero-time", 0.0))   # the draft's own time only
    prompt_ids = encode_prompts(real_target.tokenizer, load_prompts(prompts))
    threads = default_draft_threads(n)
    t0 = time.perf_counter()
    bar = progress_bar(len(prompt_ids) + len(threads) + 1 + s.decode_jobs(len(prompt_ids)), progress)
    try:
        bar.set_description("recording the target on the calibration prompts")
        for ids in prompt_ids:
            zero.prepare(ids, s.max_new_tokens)
            bar.update(1)
        rows = draft_steps(draft_gguf, threads, cores, filler(prompt_ids, s.draft_context + 70), s, bar)
        decoded = decode_calibration(zero, draft_gguf, prompt_ids, s, n, 1, bar,
                                     "acceptance (decoding the calibration prompts against the recordings)")
    finally:
        bar.close()
    return dict(n_cores=n, cores=cores, supports_tree=bool(real_target.supports_tree), draft=rows,
                channel=decoded["channel"], acceptance=decoded["acceptance"], overhead_ms=decoded["overhead_ms"],
                settings=asdict(s), wall_s=round(time.perf_counter() - t0, 2))


def ensure_measurements(tref, dref, sim_target=None, device: str = "auto", dtype: str = "auto",
                        measure_if_missing: bool = True, progress: bool = True,
                        directory: str | Path | None = None) -> tuple[dict | None, str]:
    """saved_measurements, or (measure_if_missing and a sim_target given) a new calibration, saved."""
    meas, source = saved_measurements(tref, dref, device, dtype, directory)
    if meas is not None or not measure_if_missing or sim_target is None:
        return meas, source
    log.warning("no profile of this machine and pair: calibrating the draft for the simulation "
                "(a few minutes; saved for next time)")
    meas = calibrate(sim_target.target, dref.gguf, progress=progress)
    path = calibration_path(_fingerprint(tref, dref, device, dtype), directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(dict(format=CALIBRATION_FORMAT, version=CALIBRATION_VERSION,
                                   created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                   target=tref.name, draft=dref.name, measurements=meas), indent=1) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)
    return meas, f"calibration {path}"


# ------------------------------------------------------------------------------------------- choice
def choose(accelerator, meas: dict, mode: str = "auto", budget: int | None = None) -> cost.Choice:
    """The cost model's best configuration for the accelerator (within a user's mode and budget)."""
    return plans.choose(measurements(accelerator, meas), mode, budget)


def plan_from(accelerator, meas: dict, mode: str = "auto", budget: int | None = None, source: str = ""):
    """duo.plan.Plan for the accelerator: the predicted-fastest schedule; the draft unpinned (the simulated
    target needs no core)."""
    from ..runtime.simulate import get_accelerator

    acc_ = get_accelerator(accelerator)
    m = measurements(acc_, meas)
    return plans.plan_from_choice(m, plans.choose(m, mode, budget), budget,
                                  f"simulated {acc_.name}, {source or 'measurements given'}", cores=None)


def plan_for(target_ref, draft_ref, device: str = "auto", dtype: str = "auto", mode: str = "auto",
             budget: int | None = None, quick_if_missing: bool = True, *, target_model=None,
             progress: bool = True):
    """The Plan for a simulated target (`target_model`, a SimulatedTarget) from this machine's saved
    draft measurements; with quick_if_missing, calibrate first when there are none. None (with a
    warning) when there is nothing to plan from. Same signature as duo.profiler.profile.plan_for."""
    from .. import models

    try:
        tref = target_ref if hasattr(target_ref, "hf_dir") else models.resolve_target(target_ref, progress=progress)
        dref = draft_ref if hasattr(draft_ref, "gguf") else models.resolve_draft(draft_ref, progress=progress)
        meas, source = ensure_measurements(tref, dref, target_model, device, dtype,
                                           measure_if_missing=quick_if_missing, progress=progress)
        if meas is None:
            return None
        return plan_from(target_model.accelerator, meas, mode, budget, source)
    except Exception as e:  # noqa: BLE001 - the engine falls back to its defaults
        log.warning("no plan for the simulated accelerator (%s: %s); using defaults", type(e).__name__, e)
        return None


# ------------------------------------------------------------------------------------------- efficiency
def efficiency(m: cost.Measurements, samples: list[dict], width: int = 1, draft_threads: int | None = None) -> dict:
    """Pipeline efficiency of measured generations, in the steady state.

    samples: their Stats.as_dict(), plus the draft worker's `overlap_hits` / `overlap_misses` (overlap
    schedule) and the simulated accelerator's `accelerator_idle_s` / `accelerator_gaps` when known.
    efficiency = the cost model's time for the same rounds / the measured time, both from the end of
    the first round on (the first round holds both prefills and the first tree; TTFT reports it), each
    round timed by the model with the run's own tokens per pass and overlap hit rate; tokens/s ratios
    for the same tokens are the same number. Idle ms per round: the target's (the accelerator's gaps
    between passes when simulated, else Stats.target_idle_s: its waiting for the draft) and the draft's.
    """
    dt = min(m.draft_ms, key=lambda t: abs(t - (draft_threads or max(m.draft_ms))))
    tt = max(m.verify_ms)
    predicted = measured = 0.0
    rounds = steady = hits = misses = gaps = 0
    target_idle = draft_idle = accel_idle = 0.0
    for st in samples:
        r = int(st.get("rounds", 0))
        if not r:
            continue
        mode = st.get("mode", "target")
        if mode == "target":
            row = cost.evaluate(m, "target", 0, 1, 0, tt)
        else:
            h, mi = int(st.get("overlap_hits", 0)), int(st.get("overlap_misses", 0))
            hit = h / (h + mi) if mode == "overlap" and h + mi else None
            hits, misses = hits + h, misses + mi
            row = cost.evaluate(m, mode, max(1, round(st["mean_budget"])), width, dt, tt, hit=hit,
                                verify_n=1 + st["drafted"] / r)
        if r > 1:
            predicted += (r - 1) * row.round_ms / 1000
            measured += max(1e-9, st["wall_s"] - st["ttft_s"])
            steady += r - 1
        rounds += r
        target_idle += st.get("target_idle_s", 0.0)
        draft_idle += st.get("draft_idle_s", 0.0)
        if "accelerator_gaps" in st:
            gaps += int(st["accelerator_gaps"])
            accel_idle += float(st["accelerator_idle_s"])
    if not steady:
        return {}
    return dict(efficiency=round(predicted / measured, 4), predicted_round_ms=round(1000 * predicted / steady, 2),
                measured_round_ms=round(1000 * measured / steady, 2), rounds=rounds,
                target_idle_ms_per_round=round(1000 * (accel_idle / gaps if gaps else target_idle / rounds), 3),
                draft_idle_ms_per_round=round(1000 * draft_idle / rounds, 3),
                overlap_hit_rate=round(hits / (hits + misses), 4) if hits + misses else None)


# ------------------------------------------------------------------------------------------- report
def report(accelerator, meas: dict, source: str) -> str:
    """`duo profile --simulate-accelerator NAME`: the accelerator, this machine's draft, predicted
    tokens/s by budget for each schedule, and the choice."""
    from ..runtime.simulate import get_accelerator

    acc_ = get_accelerator(accelerator)
    m = measurements(acc_, meas)
    c = choose(acc_, meas)
    best = cost.summary(c)
    lines = [f"SIMULATED accelerator {acc_.name}: {acc_.description}",
             f"  forward {acc_.base_ms:g} ms + {acc_.per_token_ms:g} ms per further token "
             f"(n=16: {acc_.forward_ms(16):.1f} ms, n=64: {acc_.forward_ms(64):.1f} ms)",
             f"  source: {acc_.source}"]
    if acc_.estimated:
        lines.append(f"  estimated: {acc_.estimated}")
    lines.append(f"draft on this machine ({source}): " + ", ".join(
        f"{t} thread{'s' * (t > 1)} {m.step(t, 1):.1f} ms/token" for t in sorted(m.draft_ms))
        + f"; channel {m.channel_ms:.2f} ms, loop overhead {m.overhead_ms:.2f} ms/round")
    lines.append("  P(accepted depth >= d): " + " ".join(f"{m.acceptance.survival(d):.2f}" for d in range(1, 9)))
    lines.append("predicted tokens/s by budget (best width and draft threads)")
    lines.append(f"  {'budget':>6} {'sequential':>22} {'overlap':>22}")
    for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 63):
        cells = []
        for md in ("sequential", "overlap"):
            r = best.get((md, b))
            mark = "*" if r is not None and (c.mode, c.budget) == (md, b) else " "
            cells.append("-" if r is None else f"{r.tps:.2f}{mark} w{r.width} {r.draft_threads}t E={r.expected_tokens:.2f}")
        lines.append(f"  {b:>6} {cells[0]:>22} {cells[1]:>22}")
    lines.append(f"  target-only: {c.target_tps:.2f} tokens/s")
    if c.mode == "target":
        lines.append(f"choice: target-only, {c.predicted_tps:.2f} tokens/s: no drafting schedule is predicted to beat it "
                     f"by {cost.DEFAULT_MARGIN:.0%}")
    else:
        lines.append(f"choice: {c.mode}, budget {c.budget}, width {c.width}, draft {c.draft_threads} threads: "
                     f"{c.predicted_tps:.2f} tokens/s predicted ({c.expected_tokens:.2f} tokens per round), "
                     f"{c.predicted_speedup:.2f}x target-only ({c.target_tps:.2f} tokens/s)")
    return "\n".join(lines)


def main(args) -> int:
    """`duo profile --simulate-accelerator NAME[,NAME...|all]`."""
    from .. import models
    from ..errors import UsageError
    from ..runtime.simulate import SimulationError, get_accelerator, load_accelerators

    names = list(load_accelerators()) if args.simulate_accelerator in ("all",) else \
        [s.strip() for s in args.simulate_accelerator.split(",") if s.strip()]
    try:   # an unknown profile is a usage error, before any loading
        names = [get_accelerator(n) for n in names]
    except SimulationError as e:
        raise UsageError(str(e)) from e
    progress = not getattr(args, "no_progress", False) and not getattr(args, "quiet", False)
    tref = models.resolve_target(args.model, progress=progress)
    dref = prepare_draft(models.resolve_draft(args.draft, progress=progress), getattr(args, "draft_quant", "auto"),
                         progress)
    meas, source = saved_measurements(tref, dref, args.device, args.dtype)
    if meas is None:   # calibrate: needs the real target once (for its recordings)
        from ..runtime.simulate import SimulatedTarget
        from ..runtime.target import load_target
        tm = load_target(tref.hf_dir, device=args.device, dtype=args.dtype, name=tref.name)
        models.check_vocab(dref.gguf, tm.tokenizer, dref.name, tref.name)
        meas, source = ensure_measurements(tref, dref, SimulatedTarget(tm, names[0]), args.device, args.dtype,
                                           progress=progress)
    out = []
    for name in names:
        if args.json:
            c = choose(name, meas)
            out.append(dict(accelerator=name.name, source=source, choice=c.to_dict()))
        else:
            out.append(report(name, meas, source))
    print(json.dumps(out, indent=1) if args.json else "\n\n".join(out))
    return 0
