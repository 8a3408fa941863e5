"""Command line: duo run | bench | models (| profile).

Errors are one line on stderr and an exit code, never a traceback (unless --debug):
  0 success, 1 a failure at run time (out of memory, a model that fails to load, a download),
  2 a usage error (bad flags or values, a missing model file, an empty or too long prompt...),
  130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
The distinction is made where the error is raised: duo.engine.UsageError (exit 2) vs DuoError (exit 1);
argparse's own errors are usage errors too.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import time
import warnings

from . import __version__
from .engine import DuoError, UsageError  # cheap: duo.engine imports torch only when an Engine is built

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPT, EXIT_TERMINATED = 0, 1, 2, 130, 143

log = logging.getLogger("duo")


# ----------------------------------------------------------------------------- argument types
def _number(kind, what: str, lo=None, hi=None, lo_open: bool = False):
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


def _budget(s: str):
    return s if s == "auto" else _number(int, ">= 1 (or auto)", lo=1)(s)


def _stop(s: str) -> str:
    if s == "":
        raise argparse.ArgumentTypeError("must be non-empty text (an empty stop string would stop at once)")
    return s


def _device(s: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", s):
        raise argparse.ArgumentTypeError(f"unknown device {s!r}: use auto, cpu, cuda or cuda:N")
    return s


DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _dtype(s: str) -> str:
    if s not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {s!r}: use auto, float32, bfloat16 or float16")
    return DTYPES[s]


def _methods(s: str) -> list[str]:
    """'target,duo-sequential@chain,b=8,duo' -> ['target', 'duo-sequential@chain,b=8', 'duo']: items that are
    not a method name are options of the method before them."""
    from bench.run import METHODS
    out: list[str] = []
    for x in _list(s):
        if x.split("@")[0] in METHODS or not out:
            out.append(x)
        else:
            out[-1] += ("," if "@" in out[-1] else "@") + x
    bad = [m for m in out if m.split("@")[0] not in METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method {bad[0]!r}: choose from {', '.join(METHODS)}")
    return out


def _list(s: str) -> list[str]:
    items = [x.strip() for x in s.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError("must be a non-empty comma-separated list")
    return items


# ----------------------------------------------------------------------------- parser
class Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2
        self.exit(EXIT_USAGE, f"duo: error: {message} (see '{self.prog} --help')\n")


def _formatter(prog):
    return argparse.HelpFormatter(prog, max_help_position=30, width=min(110, max(80, _columns())))


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        return 100


def add_common_flags(p) -> None:
    """-v / -q / --debug, on every command."""
    g = p.add_argument_group("output")
    g.add_argument("--verbose", "-v", action="store_true", help="details on stderr (library logs included)")
    g.add_argument("--quiet", "-q", action="store_true", help="nothing on stderr but errors")
    g.add_argument("--debug", action="store_true", help="show a traceback on errors")


def add_model_flags(p) -> None:
    """--model --draft --device --dtype, on every command that loads models."""
    g = p.add_argument_group("models")
    g.add_argument("--model", "-m", metavar="M", help="target: alias, GGUF file or HF directory")
    g.add_argument("--draft", "-d", metavar="D", help="draft: alias or GGUF file")
    g.add_argument("--device", type=_device, default="auto", metavar="DEV",
                   help="target device: auto, cpu, cuda, cuda:N (default auto)")
    g.add_argument("--dtype", type=_dtype, default="auto", metavar="T",
                   help="target dtype: auto, float32, bfloat16, float16")


def add_generation_flags(p, *, default_max: int, sampling: bool, seed_help: str = "random seed for sampling") -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", "-n", type=_number(int, ">= 0", lo=0), default=default_max, metavar="N",
                   help=f"at most N new tokens (default {default_max})")
    g.add_argument("--temperature", "-t", type=_number(float, ">= 0 (0 = greedy)", lo=0), default=0.0,
                   metavar="T", help="0 = greedy (default); > 0 samples")
    if sampling:
        g.add_argument("--top-p", type=_number(float, "in (0, 1]", lo=0, hi=1, lo_open=True), default=1.0,
                       metavar="P", help="nucleus sampling mass in (0, 1] (default 1)")
        g.add_argument("--top-k", type=_number(int, ">= 0 (0 = off)", lo=0), default=0, metavar="K",
                       help="sample among the K likeliest tokens (0 = off)")
    g.add_argument("--seed", type=_number(int, ">= 0", lo=0), default=None, metavar="S", help=seed_help)
    g.add_argument("--budget", type=_budget, default="auto", metavar="B",
                   help="drafted tokens per round: auto or B >= 1")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="duo", formatter_class=_formatter,
               description="Speculative decoding: a llama.cpp draft on the CPU, a PyTorch target on the GPU.")
    p.add_argument("--version", action="version", version=f"duo {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")

    # --- duo run -------------------------------------------------------------------------------
    r = sub.add_parser("run", formatter_class=_formatter,
                       help="generate text: a prompt, stdin, or an interactive chat",
                       description="Generate from a prompt (the argument, or stdin with '-' or a pipe); "
                                   "with no prompt on a terminal, chat.")
    r.add_argument("prompt", nargs="?", help="the prompt; '-' reads stdin; omit on a terminal to chat")
    add_model_flags(r)
    add_generation_flags(r, default_max=512, sampling=True)
    g = r.add_argument_group("run")
    g.add_argument("--stop", action="append", type=_stop, default=[], metavar="TEXT",
                   help="stop before TEXT (repeatable)")
    g.add_argument("--system", metavar="TEXT", help="system message for the chat template")
    g.add_argument("--raw", action="store_true", help="no chat template: continue the prompt as plain text")
    g.add_argument("--chat", action="store_true", help="chat even if stdin is not a terminal (a line per turn)")
    g.add_argument("--mode", choices=["auto", "overlap", "sequential", "target"], default="auto", metavar="MODE",
                   help="auto, overlap, sequential, or target (no draft)")
    g.add_argument("--profile", choices=["auto", "saved", "off"], default=os.environ.get("DUO_PROFILE", "auto"),
                   metavar="P", help="with --budget/--mode auto: auto (quick profile if none is saved), saved, off")
    g.add_argument("--stats", action="store_true", help="speed and acceptance on stderr")
    g.add_argument("--json", action="store_true", help="print one JSON object: text and stats")
    add_common_flags(r)
    r.set_defaults(func=cmd_run)

    # --- duo bench -----------------------------------------------------------------------------
    b = sub.add_parser("bench", formatter_class=_formatter,
                       help="benchmark methods side by side on real datasets",
                       description="Every method on the same prompts in one run; ratios against the target alone.")
    add_model_flags(b)
    add_generation_flags(b, default_max=128, sampling=False,
                         seed_help="shuffle each dataset with seed S before --limit (default: the dataset's own "
                                   "order); also the sampling seed (default 0)")
    g = b.add_argument_group("bench")
    g.add_argument("--dataset", type=_list, default=["humaneval", "gsm8k", "mt-bench"], metavar="LIST",
                   help="humaneval, gsm8k, mt-bench, mt-bench-2 (second turns), or a JSONL file")
    g.add_argument("--methods", type=_methods, metavar="LIST", default=None,
                   help="target, hf-assisted, hf-prompt-lookup, duo-sequential, duo-overlap, duo (default: all but "
                        "duo-overlap; with --simulate-accelerator: target, duo-sequential, duo-overlap, duo)")
    g.add_argument("--simulate-accelerator", metavar="PROFILE",
                   help="SIMULATION: replay the target's recorded output timed like PROFILE (a name in "
                        "configs/accelerators.json, or a JSON file); the draft runs for real")
    g.add_argument("--limit", type=_number(int, ">= 1", lo=1), default=10, metavar="N",
                   help="prompts per dataset (default 10)")
    g.add_argument("--json", metavar="PATH", help="write the rows as JSON to PATH")
    g.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of speedups")
    add_common_flags(b)
    b.set_defaults(func=cmd_bench)

    # --- duo models ----------------------------------------------------------------------------
    m = sub.add_parser("models", formatter_class=_formatter, help="list or pull models",
                       description="Manage the model cache ($DUO_CACHE or ~/.cache/duo). Default action: list.")
    msub = m.add_subparsers(dest="models_command", parser_class=Parser, metavar="ACTION")
    add_common_flags(msub.add_parser("list", formatter_class=_formatter, help="known aliases and what is cached"))
    pull = msub.add_parser("pull", formatter_class=_formatter, help="fetch a model into the cache")
    pull.add_argument("name", help="alias to pull (see 'duo models list')")
    pull.add_argument("--no-convert", action="store_true", help="do not convert a target to torch weights")
    add_common_flags(pull)
    m.set_defaults(func=cmd_models, verbose=False, quiet=False, debug=False)

    # --- duo profile ---------------------------------------------------------------------------
    from .profiler import cli as profiler_cli
    pr = profiler_cli.add_profile_parser(sub)
    pr.set_defaults(func=profiler_cli.main)
    return p


# ----------------------------------------------------------------------------- logging
def setup_logging(verbose: bool, quiet: bool) -> None:
    """Quiet by default: only duo's own warnings and errors. -v: duo's details, library logs, llama.cpp's log."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("duo: %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING)
    if verbose:
        os.environ["DUO_VERBOSE"] = "1"              # the draft worker passes llama.cpp's log through
        os.environ["TRANSFORMERS_VERBOSITY"] = "warning"
    else:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        warnings.simplefilter("ignore")              # library deprecation notices are not the user's business
    if "transformers" in sys.modules:                # else TRANSFORMERS_VERBOSITY applies when it is imported
        from transformers.utils import logging as tlog
        tlog.set_verbosity_warning() if verbose else tlog.set_verbosity_error()
    if not verbose:                                  # transformers' "Loading weights" bars
        if "transformers" in sys.modules:
            from transformers.utils import logging as tlog
            tlog.disable_progress_bar()
        # else HF_HUB_DISABLE_PROGRESS_BARS (set above) turns them off when transformers is imported


def note(args, message: str) -> None:
    """A notice on stderr: shown on a terminal or with -v, never with -q."""
    if not args.quiet and (args.verbose or sys.stderr.isatty()):
        print(f"duo: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- duo run
def read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"stdin is not valid UTF-8 (bad byte at offset {e.start}); convert it to UTF-8 first, "
                         f"e.g. with iconv -t UTF-8") from None


def stats_line(st: dict) -> str:
    return (f"{st.get('new_tokens', 0)} tok  {st.get('tokens_per_s', 0):.1f} tok/s  "
            f"accept {st.get('acceptance_rate', 0):.0%}  {st.get('mean_accepted_len', 0):.2f} tok/pass  "
            f"mode {st.get('mode')}" + (f"  fallback: {st['fallback']}" if st.get("fallback") else ""))


def plan_line(engine) -> str:
    """How this engine generates: the plan and where it came from, and the draft's llama.cpp configuration."""
    p = engine.plan
    if p.mode == "target" or engine.draft_ref is None:
        return f"plan: the target alone, {p.target_threads} threads ({p.source})"
    out = (f"plan: {p.mode}, budget {p.budget}{' (adaptive)' if p.adaptive else ''}, width {p.width}, {p.shape} "
           f"tree, draft {p.draft_threads} / target {p.target_threads} threads ({p.source})")
    v = engine.draft_llama
    r = v.result(v.chosen) if v is not None else None
    return out + (f"; draft in llama.cpp: {v.chosen}, {r.ms_per_token:.1f} ms/token" if r else "")


def cmd_run(args) -> int:
    chat = args.chat or (args.prompt is None and sys.stdin.isatty())
    if chat:
        if args.prompt is not None:
            raise UsageError("a prompt and --chat together: give the prompt, or chat (lines from stdin)")
        if args.json or args.raw:
            raise UsageError(f"{'--json' if args.json else '--raw'} does not work in the chat: give a prompt")
        prompt = None
    else:
        if args.raw and args.system is not None:
            raise UsageError("--system needs the chat template, which --raw turns off: drop one of them")
        prompt = read_stdin() if args.prompt in (None, "-") else args.prompt
        if not prompt.strip():
            raise UsageError("the prompt is empty: give some text (or run 'duo run' on a terminal to chat)")
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
               top_k=args.top_k, seed=args.seed, stop=args.stop)

    from .engine import Engine

    note(args, "loading models...")
    t = time.perf_counter()
    with Engine(args.model, args.draft, device=args.device, dtype=args.dtype, budget=args.budget,
                mode=args.mode, progress=not args.quiet, profile=args.profile) as engine:
        log.info("loaded %s + %s on %s in %.1fs; plan %s", engine.target.name,
                 engine.draft_ref.name if engine.draft_ref else "no draft", engine.target.device,
                 time.perf_counter() - t, engine.plan)
        if args.stats:
            print(f"duo: {plan_line(engine)}", file=sys.stderr, flush=True)
        if chat:
            return chat_loop(engine, args, gen)
        return run_once(engine, args, prompt, gen)


def run_once(engine, args, prompt: str, gen: dict) -> int:
    from .runtime.decode import Stats

    ids = engine.encode(prompt, system=args.system, chat=False if args.raw else None)
    log.info("prompt: %d tokens", len(ids))
    stats, pieces = Stats(), []
    live = args.stats and sys.stderr.isatty() and not sys.stdout.isatty()
    last, code = 0.0, EXIT_OK
    try:
        for _, piece in engine.stream_tokens(prompt, system=args.system, chat=False if args.raw else None,
                                             stats=stats, **gen):
            pieces.append(piece)
            if not args.json and piece:
                sys.stdout.write(piece)
                sys.stdout.flush()
            if live and time.perf_counter() - last > 0.25:
                last = time.perf_counter()
                print("\r\033[K" + stats_line(stats.as_dict()), end="", file=sys.stderr, flush=True)
    except KeyboardInterrupt as e:      # keep what was shown; the Engine's `with` stops the draft worker
        stats.stop_reason = "interrupted"
        code = _interrupt_code(e)
    st = stats.as_dict()
    if args.json:
        print(json.dumps({"text": "".join(pieces), "stats": st}))
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        print(("\r\033[K" if live else "") + stats_line(st), file=sys.stderr, flush=True)
    if code != EXIT_OK:
        print("duo: interrupted", file=sys.stderr, flush=True)
    return code


class ChatHistory:
    """The conversation as chat messages: an optional system message (kept by reset), then the turns."""

    def __init__(self, system: str | None = None):
        self.system = system
        self.turns: list[dict] = []

    @property
    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + list(self.turns)

    def ask(self, text: str) -> list[dict]:
        """Add the user's message; return the messages to answer."""
        self.turns.append({"role": "user", "content": text})
        return self.messages

    def answer(self, text: str) -> None:
        self.turns.append({"role": "assistant", "content": text})

    def undo(self) -> None:
        """Drop an unanswered user message (its generation failed)."""
        if self.turns and self.turns[-1]["role"] == "user":
            self.turns.pop()

    def reset(self) -> None:
        self.turns.clear()


CHAT_HELP = "/reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops an answer."


def chat_loop(engine, args, gen) -> int:
    """One line per turn; the whole history goes through the chat template each turn."""
    from .runtime.decode import Stats

    if not getattr(engine.target.tokenizer, "chat_template", None):
        raise UsageError(f"target {engine.target.name} has no chat template, so it cannot chat: give a prompt")
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        if not args.quiet:
            print(f"duo chat: {CHAT_HELP}", file=sys.stderr, flush=True)
    history = ChatHistory(args.system)
    while True:
        try:
            line = read_line(interactive)
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return EXIT_OK
        except UnicodeDecodeError:
            print("duo: that line is not valid UTF-8; type it again", file=sys.stderr, flush=True)
            continue
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return EXIT_OK
        if cmd == "/reset":
            history.reset()
            if not args.quiet:
                print("(history cleared)", file=sys.stderr, flush=True)
            continue
        if cmd == "/help":
            print(CHAT_HELP, file=sys.stderr, flush=True)
            continue
        if not cmd:
            continue
        messages = history.ask(line.rstrip("\r\n"))
        if args.verbose:
            ids = engine.encode(messages)
            text = engine.target.tokenizer.decode(ids)
            log.info("turn %d: %d messages, %d prompt tokens: %s", len(history.turns) // 2 + 1, len(messages),
                     len(ids), json.dumps(text[-4000:], ensure_ascii=False))
        answer, stats = [], Stats()
        try:
            for _, piece in engine.stream_tokens(messages, stats=stats, **gen):
                if piece:
                    answer.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr, end="", flush=True)
        except UsageError as e:         # e.g. the history no longer fits the context window
            history.undo()
            print(f"duo: error: {e}" + ("; /reset starts over" if "context window" in str(e) else ""),
                  file=sys.stderr, flush=True)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.answer("".join(answer))
        if args.stats:
            print(stats_line(stats.as_dict()), file=sys.stderr, flush=True)


def read_line(interactive: bool) -> str:
    """One line of input: with line editing on a terminal, else from stdin as UTF-8 (EOFError at the end)."""
    if interactive:
        return input("> ")
    if sys.stderr.isatty():
        print("> ", end="", file=sys.stderr, flush=True)
    data = sys.stdin.buffer.readline()
    if not data:
        raise EOFError
    return data.decode("utf-8")


# ----------------------------------------------------------------------------- duo bench / models
def cmd_bench(args) -> int:
    from bench.run import main as bench_main
    return bench_main(args)


def cmd_models(args) -> int:
    from . import models
    if args.models_command == "pull":
        registry = models.load_registry()
        if args.name not in registry.models:
            raise UsageError(f"unknown model alias '{args.name}': known aliases are "
                             f"{', '.join(sorted(registry.models))} (see 'duo models list')")
        print(models.pull_alias(args.name, convert=not args.no_convert, progress=not args.quiet, registry=registry))
        return EXIT_OK
    rows = models.list_models()
    print(f"{'alias':22} {'role':7} {'size':>9}  {'pulled':6}  {'torch':6}  description")
    for r in rows:
        size = f"{r['size'] / 2**20:.0f} MiB" if r.get("size") else "-"
        print(f"{r['alias']:22} {r['role']:7} {size:>9}  {'yes' if r['pulled'] else 'no':6}  "
              f"{'yes' if r.get('converted') else '-' if r['role'] != 'target' else 'no':6}  {r.get('description', '')}")
    return EXIT_OK


# ----------------------------------------------------------------------------- main
class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same clean-up runs."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _interrupt_code(e: BaseException) -> int:
    return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPT


def error_line(e: BaseException, verbose: bool) -> tuple[str, int]:
    """The one-line message and the exit code for an exception that reached main()."""
    from .models import ModelError

    if isinstance(e, DuoError):
        msg, code = str(e), e.exit_code
    elif isinstance(e, ModelError):     # models.py's errors are written for the user; none reaches here as usage
        msg, code = str(e), EXIT_RUNTIME
    elif isinstance(e, MemoryError):
        msg, code = "out of memory: close other programs or use a smaller model", EXIT_RUNTIME
    else:
        first = (str(e).strip().splitlines() or [""])[0]
        msg = f"unexpected {type(e).__name__}: {first} (run with --debug for the traceback)"
        code = EXIT_RUNTIME
    lines = msg.strip().splitlines() or [type(e).__name__]
    if len(lines) > 1 and not verbose:
        return f"{lines[0]} (run with -v for details)", code
    return "\n".join(lines), code


def main(argv: list[str] | None = None) -> int:
    """The `duo` command; returns the exit code. argv=None means the real command line (sys.argv)."""
    code = _main(argv)
    if argv is None:
        # As the command: the Engine is closed and the output written by now. Tearing down torch and
        # transformers at interpreter exit takes a second or more; an interrupted run skips it, and
        # another Ctrl-C during it just ends the process (no "exception ignored" noise).
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        if code in (EXIT_INTERRUPT, EXIT_TERMINATED):
            os._exit(code)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    return code


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    verbose, debug = args.verbose, args.debug
    setup_logging(verbose, args.quiet and not verbose)
    if sys.stdout.encoding and sys.stdout.encoding.lower().replace("-", "") != "utf8":
        sys.stdout.reconfigure(errors="replace")     # never crash on a character the terminal cannot show
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except KeyboardInterrupt as e:
        print("\nduo: interrupted", file=sys.stderr, flush=True)
        return _interrupt_code(e)
    except BrokenPipeError:             # `duo run ... | head`: the reader has gone, which is fine
        _silence_stdout()
        return EXIT_RUNTIME
    except Exception as e:  # noqa: BLE001 - one line unless --debug
        if debug:
            raise
        msg, code = error_line(e, verbose)
        print(f"duo: error: {msg}", file=sys.stderr, flush=True)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
