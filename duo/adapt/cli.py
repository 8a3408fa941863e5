"""`duo adapt`: train the draft's LoRA adapter on the generations recorded for a model pair.

    duo adapt [--model M --draft D] [--epochs N] [--rank R] [--max-minutes M] [--held-out F] [--seed S] [--json]
    duo adapt --status [--model M --draft D]

Records come from `duo run --record` (or Engine(record=True)); the adapter is kept, and used by
`--adapter auto` from the next generation on, only when the draft agrees with the target more often on
the held-out records. Ctrl-C checkpoints: the next `duo adapt` resumes; the accepted adapter stays.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..cli import add_common_flags, formatter, number
from ..exits import EXIT_INTERRUPT, EXIT_OK
from ..flags import add_draft_quant_flag
from .train import AdaptConfig


def add_parser(sub) -> None:
    a = sub.add_parser("adapt", formatter_class=formatter, help="train the draft on what the target said (LoRA)",
                       description="Train a LoRA adapter for the draft on generations recorded with --record: the "
                                   "target's tokens and its top-10 distribution (HASS), the positions where the "
                                   "draft was rejected weighted up (OSD). Kept only if the draft then agrees "
                                   "with the target more often on held-out records.")
    a.add_argument("--model", "-m", metavar="M", help="target: alias, GGUF file or HF directory (default: the default)")
    a.add_argument("--draft", "-d", metavar="D", help="draft: alias or GGUF file (default: the default)")
    a.add_argument("--epochs", type=number(int, ">= 1", lo=1), default=2, metavar="N", help="passes over the records (default 2)")
    a.add_argument("--rank", type=number(int, ">= 1", lo=1), default=8, metavar="R", help="LoRA rank (default 8)")
    a.add_argument("--layers", type=number(int, ">= 0", lo=0), default=AdaptConfig.last_layers, metavar="N",
                   help=f"adapt only the last N layers, 0 for all (default {AdaptConfig.last_layers})")
    a.add_argument("--max-minutes", type=number(float, "> 0", lo=0, lo_open=True), default=20.0, metavar="M",
                   help="stop training after M minutes, then evaluate (default 20)")
    a.add_argument("--held-out", type=number(float, "in (0, 0.9]", lo=0, hi=0.9, lo_open=True), default=0.2,
                   metavar="F", help="share of the records kept out to judge the adapter (default 0.2)")
    a.add_argument("--seed", type=int, default=0, help="the split and the order (default 0)")
    a.add_argument("--status", action="store_true", help="show the records and the accepted adapter, train nothing")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    add_draft_quant_flag(a)
    add_common_flags(a)
    a.set_defaults(func=cmd_adapt)


def pair_of(args):
    from .. import models
    from .buffer import pair_dir
    tref = models.resolve_target(args.model, progress=not args.quiet)
    dref = models.resolve_draft(args.draft, progress=not args.quiet)
    return pair_dir(tref.name, dref.gguf), dref


def status(pair: Path) -> dict:
    from .buffer import RecordBuffer
    from .store import adapters_dir, latest
    buf = RecordBuffer(pair)
    info = {"pair": str(pair), "records": len(buf.files()), "answer_tokens": buf.n_tokens(),
            "adapter": str(latest(pair)) if latest(pair) else None}
    f = adapters_dir(pair) / "latest.json"
    if f.is_file():
        info["adapter_info"] = json.loads(f.read_text())
    return info


def cmd_adapt(args) -> int:
    from .job import adapt_pair

    pair, dref = pair_of(args)
    if args.status:
        info = status(pair)
        print(json.dumps(info, indent=1) if args.json else
              f"records    {info['records']} generations, {info['answer_tokens']:,} answer tokens ({pair})\n"
              f"adapter    {info['adapter'] or 'none accepted yet'}")
        return EXIT_OK
    from ..draft_quant import prepare
    cfg = AdaptConfig(rank=args.rank, alpha=2.0 * args.rank, epochs=args.epochs, max_minutes=args.max_minutes,
                      seed=args.seed, last_layers=args.layers)
    progress = not args.quiet and (args.verbose or sys.stderr.isatty())
    run = prepare(dref, args.draft_quant, progress=not args.quiet)     # train on the weights the worker runs
    result, path = adapt_pair(pair, dref.gguf, cfg, held_out=args.held_out, progress=progress, base_gguf=run.gguf)
    out = {**result.summary(), "adapter": str(path) if path else None,
           "adapter_bytes": path.stat().st_size if path else 0}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(format_result(out))
    return EXIT_INTERRUPT if result.interrupted else EXIT_OK


def format_result(r: dict) -> str:
    lines = [
        f"records    {r['train_records']} train ({r['train_tokens']:,} answer tokens), {r['test_records']} held out",
        f"training   {r['steps']} steps" + (f" (resumed at {r['resumed_from']})" if r["resumed_from"] else "")
        + f", loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}, {r['wall_s']:.0f} s, peak memory "
        f"{r['peak_rss_mib'] / 1024:.2f} GiB",
        f"agreement  {r['agreement_before']:.3f} -> {r['agreement_after']:.3f} on held-out tokens "
        f"({r['rejected_before']:.3f} -> {r['rejected_after']:.3f} where the draft had been rejected)",
    ]
    if len(r.get("epoch_agreement", [])) > 1:
        lines.append("per epoch  " + ", ".join(f"{a:.3f}" for a in r["epoch_agreement"])
                     + (f" (kept the adapter of step {r['best_step']})" if r["adapter"] else ""))
    if r["interrupted"]:
        lines.append("stopped    interrupted: `duo adapt` resumes from the checkpoint; the accepted adapter is unchanged")
    elif r["adapter"]:
        lines.append(f"adapter    kept: {r['adapter']} ({r['adapter_bytes'] / 2**20:.1f} MiB); `--adapter auto` uses it")
    else:
        lines.append("adapter    not kept: the draft did not agree more often; the accepted adapter is unchanged")
    return "\n".join(lines)
