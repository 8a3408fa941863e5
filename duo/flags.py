"""Argument types and the flag groups duo's commands share (run, serve, bench, profile, datastore, adapt).

duo.cli re-exports them, so a command from another package (entry point group "duo.commands") imports
them from duo.cli or from here.
"""
from __future__ import annotations

import argparse
import os
import re

from .plan import PRECISION_ALIASES, PRECISIONS


def number(kind, what: str, lo=None, hi=None, lo_open: bool = False):
    """An argparse type: an int or a finite float within [lo, hi] (or (lo, hi] with lo_open)."""
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'} {what}, "
                                             f"got {s!r}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be a finite number {what}, got {s!r}")
        if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s}")
        return v
    return parse


def budget_value(s: str):
    return s if s == "auto" else number(int, ">= 1 (or auto)", lo=1)(s)


def _stop(s: str) -> str:
    if s == "":
        raise argparse.ArgumentTypeError("must be non-empty text (an empty stop string would stop at once)")
    return s


def _device(s: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|cuda:\d+(,(cuda:)?\d+)+", s):
        raise argparse.ArgumentTypeError(f"unknown device {s!r}: use auto, cpu, cuda, cuda:N or cuda:N,M")
    return s


def _dtype(s: str) -> str:
    name = PRECISION_ALIASES.get(s, s)
    if name != "auto" and name not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"unknown dtype {s!r}: use auto, {', '.join(PRECISIONS)}")
    return name


def comma_list(s: str) -> list[str]:
    items = [x.strip() for x in s.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError("must be a non-empty comma-separated list")
    return items


def add_common_flags(p) -> None:
    """-v / -q / --debug, on every command."""
    g = p.add_argument_group("output")
    g.add_argument("--verbose", "-v", action="store_true", help="details on stderr (library logs included)")
    g.add_argument("--quiet", "-q", action="store_true", help="nothing on stderr but errors")
    g.add_argument("--debug", action="store_true", help="show a traceback on errors")


def add_model_flags(p) -> None:
    """--model --draft --device --dtype --compile --draft-quant, on every command that loads models."""
    g = p.add_argument_group("models")
    g.add_argument("--model", "-m", metavar="M", help="target: alias, GGUF file or HF directory")
    g.add_argument("--draft", "-d", metavar="D", help="draft: alias or GGUF file")
    g.add_argument("--device", type=_device, default="auto", metavar="DEV",
                   help="target device: auto, cpu, cuda, cuda:N, cuda:N,M (over GPUs)")
    g.add_argument("--dtype", type=_dtype, default="auto", metavar="T",
                   help="target precision: auto, float32, bfloat16, float16, int8, w8a8")
    g.add_argument("--compile", choices=["auto", "on", "off"], default="auto", metavar="C",
                   help="compiled verify pass: auto (on a GPU), on, off")
    add_draft_quant_flag(g)


def add_draft_quant_flag(g) -> None:
    """--draft-quant: the draft's weights as given or as a Q4_0 copy (duo.draft_quant)."""
    from .draft_quant import SETTINGS
    g.add_argument("--draft-quant", choices=SETTINGS, default="auto", metavar="Q",
                   help="draft weights: auto (a Q4_0 copy if measured faster), keep, q4_0")


def add_retrieval_flags(p, cache_file: bool = True) -> None:
    """--datastore --output-cache --no-cache [--output-cache-file]: candidates that cost no model (duo.retrieval)."""
    g = p.add_argument_group("retrieval")
    g.add_argument("--datastore", metavar="DIR", default=os.environ.get("DUO_DATASTORE"),
                   help="draft also from this datastore (`duo datastore build`; default $DUO_DATASTORE)")
    g.add_argument("--output-cache", type=number(int, ">= 0 (0 = off)", lo=0), default=2_000_000, metavar="N",
                   help="draft also from up to N tokens of earlier answers (default 2000000; 0 = off)")
    g.add_argument("--no-cache", dest="output_cache", action="store_const", const=0,
                   help="no output cache (same as --output-cache 0)")
    if cache_file:
        g.add_argument("--output-cache-file", metavar="FILE",
                       help="reload the output cache from FILE and save it there at the end")


def add_adapter_flags(p, record: bool = True) -> None:
    """--adapter [--record --adapt-online]: the draft's LoRA adapter (`duo adapt`) and recording for it."""
    g = p.add_argument_group("draft adaptation")
    g.add_argument("--adapter", default="auto", metavar="auto|PATH|off",
                   help="the draft's LoRA adapter: auto = the pair's latest from `duo adapt` (default), a file, or off")
    if record:
        g.add_argument("--record", action="store_true",
                       help="record the generations (the target's top-10 per token) for `duo adapt`")
        g.add_argument("--adapt-online", action="store_true",
                       help="with --record: adapt the draft by itself in the background while idle")


def adapter_kwargs(args) -> dict:
    """The Engine arguments of add_adapter_flags' flags."""
    return dict(adapter=args.adapter, record=getattr(args, "record", False),
                adapt_online=getattr(args, "adapt_online", False))


def retrieval_kwargs(args) -> dict:
    """The Engine arguments of add_retrieval_flags' flags."""
    return dict(datastore=args.datastore, output_cache=args.output_cache,
                output_cache_file=getattr(args, "output_cache_file", None))


def add_generation_flags(p, *, default_max: int, sampling: bool, seed_help: str = "random seed for sampling") -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", "-n", type=number(int, ">= 0", lo=0), default=default_max, metavar="N",
                   help=f"at most N new tokens (default {default_max})")
    g.add_argument("--temperature", "-t", type=number(float, ">= 0 (0 = greedy)", lo=0), default=0.0,
                   metavar="T", help="0 = greedy (default); > 0 samples")
    if sampling:
        g.add_argument("--top-p", type=number(float, "in (0, 1]", lo=0, hi=1, lo_open=True), default=1.0,
                       metavar="P", help="nucleus sampling mass in (0, 1] (default 1)")
        g.add_argument("--top-k", type=number(int, ">= 0 (0 = off)", lo=0), default=0, metavar="K",
                       help="sample among the K likeliest tokens (0 = off)")
    g.add_argument("--seed", type=number(int, ">= 0", lo=0), default=None, metavar="S", help=seed_help)
    g.add_argument("--budget", type=budget_value, default="auto", metavar="B",
                   help="drafted tokens per round: auto or B >= 1")
