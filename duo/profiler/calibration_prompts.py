"""The calibration prompts: loading them (JSONL), encoding them for a target's tokenizer, and realistic
filler tokens made of them for the caches the micro-benchmarks time.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..models import CONFIG_DIR
from .timing import BenchError

CALIBRATION_PROMPTS = CONFIG_DIR / "calibration_prompts.jsonl"


def load_prompts(path: str | Path | None = None) -> list[dict]:
    """Calibration prompts: JSONL, one object per line with "messages" (chat) or "prompt" (text)."""
    path = Path(path) if path else CALIBRATION_PROMPTS
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise BenchError(f"cannot read prompts {path}: {e.strerror}") from e
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            msgs = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BenchError(f"{path} line {i + 1}: need a JSON object with \"prompt\" or \"messages\"") from e
        out.append({"id": str(r.get("id", i)), "category": r.get("category", ""), "messages": msgs})
    if not out:
        raise BenchError(f"{path} has no prompts")
    return out


def encode_prompts(tokenizer, prompts: list[dict]) -> list[list[int]]:
    from ..prompt import encode_chat, encode_plain

    if getattr(tokenizer, "chat_template", None):
        return [encode_chat(tokenizer, p["messages"]) for p in prompts]
    return [encode_plain(tokenizer, "\n".join(m["content"] for m in p["messages"])) for p in prompts]


def filler(prompt_ids: list[list[int]], n: int) -> list[int]:
    """n realistic token ids: the prompts concatenated and repeated."""
    flat = [t for ids in prompt_ids for t in ids] or [0]
    return (flat * (n // len(flat) + 1))[:n]
