"""`duo run`, the chat and the Python API, used as a user would.

The command line runs as a real process (`python -m duo ...`): exit codes, stdout and stderr are the
real ones. Every error is one line on stderr naming the problem and the fix, exit code 2 for a usage
error and 1 for a failure at run time, and never a traceback. Successful runs print the answer only.
The API tests check `generate`, `stream` (complete UTF-8 pieces that join to the answer) and the lock
that serves several threads one at a time.
"""
from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from duo import Engine
from duo.chat import ChatHistory
from duo.cli import build_parser
from duo.cli import main as cli_main
from duo.engine import DuoError, TextStream, UsageError

PROMPT = "def fib(n):"
N = 20  # new tokens in the short runs


# ----------------------------------------------------------------------------- helpers
def duo(*args, stdin: bytes | str | None = None, timeout: float = 180, env: dict | None = None):
    """Run `python -m duo ARGS` and return the CompletedProcess (text stdout/stderr, as UTF-8)."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    full_env = {**os.environ, "COLUMNS": "100", **(env or {})}
    p = subprocess.run([sys.executable, "-m", "duo", *map(str, args)], input=data if data is not None else b"",
                       capture_output=True, timeout=timeout, env=full_env)
    p.out, p.err = p.stdout.decode("utf-8"), p.stderr.decode("utf-8")
    return p


def assert_error(p, code: int, *needles: str) -> str:
    """Exit `code`, nothing on stdout, exactly one line 'duo: error: ...' on stderr containing `needles`."""
    assert "Traceback" not in p.err, p.err
    assert p.returncode == code, (p.returncode, p.err)
    assert p.out == "", p.out
    lines = p.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("duo: error: "), p.err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def flags(tiny_pair) -> list[str]:
    return ["--model", str(tiny_pair.target_hf_dir), "--draft", str(tiny_pair.draft_gguf), "--device", "cpu"]


@pytest.fixture(scope="module")
def engine(tiny_pair):
    """The same engine `duo run` builds from `flags` (default mode and budget)."""
    with Engine(str(tiny_pair.target_hf_dir), str(tiny_pair.draft_gguf), device="cpu", progress=False) as e:
        yield e


@pytest.fixture(scope="module")
def reference(engine) -> str:
    """What `duo run -n 20 PROMPT` must print (greedy: the target's own answer)."""
    return engine.generate(PROMPT, max_new_tokens=N).text


@pytest.fixture(scope="module")
def tiny_pair_300(tmp_path_factory):
    """A second tiny pair whose vocabulary has 300 tokens instead of 512."""
    from duo.testing import build_tiny_pair

    cache = os.environ.get("DUO_CACHE")
    out = Path(cache).expanduser() / "tiny" / "vocab300" if cache else tmp_path_factory.mktemp("tiny-vocab300")
    return build_tiny_pair(out, vocab_size=300)


# ----------------------------------------------------------------------------- flags and help
def test_version():
    from duo import __version__

    p = duo("--version")
    assert p.returncode == 0 and p.out.strip() == f"duo {__version__}"


RUN_FLAGS = ["--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--stop", "--system", "--device",
             "--dtype", "--budget", "--mode", "--stats", "--json", "--quiet", "--verbose", "--model", "--draft",
             "--raw", "--chat", "--debug"]


def test_run_help_has_one_line_per_flag():
    p = duo("run", "--help")
    assert p.returncode == 0 and p.err == ""
    lines = p.out.splitlines()
    for flag in RUN_FLAGS:
        at = [i for i, line in enumerate(lines) if line.startswith("  " + flag + " ") or line.startswith("  " + flag + ",")]
        assert len(at) == 1, (flag, at)
        line = lines[at[0]]
        # the help text sits on the flag's own line, and the next line is another flag or a section
        words = line.split("  ")
        assert len([w for w in words if w.strip()]) >= 2, f"no help text on the line of {flag}: {line!r}"
        nxt = lines[at[0] + 1] if at[0] + 1 < len(lines) else ""
        assert not nxt.startswith(" " * 6), f"help of {flag} spans two lines: {line!r} / {nxt!r}"


def test_flag_names_are_the_same_across_commands():
    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices

    def opts(p):
        return {s for a in p._actions for s in a.option_strings}

    shared = {"--model", "-m", "--draft", "-d", "--device", "--dtype", "--max-new-tokens", "-n", "--temperature",
              "-t", "--seed", "--budget", "--verbose", "-v", "--quiet", "-q", "--debug"}
    assert shared <= opts(subs["run"]) and shared <= opts(subs["bench"])
    output = {"--verbose", "-v", "--quiet", "-q", "--debug"}
    models = subs["models"]._subparsers._group_actions[0].choices
    for action in ("list", "pull"):
        assert output <= opts(models[action])
    if "profile" in subs:
        assert {"--model", "-m", "--draft", "-d", "--device", "--dtype"} | output <= opts(subs["profile"])


# ----------------------------------------------------------------------------- usage errors (exit 2)
@pytest.mark.parametrize("argv, needle", [
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "warm"], "must be a number"),
    (["--temperature", "nan"], "finite"),
    (["--top-p", "0"], "(0, 1]"),
    (["--top-p", "1.5"], "(0, 1]"),
    (["--top-p", "x"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--top-k", "2.5"], "integer"),
    (["--seed", "-3"], "--seed"),
    (["--max-new-tokens", "-5"], "--max-new-tokens"),
    (["--max-new-tokens", "many"], "integer"),
    (["--budget", "0"], "--budget"),
    (["--stop", ""], "non-empty"),
    (["--stop="], "non-empty"),
    (["--device", "tpu"], "unknown device"),
    (["--dtype", "int3"], "unknown dtype"),
    (["--mode", "fast"], "--mode"),
])
def test_bad_flag_values_are_usage_errors(flags, argv, needle):
    line = assert_error(duo("run", *flags, *argv, PROMPT), 2, needle)
    assert "--help" in line  # the fix: where to look


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_empty_prompt(flags, prompt):
    assert_error(duo("run", *flags, prompt), 2, "prompt is empty")
    assert_error(duo("run", *flags, "-", stdin=prompt), 2, "prompt is empty")


def test_invalid_utf8_on_stdin(flags):
    assert_error(duo("run", *flags, "-", stdin=b"def f\xff(x):"), 2, "not valid UTF-8", "offset 5")
    assert_error(duo("run", *flags, stdin=b"\xc3("), 2, "not valid UTF-8")  # a pipe, no '-'


def test_missing_model_files(tiny_pair):
    d, t = str(tiny_pair.draft_gguf), str(tiny_pair.target_hf_dir)
    assert_error(duo("run", "--model", "/nonexistent/target", "--draft", d, "--device", "cpu", PROMPT), 2,
                 "target model not found", "/nonexistent/target", "check the path")
    assert_error(duo("run", "--model", t, "--draft", "/nonexistent/draft.gguf", "--device", "cpu", PROMPT), 2,
                 "draft model not found", "/nonexistent/draft.gguf")
    assert_error(duo("run", "--model", t, "--draft", "no-such-alias", "--device", "cpu", PROMPT), 2,
                 "unknown draft model 'no-such-alias'", "duo models list")


def test_draft_that_is_not_gguf(tiny_pair, tmp_path):
    t = str(tiny_pair.target_hf_dir)
    text = tmp_path / "draft.gguf"
    text.write_text("this is not a model\n")
    assert_error(duo("run", "--model", t, "--draft", text, "--device", "cpu", PROMPT), 2,
                 "not a GGUF file", "convert")
    assert_error(duo("run", "--model", t, "--draft", t, "--device", "cpu", PROMPT), 2,
                 "is a directory", ".gguf file")
    assert_error(duo("run", "--model", tmp_path, "--draft", tiny_pair.draft_gguf, "--device", "cpu", PROMPT), 2,
                 "no config.json")


def test_corrupt_draft_is_a_runtime_error(tiny_pair, tmp_path):
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(Path(tiny_pair.draft_gguf).read_bytes()[:100])
    assert_error(duo("run", "--model", tiny_pair.target_hf_dir, "--draft", bad, "--device", "cpu", PROMPT), 1,
                 "not a valid GGUF file", "download it again")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_model_file(tiny_pair, tmp_path):
    locked = tmp_path / "locked.gguf"
    locked.write_bytes(Path(tiny_pair.draft_gguf).read_bytes())
    locked.chmod(0)
    assert_error(duo("run", "--model", tiny_pair.target_hf_dir, "--draft", locked, "--device", "cpu", PROMPT), 1,
                 "cannot read", "permission")


def test_vocabularies_that_differ(tiny_pair, tiny_pair_300):
    p = duo("run", "--model", tiny_pair.target_hf_dir, "--draft", tiny_pair_300.draft_gguf, "--device", "cpu", PROMPT)
    assert_error(p, 2, "different vocabularies", "300", "512", "same model family")


def test_cuda_without_gpu(flags):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    argv = [f for f in flags if f != "cpu" and f != "--device"]
    assert_error(duo("run", *argv, "--device", "cuda", PROMPT), 2, "no CUDA GPU", "--device cpu")
    assert_error(duo("run", *argv, "--device", "cuda:1", PROMPT), 2, "no CUDA GPU")


def test_prompt_longer_than_the_context_window(flags):
    p = duo("run", *flags, "-", stdin="ab " * 3000)
    assert_error(p, 2, "context window is 2048", "shorten the prompt")


def test_conflicting_flags(flags):
    assert_error(duo("run", *flags, "--chat", "--json", stdin="hi\n"), 2, "--json")
    assert_error(duo("run", *flags, "--chat", PROMPT), 2, "--chat")
    assert_error(duo("run", *flags, "--raw", "--system", "Be brief.", PROMPT), 2, "--system", "--raw")


# ----------------------------------------------------------------------------- out of memory (in-process)
@pytest.fixture
def in_process(monkeypatch):
    """Run cli.main in this process, undoing what it sets up (environment, the duo logger)."""
    for k in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "DUO_VERBOSE"):
        monkeypatch.setenv(k, os.environ.get(k, ""))
    log = logging.getLogger("duo")
    saved = log.handlers[:], log.level, log.propagate
    yield cli_main
    log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]


def test_out_of_memory_while_loading(flags, in_process, monkeypatch, capsys):
    import torch
    import transformers

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total)")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", oom)
    code = in_process(["run", *flags, PROMPT])
    out, err = capsys.readouterr()
    assert code == 1 and out == "", (code, out, err)
    assert err.count("\n") == 1 and err.startswith("duo: error: out of memory loading the target"), err
    assert "--device cpu" in err or "smaller model" in err


def test_out_of_memory_while_generating(flags, in_process, monkeypatch, capsys):
    import torch

    from duo.runtime.target import TargetModel   # the decode loop calls the target's passes through it

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    prefill = TargetModel.prefill
    monkeypatch.setattr(TargetModel, "prefill", oom)      # before the first token (which comes from the prefill)
    code = in_process(["run", *flags, PROMPT])
    out, err = capsys.readouterr()
    assert code == 1 and out == "", (code, out, err)
    assert err.count("\n") == 1 and err.startswith("duo: error: out of memory while generating"), err
    monkeypatch.setattr(TargetModel, "prefill", prefill)
    monkeypatch.setattr(TargetModel, "forward_tree", oom)  # mid-answer: what was shown stays, then the error
    code = in_process(["run", *flags, PROMPT])
    out, err = capsys.readouterr()
    assert code == 1 and len(out) <= 8, (code, out, err)
    assert err.count("\n") == 1 and err.startswith("duo: error: out of memory while generating"), err


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(flags, in_process, monkeypatch, capsys):
    from duo.runtime.target import TargetModel   # the decode loop calls the target's passes through it

    def boom(*a, **k):
        raise RuntimeError("something odd\nsecond line")

    monkeypatch.setattr(TargetModel, "forward_tree", boom)
    assert in_process(["run", *flags, PROMPT]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "something odd" in err and "--debug" in err, err
    with pytest.raises(RuntimeError, match="something odd"):
        in_process(["run", *flags, "--debug", PROMPT])


# ----------------------------------------------------------------------------- successful runs
def test_run_prints_the_answer_only(flags, reference):
    p = duo("run", *flags, "-n", N, PROMPT)
    assert p.returncode == 0, p.err
    assert p.out == reference + "\n"
    assert p.err == ""  # quiet by default: no notices, no library logs, no progress bars


def test_json(flags, reference):
    p = duo("run", *flags, "-n", N, "--json", PROMPT)
    assert p.returncode == 0 and p.err == "", p.err
    obj = json.loads(p.out)
    assert obj["text"] == reference
    st = obj["stats"]
    for key in ("new_tokens", "tokens_per_s", "acceptance_rate", "mean_accepted_len", "mode", "rounds", "drafted",
                "accepted", "ttft_s", "wall_s", "stop_reason", "fallback"):
        assert key in st, key
    assert st["new_tokens"] == N and st["stop_reason"] == "length" and st["mode"] == "sequential"
    assert st["fallback"] is None


def test_prompt_from_stdin(flags, reference):
    for argv in (["-"], []):
        p = duo("run", *flags, "-n", N, *argv, stdin=PROMPT)
        assert p.returncode == 0 and p.err == "", p.err
        assert p.out == reference + "\n"


def test_stop_stats_verbose_and_quiet(flags, reference):
    # a stop string taken from the answer: the output ends just before it
    cut = next(i for i in range(3, len(reference)) if reference[i].isalpha() and reference[i] not in reference[:i])
    p = duo("run", *flags, "-n", N, "--stop", reference[cut], "--stop", "never-seen", "--stats", PROMPT)
    assert p.returncode == 0
    assert p.out == reference[:cut] + "\n"
    target, plan, stats = p.err.splitlines()         # --stats: the target's precision, the plan, then speed and acceptance
    assert target.startswith("duo: target ") and " float32 on cpu, " in target and "GiB of weights" in target, p.err
    assert plan.startswith("duo: plan: ") and "(defaults)" in plan and "draft in llama.cpp" in plan, p.err
    assert "tok/s" in stats and "accept" in stats and "fallback" not in stats, p.err
    p = duo("run", *flags, "-n", "4", "-v", PROMPT)
    assert p.returncode == 0 and "duo: loaded" in p.err and "prompt:" in p.err
    p = duo("run", *flags, "-n", "4", "-q", "--system", "You are terse.", PROMPT)
    assert p.returncode == 0 and p.out.strip("\n") != "" and p.err == ""


def test_mode_budget_and_dtype_flags(flags, reference):
    p = duo("run", *flags, "-n", N, "--mode", "sequential", "--budget", "3", "--json", PROMPT)
    assert p.returncode == 0, p.err
    obj = json.loads(p.out)
    assert obj["text"] == reference  # lossless whatever the budget
    assert obj["stats"]["mode"] == "sequential" and obj["stats"]["drafted"] <= 3 * obj["stats"]["rounds"]
    p = duo("run", *flags, "-n", "4", "--mode", "target", "--dtype", "bfloat16", "--json", PROMPT)
    assert p.returncode == 0, p.err
    obj = json.loads(p.out)
    assert obj["stats"]["mode"] == "target" and obj["stats"]["drafted"] == 0


def test_first_run_measures_a_quick_profile_then_uses_it(flags, reference, tmp_path):
    env = {"DUO_PROFILE": "auto", "DUO_CACHE": str(tmp_path)}      # a machine with no saved profile
    p = duo("run", *flags, "-n", N, "-v", PROMPT, env=env, timeout=600)
    assert p.returncode == 0, p.err
    assert p.out.rstrip("\n") == reference
    assert "no profile yet: measuring this machine" in p.err and "source='profile " in p.err, p.err
    saved = list((tmp_path / "profiles").glob("*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["quick"] is True
    p = duo("run", *flags, "-n", N, "-v", PROMPT, env=env)        # the second run just uses it
    assert p.returncode == 0 and p.out.rstrip("\n") == reference, p.err
    assert "no profile yet" not in p.err and "source='profile " in p.err, p.err


def test_sampling_flags_reach_the_engine(flags, engine):
    args = ["-n", N, "-t", "0.8", "--top-p", "0.9", "--top-k", "40", "--seed", "7", "--json", PROMPT]
    p = duo("run", *flags, *args)
    assert p.returncode == 0, p.err
    expect = engine.generate(PROMPT, max_new_tokens=N, temperature=0.8, top_p=0.9, top_k=40, seed=7).text
    assert json.loads(p.out)["text"] == expect
    assert expect != engine.generate(PROMPT, max_new_tokens=N, temperature=0.8, top_p=0.9, top_k=40, seed=8).text


# ----------------------------------------------------------------------------- chat
def _turn_logs(err: str) -> list[dict]:
    """The -v lines 'duo: turn N: M messages, K prompt tokens: "<prompt>"'."""
    out = []
    for line in err.splitlines():
        if line.startswith("duo: turn "):
            head, _, text = line.partition(" prompt tokens: ")
            out.append({"tokens": int(head.rsplit(" ", 1)[1]), "prompt": json.loads(text)})
    return out


def test_chat_from_stdin_keeps_history_and_resets(flags, engine):
    p = duo("run", *flags, "-n", "12", "--chat", "-v", stdin="hello\nhello\n/reset\nhello\n")
    assert p.returncode == 0, p.err
    answers = p.out.split("\n")[:-1]
    first = engine.generate([{"role": "user", "content": "hello"}], max_new_tokens=12).text
    assert "\n" not in first  # so that the answers are one line each
    assert len(answers) == 3 and answers[0] == first and answers[2] == first, answers
    turns = _turn_logs(p.err)
    assert len(turns) == 3
    assert first in turns[1]["prompt"] and first not in turns[0]["prompt"]  # turn 2 sees the first answer
    assert turns[1]["tokens"] > turns[0]["tokens"]
    assert turns[2] == turns[0]  # after /reset: the first turn's prompt again
    second = engine.generate([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                              {"role": "user", "content": "hello"}], max_new_tokens=12).text
    assert answers[1] == second


def test_chat_on_a_terminal(flags, engine):
    """No prompt and a terminal: the chat (banner, prompt, answer, /exit), through a pseudo-terminal."""
    first = engine.generate([{"role": "user", "content": "hi there"}], max_new_tokens=8).text
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "duo", "run", *flags, "-n", "8"], stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True, env={**os.environ, "TERM": "dumb"})
    os.close(slave)
    seen = bytearray()

    def text() -> str:
        return seen.decode("utf-8", "replace").replace("\r\n", "\n")

    def read_until(done, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert proc.poll() is None and time.monotonic() < deadline, text()
            if select.select([master], [], [], 0.2)[0]:
                seen.extend(os.read(master, 4096))

    try:
        read_until(lambda: text().endswith("> "))
        assert "duo chat:" in text() and "/reset" in text()
        start = len(text())
        os.write(master, b"hi there\n")
        read_until(lambda: first in text()[start:] and text().endswith("> "))
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert "Traceback" not in text()


def test_chat_history_builder(engine):
    h = ChatHistory(system="Be brief.")
    m1 = h.ask("hello")
    assert m1 == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    a1 = engine.generate(m1, max_new_tokens=10).text
    h.answer(a1)
    m2 = h.ask("and then?")
    assert [m["role"] for m in m2] == ["system", "user", "assistant", "user"] and m2[2]["content"] == a1
    prompt2 = engine.target.tokenizer.decode(engine.encode(m2))
    assert a1 in prompt2 and "and then?" in prompt2 and "Be brief." in prompt2
    h.undo()
    assert h.messages == m2[:3]
    h.reset()
    assert h.messages == [{"role": "system", "content": "Be brief."}]


# ----------------------------------------------------------------------------- Ctrl-C
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_prints_what_was_generated_and_leaves_no_process(flags, engine, sig, code):
    long_prompt = "a b c d"  # the tiny target's greedy answer to it runs for 268 tokens (--raw)
    full = engine.generate(long_prompt, max_new_tokens=200, chat=False)
    assert full.stats["new_tokens"] == 200, "the run must still be going when it is interrupted"
    # as from a terminal: SIGINT at its default even when this test runs as a background job (which starts
    # with SIGINT ignored, inherited by the child, so Ctrl-C could never reach it)
    proc = subprocess.Popen([sys.executable, "-m", "duo", "run", *flags, "-n", "1500", "--raw", long_prompt],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.set_blocking(proc.stdout.fileno(), False)
    got, deadline = b"", time.monotonic() + 120
    while len(got) < 8:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
        got += proc.stdout.read() or b""
    kids = psutil.Process(proc.pid).children(recursive=True)
    assert kids, "the draft worker should be running"
    t = time.monotonic()
    proc.send_signal(sig)
    os.set_blocking(proc.stdout.fileno(), True)
    rest, err = proc.communicate(timeout=30)
    took = time.monotonic() - t
    assert proc.returncode == code, err
    assert took < 5, f"took {took:.1f}s to stop"
    assert err.decode().strip().endswith("duo: interrupted") and b"Traceback" not in err
    printed = (got + rest).decode()
    assert printed.endswith("\n") and len(printed) > 1
    assert len(printed) - 1 < len(full.text), "stopped well before the end"
    assert full.text.startswith(printed[:-1])  # what was shown is the start of the answer
    time.sleep(0.5)
    alive = [c for c in kids if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"left behind: {alive}"
    assert list(Path("/dev/shm").glob(f"duo_{proc.pid}_*")) == [], "shared memory left behind"


# ----------------------------------------------------------------------------- the Python API
def test_generate_result(engine, reference):
    r = engine.generate(PROMPT, max_new_tokens=N)
    assert r.text == reference
    assert len(r.token_ids) == N and all(isinstance(t, int) for t in r.token_ids)
    assert r.stats["new_tokens"] == N and r.stats["tokens_per_s"] > 0 and 0 <= r.stats["acceptance_rate"] <= 1


@pytest.mark.parametrize("kw", [
    dict(),
    dict(temperature=0.7, top_p=0.8, top_k=50, seed=11),
    dict(chat=False, temperature=1.0, seed=3),
])
def test_stream_joins_to_generate_and_pieces_are_whole_characters(engine, kw):
    r = engine.generate(PROMPT, max_new_tokens=40, **kw)
    pieces = list(engine.stream(PROMPT, max_new_tokens=40, **kw))
    assert "".join(pieces) == r.text
    assert all(isinstance(p, str) and p for p in pieces)
    for p in pieces:
        p.encode("utf-8")  # strict: no lone surrogates
    # no piece ever showed a half character: the pieces add up to the decoding of all the tokens at once
    assert "".join(pieces) == engine.target.tokenizer.decode(r.token_ids, skip_special_tokens=True)


def test_text_stream_never_splits_a_character(engine):
    tok = engine.target.tokenizer
    text = "héllo ☃ 日本語 😀 — ümlaut ß"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens here
    ts = TextStream(tok)
    pieces = [ts.push([i]) for i in ids] + [ts.finish()]
    assert all("\ufffd" not in p for p in pieces), pieces
    assert "".join(pieces) == text
    ts = TextStream(tok, stop=["本語"])
    pieces = [ts.push([i]) for i in ids]
    assert "".join(pieces) == "héllo ☃ 日" and ts.stopped


@pytest.fixture
def overlap_meter(monkeypatch):
    """Counts generations running at once (wraps the decode loop the Engine runs under its lock)."""
    import duo.runtime.decode as decode

    real = decode.generate_tokens
    meter = {"active": 0, "max": 0, "started": 0}
    guard = threading.Lock()

    def counted(*a, **k):
        with guard:
            meter["active"] += 1
            meter["started"] += 1
            meter["max"] = max(meter["max"], meter["active"])
        try:
            for new in real(*a, **k):
                time.sleep(0.01)  # leave room for another thread to barge in
                yield new
        finally:
            with guard:
                meter["active"] -= 1

    monkeypatch.setattr(decode, "generate_tokens", counted)
    return meter


def test_threads_are_served_one_at_a_time(engine, overlap_meter):
    prompts = [PROMPT, "class Stack:", "import os", PROMPT]
    sequential = [engine.generate(p, max_new_tokens=24).token_ids for p in prompts]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    go = threading.Barrier(len(prompts))

    def work(i):
        try:
            go.wait()
            results[i] = engine.generate(prompts[i], max_new_tokens=24).token_ids
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert [results[i] for i in range(len(prompts))] == sequential
    assert overlap_meter["started"] == 2 * len(prompts) and overlap_meter["max"] == 1


def test_a_second_request_waits_for_the_first(engine, reference, overlap_meter):
    first = engine.stream(PROMPT, max_new_tokens=N)
    head = next(first)  # the first request holds the engine now
    done = threading.Event()
    out = {}

    def second():
        out["text"] = engine.generate("import os", max_new_tokens=8).text
        done.set()

    t = threading.Thread(target=second)
    t.start()
    time.sleep(1.0)
    assert overlap_meter["started"] == 1 and not done.is_set(), "the second request ran during the first"
    rest = "".join(first)
    assert head + rest == reference
    assert done.wait(120)
    t.join()
    assert overlap_meter["max"] == 1
    assert out["text"] == engine.generate("import os", max_new_tokens=8).text


def test_nested_generation_in_one_thread_is_an_error_not_a_deadlock(engine):
    it = engine.stream(PROMPT, max_new_tokens=N)
    next(it)
    with pytest.raises(UsageError, match="already running in this thread"):
        engine.generate("import os", max_new_tokens=4)
    it.close()
    assert engine.generate("import os", max_new_tokens=4).token_ids


@pytest.mark.parametrize("kw, needle", [
    (dict(temperature=-1), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(seed=-1), "seed"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(stop=[""]), "stop"),
    (dict(stop=""), "stop"),
])
def test_api_rejects_bad_values(engine, kw, needle):
    with pytest.raises(UsageError, match=needle):
        engine.generate(PROMPT, **kw)
    with pytest.raises(ValueError):  # a UsageError is also a ValueError
        engine.generate(PROMPT, **kw)


@pytest.mark.parametrize("prompt, needle", [
    ("", "empty"),
    ("  ", "empty"),
    ([], "non-empty"),
    ([{"role": "user"}], "content"),
    ([{"role": "user", "content": 3}], "content"),
    ([10**9], "token ids"),
    ("ab " * 3000, "context window"),
])
def test_api_rejects_bad_prompts(engine, prompt, needle):
    with pytest.raises(UsageError, match=needle):
        engine.generate(prompt, max_new_tokens=4)


def test_api_constructor_errors(tiny_pair, tiny_pair_300):
    t, d = str(tiny_pair.target_hf_dir), str(tiny_pair.draft_gguf)
    with pytest.raises(UsageError, match="not found"):
        Engine("/nonexistent/model", d, device="cpu")
    with pytest.raises(UsageError, match="unknown mode"):
        Engine(t, d, device="cpu", mode="turbo")
    with pytest.raises(UsageError, match="budget"):
        Engine(t, d, device="cpu", budget=0)
    with pytest.raises(UsageError, match="different vocabularies"):
        Engine(t, str(tiny_pair_300.draft_gguf), device="cpu", progress=False)
    assert issubclass(UsageError, DuoError) and not DuoError("x").usage


def test_context_manager_closes_the_worker(tiny_pair):
    with Engine(str(tiny_pair.target_hf_dir), str(tiny_pair.draft_gguf), device="cpu", progress=False) as e:
        worker = psutil.Process(e._draft.worker_pid)
        assert e.generate(PROMPT, max_new_tokens=4).token_ids
    deadline = time.monotonic() + 5
    while worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    with pytest.raises(UsageError, match="closed"):
        e.generate(PROMPT, max_new_tokens=4)
