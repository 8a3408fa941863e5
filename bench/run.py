"""`duo bench`'s run: every method on the same prompts, same models, same machine, in one run.

run_bench(datasets, methods, limit=, max_new=, ...) -> one Row per (dataset, method), in steps that are the
functions here: check the methods (and the simulated accelerator), prepare the datasets, build the engines
(one target in memory, shared by every method; each duo method its own draft worker and thread split), then
on each dataset run every method on its prompts and set the speedups against `target`, which runs first
and is the reference of every exactness check. A peer (llama-cpp: the target's GGUF in llama.cpp) is another
model: it gets a speedup against `target` but no exactness check, and is never a baseline. The methods are
in bench.methods (llama-cpp's in bench.llama_peer), the rows and outputs in bench.report, the command line
in bench.cli.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from duo.engine import Engine
from duo.errors import UsageError

from . import datasets as ds
from .methods import DUO_MODES, METHODS, PEER_METHODS, SIMULATED_METHODS, Sample, Shared, parse_method, runner
from .report import Row, exact_cell, plan_extra, simulation_extra, summarize


@dataclass
class BenchConfig:
    """run_bench's options."""
    datasets: list[str]
    methods: list[str]
    limit: int | None               # prompts per dataset (None: all)
    max_new: int                    # new tokens per answer, at most
    model: str | None = None        # the target and the draft, as Engine takes them
    draft: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    budget: int | str = "auto"      # the duo engines' budget
    temperature: float = 0.0        # > 0: every method samples
    seed: int | None = None         # shuffles each dataset before `limit` (None: its own order); seeds sampling (0 if None)
    warmup: int = 1                 # untimed short answers per method and dataset, first
    engine_kw: dict | None = None   # more Engine arguments for the duo engines
    simulate: Any = None            # SIMULATION: an accelerator profile (configs/accelerators.json)


@dataclass
class Simulation:
    """SIMULATION: the accelerator, and the cost model a row's pipeline efficiency is measured against."""
    accel: Any
    model: Any


def run_bench(datasets: list[str], methods: list[str], *, log: Callable[[str], None] = print,
              on_dataset: Callable[[list[Row]], None] | None = None, **options) -> list[Row]:
    """Run every method on every dataset's prompts; returns one Row per (dataset, method).

    options: BenchConfig's fields (limit and max_new are required). seed: shuffles each dataset before
    `limit` is applied (None: the dataset's own order) and seeds sampling (0 when None). on_dataset(rows so
    far) is called after each dataset (partial results).

    simulate: SIMULATION: an accelerator profile (configs/accelerators.json): every method runs against
    the target replayed from its recorded output, timed like that accelerator (duo.runtime.simulate);
    rows get the pipeline efficiency and idle times in `extra`."""
    cfg = BenchConfig(datasets, methods, **options)
    accel = check_methods(cfg)
    prompts = prepare_datasets(cfg)
    methods = sorted(cfg.methods, key=lambda m: m != "target")   # the reference runs first
    shared = Shared(simulated=accel is not None, temperature=cfg.temperature, seed=cfg.seed or 0,
                    llama_gguf=check_llama_cpp(cfg))
    rows: list[Row] = []
    try:
        sim = build_engines(cfg, methods, prompts, shared, accel, log)
        same_as = share_sequential_plan(methods, shared, log)
        methods = sorted(methods, key=lambda m: (m != "target", m in same_as))
        if "hf-assisted" in methods:
            shared.assistant = load_assistant(cfg.draft, shared.target)
        log_round_trips(shared, same_as, log)
        for d, plist in prompts.items():
            run_dataset(cfg, d, plist, methods, shared, same_as, sim, rows, log)
            if on_dataset:
                on_dataset(rows)
    finally:
        shared.close()
    return rows


# ------------------------------------------------------------------------------------------- set-up
def accelerator(spec):
    """The simulated accelerator of a profile name or file; an unknown one is a UsageError."""
    from duo.runtime.simulate import SimulationError, get_accelerator
    try:
        return get_accelerator(spec)
    except SimulationError as e:
        raise UsageError(str(e)) from e


def check_methods(cfg: BenchConfig):
    """Unknown methods are a ValueError; returns the simulated accelerator (None without), which replays
    greedy decoding by duo itself only."""
    bad = [m for m in cfg.methods if m.split("@")[0] not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)}: choose from {', '.join(METHODS)}")
    if "rest" in (m.split("@")[0] for m in cfg.methods) and not (cfg.engine_kw or {}).get("datastore"):
        raise UsageError("method rest drafts from a datastore alone: give --datastore PATH (duo datastore build)")
    if cfg.simulate is None:
        return None
    accel = accelerator(cfg.simulate)
    unsupported = [m for m in cfg.methods if m.split("@")[0] not in SIMULATED_METHODS]
    if unsupported or cfg.temperature > 0:
        raise UsageError(f"a simulated accelerator replays greedy decoding by duo itself: use temperature 0 and "
                         f"the methods {', '.join(SIMULATED_METHODS)}" + (f", not {', '.join(unsupported)}"
                                                                          if unsupported else ""))
    return accel


def check_llama_cpp(cfg: BenchConfig):
    """llama-cpp's GGUF target (None when the method is not asked for): a UsageError when the target is not a
    GGUF, or with sampling (llama-cpp decodes greedily)."""
    if "llama-cpp" not in (m.split("@")[0] for m in cfg.methods):
        return None
    if cfg.temperature > 0:
        raise UsageError("method llama-cpp decodes greedily: use temperature 0, or leave llama-cpp out")
    from .llama_peer import gguf_of
    return gguf_of(cfg.model)


def prepare_datasets(cfg: BenchConfig) -> dict[str, list]:
    """Each dataset's prompts (shuffled with the seed, if one is given, before the limit)."""
    return {d: ds.load(d, cfg.limit, seed=cfg.seed) for d in cfg.datasets}


def build_engines(cfg: BenchConfig, methods: list[str], prompts: dict, shared: Shared, accel,
                  log) -> Simulation | None:
    """The target-only engine, then one engine per duo method, all on the one target loaded (into
    shared.engines as they load, so that a failure closes those already running). Under a simulated
    accelerator the target's output is recorded first; returns the simulation's cost model then."""
    base = Engine(cfg.model, cfg.draft, device=cfg.device, dtype=cfg.dtype, mode="target", progress=False,
                  simulate=accel, compile=(cfg.engine_kw or {}).get("compile", "auto"))
    shared.engines["target"] = base
    shared.target = base.target.target if accel else base.target   # the real target, loaded once
    sim = Simulation(accel, record_simulation(cfg, prompts, base, accel, log)) if accel else None
    for m in methods:
        name = m.split("@")[0]
        if name in DUO_MODES and name not in shared.engines:
            shared.engines[name] = Engine(cfg.model, cfg.draft, device=cfg.device, dtype=cfg.dtype,
                                          budget=cfg.budget, mode=DUO_MODES[name], progress=False,
                                          target_model=shared.target, simulate=accel, **(cfg.engine_kw or {}))
    return sim


def record_simulation(cfg: BenchConfig, prompts: dict, base: Engine, accel, log):
    """SIMULATION: record the target's answer to every prompt (once per prompt, cached) and get this machine's
    draft measurements; returns the cost model (duo.profiler.simulated.measurements)."""
    from duo import models
    from duo.profiler import simulated

    log(f"SIMULATED accelerator {accel.name}: {accel.forward_ms(1):g} ms per pass + {accel.per_token_ms:g} "
        f"ms per further token ({accel.description}); source: {accel.source}")
    bar = progress(sum(len(p) for p in prompts.values()), "recording the target (once per prompt, cached)")
    for plist in prompts.values():
        for p in plist:
            base.target.prepare(base.encode(p.messages), cfg.max_new)
            bar.update(1)
    bar.close()
    meas, source = simulated.ensure_measurements(
        models.resolve_target(cfg.model), models.resolve_draft(cfg.draft), base.target, cfg.device, cfg.dtype)
    log(f"simulation: draft measurements from {source}")
    return simulated.measurements(accel, meas)


def share_sequential_plan(methods: list[str], shared: Shared, log) -> dict[str, str]:
    """`duo` runs as `duo run` would; where its plan is exactly duo-sequential's (the profile chose the
    sequential schedule) it is the same engine: measured once, reported under both names. Returns
    {method: the method it is measured as}."""
    e = shared.engines
    if not ("duo" in e and "duo-sequential" in e and "duo" in methods and "duo-sequential" in methods):
        return {}
    a, b = e["duo"], e["duo-sequential"]
    if (a.plan, a.lookup, a.plan.mode) != (b.plan, b.lookup, "sequential"):
        return {}
    a.close()
    e["duo"] = b
    log("duo: the profiled plan is the sequential schedule, the same engine as duo-sequential: "
        "measured once, reported under both names")
    return {"duo": "duo-sequential"}


def load_assistant(draft, target):
    """hf-assisted's assistant: the draft's GGUF as a transformers model, on the target's device and dtype."""
    from transformers import AutoModelForCausalLM

    from duo import models

    aref = models.resolve_target(str(models.resolve_draft(draft).gguf))
    assistant = AutoModelForCausalLM.from_pretrained(str(aref.hf_dir), dtype=target.dtype).to(target.device).eval()
    if target.device.type == "cpu":
        from duo.runtime.target import use_onednn_linears
        use_onednn_linears(assistant)
    return assistant


def log_round_trips(shared: Shared, same_as: dict, log) -> None:
    """Each duo engine's channel round trip to its draft worker (200 pings), and its plan."""
    for m, e in shared.engines.items():
        if m.startswith("duo") and e.draft_stats() is not None and m not in same_as:
            rtt = sorted(e.draft_round_trips(200))
            log(f"{m}: channel round trip median {rtt[100] * 1e6:.0f} us, p99 {rtt[198] * 1e6:.0f} us; plan {e.plan}")


# ------------------------------------------------------------------------------------------- one dataset
def run_dataset(cfg: BenchConfig, d: str, plist: list, methods: list[str], shared: Shared, same_as: dict,
                sim: Simulation | None, rows: list[Row], log) -> None:
    """Every method on one dataset's prompts, a Row each appended to `rows`; then the speedups."""
    if d == "mt-bench-2":
        answer_first_turns(plist, shared, cfg.max_new)
    encoded = [shared.base.encode(p.messages) for p in plist]
    ref = None
    for m in methods:
        if m in same_as:   # the same engine and plan as a method already measured on these prompts
            src = next(r for r in rows if r.dataset == d and r.method == same_as[m])
            rows.append(Row(**{**asdict(src), "method": m, "extra": {**src.extra, "measured_as": same_as[m]}}))
            log(f"{d:10} {m:17} = {same_as[m]} (same plan, measured once)")
            continue
        samples = run_method(cfg, d, m, encoded, shared)
        name, opts = parse_method(m)
        checked = cfg.temperature == 0 and m != "target" and name not in PEER_METHODS
        row = summarize(d, m, samples, ref if checked else None)
        if sim:
            simulation_extra(row, shared.engines[name], opts, samples, sim.model, sim.accel)
        if row.mismatches and not sim:   # each greedy divergence: a proven near-tie, or not
            row.extra["divergences"] = check_divergences(shared.target, encoded, samples, ref, row.mismatches, f"{d} {m}")
        if m == "target":
            ref = samples
        elif m.startswith("duo") and not sim:
            plan_extra(row, shared.engines[name], opts)
        elif name == "llama-cpp":
            row.extra["llama_cpp"] = shared.llama.describe()
        if name not in PEER_METHODS:   # every torch method runs the one target, in its one precision
            row.extra["precision"] = shared.target.precision
        rows.append(row)
        log(f"{d:10} {m:17} {row.tokens_per_s:6.2f} tok/s  accepted/pass {row.mean_accepted_len:.2f}"
            + ("" if row.exact is None else f"  exact: {exact_cell(row)}")
            + (f"  SIMULATED {sim.accel.name}: efficiency {row.extra.get('efficiency', 0):.0%}, plan "
               f"{row.extra.get('plan')}" if sim else ""))
    set_speedups(rows, d)


def check_divergences(tm, encoded: list, samples: list[Sample], ref: list[Sample], which: list[int], what: str) -> list:
    """The near-tie check of each mismatched prompt (bench.near_ties): re-decodes the target up to where they part."""
    from .near_ties import check
    bar = progress(len(which), f"{what}: checking {len(which)} divergence{'s' * (len(which) > 1)} for near-ties")
    out = []
    for i in which:
        out.append({"prompt": i, **asdict(check(tm, encoded[i], samples[i].tokens, ref[i].tokens))})
        bar.update(1)
    bar.close()
    return out


def answer_first_turns(plist: list, shared: Shared, max_new: int) -> None:
    """mt-bench-2: the second turn follows the target's own (greedy) answer to the first (not timed)."""
    first = next((e for k, e in shared.engines.items() if k.startswith("duo")), shared.base)
    bar = progress(len(plist), "mt-bench-2: answering the first turns (not timed)")
    for p in plist:
        answer = first.generate(p.messages, max_new_tokens=max_new, remember=False).text
        p.messages = p.messages + [{"role": "assistant", "content": answer},
                                   {"role": "user", "content": p.turns[1]}]
        bar.update(1)
    bar.close()


def run_method(cfg: BenchConfig, d: str, m: str, encoded: list, shared: Shared) -> list[Sample]:
    """One method's timed answers to a dataset's prompts, after `warmup` short untimed ones."""
    run = runner(m, shared)
    engine = shared.engines.get(parse_method(m)[0])
    if engine is not None and m != "target":   # its output cache holds this method's answers of this dataset only
        engine.retrieval.forget()
    for ids in encoded[:cfg.warmup]:      # warm-up (a short generation), not timed, not remembered
        run(ids, 16, True)
    bar = progress(len(encoded), f"{d} {m}")
    samples = []
    for ids in encoded:
        with torch.inference_mode():
            samples.append(run(ids, cfg.max_new))
        bar.update(1)
    bar.close()
    return samples


def set_speedups(rows: list[Row], d: str) -> None:
    """Every row of dataset d: its tokens/s over the target's."""
    base_row = next((r for r in rows if r.dataset == d and r.method == "target"), None)
    for r in rows:
        if r.dataset == d and base_row and base_row.tokens_per_s:
            r.speedup = r.tokens_per_s / base_row.tokens_per_s


def progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
