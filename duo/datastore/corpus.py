"""The inputs of a datastore: the files of the PATHs given, read as documents, and what was skipped.

    collect_files(paths, extensions)          each file PATH, and each directory's files with the extensions
    read_texts(files, tokenizer, counts)      (file number, document text) in order; counts updated

Directories are walked recursively (hidden and cache directories left out), files chosen by extension;
a file given by name is read whatever its extension. Binary or non-UTF-8 files, empty files and files
whose content was already read are skipped and counted. A `.jsonl` file holds one conversation per line:
OpenAI {"messages": [{"role", "content"}]}, ShareGPT {"conversations": [{"from", "value"}]} or {"text"};
a conversation becomes one document rendered with the tokenizer's chat template when it has one (the text
as the target sees it), else its contents joined; a line that is none of these is counted and skipped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import UsageError

DEFAULT_EXTENSIONS = ("py", "pyi", "c", "h", "cc", "cpp", "hpp", "rs", "go", "java", "js", "ts", "sh",
                      "md", "rst", "txt")
SKIPPED_DIRS = {"__pycache__", "node_modules"}      # and every hidden directory (.git, .venv, ...)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}

log = logging.getLogger("duo")


@dataclass
class Counts:
    """What the build read and what it kept."""

    files: int = 0          # files with a document in the corpus
    skipped: int = 0        # binary, undecodable or unreadable files
    duplicates: int = 0     # files whose content was already read
    empty: int = 0          # empty or whitespace-only files
    bad_lines: int = 0      # JSONL lines that are not a conversation
    documents: int = 0
    tokens: int = 0
    capped: bool = False    # stopped at --max-tokens

    def as_meta(self) -> dict:
        return {"tokens": self.tokens, "documents": self.documents, "bad_lines": self.bad_lines, "capped": self.capped,
                "files": {"read": self.files, "skipped": self.skipped, "duplicates": self.duplicates,
                          "empty": self.empty}}


# ----------------------------------------------------------------------------- the files
def normalize_extensions(extensions: Iterable[str] | None) -> list[str]:
    return sorted({e.strip().lstrip(".").lower() for e in (extensions or DEFAULT_EXTENSIONS) if e.strip(". ")})


def collect_files(paths: Iterable[str | Path], extensions: list[str]) -> list[Path]:
    """The files to read: each file PATH as it is, each directory's files with one of the extensions
    (recursively, sorted, hidden and cache directories left out); each file once."""
    files, seen = [], set()
    for p in map(lambda s: Path(s).expanduser(), paths):
        if not p.exists():
            raise UsageError(f"input path {p} does not exist; check the path given to --from")
        found = [p] if not p.is_dir() else walk_directory(p, extensions)
        for f in found:
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files


def walk_directory(root: Path, extensions: list[str]) -> Iterator[Path]:
    wanted = {"." + e for e in extensions}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIPPED_DIRS)
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower() in wanted:
                yield Path(dirpath) / name


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def decode_text(data: bytes) -> str | None:
    """The UTF-8 text of a file (without a byte-order mark), or None if it is binary or not UTF-8."""
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        return None


def read_texts(files: list[Path], tokenizer, counts: Counts, bar=None) -> Iterator[tuple[int, str]]:
    """(file number, document) for the documents of the files, in order (a conversation file gives one per
    line); counts the files skipped, empty and duplicated, and the bad lines."""
    seen_hashes: set[bytes] = set()
    for number, path in enumerate(files):
        try:
            data = path.read_bytes()
        except OSError as e:
            log.info("skipped %s: %s", path, e.strerror)
            data, text = b"", None
        else:
            text = decode_text(data)
        if bar is not None:
            bar.update(len(data))
        if text is None:
            counts.skipped += 1
            continue
        if not text.strip():
            counts.empty += 1
            continue
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if digest in seen_hashes:
            counts.duplicates += 1
            continue
        seen_hashes.add(digest)
        if path.suffix.lower() == ".jsonl":
            for doc in conversation_texts(text, tokenizer, counts):
                yield number, doc
        else:
            yield number, text


# ----------------------------------------------------------------------------- conversations
def conversation_texts(text: str, tokenizer, counts: Counts) -> Iterator[str]:
    """One document per JSONL line; a line that is not a conversation is counted in counts.bad_lines."""
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            doc = conversation_text(json.loads(line), tokenizer)
        except Exception:  # noqa: BLE001 - bad JSON, a wrong shape, a template that refuses it
            counts.bad_lines += 1
            continue
        yield doc


def conversation_text(obj, tokenizer) -> str:
    """An OpenAI, ShareGPT or {"text"} record as the target sees it; ValueError/KeyError/TypeError if not one."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if "messages" in obj:
        messages = [message(m["role"], m.get("content")) for m in obj["messages"]]
    elif "conversations" in obj:
        messages = [message(SHAREGPT_ROLES[m["from"]], m.get("value")) for m in obj["conversations"]]
    elif isinstance(obj.get("text"), str):
        return obj["text"]
    else:
        raise ValueError("no messages, conversations or text")
    if not messages:
        raise ValueError("an empty conversation")
    return render_conversation(messages, tokenizer)


def message(role, content) -> dict:
    if not isinstance(role, str):
        raise TypeError("a role must be a string")
    if content is None:
        content = ""
    elif isinstance(content, list):      # OpenAI content parts: keep the text ones
        content = "".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text")
    elif not isinstance(content, str):
        raise TypeError("content must be a string or a list of parts")
    return {"role": role, "content": content}


def render_conversation(messages: list[dict], tokenizer) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n\n".join(m["content"] for m in messages)
