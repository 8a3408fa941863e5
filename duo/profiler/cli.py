"""`duo profile`: measure this machine with a model pair, print what was found and the plan chosen.

    duo profile [--model M] [--draft D] [--device auto] [--dtype auto] [--quick] [--no-precisions] [--json]
                [--prompts FILE] [--plot PATH]

Besides the plan in its own precision (--dtype), the report compares the target in each precision this device
runs (duo.profiler.precisions): target-only and duo's predicted tokens/s, and the one recommended.

Wire-up (duo/cli.py): `add_profile_parser(sub)` in build_parser, and `return profiler_cli.main(args)`
for args.command == "profile". Standalone: `python -m duo.profiler.cli ...`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..flags import add_draft_quant_flag
from . import cost, precisions

BUDGETS_SHOWN = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 63)


def add_profile_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile", help="measure this machine and pick the draft budget",
        description="Benchmark the draft and the target on this machine (latency by tokens, threads and "
                    "batch width; acceptance on calibration prompts), predict tokens/s for every schedule "
                    "and budget, and save the choice as the profile `duo run --budget auto` uses.")
    add_flags(p)
    return p


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--model", "-m", help="target: alias, GGUF file or Hugging Face directory (default qwen2.5-coder-1.5b)")
    g.add_argument("--draft", "-d", help="draft: alias or GGUF file (default qwen2.5-coder-0.5b)")
    g.add_argument("--device", default="auto", help="where the target runs: auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--dtype", default="auto", help="target precision: auto, float32, bfloat16, float16, int8, w8a8 "
                                                   "(default auto); the profile also reports the others")
    add_draft_quant_flag(g)
    p.add_argument("--quick", action="store_true", help="fewer repetitions and calibration tokens (about 2 minutes on 2 cores)")
    p.add_argument("--no-precisions", action="store_true",
                   help="measure the target in the --dtype precision only (not each precision of this device)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON instead of the table")
    p.add_argument("--prompts", metavar="FILE", help="calibration prompts, JSONL with \"prompt\" or \"messages\" "
                                                     "(default configs/calibration_prompts.jsonl)")
    p.add_argument("--plot", metavar="PATH", help="write the PNG plot here (default: next to the profile)")
    p.add_argument("--simulate-accelerator", metavar="NAME",
                   help="SIMULATION: the choice for an accelerator profile of configs/accelerators.json (or a "
                        "comma list, or 'all') with this machine's draft (from the saved profile, else calibrated)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--verbose", "-v", action="store_true", help="details on stderr (library logs included)")
    p.add_argument("--quiet", "-q", action="store_true", help="nothing on stderr but errors (no progress bar)")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")


# ------------------------------------------------------------------------------------------- report
def _ms(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.3f}"


def format_report(profile: dict, path: Path | None = None) -> str:
    inv, m, key = profile["inventory"], profile["measurements"], profile["key"]
    ch = profile["choice"]
    lines = []
    add = lines.append
    add(f"duo profile{' (quick)' if profile.get('quick') else ''}: {profile.get('wall_s', 0):.0f} s"
        + (f", saved to {path}" if path else ""))
    from .inventory import Inventory
    add(f"machine  {Inventory.from_dict(inv).describe()}")
    load = inv.get("load_avg_1m")
    if load is not None and load > 0.5 * len(inv["usable_cores"]):
        add(f"         load average {load:.1f} on {len(inv['usable_cores'])} cores when profiling: "
            f"other work competed, timings are noisy")
    add(f"models   target {key['target']['name']} ({inv['device']}, {inv['dtype']}), draft {key['draft']['name']}; "
        f"tree verification {'yes' if m.get('supports_tree') else 'no (chains only)'}")
    add("")
    widths = sorted({r["width"] for r in m["draft"]})
    add("draft: ms per llama.cpp decode step (median ±half-range) by threads and batch width")
    add("  threads " + "".join(f"{'width ' + str(w):>16}" for w in widths))
    for t in sorted({r["threads"] for r in m["draft"]}):
        cells = {r["width"]: r for r in m["draft"] if r["threads"] == t}
        add(f"  {t:>7} " + "".join(f"{_ms(cells[w]['ms']) + ' ±' + _ms((cells[w]['max_ms'] - cells[w]['min_ms']) / 2):>16}"
                                   if w in cells else f"{'-':>16}" for w in widths))
    ns = sorted({r["n"] for r in m["verify"]})
    add("")
    add("target: ms per verification pass (forward + accept) by tokens in the pass")
    add("  threads ctx " + "".join(f"{'n=' + str(k):>8}" for k in ns))
    for t in sorted({r["threads"] for r in m["verify"]}, reverse=True):
        for c in sorted({r["context"] for r in m["verify"] if r["threads"] == t}):
            cells = {r["n"]: r for r in m["verify"] if r["threads"] == t and r["context"] == c}
            add(f"  {t:>7} {c:>4}" + "".join(f"{_ms(cells[k]['ms']) if k in cells else '-':>8}" for k in ns))
    extra = [f"channel round trip {_ms(m['channel']['ms'])} ms", f"loop overhead {_ms(m.get('overhead_ms', 0))} ms/round"]
    if "sources" in m:
        extra.append(f"free sources {_ms(m['sources']['ms'])} ms/round (prompt lookup {_ms(m['sources']['lookup_ms'])}, "
                     f"output cache {_ms(m['sources']['cache_ms'])})")
    if m.get("tree_mask"):
        extra.append(f"tree mask x{m['tree_mask']['factor']:.2f} (n={m['tree_mask']['n']})")
    for r in m.get("interference", []):
        extra.append(f"both at once ({r['draft_threads']} draft / {r['target_threads']} target threads): "
                     f"draft x{r['draft_factor']:.2f}, target x{r['target_factor']:.2f}")
    add("  " + "; ".join(extra))
    a = m["acceptance"]
    acc = cost.Acceptance(a["hazard"], a.get("rank", []), a.get("tail"))
    add("")
    add(f"acceptance: {a['rounds']} rounds on {a['prompts']} prompts ({a['max_new_tokens']} new tokens each)")
    D = len(a["hazard"])
    add("  depth d        " + "".join(f"{d:>6}" for d in range(1, D + 1)))
    add("  P(depth >= d)  " + "".join(f"{acc.survival(d):>6.2f}" for d in range(1, D + 1)))
    add("  trials         " + "".join(f"{t:>6}" for t in a["tested"]))
    add("  root branch rank  " + "  ".join(f"r{r}: {q:.2f}" for r, q in enumerate([acc.first(0)] + a.get("rank", [])[1:])))
    for v in profile.get("validation", []):
        add(f"  check {v['shape']:5} budget {v['budget']:>2} width {v['width']}: {v['measured_tokens_per_round']:.2f} "
            f"tokens/round measured vs {v['predicted_tokens_per_round']:.2f} predicted; {v['measured_tps']:.2f} "
            f"tokens/s measured vs {v['predicted_tps']:.2f} predicted (sequential, no lookup)")
    add("")
    table = profile["table"]
    modes = [md for md in ("sequential", "overlap") if any(r["mode"] == md for r in table)]
    target = next((r for r in table if r["mode"] == "target"), None)
    add("predicted tokens/s by budget (best width / draft+target threads for each cell)")
    add("  budget" + "".join(f"{md:>28}" for md in modes))
    cells = {(r["mode"], r["budget"]): r for r in table}
    shown = [b for b in BUDGETS_SHOWN if any((md, b) in cells for md in modes)]
    if ch["mode"] != "target" and ch["budget"] not in shown:
        shown = sorted(shown + [ch["budget"]])
    for b in shown:
        row = f"  {b:>6}"
        for md in modes:
            r = cells.get((md, b))
            mark = "*" if r and md == ch["mode"] and b == ch["budget"] else " "
            cell = "-" if r is None else (f"{r['tps']:.2f}{mark} w{r['width']} {r['draft_threads']}+"
                                          f"{r['target_threads']}t E={r['expected_tokens']:.2f}")
            row += f"{cell:>28}"
        add(row)
    if target:
        add(f"  target-only: {target['tps']:.2f} tokens/s ({target['target_threads']} threads)")
    probe = profile.get("measurements", {}).get("llama_probe")
    if probe:
        add("  draft in llama.cpp, " + f"{probe['threads']} threads: " + "; ".join(
            f"{v['variant']} {v['ms_per_token']:.1f} ms/token" if v["ok"] else f"{v['variant']}: {v['error']}"
            for v in probe["variants"]) + f"; duo uses {probe['chosen']}")
    add("")
    if ch["mode"] == "target":
        add(f"choice: target-only ({ch['target_threads']} threads), {ch['predicted_tps']:.2f} tokens/s predicted: "
            f"no drafting schedule is predicted to beat it by {cost.DEFAULT_MARGIN:.0%}")
    else:
        add(f"choice: {ch['mode']}, budget {ch['budget']}, width {ch['width']}, draft {ch['draft_threads']} / target "
            f"{ch['target_threads']} threads: {ch['predicted_tps']:.2f} tokens/s predicted "
            f"({ch['expected_tokens']:.2f} tokens per round), {ch['predicted_speedup']:.2f}x target-only "
            f"({ch['target_tps']:.2f} tokens/s)")
    table = precisions.report_lines(profile)
    if table:
        lines += [""] + table
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- plot
def plot_profile(profile: dict, path: str | Path) -> Path | None:
    """PNG: latency curves and predicted tokens/s vs budget, the choice marked. None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .profile import measurements_from_profile

    m, ch = measurements_from_profile(profile), profile["choice"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for t, curve in sorted(m.verify_ms.items()):
        xs = sorted(curve)
        ax1.plot(xs, [curve[x] for x in xs], "o-", label=f"target verify ({profile['key'].get('dtype')}), {t} thr")
    for t in sorted(m.draft_ms):
        xs = list(range(1, 33))
        ax1.plot(xs, [m.draft(b, 1, t) for b in xs], "--", label=f"draft chain of n, {t} thr")
    for name, xs, ys in precisions.plot_curves(profile):
        ax1.plot(xs, ys, ".:", label=f"target verify in {name} (measured)")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("tokens n (verify pass size / chain length)")
    ax1.set_ylabel("ms")
    ax1.set_title("latency")
    ax1.legend(fontsize=7)
    table = profile["table"]
    for md in ("sequential", "overlap"):
        rows = sorted((r for r in table if r["mode"] == md), key=lambda r: r["budget"])
        if rows:
            ax2.plot([r["budget"] for r in rows], [r["tps"] for r in rows], "-", label=md)
    tgt = next((r for r in table if r["mode"] == "target"), None)
    if tgt:
        ax2.axhline(tgt["tps"], color="gray", ls=":", label="target-only")
    if ch["mode"] != "target":
        ax2.plot([ch["budget"]], [ch["predicted_tps"]], "r*", ms=14, label=f"choice: {ch['mode']} b={ch['budget']}")
    ax2.set_xlabel("draft budget (nodes per round)")
    ax2.set_ylabel("predicted tokens/s")
    ax2.set_title(f"predicted speed (choice {ch['predicted_speedup']:.2f}x)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------- main
def main(args) -> int:
    from .profile import create_profile

    if getattr(args, "simulate_accelerator", None):
        from . import simulated
        return simulated.main(args)
    progress = not getattr(args, "no_progress", False) and not getattr(args, "quiet", False)
    profile, path = create_profile(args.model, args.draft, device=args.device, dtype=args.dtype,
                                   quick=args.quick, prompts=args.prompts, progress=progress,
                                   precisions=not getattr(args, "no_precisions", False),
                                   draft_quant=getattr(args, "draft_quant", "auto"))
    plot_to = Path(args.plot) if args.plot else (path.with_suffix(".png") if path else None)
    note = None
    if plot_to is not None:
        try:
            written = plot_profile(profile, plot_to)
        except Exception as e:  # noqa: BLE001 - a plot is never worth failing the profile for
            written, note = None, f"plot failed: {e}"
        if written is None and note is None:
            note = "no plot: matplotlib is not installed (pip install matplotlib)"
        elif written is not None:
            note = f"plot: {written}"
    if args.json:
        print(json.dumps(profile, indent=1))
    else:
        print(format_report(profile, path))
    if note:
        print(f"duo: {note}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="duo profile", description=__doc__.splitlines()[0])
    add_flags(p)
    return p


if __name__ == "__main__":
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING, format="duo: %(message)s")
    try:
        from transformers.utils import logging as tlog
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    a = build_parser().parse_args()
    try:
        sys.exit(main(a))
    except KeyboardInterrupt:
        print("\nduo: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001
        if a.debug:
            raise
        print(f"duo: error: {e}", file=sys.stderr)
        sys.exit(1)
