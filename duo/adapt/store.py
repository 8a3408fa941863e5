"""A pair's accepted adapters: <pair>/adapters/adapter-<time>.gguf, and latest.json naming the one in use.

    --adapter auto    the pair's latest accepted adapter (none yet: the plain draft)
    --adapter PATH    that file (checked: a LoRA GGUF for this draft)
    --adapter off     the plain draft
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import UsageError
from .lora_gguf import check_adapter

ADAPTER_CHOICES = "auto|PATH|off"


def adapters_dir(pair: Path) -> Path:
    return Path(pair) / "adapters"


def latest(pair: Path) -> Path | None:
    """The pair's latest accepted adapter, if it has one (and the file is still there)."""
    f = adapters_dir(pair) / "latest.json"
    try:
        path = Path(json.loads(f.read_text())["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if path.is_file() else None


def accept(pair: Path, written: Path, summary: dict) -> Path:
    """Make `written` (an adapter file in the pair's adapters dir) the latest, atomically."""
    d = adapters_dir(pair)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "latest.json.part"
    tmp.write_text(json.dumps({"path": str(written), "accepted_at": time.time(), **summary}, indent=1))
    os.replace(tmp, d / "latest.json")
    return written


def new_adapter_path(pair: Path) -> Path:
    adapters_dir(pair).mkdir(parents=True, exist_ok=True)
    return adapters_dir(pair) / f"adapter-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.gguf"


def check_adapter_arg(adapter) -> None:
    if not isinstance(adapter, (str, os.PathLike)) or str(adapter) == "":
        raise UsageError(f"adapter must be {ADAPTER_CHOICES}, got {adapter!r}")


def resolve(adapter: str, pair: Path | None, draft_gguf: Path | None) -> Path | None:
    """The adapter file to apply (None: the plain draft); UsageError for a file that is not one for this draft."""
    check_adapter_arg(adapter)
    if str(adapter) == "off" or draft_gguf is None:
        return None
    if str(adapter) == "auto":
        path = latest(pair) if pair is not None else None
    else:
        path = Path(adapter).expanduser()
    if path is not None:
        check_adapter(path, draft_gguf)
    return path
