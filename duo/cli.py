"""Command line: the `duo` parser, `duo run` and `duo models`, logging set-up, errors as exit codes (duo.exits).

Errors are one line on stderr and an exit code, never a traceback (unless --debug):
  0 success, 1 a failure at run time (out of memory, a model that fails to load, a download),
  2 a usage error (bad flags or values, a missing model file, an empty or too long prompt...),
  130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
The distinction is made where the error is raised: duo.errors.UsageError (exit 2) vs DuoError (exit 1);
argparse's own errors are usage errors too.

`duo run`'s generation (one answer, the chat) is in duo.chat; `duo profile` is duo.profiler.cli. Other
modules add commands through the entry point group "duo.commands" (see add_plugin_commands): `duo bench`
is bench.cli:add_parser and `duo datastore` duo.datastore.cli:add_parser, registered in pyproject.toml.
Such a command builds its parser from formatter (here) and the flag helpers of duo.flags, re-exported here:
number, comma_list, add_model_flags, add_generation_flags, add_retrieval_flags, add_adapter_flags, add_common_flags.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import warnings

from . import __version__
from .errors import DuoError, UsageError
from .plan import MODES
from .exits import EXIT_INTERRUPT, EXIT_OK, EXIT_RUNTIME, EXIT_TERMINATED, EXIT_USAGE, Terminated, interrupt_code
from .flags import (add_adapter_flags, add_common_flags, add_generation_flags, add_model_flags,  # noqa: F401
                    add_retrieval_flags, adapter_kwargs, budget_value, comma_list, number, retrieval_kwargs)
from .flags import _stop

COMMANDS_GROUP = "duo.commands"     # entry points: add_parser(subparsers) of a command from another package

log = logging.getLogger("duo")




# ----------------------------------------------------------------------------- parser
class Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2
        self.exit(EXIT_USAGE, f"duo: error: {message} (see '{self.prog} --help')\n")


def formatter(prog):
    return argparse.HelpFormatter(prog, max_help_position=30, width=min(110, max(80, _columns())))


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        return 100


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="duo", formatter_class=formatter,
               description="Speculative decoding: a llama.cpp draft on the CPU, a PyTorch target on the GPU.")
    p.add_argument("--version", action="version", version=f"duo {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")

    # --- duo run -------------------------------------------------------------------------------
    r = sub.add_parser("run", formatter_class=formatter,
                       help="generate text: a prompt, stdin, or an interactive chat",
                       description="Generate from a prompt (the argument, or stdin with '-' or a pipe); "
                                   "with no prompt on a terminal, chat.")
    r.add_argument("prompt", nargs="?", help="the prompt; '-' reads stdin; omit on a terminal to chat")
    add_model_flags(r)
    add_generation_flags(r, default_max=512, sampling=True)
    add_retrieval_flags(r)
    add_adapter_flags(r)
    g = r.add_argument_group("run")
    g.add_argument("--stop", action="append", type=_stop, default=[], metavar="TEXT",
                   help="stop before TEXT (repeatable)")
    g.add_argument("--system", metavar="TEXT", help="system message for the chat template")
    g.add_argument("--raw", action="store_true", help="no chat template: continue the prompt as plain text")
    g.add_argument("--chat", action="store_true", help="chat even if stdin is not a terminal (a line per turn)")
    g.add_argument("--mode", choices=["auto", *MODES], default="auto", metavar="MODE",
                   help="auto, overlap, sequential, or target (no draft)")
    g.add_argument("--profile", choices=["auto", "saved", "off"], default=os.environ.get("DUO_PROFILE", "auto"),
                   metavar="P", help="with --budget/--mode auto: auto (quick profile if none is saved), saved, off")
    g.add_argument("--stats", action="store_true", help="speed and acceptance on stderr")
    g.add_argument("--json", action="store_true", help="print one JSON object: text and stats")
    add_common_flags(r)
    r.set_defaults(func=cmd_run)

    # --- commands of other packages (duo bench) ---------------------------------------------------
    add_plugin_commands(sub)

    # --- duo models ----------------------------------------------------------------------------
    m = sub.add_parser("models", formatter_class=formatter, help="list or pull models",
                       description="Manage the model cache ($DUO_CACHE or ~/.cache/duo). Default action: list.")
    msub = m.add_subparsers(dest="models_command", parser_class=Parser, metavar="ACTION")
    add_common_flags(msub.add_parser("list", formatter_class=formatter, help="known aliases and what is cached"))
    pull = msub.add_parser("pull", formatter_class=formatter, help="fetch a model into the cache")
    pull.add_argument("name", help="alias to pull (see 'duo models list')")
    pull.add_argument("--no-convert", action="store_true", help="do not convert a target to torch weights")
    add_common_flags(pull)
    m.set_defaults(func=cmd_models, verbose=False, quiet=False, debug=False)

    # --- duo profile ---------------------------------------------------------------------------
    from .profiler import cli as profiler_cli
    pr = profiler_cli.add_profile_parser(sub)
    pr.set_defaults(func=profiler_cli.main)
    return p


def add_plugin_commands(sub) -> None:
    """The commands other packages register as entry points in the group "duo.commands" (by name): each
    is a function add_parser(subparsers) that adds its subcommand and sets its `func` (args -> exit code).
    One that fails to load is left out, with a warning, so that the other commands still work; duo's own
    command names (run, models, profile) are never taken."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        if ep.name in sub.choices or ep.name in ("run", "models", "profile"):
            continue
        try:
            add_parser = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break duo
            print(f"duo: warning: command {ep.name!r} ({ep.value}) is left out: it failed to load "
                  f"({type(e).__name__}: {e})", file=sys.stderr, flush=True)
            continue
        add_parser(sub)


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

    from .chat import chat_loop, plan_line, run_once, target_line
    from .engine import Engine

    note(args, "loading models...")
    t = time.perf_counter()
    with Engine(args.model, args.draft, device=args.device, dtype=args.dtype, budget=args.budget,
                mode=args.mode, progress=not args.quiet, profile=args.profile, compile=args.compile,
                draft_quant=args.draft_quant,
                **retrieval_kwargs(args), **adapter_kwargs(args)) as engine:
        log.info("loaded %s + %s on %s in %.1fs; plan %s", engine.target.name,
                 engine.draft_ref.name if engine.draft_ref else "no draft", engine.target.device,
                 time.perf_counter() - t, engine.plan)
        if args.stats:
            print(f"duo: {target_line(engine)}\nduo: {plan_line(engine)}", file=sys.stderr, flush=True)
        else:
            note(args, target_line(engine))
        if chat:
            return chat_loop(engine, args, gen)
        return run_once(engine, args, prompt, gen)


# ----------------------------------------------------------------------------- duo models
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
def _on_sigterm(signum, frame):
    raise Terminated()


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
        return interrupt_code(e)
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
