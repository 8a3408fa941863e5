"""The Engine's retrieval candidates: a datastore opened once (REST) and the cache of its earlier outputs
(SuffixDecoding), both checked against the target's vocabulary. The sources themselves are in
runtime/sources/ (datastore.py, output_cache.py); building a datastore is duo/datastore/ (`duo datastore`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

log = logging.getLogger("duo")

DEFAULT_CACHE_TOKENS = 2_000_000    # the output cache's bound (~8 MB of tokens, ~16 MB indexed)


def check_retrieval_args(datastore, output_cache, output_cache_file) -> None:
    """UsageErrors before anything loads: a datastore path that is not one, a bad cache bound or file."""
    if isinstance(output_cache, bool) or not isinstance(output_cache, int) or output_cache < 0:
        raise UsageError(f"output_cache must be a number of tokens >= 0 (0 = none), got {output_cache!r}")
    if datastore is not None and not (Path(datastore).expanduser() / "meta.json").is_file():
        raise UsageError(f"{datastore} is not a datastore (no meta.json): build one with "
                         f"`duo datastore build {datastore} --from PATH...`")
    if output_cache_file is not None and Path(output_cache_file).expanduser().is_dir():
        raise UsageError(f"the output cache file {output_cache_file} is a directory: name a file")


def open_datastore(path, tokenizer_size: int, target_name: str):
    """The memory-mapped SuffixIndex at `path`; UsageError naming the fix if it is not usable here."""
    from .datastore.index import SuffixIndex
    try:
        index = SuffixIndex.open(Path(path).expanduser())
    except ValueError as e:
        raise UsageError(str(e)) from None
    vocab = index.meta.get("vocab_size")
    if vocab is not None and int(vocab) != tokenizer_size:
        index.close()
        raise UsageError(f"datastore {path} was tokenized for a {vocab}-token vocabulary ({index.meta.get('model')}), "
                         f"the target {target_name} has {tokenizer_size}: rebuild it with "
                         f"`duo datastore build ... --model {target_name}`")
    log.info("datastore %s: %.1fM tokens", path, len(index) / 1e6)
    return index


def open_output_cache(max_tokens: int, path):
    """An OutputCache (None when max_tokens is 0), reloaded from `path` when that file exists."""
    from .runtime.sources.output_cache import OutputCache
    if max_tokens <= 0:
        return None
    if path is None or not Path(path).expanduser().exists():
        return OutputCache(max_tokens)
    try:
        cache = OutputCache.load(Path(path).expanduser(), max_tokens)
    except ValueError as e:
        raise UsageError(str(e)) from None
    log.info("output cache %s: %d earlier generations, %d tokens", path, len(cache.docs), cache.n_tokens)
    return cache


def save_output_cache(cache, path) -> None:
    if cache is None or path is None:
        return
    try:
        cache.save(Path(path).expanduser())
    except OSError as e:
        log.warning("the output cache could not be saved to %s: %s", path, e.strerror or e)


@dataclass
class Retrieval:
    """An Engine's retrieved candidates: its datastore and its output cache (either may be None)."""
    datastore: object = None        # duo.datastore.index.SuffixIndex, memory-mapped
    cache: object = None            # runtime.sources.output_cache.OutputCache
    cache_file: str | None = None   # where the cache is reloaded from and saved

    @staticmethod
    def open(datastore, output_cache: int, output_cache_file, tokenizer_size: int, target_name: str) -> "Retrieval":
        index = open_datastore(datastore, tokenizer_size, target_name) if datastore is not None else None
        return Retrieval(index, open_output_cache(output_cache, output_cache_file), output_cache_file)

    def remember(self, tokens: list[int]) -> None:
        """A finished generation (prompt + answer): later ones may draft from it."""
        if self.cache is not None and tokens:
            self.cache.add(tokens)

    def forget(self) -> None:
        """Empty the output cache (a benchmark's next method must not find the answers of the last)."""
        if self.cache is not None:
            self.cache = type(self.cache)(self.cache.max_tokens)

    def close(self) -> None:
        """Save the cache (if it has a file) and unmap the datastore. Idempotent."""
        save_output_cache(self.cache, self.cache_file)
        self.cache_file = None
        datastore, self.datastore = self.datastore, None
        if datastore is not None:
            datastore.close()
