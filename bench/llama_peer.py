"""The bench's llama.cpp peer (method `llama-cpp`): the target's GGUF alone in llama.cpp, greedy.

It runs through duo's own llama.cpp wrapper (duo.runtime.drafter.Drafter) in the configuration the probe
found to work on this CPU (duo.runtime.llama_probe: llama.cpp's default extra buffer types crash some
CPUs), never through llama_cpp.Llama. One sequence, all usable cores. Each answer: clear the cache, prefill
the prompt in chunks of n_batch tokens, then argmax (ties: the lowest id) and decode that one token, until
max_new tokens or one of the EOS ids (kept, as transformers keeps it). The context grows (the model is
reloaded, untimed) when a prompt and its answer would not fit.

llama.cpp's GGUF target is not the torch target (quantized, other kernels): its tokens are not checked
against the target's; its speed is reported in absolute tokens/s.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .sample import Sample

MIN_CTX = 4096


def gguf_of(model) -> Path:
    """The GGUF file of a target spec (as Engine takes it); a UsageError (a ValueError) when the target is
    a transformers directory."""
    from duo import models
    from duo.errors import UsageError

    gguf = models.target_gguf(model, progress=False)   # the GGUF only: no torch conversion
    if gguf is None:
        raise UsageError(f"method llama-cpp needs a GGUF target (a .gguf file or an alias), not the transformers "
                         f"directory {model}")
    return Path(gguf)


def context_for(n: int) -> int:
    """A context holding n tokens: MIN_CTX, or the next power of two."""
    return max(MIN_CTX, 1 << (n - 1).bit_length())


class LlamaPeer:
    """The target's GGUF in llama.cpp, loaded on the first answer; run(ids, max_new, eos) -> Sample."""

    def __init__(self, gguf: str | os.PathLike, threads: int | None = None):
        self.gguf = Path(gguf)
        self.threads = threads or len(os.sched_getaffinity(0))
        self.drafter = None

    def describe(self) -> str:
        """What runs: the file, the llama.cpp variant (extra-bufts | plain) and the threads."""
        from duo.runtime.llama_probe import llama_verdict

        return f"target GGUF {self.gguf.name}, {llama_verdict(self.gguf).chosen}, {self.threads} threads"

    def ensure(self, n_tokens: int):
        """The loaded Drafter, with a context of at least n_tokens (reloaded when it is smaller)."""
        if self.drafter is not None and self.drafter.n_ctx >= n_tokens:
            return self.drafter
        from duo.runtime.drafter import DraftConfig, Drafter
        from duo.runtime.llama_probe import resolve_config

        self.close()
        cfg = DraftConfig(gguf_path=str(self.gguf), n_threads=self.threads, n_ctx=context_for(n_tokens), max_seqs=1)
        self.drafter = Drafter(resolve_config(cfg))
        return self.drafter

    def run(self, ids: list[int], max_new: int, eos) -> Sample:
        """Greedy: at most max_new tokens after the prompt ids, stopping after an EOS id; timed."""
        if max_new < 1:
            return Sample([], 0.0, 0.0)
        d = self.ensure(len(ids) + max_new)
        t0 = time.perf_counter()
        logits = prefill(d, list(ids))
        tokens: list[int] = []
        ttft = 0.0
        while True:
            t = greedy(logits)
            tokens.append(t)
            if len(tokens) == 1:
                ttft = time.perf_counter() - t0
            if t in eos or len(tokens) >= max_new:
                break
            d.decode([(t, 0)], last_logits_only=True)
            logits = d.logits(0)
        return Sample(tokens, time.perf_counter() - t0, ttft)

    def close(self) -> None:
        if self.drafter is not None:
            self.drafter.close()
            self.drafter = None


def prefill(d, ids: list[int]):
    """Clear the cache and decode the prompt in chunks of d.n_batch; the last position's logits."""
    if not ids:
        raise ValueError("llama-cpp: an empty prompt")
    d.reset()
    for i in range(0, len(ids), d.n_batch):
        chunk = ids[i:i + d.n_batch]
        d.decode([(t, 0) for t in chunk], last_logits_only=True)
    return d.logits(len(chunk) - 1)


def greedy(logits) -> int:
    """The most likely token id (ties: the lowest id)."""
    from duo.runtime.tree_shapes import top_k

    return int(top_k(logits, 1)[0][0])
