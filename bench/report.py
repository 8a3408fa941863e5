"""The bench's results: a Row per (dataset, method) summarized from its Samples, the extras a duo row
carries (its plan; under a simulated accelerator the pipeline efficiency and idle times), the llama-cpp
peer's note (what ran; why its exactness is not checked), and the outputs: the markdown table, the JSON rows
and the PNG plot of speedups.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from .sample import Sample


@dataclass
class Row:
    dataset: str
    method: str
    prompts: int = 0
    new_tokens: int = 0
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    speedup: float = 0.0
    ttft_s: float = 0.0
    mean_accepted_len: float = 0.0
    acceptance_rate: float = 0.0
    accepted_per_position: list = field(default_factory=list)
    exact: bool | None = None
    mismatches: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def summarize(dataset: str, method: str, samples: list[Sample], ref: list[Sample] | None) -> Row:
    n_tok = sum(len(s.tokens) for s in samples)
    wall = sum(s.wall_s for s in samples)
    row = Row(dataset, method, prompts=len(samples), new_tokens=n_tok, wall_s=wall,
              tokens_per_s=n_tok / wall if wall else 0.0,
              ttft_s=sum(s.ttft_s for s in samples) / max(1, len(samples)))
    st = [s.stats for s in samples if s.stats]
    if st:
        rounds = sum(x["rounds"] for x in st)
        row.mean_accepted_len = sum(x["new_tokens"] - 1 for x in st if x["new_tokens"]) / rounds if rounds else 0.0
        drafted = sum(x["drafted"] for x in st)
        row.acceptance_rate = sum(x["accepted"] for x in st) / drafted if drafted else 0.0
        depth = max((len(x["accepted_per_position"]) for x in st), default=0)
        row.accepted_per_position = [
            round(sum(x["accepted_per_position"][d] * x["rounds"] for x in st if d < len(x["accepted_per_position"]))
                  / rounds, 3) for d in range(depth)] if rounds else []
        row.extra = {"fallbacks": sum(1 for x in st if x.get("fallback")),
                     "plain_steps": sum(x.get("plain_steps", 0) for x in st),   # governor: target-alone rounds
                     "pauses": sum(x.get("pauses", 0) for x in st),
                     "target_idle_s": sum(x.get("target_idle_s", 0) for x in st),
                     "draft_idle_s": sum(x.get("draft_idle_s", 0) for x in st),
                     "verify_s": sum(x.get("verify_s", 0) for x in st),
                     "free_rounds": sum(x.get("free_rounds", 0) for x in st),   # rounds without the model's tree
                     "sources": sum_sources(st)}
        if rounds and any(x.get("drafted") for x in st):   # where the time of one round goes, ms
            prefill = sum(x.get("prefill_s", 0) for x in st)
            x = row.extra
            rest = wall - prefill - x["verify_s"] - x["target_idle_s"]
            x["round_ms"] = {"round": 1000 * (wall - prefill) / rounds,
                             "verify": 1000 * x["verify_s"] / rounds,             # target forward + accept + compact
                             "wait_for_draft": 1000 * x["target_idle_s"] / rounds,  # drafting the target waited for
                             "other": 1000 * rest / rounds,                      # exchange, lookup, Python, streaming
                             "draft_idle": 1000 * x["draft_idle_s"] / rounds}     # the worker waiting for the target
    if ref is not None:
        row.mismatches = [i for i, (a, b) in enumerate(zip(samples, ref)) if a.tokens != b.tokens]
        row.exact = not row.mismatches
    return row


def exact_cell(r: Row) -> str:
    """yes (token for token) / near-ties (n): every divergence a proven near-tie / NO (n); with the largest
    near-tie gap, or the smallest gap of the divergences that are not near-ties, where they were checked."""
    if r.exact is None:
        return "-"
    if r.exact:
        return "yes"
    checked = r.extra.get("divergences", [])
    if len(checked) == len(r.mismatches) and all(x["near_tie"] for x in checked):
        gaps = [x["gap"] for x in checked if "gap" in x]
        return f"near-ties ({len(checked)}" + (f", gap <= {max(gaps):.2g})" if gaps else ")")
    gaps = [x["gap"] for x in checked if not x["near_tie"] and "gap" in x]
    return f"NO ({len(r.mismatches)}" + (f", gap {min(gaps):.2g})" if gaps else ")")


def sum_sources(stats: list[dict]) -> dict:
    """{source: {asked, skipped, proposed, gained, accepted, seconds}} summed over a method's answers."""
    out: dict = {}
    for x in stats:
        for name, r in x.get("sources", {}).items():
            acc = out.setdefault(name, dict.fromkeys(("asked", "skipped", "proposed", "gained", "accepted", "seconds"), 0))
            for k in acc:
                acc[k] += r.get(k, 0)
    return out


def sources_table(rows: list[Row]) -> list[str]:
    """Where the accepted tokens came from: each candidate source of each duo row."""
    rows = [r for r in rows if r.extra.get("sources") and not r.extra.get("measured_as")]
    if not rows:
        return []
    lines = ["", "Candidate sources (asked: rounds it proposed in; accepted: its nodes on accepted paths; own depth: "
             "what its own tree would have been accepted to, per round asked; ms: its proposal's time per round "
             "asked, the model's being the target's wait):", "",
             "| dataset | method | source | asked | skipped | nodes/round | accepted | own depth/round | ms/round |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, x in r.extra["sources"].items():
            n = max(1, x["asked"])
            lines.append(f"| {r.dataset} | {r.method} | {name} | {x['asked']} | {x['skipped']} | {x['proposed'] / n:.1f} | "
                         f"{x['accepted']} | {x['gained'] / n:.2f} | {1000 * x['seconds'] / n:.2f} |")
        if r.extra.get("free_rounds"):
            lines.append(f"| {r.dataset} | {r.method} | (rounds without the model's tree) | {r.extra['free_rounds']} "
                         f"| | | | | |")
    return lines


def markdown(rows: list[Row]) -> str:
    sim = next((r.extra["simulated"] for r in rows if r.extra.get("simulated")), None)
    head = "| dataset | method | prompts | tokens | tok/s | speedup | TTFT s | accepted/pass | acceptance | exact |"
    if sim:  # pipeline efficiency: measured / the cost model's tokens/s for the same rounds; idle ms per round
        head += " plan | efficiency | target idle ms/round | draft idle ms/round | overlap hits |"
    lines = ([f"SIMULATED accelerator: {sim} (the target replayed from its recorded output, timed as "
              f"configs/accelerators.json says; the draft runs for real on this machine). efficiency: the cost "
              f"model's time for the same rounds / the measured time, after the first round; b=N~: adaptive "
              f"budget starting at N", ""] if sim else [])
    precision = next((r.extra["precision"] for r in rows if r.extra.get("precision")), None)
    if precision:
        lines += [f"Target precision: {precision} (the target row and every duo row; exact: yes = token for token that "
                  f"target's greedy output, near-ties (n) = parting from it only at proven near-ties)", ""]
    lines += [head, "|" + "---|" * head.count(" |")]
    for r in rows:
        line = (f"| {r.dataset} | {r.method} | {r.prompts} | {r.new_tokens} | {r.tokens_per_s:.2f} | "
                f"{r.speedup:.2f}x | {r.ttft_s:.2f} | {r.mean_accepted_len:.2f} | {r.acceptance_rate:.2f} | "
                f"{exact_cell(r)} |")
        if sim:
            x, hit = r.extra, r.extra.get("overlap_hit_rate")
            line += (f" {x.get('plan', '-')} | {x.get('efficiency', 0):.0%} | {x.get('target_idle_ms_per_round', 0):.1f} | "
                     f"{x.get('draft_idle_ms_per_round', 0):.1f} | {'-' if hit is None else f'{hit:.0%}'} |")
        lines.append(line)
    lines += llama_cpp_note(rows)
    shared = [r for r in rows if r.extra.get("measured_as")]
    if shared:
        lines += ["", "; ".join(f"{r.dataset} {r.method} = {r.extra['measured_as']}" for r in shared)
                  + ": the plan `duo run` picks here is the sequential schedule, the same engine and plan: measured once, "
                  "reported under both names."]
    wrong = [r for r in rows if r.mismatches]
    if wrong:
        lines += ["", "Greedy outputs different from the target's (prompt index in the dataset order used); each "
                  "checked: the target's top-2 logit gap where they part against the precision's near-tie bound "
                  "(1e-4 in float32, else twice the measured logit noise between pass shapes, over the answer and at the "
                  "divergence in duo's own verify pass):"]
        for r in wrong:
            checked = {x["prompt"]: x for x in r.extra.get("divergences", [])}
            lines.append(f"- {r.dataset} {r.method}: " + "; ".join(
                f"{i}" + (f" at token {x['position']}: gap {x['gap']:.3g} vs bound {x['bound']:.3g} -> "
                          f"{'near-tie' if x['near_tie'] else 'NOT a near-tie'}" if (x := checked.get(i)) else "")
                for i in r.mismatches))
    drafted = [r for r in rows if r.accepted_per_position and not r.extra.get("measured_as")]
    if drafted:
        lines += ["", "Per-position acceptance, P(accepted depth >= d) per round, d = 1, 2, ...:", "",
                  "| dataset | method | plan | P(depth >= d) |", "|---|---|---|---|"]
        lines += [f"| {r.dataset} | {r.method} | {r.extra.get('plan', '-')} | "
                  f"{' '.join(f'{p:.2f}' for p in r.accepted_per_position[:12])} |" for r in drafted]
    timed = [r for r in rows if r.extra.get("round_ms") and not r.extra.get("measured_as")]
    if timed:
        lines += ["", "Where one round's time goes (ms per round; the draft's idle time overlaps the others):", "",
                  "| dataset | method | round | verify | wait for draft | other (exchange, Python) | draft idle |",
                  "|---|---|---|---|---|---|---|"]
        for r in timed:
            t = r.extra["round_ms"]
            lines.append(f"| {r.dataset} | {r.method} | {t['round']:.1f} | {t['verify']:.1f} | {t['wait_for_draft']:.1f} "
                         f"| {t['other']:.1f} | {t['draft_idle']:.1f} |")
    lines += sources_table(rows)
    return "\n".join(lines)


def llama_cpp_note(rows: list[Row]) -> list[str]:
    """One line under the table where llama-cpp ran: what ran, and why its exactness is not checked."""
    ran = list(dict.fromkeys(r.extra["llama_cpp"] for r in rows if r.extra.get("llama_cpp")))
    if not ran:
        return []
    return ["", f"llama-cpp: {'; '.join(ran)}; greedy, absolute tok/s (speedup against target). exact `-`: "
                "llama.cpp's (quantized) target is another model than the torch target, so exactness does not apply."]


def rows_json(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


def write_json(rows: list[Row], path: str | None) -> None:
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(rows_json(rows), f, indent=1)
        os.replace(path + ".tmp", path)


def plan_extra(row: Row, engine, opts: dict) -> None:
    """A duo row's plan: mode, budget (b=N~: adaptive, starting at N), width and tree shape."""
    p = engine.plan
    row.extra["plan"] = (f"{p.mode} b={opts.get('budget', p.budget)}"
                         f"{'~' if p.adaptive and 'budget' not in opts else ''} "
                         f"w={opts.get('width', p.width)} {opts.get('shape', p.shape)}")


def simulation_extra(row: Row, engine, opts: dict, samples: list[Sample], model, accel) -> None:
    """Under a simulated accelerator: the plan used, the pipeline efficiency (measured tokens/s over the
    cost model's for the same rounds, duo.profiler.simulated.efficiency) and each side's idle ms per round."""
    from duo.profiler import simulated

    p = engine.plan
    mode = samples[0].stats.get("mode", p.mode) if samples and samples[0].stats else p.mode
    shape, width = opts.get("shape", p.shape), opts.get("width", p.width)
    width = 1 if shape == "chain" else width
    budget = opts.get("budget", f"{p.budget}{'~' if p.adaptive and 'budget' not in opts else ''}")
    row.extra["simulated"] = accel.name
    row.extra["plan"] = "target-only" if mode == "target" else f"{mode} b={budget} w={width} {p.draft_threads}t"
    row.extra.update(simulated.efficiency(model, [s.stats for s in samples], width, p.draft_threads))


def plot_speedups(rows: list[Row], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    datasets = list(dict.fromkeys(r.dataset for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(datasets), 3.6))
    w = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ys = [next((r.speedup for r in rows if r.dataset == d and r.method == m), 0) for d in datasets]
        ax.bar([j + i * w for j in range(len(datasets))], ys, w, label=m)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(datasets))], datasets)
    ax.set_ylabel("speedup over target alone")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
