"""Predicted (the saved profile's cost model) next to measured (`duo bench --json`) tokens/s, and the
budget the profiler chose next to the best budget of a measured sweep.

    duo bench --dataset configs/calibration_prompts.jsonl -n 64 --json sweep.json \
        --methods target,duo,duo-sequential@chain,nolookup,b=4,duo-sequential@chain,nolookup,b=8,...
    python -m bench.check_profile sweep.json            # the profile of this machine + default pair
    python -m bench.check_profile sweep.json --profile ~/.cache/duo/profiles/<fingerprint>.json

Sweep rows are `duo-sequential@chain,nolookup,b=N` (what the cost model predicts: a chain, no prompt
lookup, fixed budget); the `duo` row is the profiled plan as `duo run` uses it; `target` is target-only.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def predictions(profile: dict) -> tuple[dict, dict, float]:
    """(sequential chain tokens/s by budget, the choice, target-only tokens/s) from a profile."""
    from duo.profiler import cost
    from duo.profiler.profile import measurements_from_profile

    m = measurements_from_profile(profile)
    c = profile["choice"]
    by_budget = {}
    for b in range(1, 33):
        row = cost.evaluate(m, "sequential", b, 1, c.get("draft_threads", m.n_cores), c.get("target_threads", m.n_cores))
        by_budget[b] = row.tps
    return by_budget, c, c["target_tps"]


def compare(rows: list[dict], profile: dict) -> str:
    by_budget, choice, target_tps = predictions(profile)
    out = ["| dataset | method | measured tok/s (end to end) | measured tok/s (decoding) | predicted tok/s | "
           "error (end to end) | error (decoding) |", "|---|---|---|---|---|---|---|"]
    sweep: dict[str, dict[int, float]] = {}
    for r in rows:
        got = re.fullmatch(r"duo-sequential@chain,nolookup,b=(\d+)", r["method"])
        if got:
            b = int(got.group(1))
            pred = by_budget[b]
            sweep.setdefault(r["dataset"], {})[b] = r["tokens_per_s"]
        elif r["method"] == "duo":
            pred = choice["predicted_tps"]
        elif r["method"] == "target":
            pred = target_tps
        else:
            continue
        # the model predicts steady decoding; bench's tokens/s also pays each prompt's prefill (TTFT)
        rm = (r.get("extra") or {}).get("round_ms")
        dec = 1000 * r["mean_accepted_len"] / rm["round"] if rm and rm.get("round") else None
        err = r["tokens_per_s"] / pred - 1 if pred else float("nan")
        out.append(f"| {r['dataset']} | {r['method']} | {r['tokens_per_s']:.2f} | "
                   f"{'-' if dec is None else f'{dec:.2f}'} | {pred:.2f} | {err:+.0%} | "
                   f"{'-' if dec is None else f'{dec / pred - 1:+.0%}'} |")
    for d, s in sweep.items():
        best = max(s, key=s.get)
        chosen = choice["budget"]
        at_chosen = s.get(chosen)
        line = (f"\n{d}: best measured budget {best} ({s[best]:.2f} tok/s); profiler chose {choice['mode']} "
                f"budget {chosen} width {choice['width']}")
        if at_chosen is not None:
            line += f", measured {at_chosen:.2f} tok/s there = {at_chosen / s[best]:.1%} of the best"
        out.append(line)
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.check_profile", description=__doc__.splitlines()[0])
    ap.add_argument("bench_json", help="rows written by duo bench --json")
    ap.add_argument("--profile", help="profile JSON (default: this machine's profile of the default pair)")
    args = ap.parse_args(argv)
    rows = json.loads(Path(args.bench_json).read_text())
    if args.profile:
        profile = json.loads(Path(args.profile).expanduser().read_text())
    else:
        from duo import models
        from duo.profiler import inventory
        from duo.profiler.profile import fingerprint, key_for, load_profile
        key = key_for(models.resolve_target(None), models.resolve_draft(None), inventory.collect())
        profile = load_profile(fingerprint(key))
        if profile is None:
            raise SystemExit("no saved profile for this machine and the default pair: run `duo profile` first")
    print(compare(rows, profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
