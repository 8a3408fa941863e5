"""The draft adapts to its target (issue 19), measured: record on a train split, `duo adapt`, then the held-out
prompts of the same dataset before and after, side by side in one run, on one engine (the target untouched).

    python -m bench.adapt_bench --dataset gsm8k,mt-bench [--train 100] [--test 20] [-n 128] [--seed 0]
                                [--dtype bfloat16] [--max-minutes 20] [--lr 1e-4] [--rank 8] [--json PATH]
                                [--install gsm8k]

Per dataset: the prompts shuffled by --seed, the first --test held out, the next --train recorded (greedy,
duo's own decoding, the target's top-10 kept) into a buffer of this run's own (never the user's pair
buffer), an adapter trained on it, and the held-out prompts decoded with the plain draft and with the
adapter (a LoRA applied by llama.cpp at run time), prompt by prompt alternately so that a drift in the
machine's speed hits both rows alike (--merged-row adds a row with the same adapter merged into a Q4_0 draft,
after them), and once by the target alone (transformers' greedy
generate on the same weights: the speedups' base and the output every row must give). Every duo row that
parts from the target's is checked by the near-tie rule. Reported: P(depth >= d), mean accepted length,
acceptance, tok/s and speedup over the target before/after, the training's
time and memory, the recording overhead (its share of the recorded generations' time). --install NAME makes
the adapter learned on dataset NAME (when kept) the pair's accepted one, so `--adapter auto` uses it afterwards.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def depth_share(samples, d: int) -> float:
    """P(depth >= d): the share of speculative rounds whose accepted path reached depth d."""
    rounds = sum(s.stats["rounds"] - s.stats.get("plain_steps", 0) for s in samples)
    reached = sum(round(s.stats["accepted_per_position"][d - 1] * s.stats["rounds"]) for s in samples
                  if len(s.stats["accepted_per_position"]) >= d)
    return reached / rounds if rounds else 0.0


def summarise(samples) -> dict:
    toks = sum(len(s.tokens) for s in samples)
    wall = sum(s.wall_s for s in samples)
    drafted = sum(s.stats["drafted"] for s in samples)
    return {"tokens_per_s": toks / wall if wall else 0.0, "tokens": toks, "wall_s": wall,
            "acceptance": sum(s.stats["accepted"] for s in samples) / drafted if drafted else 0.0,
            "mean_accepted_len": float(np.mean([s.stats["mean_accepted_len"] for s in samples])),
            "p_depth": [depth_share(samples, d) for d in range(1, 6)],
            # where the time went (s, summed): the target's prefill and verify passes, and its wait for the draft
            "rounds": sum(s.stats["rounds"] for s in samples),
            "prefill_s": sum(s.stats["prefill_s"] for s in samples),
            "verify_s": sum(s.stats["verify_s"] for s in samples),
            "draft_wait_s": sum(s.stats["target_idle_s"] for s in samples)}


def run_dataset(engine, name: str, args, work: Path, log) -> dict:
    from duo.adapt.buffer import RecordBuffer
    from duo.adapt.job import adapt_pair
    from duo.adapt.train import AdaptConfig

    from . import datasets as ds
    from .methods import duo_sample, hf_generate

    prompts = ds.load(name, args.test + args.train, seed=args.seed)
    test, train = prompts[:args.test], prompts[args.test:]
    enc = lambda ps: [engine.encode(p.messages) for p in ps]   # noqa: E731
    test_ids, train_ids = enc(test), enc(train)
    log(f"{name}: {len(train_ids)} prompts recorded, {len(test_ids)} held out")

    def decode(ids_list, what):
        out = []
        for i, ids in enumerate(ids_list):
            out.append(duo_sample(engine, ids, args.max_new, retrieval=False, remember=False))
            log(f"  {what} {i + 1}/{len(ids_list)}: {out[-1].stats['tokens_per_s']:.2f} tok/s")
        return out

    engine.adaptation.adapter = "off"
    tm = engine.target
    hf_generate(tm.model, test_ids[0], 16, tm.eos_ids)                              # warm-up
    target = [hf_generate(tm.model, ids, args.max_new, tm.eos_ids) for ids in test_ids]
    log(f"  target alone: {summarise_target(target)['tokens_per_s']:.2f} tok/s")
    duo_sample(engine, test_ids[0], 16, retrieval=False, remember=False)          # warm-up
    pair = work / name
    recording = None
    if args.records:                                   # the train prompts' records of an earlier run, reused
        shutil.copytree(Path(args.records) / name / "records", pair / "records")
        log(f"  reusing {len(list((pair / 'records').glob('*.npz')))} records from {args.records}/{name}")
    else:
        engine.adaptation.buffer = RecordBuffer(pair)                              # this run's own buffer
        t0 = time.perf_counter()
        recorded = decode(train_ids, "recording")
        record_wall = time.perf_counter() - t0
        engine.adaptation.buffer = None
        record_s = sum(s.stats["record_s"] for s in recorded)
        rounds = sum(s.stats["rounds"] for s in recorded)
        recording = {"record_s": record_s, "rounds": rounds, "wall_s": record_wall,
                     "ms_per_round": 1e3 * record_s / max(1, rounds),
                     "share_of_time": record_s / sum(s.wall_s for s in recorded)}
        if args.keep_records:
            shutil.copytree(pair / "records", Path(args.keep_records) / name / "records", dirs_exist_ok=True)
    cfg = AdaptConfig(max_minutes=args.max_minutes, epochs=args.epochs, seed=args.seed, lr=args.lr, rank=args.rank,
                      alpha=2.0 * args.rank, rejected_weight=args.rejected_weight, last_layers=args.layers)
    # the adapter belongs to the draft's own file; it is trained on the weights the worker runs (--train-on run)
    base = engine.adaptation.run_gguf if args.train_on == "run" else engine.adaptation.draft_gguf
    result, path = adapt_pair(pair, engine.adaptation.draft_gguf, cfg, progress=sys.stderr.isatty(), base_gguf=base)
    log(f"  adapt: {result.summary()}")
    after = after_merged = None
    if path is None:
        before = decode(test_ids, "before")
    else:    # before and after prompt by prompt, alternately: a drift in the machine's speed hits both alike
        before, after = [], []
        for i, ids in enumerate(test_ids):
            for adapter, out in (("off", before), (str(path), after)):
                engine.adaptation.adapter = adapter       # swapped at the next generation's start (its KV rebuilt)
                out.append(duo_sample(engine, ids, args.max_new, retrieval=False, remember=False))
            log(f"  before/after {i + 1}/{len(test_ids)}: {before[-1].stats['tokens_per_s']:.2f} / "
                f"{after[-1].stats['tokens_per_s']:.2f} tok/s")
        if args.merged_row:                           # the same adapter merged into a Q4_0 draft (opt-in)
            engine.adaptation.merge = True
            duo_sample(engine, test_ids[0], 16, retrieval=False, remember=False)
            after_merged = decode(test_ids, "after (merged)")
            engine.adaptation.merge = False
        engine.adaptation.adapter = "off"
        duo_sample(engine, test_ids[0], 4, retrieval=False, remember=False)      # back to the plain draft
    divergences = [divergence(engine, i, test_ids[i], s.tokens, t.tokens, row)
                   for row, rows in (("before", before), ("after", after), ("after_merged", after_merged)) if rows
                   for i, (s, t) in enumerate(zip(rows, target)) if s.tokens != t.tokens]
    return {"dataset": name, "train_prompts": len(train_ids), "test_prompts": len(test_ids),
            "target": summarise_target(target), "before": summarise(before), "after": summarise(after) if after else None,
            "after_merged": summarise(after_merged) if after_merged else None,
            "same_tokens": not divergences, "divergences": divergences,
            "applied_as": "merged" if engine.adaptation.merge else "LoRA",
            "adapt": result.summary(), "adapter": str(path) if path else None,
            "adapter_bytes": path.stat().st_size if path else 0, "recording": recording,
            "settings": {"lr": cfg.lr, "rank": cfg.rank, "epochs": cfg.epochs, "rejected_weight": cfg.rejected_weight,
                         "last_layers": cfg.last_layers, "trained_on": Path(base).name}}


def summarise_target(samples) -> dict:
    toks, wall = sum(len(s.tokens) for s in samples), sum(s.wall_s for s in samples)
    return {"tokens_per_s": toks / wall if wall else 0.0, "tokens": toks, "wall_s": wall}


def divergence(engine, i: int, ids: list[int], got: list[int], target: list[int], row: str) -> dict:
    """Where a duo row parts from the target's own one-token decoding, judged by the near-tie rule there."""
    from .near_ties import check
    d = check(engine.target, ids, got, target)
    return {"row": row, "prompt": i, "position": d.position, "gap": d.gap, "bound": d.bound, "near_tie": d.near_tie,
            "duo_rank": d.rank, "margin": d.margin}


def install(engine, row: dict) -> str:
    """Copy the row's kept adapter into the pair's own adapters and make it the latest (`--adapter auto`)."""
    from duo.adapt import store
    if not row["adapter"]:
        return "nothing (the adapter was not kept)"
    pair = engine.adaptation.pair
    dest = store.new_adapter_path(pair)
    shutil.copyfile(row["adapter"], dest)
    store.accept(pair, dest, {**row["adapt"], "source": f"bench.adapt_bench on {row['dataset']}"})
    return str(dest)


def per_round(s: dict) -> str:
    """Mean ms per round after the prefill: all, (the verify pass, the wait for the draft)."""
    if not s.get("rounds"):
        return ""
    ms = lambda x: 1e3 * x / s["rounds"]   # noqa: E731
    return f"{ms(s['wall_s'] - s['prefill_s']):.0f} ({ms(s['verify_s']):.0f}, {ms(s['draft_wait_s']):.0f})"


def report(rows: list[dict]) -> str:
    out = ["| dataset | | tok/s | speedup | mean accepted len | acceptance | P(d>=1) | P(d>=2) | P(d>=3) | P(d>=4) | ms/round (verify, draft wait) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = r.get("target", {}).get("tokens_per_s")
        if base:
            out.append(f"| {r['dataset']} | target alone | {base:.2f} | 1.00x | | | | | | | |")
        for when in ("before", "after", "after_merged"):
            s = r.get(when)
            if s is None:
                if when == "after":
                    out.append(f"| {r['dataset']} | after | (adapter not kept) | | | | | | | | |")
                continue
            label = {"after": f"after ({r.get('applied_as', 'LoRA')})", "after_merged": "after (merged)"}.get(when, when)
            speedup = f"{s['tokens_per_s'] / base:.2f}x" if base else ""
            out.append(f"| {r['dataset']} | {label} | {s['tokens_per_s']:.2f} | {speedup} | {s['mean_accepted_len']:.2f} | "
                       f"{s['acceptance']:.2f} | " + " | ".join(f"{p:.2f}" for p in s["p_depth"][:4]) + f" | {per_round(s)} |")
        a, rec = r["adapt"], r["recording"]
        gain = (r["after"]["tokens_per_s"] / r["before"]["tokens_per_s"]) if r["after"] else float("nan")
        out.append("")
        ties = r.get("divergences", [])
        out.append(f"{r['dataset']}: speed after/before {gain:.3f}x, every row the target's tokens {r['same_tokens']}"
                   + "".join(f"; {d.get('row', 'after')} prompt {d['prompt']} parts at token {d['position']}: gap {d['gap']:.3g} vs bound "
                             f"{d['bound']:.3g} -> {'near-tie' if d['near_tie'] else 'NOT a near-tie'}"
                             + (f" (duo's token the target's #{d['duo_rank']}, {d['margin']:.3g} below its top)"
                                if not d['near_tie'] else "") for d in ties)
                   + "; training "
                   f"{a['steps']} steps on {a['train_records']} records ({a['train_tokens']} tokens), loss "
                   f"{a['loss_first']:.3f} -> {a['loss_last']:.3f}, {a['wall_s']:.0f} s, peak memory "
                   f"{a['peak_rss_mib'] / 1024:.2f} GiB; agreement {a['agreement_before']:.3f} -> "
                   f"{a['agreement_after']:.3f} (held-out records; per epoch "
                   f"{', '.join(f'{x:.3f}' for x in a.get('epoch_agreement', []))}); adapter {r['adapter_bytes'] / 2**20:.1f} MiB; "
                   + (f"recording {rec['ms_per_round']:.2f} ms per round = {100 * rec['share_of_time']:.2f}% of the time"
                      if rec else "records reused from an earlier run"))
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    from duo import Engine
    from duo.adapt.train import AdaptConfig

    ap = argparse.ArgumentParser(prog="python -m bench.adapt_bench")
    ap.add_argument("--dataset", default="gsm8k,mt-bench")
    ap.add_argument("--train", type=int, default=100)
    ap.add_argument("--test", type=int, default=20)
    ap.add_argument("-n", "--max-new", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=20.0)
    ap.add_argument("--lr", type=float, default=AdaptConfig.lr)
    ap.add_argument("--rank", type=int, default=AdaptConfig.rank)
    ap.add_argument("--layers", type=int, default=AdaptConfig.last_layers, help="adapt the last N layers (0: all)")
    ap.add_argument("--train-on", choices=("run", "source"), default="run",
                    help="train on the weights the worker runs (its Q4_0 copy) or the draft's own file")
    ap.add_argument("--model")
    ap.add_argument("--draft")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--mode", default="auto", help="the schedule (default: this machine's profile)")
    ap.add_argument("--budget", default="auto", help="the draft budget (default: this machine's profile)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--rejected-weight", type=float, default=AdaptConfig.rejected_weight)
    ap.add_argument("--records", metavar="DIR", help="reuse DIR/<dataset>/records (an earlier --keep-records) instead of recording")
    ap.add_argument("--keep-records", metavar="DIR", help="copy this run's records to DIR/<dataset>/records")
    ap.add_argument("--install", metavar="DATASET", help="make that dataset's kept adapter the pair's accepted one")
    ap.add_argument("--merged-row", action="store_true", help="also decode with the adapter merged into a Q4_0 draft")
    args = ap.parse_args(argv)
    if args.install and args.install not in args.dataset.split(","):
        ap.error(f"--install {args.install}: not one of --dataset {args.dataset}")
    log = lambda m: print(m, file=sys.stderr, flush=True)   # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory(prefix="duo-adapt-bench-") as work, \
            Engine(args.model, args.draft, dtype=args.dtype, progress=True, output_cache=0, adapter="off",
                   mode=args.mode, budget=args.budget if args.budget == "auto" else int(args.budget)) as engine:
        for name in args.dataset.split(","):
            rows.append(run_dataset(engine, name, args, Path(work), log))
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
            if name == args.install:
                log(f"  installed: {install(engine, rows[-1])}")
    print(report(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
