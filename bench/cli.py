"""`duo bench`: the subcommand's parser and what it runs (bench.run.run_bench, then the table, JSON, plot).

duo's CLI does not import the bench: pyproject.toml registers `add_parser` in the entry point group
"duo.commands" and duo.cli.build_parser adds it from there. The flags are built with duo.cli's helpers, so
they read, check and fail (exit 2, one line) like every other command's.
"""
from __future__ import annotations

import argparse
import sys

from duo.cli import (add_adapter_flags, add_common_flags, add_generation_flags, add_model_flags, add_retrieval_flags,
                     adapter_kwargs, comma_list, formatter, number, retrieval_kwargs)


def _methods(s: str) -> list[str]:
    """'target,duo-sequential@chain,b=8,duo' -> ['target', 'duo-sequential@chain,b=8', 'duo']: items that are
    not a method name are options of the method before them."""
    from .methods import METHODS
    out: list[str] = []
    for x in comma_list(s):
        if x.split("@")[0] in METHODS or not out:
            out.append(x)
        else:
            out[-1] += ("," if "@" in out[-1] else "@") + x
    bad = [m for m in out if m.split("@")[0] not in METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method {bad[0]!r}: choose from {', '.join(METHODS)}")
    return out


def add_parser(sub) -> argparse.ArgumentParser:
    """The entry point (group "duo.commands"): add `duo bench` to duo's subparsers."""
    b = sub.add_parser("bench", formatter_class=formatter,
                       help="benchmark methods side by side on real datasets",
                       description="Every method on the same prompts in one run; ratios against the target alone.")
    add_model_flags(b)
    add_generation_flags(b, default_max=128, sampling=False,
                         seed_help="shuffle each dataset with seed S before --limit (default: the dataset's own "
                                   "order); also the sampling seed (default 0)")
    add_retrieval_flags(b, cache_file=False)   # each method starts with an empty cache: no file to keep
    add_adapter_flags(b, record=False)
    g = b.add_argument_group("bench")
    g.add_argument("--dataset", type=comma_list, default=["humaneval", "gsm8k", "mt-bench"], metavar="LIST",
                   help="humaneval, gsm8k, mt-bench, mt-bench-2 (second turns), or a JSONL file")
    g.add_argument("--methods", type=_methods, metavar="LIST", default=None,
                   help="target, hf-assisted, hf-prompt-lookup, duo-sequential, duo-overlap, duo, llama-cpp "
                        "(the GGUF target alone in llama.cpp, greedy; needs a GGUF target) (default: all but "
                        "duo-overlap and llama-cpp; with --simulate-accelerator: target, duo-sequential, "
                        "duo-overlap, duo)")
    g.add_argument("--simulate-accelerator", metavar="PROFILE",
                   help="SIMULATION: replay the target's recorded output timed like PROFILE (a name in "
                        "configs/accelerators.json, or a JSON file); the draft runs for real")
    g.add_argument("--limit", type=number(int, ">= 1", lo=1), default=10, metavar="N",
                   help="prompts per dataset (default 10)")
    g.add_argument("--json", metavar="PATH", help="write the rows as JSON to PATH")
    g.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of speedups")
    add_common_flags(b)
    b.set_defaults(func=cmd_bench)
    return b


def cmd_bench(args) -> int:
    """Run the bench; print the markdown table; write the JSON (after each dataset too) and the plot."""
    from .methods import default_methods
    from .report import markdown, plot_speedups, write_json
    from .run import run_bench

    simulate = getattr(args, "simulate_accelerator", None)
    rows = run_bench(args.dataset, args.methods or default_methods(simulated=bool(simulate)),
                     limit=args.limit, max_new=args.max_new_tokens, model=args.model, draft=args.draft,
                     device=args.device, dtype=args.dtype, budget=args.budget, temperature=args.temperature,
                     seed=args.seed, log=lambda s: print(s, file=sys.stderr, flush=True), simulate=simulate,
                     on_dataset=lambda rows: write_json(rows, args.json),   # partial results survive a crash
                     engine_kw={**retrieval_kwargs(args), **adapter_kwargs(args), "compile": args.compile,
                                "draft_quant": args.draft_quant})
    print(markdown(rows))
    write_json(rows, args.json)
    if args.plot:
        plot_speedups(rows, args.plot)
    return 0
