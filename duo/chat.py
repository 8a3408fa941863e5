"""`duo run`'s generation, once the engine is loaded: one answer streamed to stdout (`run_once`), or the
chat (`chat_loop`: one line per turn, the whole `ChatHistory` through the chat template each turn); the
stats and plan lines on stderr. duo.cli parses the command line and builds the engine.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
import sys
import time

from .exits import EXIT_OK, interrupt_code
from .errors import UsageError

log = logging.getLogger("duo")


def stats_line(st: dict) -> str:
    sources = {k: v["accepted"] for k, v in st.get("sources", {}).items() if v.get("accepted")}
    return (f"{st.get('new_tokens', 0)} tok  {st.get('tokens_per_s', 0):.1f} tok/s  "
            f"accept {st.get('acceptance_rate', 0):.0%}  {st.get('mean_accepted_len', 0):.2f} tok/pass  "
            f"mode {st.get('mode')}"
            + (f"  accepted from {', '.join(f'{k} {v}' for k, v in sources.items())}" if sources else "")
            + (f"  draft adapter {Path(st['adapter']).name}" if st.get("adapter") else "")
            + (f"  verify {st['verify']}" if st.get("verify", "eager") != "eager" else "")
            + (f"  fallback: {st['fallback']}" if st.get("fallback") else ""))


def target_line(engine) -> str:
    """The target as it runs: its precision (never switched silently), device and memory."""
    t = engine.target
    return f"target {t.name}: {t.precision} on {t.device}, {t.footprint / 2**30:.2f} GiB of weights"


def plan_line(engine) -> str:
    """How this engine generates: the plan and where it came from, and the draft's llama.cpp configuration."""
    p = engine.plan
    if p.mode == "target" or engine.draft_ref is None:
        return f"plan: the target alone, {p.target_threads} threads ({p.source})"
    out = (f"plan: {p.mode}, budget {p.budget}{' (adaptive)' if p.adaptive else ''}, width {p.width}, {p.shape} "
           f"tree, draft {p.draft_threads} / target {p.target_threads} threads ({p.source})")
    v = engine.draft_llama
    r = v.result(v.chosen) if v is not None else None
    return out + (f"; draft in llama.cpp: {engine.draft_ref.weights}, {v.chosen}, {r.ms_per_token:.1f} ms/token"
                  if r else "")


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
        code = interrupt_code(e)
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
