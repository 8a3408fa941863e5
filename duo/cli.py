"""Command line: duo run | models | profile | bench. Errors are one line and an exit code, never a traceback."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

from . import __version__

EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPT = 1, 2, 130


class UsageError(Exception):
    pass


def _number(kind, name, lo=None, hi=None, lo_open=False):
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {s!r}")
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{name} must be finite, got {s!r}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise argparse.ArgumentTypeError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {s}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{name} must be <= {hi}, got {s}")
        return v
    return parse


def _budget(s):
    if s == "auto":
        return s
    return _number(int, "--budget", lo=1)(s)


def _stop(s):
    if s == "":
        raise argparse.ArgumentTypeError("--stop must be non-empty text")
    return s


class Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2
        self.exit(EXIT_USAGE, f"duo: error: {message} (see '{self.prog} --help')\n")


def add_model_flags(p):
    g = p.add_argument_group("models")
    g.add_argument("--model", "-m", help="target: alias, GGUF file or Hugging Face directory (default qwen2.5-coder-1.5b)")
    g.add_argument("--draft", "-d", help="draft: alias or GGUF file (default qwen2.5-coder-0.5b)")
    g.add_argument("--device", default="auto", help="where the target runs: auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--dtype", default="auto", help="target dtype: auto, float32, bfloat16, float16 (default auto)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="duo", description="Speculative decoding: a llama.cpp draft on the CPU, a PyTorch target on the GPU.")
    p.add_argument("--version", action="version", version=f"duo {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")

    r = sub.add_parser("run", help="generate text (one prompt, stdin, or an interactive chat)",
                       description="Generate from a prompt; with no prompt on a terminal, chat.")
    r.add_argument("prompt", nargs="?", help="the prompt; '-' reads stdin; omit on a terminal to chat")
    add_model_flags(r)
    r.add_argument("--max-new-tokens", "-n", type=_number(int, "--max-new-tokens", lo=0), default=512,
                   help="stop after this many new tokens (default 512)")
    r.add_argument("--temperature", "-t", type=_number(float, "--temperature", lo=0), default=0.0,
                   help="0 = greedy (default); > 0 samples")
    r.add_argument("--top-p", type=_number(float, "--top-p", lo=0, hi=1, lo_open=True), default=1.0,
                   help="nucleus sampling mass in (0, 1] (default 1)")
    r.add_argument("--top-k", type=_number(int, "--top-k", lo=0), default=0, help="sample among the k best tokens (0 = off)")
    r.add_argument("--seed", type=_number(int, "--seed", lo=0), default=None, help="random seed for sampling")
    r.add_argument("--stop", action="append", type=_stop, default=[], help="stop before this text (repeatable)")
    r.add_argument("--system", help="system message for the chat template")
    r.add_argument("--raw", action="store_true", help="no chat template: the prompt is plain text to continue")
    r.add_argument("--budget", type=_budget, default="auto", help="drafted tokens per round: auto (profile) or N")
    r.add_argument("--mode", choices=["auto", "overlap", "sequential", "target"], default="auto",
                   help="schedule: auto (profile), overlap, sequential, or target (no draft)")
    r.add_argument("--stats", action="store_true", help="show a live line (tokens/s, acceptance) on stderr")
    r.add_argument("--json", action="store_true", help="print one JSON object with text and statistics at the end")
    r.add_argument("--quiet", "-q", action="store_true", help="no notices on stderr")
    r.add_argument("--verbose", "-v", action="store_true", help="details on stderr (library logs included)")
    r.add_argument("--debug", action="store_true", help="show tracebacks")

    b = sub.add_parser("bench", help="benchmark methods side by side on real datasets",
                       description="Every method on the same prompts in one run; ratios against the target alone.")
    add_model_flags(b)
    b.add_argument("--dataset", type=lambda s: s.split(","), default=["humaneval", "gsm8k", "mt-bench"],
                   help="comma-separated: humaneval, gsm8k, mt-bench, or a JSONL file of prompts")
    b.add_argument("--methods", type=lambda s: s.split(","),
                   default=["target", "hf-assisted", "hf-prompt-lookup", "duo-sequential", "duo"],
                   help="comma-separated: target, hf-assisted, hf-prompt-lookup, duo-sequential, duo")
    b.add_argument("--limit", type=_number(int, "--limit", lo=1), default=10, help="prompts per dataset (default 10)")
    b.add_argument("--max-new-tokens", "-n", type=_number(int, "--max-new-tokens", lo=1), default=128,
                   help="new tokens per prompt (default 128)")
    b.add_argument("--temperature", "-t", type=_number(float, "--temperature", lo=0), default=0.0,
                   help="0 = greedy (default); > 0 samples (exactness not checked)")
    b.add_argument("--seed", type=_number(int, "--seed", lo=0), default=0, help="random seed")
    b.add_argument("--budget", type=_budget, default="auto", help="drafted tokens per round for duo: auto or N")
    b.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    b.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of speedups")
    b.add_argument("--verbose", "-v", action="store_true", help="details on stderr")
    b.add_argument("--debug", action="store_true", help="show tracebacks")

    m = sub.add_parser("models", help="list or pull models", description="Manage the model cache.")
    msub = m.add_subparsers(dest="models_command", parser_class=Parser, metavar="ACTION")
    msub.add_parser("list", help="known aliases and what is cached")
    pull = msub.add_parser("pull", help="fetch a model into the cache")
    pull.add_argument("name", help="alias to pull (see 'duo models list')")
    pull.add_argument("--no-convert", action="store_true", help="do not convert a target to torch weights")
    for q in (m, pull):
        q.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="duo: %(message)s")
    if verbose:
        os.environ["DUO_VERBOSE"] = "1"
        os.environ["TRANSFORMERS_VERBOSITY"] = "warning"
    try:
        from transformers.utils import logging as tlog
        tlog.set_verbosity_warning() if verbose else tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


def read_prompt(args) -> str | None:
    if args.prompt == "-" or (args.prompt is None and not sys.stdin.isatty()):
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"stdin is not valid UTF-8 (byte {e.start}): pass UTF-8 text") from None
    return args.prompt


def stats_line(st: dict) -> str:
    return (f"{st.get('new_tokens', 0)} tok  {st.get('tokens_per_s', 0):.1f} tok/s  "
            f"accept {st.get('acceptance_rate', 0):.0%}  {st.get('mean_accepted_len', 0):.2f} tok/pass  "
            f"mode {st.get('mode')}" + (f"  fallback: {st['fallback']}" if st.get("fallback") else ""))


def cmd_run(args) -> int:
    from .engine import Engine
    from .runtime.decode import Stats

    prompt = read_prompt(args)
    if prompt is not None and not prompt.strip():
        raise UsageError("the prompt is empty: give some text (or omit it on a terminal to chat)")
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
               top_k=args.top_k, seed=args.seed, stop=args.stop, chat=False if args.raw else None)
    if not args.quiet:
        print("duo: loading models...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    with Engine(args.model, args.draft, device=args.device, dtype=args.dtype, budget=args.budget,
                mode=args.mode, progress=not args.quiet) as engine:
        if args.verbose:
            print(f"duo: loaded in {time.perf_counter() - t:.1f}s; plan {engine.plan}", file=sys.stderr)
        if prompt is None:
            return chat_loop(engine, args, gen)
        stats = Stats()
        pieces = []
        last = 0.0
        live = args.stats and not (sys.stdout.isatty() and sys.stderr.isatty() and not args.json)
        try:
            for _, piece in engine.stream_tokens(prompt, system=args.system, stats=stats, **gen):
                pieces.append(piece)
                if not args.json:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                if live and time.perf_counter() - last > 0.25:
                    last = time.perf_counter()
                    print("\r\033[K" + stats_line(stats.as_dict()), end="", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            if not args.json:
                sys.stdout.write("\n")
            sys.stdout.flush()
            print("duo: interrupted", file=sys.stderr)
            return EXIT_INTERRUPT
        st = stats.as_dict()
        if not args.json:
            sys.stdout.write("\n")
            sys.stdout.flush()
        if args.stats:
            print(("\r\033[K" if live else "") + stats_line(st), file=sys.stderr)
        if args.json:
            print(json.dumps({"text": "".join(pieces), "stats": st}))
    return 0


def chat_loop(engine, args, gen) -> int:
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("duo chat: /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return EXIT_INTERRUPT
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            history = history[:1] if args.system else []
            print("(history cleared)", file=sys.stderr)
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        answer = []
        try:
            for piece in engine.stream(history, **gen):
                answer.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})


def cmd_models(args) -> int:
    from . import models
    if args.models_command == "pull":
        path = models.pull_alias(args.name, convert=not args.no_convert) if hasattr(models, "pull_alias") \
            else models.pull(args.name)
        print(path)
        return 0
    rows = models.list_models()
    print(f"{'alias':22} {'role':7} {'size':>9}  {'pulled':6}  {'torch':6}  description")
    for r in rows:
        size = f"{r['size'] / 2**20:.0f} MiB" if r.get("size") else "-"
        print(f"{r['alias']:22} {r['role']:7} {size:>9}  {'yes' if r['pulled'] else 'no':6}  "
              f"{'yes' if r.get('converted') else '-' if r['role'] != 'target' else 'no':6}  {r.get('description', '')}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    debug = getattr(args, "debug", False)
    setup_logging(getattr(args, "verbose", False))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "bench":
            from bench.run import main as bench_main
            return bench_main(args)
        if args.command == "models":
            if args.models_command is None:
                parser.parse_args(["models", "--help"])
            return cmd_models(args)
        parser.error(f"unknown command {args.command}")
    except UsageError as e:
        print(f"duo: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nduo: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT
    except Exception as e:  # noqa: BLE001 - one line unless --debug
        if debug:
            raise
        from .engine import DuoError
        code = EXIT_USAGE if isinstance(e, DuoError) and _is_usage(e) else EXIT_RUNTIME
        print(f"duo: error: {e}", file=sys.stderr)
        return code
    return 0


def _is_usage(e) -> bool:
    msg = str(e)
    return any(k in msg for k in ("must be", "empty", "unknown mode", "prompt is", "not a GGUF", "does not exist",
                                   "unknown alias", "no CUDA GPU", "unsupported device", "unknown device",
                                   "unknown dtype"))
