"""Retrieval datastores: `duo datastore build` / `info` on a small corpus, and the suffix index on its own.

The CLI runs with the tiny pair's tokenizer (--model its HF directory): in this process for the builds
(duo.cli.main, transformers imported once), as a real process for the usage errors (exit code 2, one
line on stderr, no traceback). What the datastore must hold is computed here with the same tokenizer
from the files written here, never copied from a run. The index is checked against a brute-force search
on tiny random corpora.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from duo.cli import main as cli_main
from duo.datastore.index import SEP, SuffixIndex

WINDOW = 16
DEPTH = 8


# ----------------------------------------------------------------------------- helpers
def duo(*args, timeout: float = 120):
    """`python -m duo ARGS` as a real process: the CompletedProcess with text out/err."""
    p = subprocess.run([sys.executable, "-m", "duo", *map(str, args)], capture_output=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "100"})
    p.out, p.err = p.stdout.decode(), p.stderr.decode()
    return p


def assert_usage_error(p, *needles: str) -> str:
    assert "Traceback" not in p.err, p.err
    assert p.returncode == 2, (p.returncode, p.err)
    lines = p.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("duo: error: "), p.err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def run_cli(*args) -> tuple[int, str, str]:
    """duo.cli.main(ARGS) in this process: (exit code, stdout, stderr), undoing what main sets up."""
    keys = ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "DUO_VERBOSE")
    env = {k: os.environ.get(k) for k in keys}
    log = logging.getLogger("duo")
    saved = log.handlers[:], log.level, log.propagate
    out, err = io.StringIO(), io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main([*map(str, args)])
    finally:
        log.handlers[:], log.level, log.propagate = saved
        for k, v in env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return code, out.getvalue(), err.getvalue()


def words(rng, n: int) -> str:
    """n random made-up words: text whose 16-token windows occur nowhere else."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return " ".join("".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(n))


def expected_continuation(ids: list[int], end: int, depth: int = DEPTH) -> list[int]:
    """The `depth` tokens after ids[:end], -1 past the document's end."""
    tail = ids[end:end + depth]
    return tail + [-1] * (depth - len(tail))


def found_with(index: SuffixIndex, ids: list[int], start: int) -> tuple[int, list[list[int]]]:
    """(matched length, continuation rows) for the window ids[start:start + WINDOW]."""
    m = index.longest_suffix(ids[start:start + WINDOW], max_len=WINDOW)
    return m.length, index.continuations(m, DEPTH).tolist()


# ----------------------------------------------------------------------------- a corpus
@pytest.fixture(scope="module")
def model_dir(tiny_pair) -> Path:
    return tiny_pair.target_hf_dir


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A source tree and a conversation file; which documents the datastore must hold, and which not."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    (src / "pkg" / "sub").mkdir(parents=True)
    (src / ".hidden").mkdir()
    kept = {
        src / "pkg" / "a.py": f"def alpha():\n    return '{words(rng, 120)}'\n",
        src / "pkg" / "sub" / "b.py": f"# {words(rng, 150)}\nclass Beta:\n    pass\n",
        src / "notes.txt": words(rng, 80) + "\n",
    }
    for path, text in kept.items():
        path.write_text(text)
    (src / "pkg" / "copy_of_a.py").write_text(kept[src / "pkg" / "a.py"])        # a duplicate
    (src / "pkg" / "blob.py").write_bytes(b"\x89PNG\0\0" + rng.bytes(2000))     # binary
    (src / "pkg" / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)  # not UTF-8
    (src / "pkg" / "empty.py").write_text("")
    ignored = {src / ".hidden" / "h.py": words(rng, 60), src / "pkg" / "data.csv": words(rng, 60)}
    for path, text in ignored.items():
        path.write_text(text)
    openai = [{"role": "user", "content": words(rng, 30)}, {"role": "assistant", "content": words(rng, 40)}]
    sharegpt = [{"from": "human", "value": words(rng, 30)}, {"from": "gpt", "value": words(rng, 40)}]
    plain = words(rng, 50)
    chats = root / "chats.jsonl"
    chats.write_text("\n".join([json.dumps({"messages": openai}),
                                json.dumps({"conversations": sharegpt}),
                                "{this is not json",
                                json.dumps({"text": plain})]) + "\n")
    return {"root": root, "src": src, "chats": chats, "kept": kept, "ignored": ignored, "openai": openai,
            "sharegpt": [{"role": {"human": "user", "gpt": "assistant"}[m["from"]], "content": m["value"]}
                         for m in sharegpt], "plain": plain}


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def documents(corpus, tokenizer) -> list[list[int]]:
    """The token ids of every document the datastore must hold."""
    texts = list(corpus["kept"].values())
    texts += [tokenizer.apply_chat_template(corpus[k], tokenize=False) for k in ("openai", "sharegpt")]
    return [encode(tokenizer, t) for t in texts + [corpus["plain"]]]


@pytest.fixture(scope="module")
def built(corpus, model_dir, tmp_path_factory):
    """(datastore path, exit code, stdout, stderr) of one build of the corpus."""
    out = tmp_path_factory.mktemp("built") / "ds"
    code, stdout, stderr = run_cli("datastore", "build", out, "--from", corpus["src"], corpus["chats"],
                                   "--model", model_dir)
    return out, code, stdout, stderr


@pytest.fixture
def index(built):
    ix = SuffixIndex.open(built[0])
    yield ix
    ix.close()


# ----------------------------------------------------------------------------- build
def test_build_succeeds_with_a_summary(built, documents):
    out, code, stdout, stderr = built
    assert code == 0, stderr
    assert stderr == ""
    tokens = sum(map(len, documents))
    assert f"{tokens:,} in {len(documents)} documents" in stdout, stdout
    assert "retrieval" in stdout and "ms median" in stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["ds"]        # no .partial left


def test_windows_of_a_file_are_found_with_what_follows(index, corpus, tokenizer):
    for text in corpus["kept"].values():
        ids = encode(tokenizer, text)
        assert len(ids) > 3 * WINDOW
        for start in (0, len(ids) // 2, len(ids) - WINDOW - 3):     # the last one runs past the end
            length, rows = found_with(index, ids, start)
            assert length == WINDOW
            assert expected_continuation(ids, start + WINDOW) in rows


def test_conversations_are_rendered_with_the_chat_template(index, corpus, tokenizer):
    assert tokenizer.chat_template
    for key in ("openai", "sharegpt"):
        rendered = tokenizer.apply_chat_template(corpus[key], tokenize=False)
        assert "<|im_start|>" in rendered
        ids = encode(tokenizer, rendered)
        start = len(ids) - WINDOW - 4
        length, rows = found_with(index, ids, start)
        assert length == WINDOW and expected_continuation(ids, start + WINDOW) in rows
    ids = encode(tokenizer, corpus["plain"])
    assert found_with(index, ids, 5)[0] == WINDOW


def test_skipped_files_are_counted_and_left_out(built, index, corpus, tokenizer, documents, model_dir):
    meta = json.loads((built[0] / "meta.json").read_text())
    assert meta["files"] == {"read": len(corpus["kept"]) + 1, "skipped": 2, "duplicates": 1, "empty": 1}
    assert meta["bad_lines"] == 1 and meta["capped"] is False
    assert meta["documents"] == len(documents)
    assert meta["tokens"] == sum(map(len, documents))
    assert meta["n_tokens"] == meta["tokens"] + meta["documents"] == len(index)
    assert meta["model"] == model_dir.name and meta["vocab_size"] == len(tokenizer)
    assert meta["sources"] == [str(corpus["src"].resolve()), str(corpus["chats"].resolve())]
    assert meta["retrieval"]["n"] > 0 and meta["retrieval"]["median_ms"] > 0
    assert meta["build_seconds"]["total"] >= meta["build_seconds"]["suffix_array"]
    assert meta["size_bytes"] >= 8 * len(index) and meta["peak_memory_bytes"] > 0
    for text in corpus["ignored"].values():       # a hidden directory, an extension not asked for
        assert found_with(index, encode(tokenizer, text), 3)[0] < WINDOW


def test_ext_chooses_the_files_of_directories(corpus, model_dir, tokenizer, tmp_path):
    code, _, err = run_cli("datastore", "build", tmp_path / "ds", "--from", corpus["src"], "--ext", ".csv",
                           "--model", model_dir)
    assert code == 0, err
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["extensions"] == ["csv"] and meta["files"]["read"] == 1
    assert meta["tokens"] == len(encode(tokenizer, corpus["ignored"][corpus["src"] / "pkg" / "data.csv"]))


def test_max_tokens_caps_and_force_replaces(corpus, model_dir, tmp_path):
    out = tmp_path / "ds"
    assert run_cli("datastore", "build", out, "--from", corpus["src"], "--model", model_dir)[0] == 0
    full = json.loads((out / "meta.json").read_text())["tokens"]
    cap = full // 3
    code, stdout, err = run_cli("datastore", "build", out, "--from", corpus["src"], "--model", model_dir,
                                "--max-tokens", cap, "--force")
    assert code == 0, err
    assert "stopped at --max-tokens" in stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokens"] == cap < full and meta["capped"] is True
    with contextlib.closing(SuffixIndex.open(out)) as ix:
        assert len(ix) == cap + meta["documents"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_a_failed_build_leaves_nothing(corpus, model_dir, tmp_path, monkeypatch):
    def broken_save(self, out, meta):
        Path(out).mkdir(parents=True)
        (Path(out) / "tokens.be").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SuffixIndex, "save", broken_save)
    code, stdout, err = run_cli("datastore", "build", tmp_path / "ds", "--from", corpus["src"], "--model", model_dir)
    assert code == 1 and stdout == "" and err.count("\n") == 1 and "No space left" in err, err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the tokenizer
def test_tokenizer_of_a_gguf_without_converting_it(tiny_pair, tokenizer, tmp_path, monkeypatch):
    from duo.datastore.build import load_tokenizer
    from duo.registry import SOURCE_FILE, converted_dir

    monkeypatch.setenv("DUO_CACHE", str(tmp_path / "cache"))
    name, from_gguf, source = load_tokenizer(str(tiny_pair.target_gguf))
    assert (name, source) == ("target", tiny_pair.target_gguf)
    text = "def f(x):\n    return x + 1  # café <|im_end|>"
    assert len(from_gguf) == len(tokenizer) and encode(from_gguf, text) == encode(tokenizer, text)
    assert not (tmp_path / "cache").exists()                    # nothing converted, nothing cached
    converted = converted_dir(tiny_pair.target_gguf)            # a conversion in the cache is preferred
    shutil.copytree(tiny_pair.target_hf_dir, converted, ignore=shutil.ignore_patterns("*.safetensors"))
    (converted / SOURCE_FILE).write_text("{}")
    assert load_tokenizer(str(tiny_pair.target_gguf))[2] == converted


def test_a_directory_without_a_tokenizer_is_a_usage_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "f.txt").write_text("some text")
    assert_usage_error(duo("datastore", "build", tmp_path / "ds", "--from", tmp_path / "f.txt", "--model", tmp_path),
                       "has no tokenizer")


# ----------------------------------------------------------------------------- usage errors
def test_out_existing_is_a_usage_error(corpus, built, tmp_path):
    assert_usage_error(duo("datastore", "build", built[0], "--from", corpus["src"]), str(built[0]), "--force")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert_usage_error(duo("datastore", "build", other, "--from", corpus["src"], "--force"), "not a datastore")
    assert (other / "keep.txt").read_text() == "mine"


def test_bad_inputs_are_usage_errors(corpus, tmp_path):
    out = tmp_path / "ds"
    assert_usage_error(duo("datastore", "build", out, "--from", tmp_path / "missing"), "does not exist",
                       str(tmp_path / "missing"))
    assert_usage_error(duo("datastore", "build", out, "--from", corpus["src"], "--ext", "zzz"), "no input files")
    assert_usage_error(duo("datastore", "build", out, "--from", corpus["src"], "--max-tokens", "0"), "--max-tokens")
    assert_usage_error(duo("datastore", "build", out, "--from", corpus["src"], "--model", tmp_path / "no.gguf"),
                       "not found")
    assert not out.exists()


# ----------------------------------------------------------------------------- info
def test_info_prints_the_meta_and_a_timing(built, documents, model_dir):
    code, stdout, err = run_cli("datastore", "info", built[0])
    assert code == 0, err
    assert f"{sum(map(len, documents)):,} in {len(documents)} documents" in stdout
    assert model_dir.name in stdout and "(now)" in stdout
    code, stdout, err = run_cli("datastore", "info", built[0], "--json")
    assert code == 0, err
    info = json.loads(stdout)
    meta = json.loads((built[0] / "meta.json").read_text())
    assert {k: info[k] for k in meta} == meta
    assert info["retrieval_now"]["n"] > 0 and info["retrieval_now"]["max_ms"] >= info["retrieval_now"]["median_ms"] > 0


def test_info_on_what_is_not_a_datastore(built, tmp_path):
    assert_usage_error(duo("datastore", "info", tmp_path), "not a datastore", "duo datastore build")
    assert_usage_error(duo("datastore", "info", tmp_path / "missing"), "does not exist")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in built[0].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    with open(broken / "sa.i32", "r+b") as f:
        f.truncate(8)
    assert_usage_error(duo("datastore", "info", broken), "wrong size", "rebuild")


# ----------------------------------------------------------------------------- the index on its own
def brute_force(documents, context, max_len: int, depth: int):
    """(length, occurrence count, sorted continuation rows) of the longest suffix of context found."""
    corpus = [t for d in documents for t in [*d, SEP]]
    for length in range(min(max_len, len(context)), 0, -1):
        pattern = list(context[len(context) - length:])
        starts = [i for i in range(len(corpus) - length + 1) if corpus[i:i + length] == pattern]
        if starts:
            rows = []
            for s in starts:
                row = corpus[s + length:s + length + depth]
                row = row[:row.index(SEP)] if SEP in row else row
                rows.append(row + [-1] * (depth - len(row)))
            return length, len(starts), sorted(rows)
    return 0, 0, []


@pytest.mark.parametrize("seed", range(6))
def test_index_against_brute_force(seed, tmp_path):
    rng = np.random.default_rng(seed)
    alphabet = int(rng.integers(2, 6))
    documents = [rng.integers(0, alphabet, size=int(rng.integers(0, 40))).tolist() for _ in range(int(rng.integers(1, 6)))]
    index = SuffixIndex.build(documents)
    if seed % 2:                                   # the same through the files on disk
        index.save(tmp_path / "ds", {})
        index = SuffixIndex.open(tmp_path / "ds")
    for _ in range(40):
        context = rng.integers(0, alphabet + 1, size=int(rng.integers(1, 12))).tolist()   # alphabet: absent
        max_len, depth = int(rng.integers(1, 10)), int(rng.integers(1, 6))
        length, count, rows = brute_force(documents, context, max_len, depth)
        m = index.longest_suffix(context, max_len=max_len)
        assert (m.length, m.count) == (length, count), (documents, context, max_len)
        cont = index.continuations(m, depth, max_occurrences=10**6)
        assert sorted(cont.tolist()) == rows
        assert not (cont == SEP).any()
    absent = index.longest_suffix([alphabet + 1], max_len=4)
    assert absent.length == 0 and index.continuations(absent, 3).shape == (0, 3)


def test_continuations_end_at_a_document_end():
    index = SuffixIndex.build([[5, 6, 7], [5, 6, 8, 9, 10]])
    m = index.longest_suffix([1, 5, 6], max_len=4)
    assert (m.length, m.count) == (2, 2)
    assert sorted(index.continuations(m, 4).tolist()) == [[7, -1, -1, -1], [8, 9, 10, -1]]
    last = index.longest_suffix([9, 10])
    assert index.continuations(last, 2).tolist() == [[-1, -1]]      # at the corpus's end: -1, nothing read past it
