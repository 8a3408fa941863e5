"""`duo bench`: every method on the same prompts, same models, same machine, in one run.

Methods share one interface: `run(ids, max_new) -> Sample`. The `target` method (transformers
generate, target alone) is the baseline of every ratio and the reference of every exactness check.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from duo.engine import Engine
from duo.runtime.decode import Stats


@dataclass
class Sample:
    tokens: list[int]
    wall_s: float
    ttft_s: float
    stats: dict = field(default_factory=dict)


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


def hf_generate(model, ids, max_new, eos, **kw) -> Sample:
    """transformers generate (greedy unless kw samples); TTFT measured with a one-token call beforehand is not fair, so
    TTFT here is the prefill+first step timed by a streamer."""
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.t, self.n = None, 0

        def put(self, value):
            self.n += 1
            if self.n == 2 and self.t is None:   # first put is the prompt
                self.t = time.perf_counter()

        def end(self):
            pass

    s = FirstToken()
    x = torch.tensor([ids], device=model.device)
    t0 = time.perf_counter()
    kw.setdefault("do_sample", False)     # greedy unless the caller samples (do_sample=True, temperature=...)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                         eos_token_id=list(eos), pad_token_id=list(eos)[0], streamer=s, **kw)
    wall = time.perf_counter() - t0
    toks = out[0, len(ids):].tolist()
    return Sample(toks, wall, (s.t or time.perf_counter()) - t0)


def duo_sample(engine: Engine, ids, max_new, **kw) -> Sample:
    stats = Stats()
    toks: list[int] = []
    d0 = engine._draft.stats if engine._draft is not None else None
    sim = engine.target.counters if getattr(engine.target, "simulated", False) else None
    s0 = (sim.idle_s, sim.gaps) if sim else None
    t0 = time.perf_counter()
    for new, _ in engine.stream_tokens(ids, max_new_tokens=max_new, stats=stats, **kw):
        toks += new
    wall = time.perf_counter() - t0
    out = stats.as_dict()
    if d0 is not None and engine._draft is not None:   # the worker's overlap hits (trees drafted ahead and used)
        d1 = engine._draft.stats
        out["overlap_hits"] = max(0, d1.overlap_hits - d0.overlap_hits)
        out["overlap_misses"] = max(0, d1.overlap_misses - d0.overlap_misses)
    if sim:   # SIMULATED accelerator: its idle time between passes, steady state (duo.runtime.simulate)
        out["accelerator_idle_s"], out["accelerator_gaps"] = sim.idle_s - s0[0], sim.gaps - s0[1]
    return Sample(toks, wall, stats.ttft_s, out)


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
                     "verify_s": sum(x.get("verify_s", 0) for x in st)}
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


def markdown(rows: list[Row]) -> str:
    sim = next((r.extra["simulated"] for r in rows if r.extra.get("simulated")), None)
    head = "| dataset | method | prompts | tokens | tok/s | speedup | TTFT s | accepted/pass | acceptance | exact |"
    if sim:  # pipeline efficiency: measured / the cost model's tokens/s for the same rounds; idle ms per round
        head += " plan | efficiency | target idle ms/round | draft idle ms/round | overlap hits |"
    lines = ([f"SIMULATED accelerator: {sim} (the target replayed from its recorded output, timed as "
              f"configs/accelerators.json says; the draft runs for real on this machine). efficiency: the cost "
              f"model's time for the same rounds / the measured time, after the first round; b=N~: adaptive "
              f"budget starting at N", ""] if sim else [])
    lines += [head, "|" + "---|" * head.count(" |")]
    for r in rows:
        line = (f"| {r.dataset} | {r.method} | {r.prompts} | {r.new_tokens} | {r.tokens_per_s:.2f} | "
                f"{r.speedup:.2f}x | {r.ttft_s:.2f} | {r.mean_accepted_len:.2f} | {r.acceptance_rate:.2f} | "
                f"{'-' if r.exact is None else 'yes' if r.exact else f'NO ({len(r.mismatches)})'} |")
        if sim:
            x, hit = r.extra, r.extra.get("overlap_hit_rate")
            line += (f" {x.get('plan', '-')} | {x.get('efficiency', 0):.0%} | {x.get('target_idle_ms_per_round', 0):.1f} | "
                     f"{x.get('draft_idle_ms_per_round', 0):.1f} | {'-' if hit is None else f'{hit:.0%}'} |")
        lines.append(line)
    shared = [r for r in rows if r.extra.get("measured_as")]
    if shared:
        lines += ["", "; ".join(f"{r.dataset} {r.method} = {r.extra['measured_as']}" for r in shared)
                  + ": the plan `duo run` picks here is the sequential schedule, the same engine and plan: measured once, "
                  "reported under both names."]
    wrong = [r for r in rows if r.mismatches]
    if wrong:
        lines += ["", "Greedy outputs different from the target's (prompt index in the dataset order used):"]
        lines += [f"- {r.dataset} {r.method}: {', '.join(map(str, r.mismatches))}" for r in wrong]
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
    return "\n".join(lines)


def rows_json(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


def write_json(rows: list[Row], path: str | None) -> None:
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(rows_json(rows), f, indent=1)
        os.replace(path + ".tmp", path)


def progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


METHODS = ("target", "hf-assisted", "hf-prompt-lookup", "duo-sequential", "duo-overlap", "duo")
DUO_MODES = {"duo-sequential": "sequential", "duo-overlap": "overlap", "duo": "auto"}
SIMULATED_METHODS = ("target", "duo-sequential", "duo-overlap", "duo")


def _simulation_extra(row: Row, engine: Engine, opts: dict, samples: list[Sample], model, accel) -> None:
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


def parse_method(m: str) -> tuple[str, dict]:
    """'duo-sequential@chain,nolookup,b=8,w=2' -> ('duo-sequential', {shape, lookup, budget, width})."""
    name, _, spec = m.partition("@")
    opts: dict = {}
    for o in filter(None, spec.split(",")):
        if o in ("chain", "dynamic", "eagle"):
            opts["shape"] = o
        elif o == "nolookup":
            opts["lookup"] = False
        elif o.startswith("b="):
            opts["budget"] = int(o[2:])
        elif o.startswith("w="):
            opts["width"] = int(o[2:])
        else:
            raise ValueError(f"unknown method option {o!r} in {m!r}: use chain|dynamic|eagle|nolookup|b=N|w=N")
    return name, opts


def run_bench(datasets: list[str], methods: list[str], *, limit: int | None, max_new: int, model=None, draft=None,
              device="auto", dtype="auto", budget="auto", temperature: float = 0.0, seed: int | None = None,
              warmup: int = 1, log=print, engine_kw: dict | None = None, simulate=None,
              on_dataset: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """Run every method on every dataset's prompts; returns one Row per (dataset, method).

    seed: shuffles each dataset before `limit` is applied (None: the dataset's own order) and seeds
    sampling (0 when None). on_dataset(rows so far) is called after each dataset (partial results).

    simulate: SIMULATION: an accelerator profile (configs/accelerators.json): every method runs against
    the target replayed from its recorded output, timed like that accelerator (duo.runtime.simulate);
    rows get the pipeline efficiency and idle times in `extra`."""
    from bench import datasets as ds
    from duo import models

    shuffle, seed = seed, seed or 0

    bad = [m for m in methods if m.split("@")[0] not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)}: choose from {', '.join(METHODS)}")
    accel = None
    if simulate is not None:
        from duo.engine import UsageError, _accelerator
        from duo.profiler import simulated
        accel = _accelerator(simulate)   # an unknown profile is a UsageError
        unsupported = [m for m in methods if m.split("@")[0] not in SIMULATED_METHODS]
        if unsupported or temperature > 0:
            raise UsageError(f"a simulated accelerator replays greedy decoding by duo itself: use temperature 0 and "
                             f"the methods {', '.join(SIMULATED_METHODS)}" + (f", not {', '.join(unsupported)}"
                                                                              if unsupported else ""))
    prompts = {d: ds.load(d, limit, seed=shuffle) for d in datasets}
    methods = sorted(methods, key=lambda m: m != "target")   # the reference runs first
    rows: list[Row] = []
    engine_kw = engine_kw or {}
    # one target in memory, shared by every method; each duo method has its own draft worker/thread split
    engines: dict[str, Engine] = {}
    try:
        base = Engine(model, draft, device=device, dtype=dtype, mode="target", progress=False, simulate=accel)
        engines["target"] = base
        tm = base.target.target if accel else base.target   # the real target, loaded once
        if accel:
            log(f"SIMULATED accelerator {accel.name}: {accel.forward_ms(1):g} ms per pass + {accel.per_token_ms:g} "
                f"ms per further token ({accel.description}); source: {accel.source}")
            n_rec = sum(len(p) for p in prompts.values())
            bar = progress(n_rec, "recording the target (once per prompt, cached)")
            for plist in prompts.values():
                for p in plist:
                    base.target.prepare(base.encode(p.messages), max_new)
                    bar.update(1)
            bar.close()
            sim_meas, sim_source = simulated.ensure_measurements(
                models.resolve_target(model), models.resolve_draft(draft), base.target, device, dtype)
            log(f"simulation: draft measurements from {sim_source}")
            sim_model = simulated.measurements(accel, sim_meas)
        for m in methods:
            base_name = m.split("@")[0]
            if base_name.startswith("duo") and base_name not in engines:
                engines[base_name] = Engine(model, draft, device=device, dtype=dtype, budget=budget,
                                            mode=DUO_MODES[base_name], progress=False, target_model=tm,
                                            simulate=accel, **engine_kw)
        # `duo` runs as `duo run` would; where its plan is exactly duo-sequential's (the profile chose the
        # sequential schedule) it is the same engine: measured once, reported under both names
        same_as: dict[str, str] = {}
        if "duo" in engines and "duo-sequential" in engines and "duo" in methods and "duo-sequential" in methods:
            a, b = engines["duo"], engines["duo-sequential"]
            if (a.plan, a.lookup, a.plan.mode) == (b.plan, b.lookup, "sequential"):
                a.close()
                engines["duo"], same_as["duo"] = b, "duo-sequential"
                methods = sorted(methods, key=lambda m: (m != "target", m in same_as))
                log("duo: the profiled plan is the sequential schedule, the same engine as duo-sequential: "
                    "measured once, reported under both names")
        assistant = None
        if "hf-assisted" in methods:
            dref = models.resolve_draft(draft)
            aref = models.resolve_target(str(dref.gguf))
            from transformers import AutoModelForCausalLM
            assistant = AutoModelForCausalLM.from_pretrained(str(aref.hf_dir), dtype=tm.dtype).to(tm.device).eval()
            if tm.device.type == "cpu":
                from duo.runtime.target import use_onednn_linears
                use_onednn_linears(assistant)
        for m, e in engines.items():
            if m.startswith("duo") and e._draft is not None and m not in same_as:
                rtt = sorted(e._draft.ping() for _ in range(200))
                log(f"{m}: channel round trip median {rtt[100] * 1e6:.0f} us, p99 {rtt[198] * 1e6:.0f} us; plan {e.plan}")
        sampling = dict(temperature=temperature, seed=seed) if temperature > 0 else {}
        hf_sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else {}

        def method_fn(m, max_new=max_new):
            if m == "target" and accel:   # the target alone, replayed and timed like the accelerator
                return lambda ids: duo_sample(base, ids, max_new)
            if m == "target":
                return lambda ids: hf_generate(tm.model, ids, max_new, tm.eos_ids, **hf_sampling)
            if m == "hf-assisted":
                return lambda ids: hf_generate(tm.model, ids, max_new, tm.eos_ids, assistant_model=assistant,
                                               **hf_sampling)
            if m == "hf-prompt-lookup":
                return lambda ids: hf_generate(tm.model, ids, max_new, tm.eos_ids, prompt_lookup_num_tokens=10,
                                               **hf_sampling)
            name, opts = parse_method(m)
            return lambda ids: duo_sample(engines[name], ids, max_new, **sampling, **opts)

        for d, plist in prompts.items():
            if d == "mt-bench-2":   # the second turn follows the target's own (greedy) answer to the first
                first = next((e for k, e in engines.items() if k.startswith("duo")), base)
                bar = progress(len(plist), "mt-bench-2: answering the first turns (not timed)")
                for p in plist:
                    answer = first.generate(p.messages, max_new_tokens=max_new).text
                    p.messages = p.messages + [{"role": "assistant", "content": answer},
                                               {"role": "user", "content": p.turns[1]}]
                    bar.update(1)
                bar.close()
            encoded = [base.encode(p.messages) for p in plist]
            ref = None
            for m in methods:
                if m in same_as:   # the same engine and plan as a method already measured on these prompts
                    src = next(r for r in rows if r.dataset == d and r.method == same_as[m])
                    row = Row(**{**asdict(src), "method": m, "extra": {**src.extra, "measured_as": same_as[m]}})
                    rows.append(row)
                    log(f"{d:10} {m:17} = {same_as[m]} (same plan, measured once)")
                    continue
                fn = method_fn(m)
                for ids in encoded[:warmup]:      # warm-up (a short generation), not timed
                    method_fn(m, 16)(ids)
                bar = progress(len(encoded), f"{d} {m}")
                samples = []
                for ids in encoded:
                    with torch.inference_mode():
                        samples.append(fn(ids))
                    bar.update(1)
                bar.close()
                row = summarize(d, m, samples, ref if (temperature == 0 and m != "target") else None)
                if accel:
                    _simulation_extra(row, engines[m.split("@")[0]], parse_method(m)[1], samples, sim_model,
                                      accel)
                if m == "target":
                    ref = samples
                elif m.startswith("duo") and not accel:
                    p, opts = engines[m.split("@")[0]].plan, parse_method(m)[1]
                    row.extra["plan"] = (f"{p.mode} b={opts.get('budget', p.budget)}"
                                         f"{'~' if p.adaptive and 'budget' not in opts else ''} "
                                         f"w={opts.get('width', p.width)} {opts.get('shape', p.shape)}")
                rows.append(row)
                log(f"{d:10} {m:17} {row.tokens_per_s:6.2f} tok/s  accepted/pass {row.mean_accepted_len:.2f}"
                    + ("" if row.exact is None else f"  exact={row.exact}")
                    + (f"  SIMULATED {accel.name}: efficiency {row.extra.get('efficiency', 0):.0%}, plan "
                       f"{row.extra.get('plan')}" if accel else ""))
            base_row = next((r for r in rows if r.dataset == d and r.method == "target"), None)
            for r in rows:
                if r.dataset == d and base_row and base_row.tokens_per_s:
                    r.speedup = r.tokens_per_s / base_row.tokens_per_s
            if on_dataset:
                on_dataset(rows)
    finally:
        for e in engines.values():
            e.close()
    return rows


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


def main(args) -> int:
    methods = args.methods or (list(SIMULATED_METHODS) if getattr(args, "simulate_accelerator", None) else
                               ["target", "hf-assisted", "hf-prompt-lookup", "duo-sequential", "duo"])
    rows = run_bench(args.dataset, methods, limit=args.limit, max_new=args.max_new_tokens, model=args.model,
                     draft=args.draft, device=args.device, dtype=args.dtype, budget=args.budget,
                     temperature=args.temperature, seed=args.seed,
                     log=lambda s: print(s, file=sys.stderr, flush=True),
                     simulate=getattr(args, "simulate_accelerator", None),
                     on_dataset=lambda rows: write_json(rows, args.json))   # partial results survive a crash
    print(markdown(rows))
    write_json(rows, args.json)
    if args.plot:
        plot_speedups(rows, args.plot)
    return 0
