"""Build a retrieval datastore: read a corpus, tokenize it with the target's tokenizer, index it by suffix.

    load_tokenizer(model_spec)                                  (name, tokenizer, source), no weights loaded
    build_datastore(out, paths, model=None, extensions=None, max_tokens=None, force=False) -> meta
    measure_retrieval(index)                                    median / max ms of one retrieval

The inputs (directories, text files, .jsonl conversations) are read by duo.datastore.corpus. Token ids
are int32, tokenized in batches by the fast tokenizer; the documents go to duo.datastore.index
(SuffixIndex), written into OUT.partial and renamed to OUT when complete. meta.json records the model, its
vocabulary size (len(tokenizer)), the counts, the build's timings, its size and peak memory, and the
retrieval time measured on 16-token windows of the corpus itself. In meta, "tokens" counts the
documents' tokens; "n_tokens" (the index's) adds one separator per document.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import DuoError, UsageError
from .index import SEP, SuffixIndex, timed_search
from .corpus import DEFAULT_EXTENSIONS, Counts, collect_files, file_size, normalize_extensions, read_texts

__all__ = ["DEFAULT_EXTENSIONS", "build_datastore", "load_tokenizer", "measure_retrieval", "sample_contexts"]

STORAGE_DTYPES = ("float32", "bfloat16", "float16")  # the dtypes a converted target is cached in
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
BATCH_CHARS = 1 << 20           # characters of text per tokenizer call
WINDOW = 16                     # tokens of context in a retrieval timing
TIMING_CONTEXTS = 200           # contexts in a retrieval timing

log = logging.getLogger("duo")


# ----------------------------------------------------------------------------- the tokenizer
def load_tokenizer(model_spec: str | None, progress: bool = True):
    """(name, tokenizer, source): the target's tokenizer for a `duo run --model` spec (None: the default
    target), without loading or converting its weights. A converted torch directory in the cache is used
    when there is one, a Hugging Face directory directly, else the tokenizer in the GGUF."""
    from .. import models
    from ..arguments import check_model_arg
    from ..gguf_file import quiet_transformers

    registry = models.load_registry()
    spec = model_spec or registry.default_target
    check_model_arg(spec, "target", registry)
    try:
        name, directory, gguf_name = tokenizer_location(spec, registry, progress)
    except models.ModelError as e:
        raise DuoError(str(e)) from e
    from transformers import AutoTokenizer

    source = directory / gguf_name if gguf_name else directory
    try:
        with quiet_transformers(verbose=log.isEnabledFor(logging.INFO)):
            tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_name)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the user needs one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DuoError(f"cannot load the tokenizer of {name} from {source} ({first}); pass a Hugging Face "
                       f"directory with tokenizer files, a .gguf file or a built-in alias") from e
    return name, tokenizer, source


def tokenizer_location(spec: str, registry, progress: bool) -> tuple[str, Path, str | None]:
    """(model name, directory, GGUF file name in it or None) holding the tokenizer of a checked spec."""
    from .. import models

    if spec in registry.models:
        converted = [models.torch_dir(spec, dt) for dt in STORAGE_DTYPES]
        done = next((d for d in converted if models.is_converted(d)), None)
        if done is not None:
            return spec, done, None
        gguf = models.pull(spec, progress, registry=registry)
        return spec, gguf.parent, gguf.name
    path = Path(spec).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise UsageError(f"target model directory {path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                             f"pass a Hugging Face directory with its tokenizer, a .gguf file or a built-in alias")
        return path.resolve().name, path, None
    converted = [models.converted_dir(path, dt) for dt in STORAGE_DTYPES]
    done = next((d for d in converted if models.is_converted(d)), None)
    return path.stem, (done or path.parent), (None if done else path.name)


# ----------------------------------------------------------------------------- tokenizing
def text_batches(texts: Iterable[tuple[int, str]], batch_chars: int = BATCH_CHARS) -> Iterator[list[tuple[int, str]]]:
    batch, chars = [], 0
    for item in texts:
        batch.append(item)
        chars += len(item[1])
        if chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_texts(texts: Iterable[tuple[int, str]], tokenizer, counts: Counts,
                   max_tokens: int | None) -> list[np.ndarray]:
    """int32 token ids of each non-empty document of (file number, text), tokenized in batches; stops at
    max_tokens (the last document cut). counts.files: the files with a document kept."""
    documents, last_file = [], -1
    for batch in text_batches(texts):
        encoded = tokenizer([text for _, text in batch], add_special_tokens=False)["input_ids"]
        for (file_number, _), ids in zip(batch, encoded):
            if not ids:
                continue
            doc = np.asarray(ids, dtype=np.int32)
            if max_tokens is not None and counts.tokens + len(doc) >= max_tokens:
                doc = doc[:max_tokens - counts.tokens]
                counts.capped = True
            documents.append(doc)
            counts.documents += 1
            counts.tokens += len(doc)
            counts.files += file_number != last_file
            last_file = file_number
            if counts.capped:
                return documents
    return documents


# ----------------------------------------------------------------------------- measuring
def sample_contexts(index: SuffixIndex, n: int = TIMING_CONTEXTS, window: int = WINDOW, seed: int = 0) -> list:
    """Up to n windows of `window` tokens of the corpus (none across a document's end), for timed_search."""
    tokens = index.tokens
    if len(tokens) <= window:
        return []
    starts = np.random.default_rng(seed).integers(0, len(tokens) - window + 1, size=8 * n)
    windows = tokens[starts[:, None] + np.arange(window)]
    inside = ~(windows == SEP).any(axis=1)
    return [w.astype(np.int64) for w in windows[inside][:n]]


def measure_retrieval(index: SuffixIndex, seed: int = 0) -> dict:
    """Median and max ms of one retrieval over windows of the corpus (index.timed_search)."""
    timing = timed_search(index, sample_contexts(index, seed=seed), max_len=WINDOW)
    return {"median_ms": round(timing["median_ms"], 4), "max_ms": round(timing["max_ms"], 4), "n": timing["n"],
            "window": WINDOW}


def peak_memory_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


# ----------------------------------------------------------------------------- the output directory
def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def check_output(out: Path, force: bool) -> None:
    """UsageError unless OUT can be written: absent, an empty directory, or a datastore with --force."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory; choose another path for the datastore")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UsageError(f"{out} exists and is not empty; pass --force to replace it, or choose another path")
        if not (out / "meta.json").is_file():
            raise UsageError(f"{out} is a non-empty directory that is not a datastore; --force replaces only "
                             f"a datastore, choose another path")


def move_into_place(partial: Path, out: Path) -> None:
    """Rename the finished OUT.partial to OUT, replacing what OUT was (checked by check_output)."""
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(partial, out)
    shutil.rmtree(old, ignore_errors=True)


def write_meta(path: Path, meta: dict) -> None:
    (path / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


# ----------------------------------------------------------------------------- the build
def build_datastore(out, paths, model: str | None = None, extensions=None, max_tokens: int | None = None,
                    force: bool = False, progress: bool = True) -> dict:
    """Build the datastore OUT from the files of `paths`; returns its meta (also in OUT/meta.json)."""
    out = Path(out).expanduser()
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1, got {max_tokens}")
    check_output(out, force)
    extensions = normalize_extensions(extensions)
    files = collect_files(paths, extensions)
    if not files:
        raise UsageError(f"no input files found in {', '.join(map(str, paths))} with the extensions "
                         f"{','.join(extensions)}; choose other paths or pass --ext")
    clock = Clock()
    name, tokenizer, source = load_tokenizer(model, progress)
    clock.lap("load_tokenizer")
    counts = Counts()
    documents = read_and_tokenize(files, tokenizer, counts, max_tokens, progress)
    if not documents:
        raise UsageError(f"no text to index: the {len(files)} input files are binary, empty or duplicates; "
                         f"choose other paths")
    clock.lap("tokenize")
    if progress:
        print(f"duo: sorting {counts.tokens:,} tokens into a suffix array...", file=sys.stderr, flush=True)
    index = SuffixIndex.build(drain(documents))
    clock.lap("suffix_array")
    meta = {"model": name, "vocab_size": len(tokenizer), "tokenizer": str(source), **counts.as_meta(),
            "sources": [str(Path(p).expanduser().resolve()) for p in paths], "extensions": extensions,
            "max_tokens": max_tokens}
    partial = partial_path(out)
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        index.save(partial, meta)
        del index
        meta = finish_meta(partial, clock)
        check_output(out, force)
        move_into_place(partial, out)
    except OSError as e:
        raise DuoError(f"cannot write the datastore {out}: {e.strerror or e}; free some disk space or choose "
                       f"another path") from e
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return meta


class Clock:
    """Seconds spent in each phase of the build."""

    def __init__(self):
        self.started = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self.last, 2)
        self.last = now

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 2)


def drain(items: list) -> Iterator:
    """The items of a list, each dropped from it once taken (the documents are freed as they are joined)."""
    items.reverse()
    while items:
        yield items.pop()


def read_and_tokenize(files: list[Path], tokenizer, counts: Counts, max_tokens, progress: bool) -> list[np.ndarray]:
    from tqdm import tqdm

    total = sum(file_size(f) for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="duo: tokenizing", file=sys.stderr,
              disable=not progress, dynamic_ncols=True, leave=False) as bar:
        return tokenize_texts(read_texts(files, tokenizer, counts, bar), tokenizer, counts, max_tokens)


def finish_meta(partial: Path, clock: Clock) -> dict:
    """Add the timings, size, peak memory and a retrieval measurement to the saved meta.json."""
    from .. import __version__

    index = SuffixIndex.open(partial, warm=False)
    try:
        retrieval = measure_retrieval(index)
        meta = dict(index.meta)
    finally:
        index.close()
    meta.update({
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": {**clock.seconds, "total": clock.total()},
        "peak_memory_bytes": peak_memory_bytes(),
        "retrieval": retrieval,
        "duo_version": __version__,
    })
    write_meta(partial, meta)
    meta["size_bytes"] = directory_size(partial)     # the arrays and meta.json (but for this entry)
    write_meta(partial, meta)
    return meta
