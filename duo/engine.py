"""The public API: `Engine` loads a target (torch) and a draft (llama.cpp worker process) and generates.

    with Engine() as engine:                       # default Qwen2.5-Coder 1.5B target, 0.5B draft
        print(engine.generate("Write a prime test in Python", max_new_tokens=128).text)
        for piece in engine.stream([{"role": "user", "content": "Hi"}]):
            print(piece, end="", flush=True)
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from .sampling import SamplingError, SamplingParams
from .runtime.decode import MODES, DecodeConfig, Stats, generate_tokens

log = logging.getLogger("duo")

Messages = Sequence[dict]


class DuoError(RuntimeError):
    """A user-facing error: the message names the problem and the fix."""


@dataclass
class Result:
    text: str
    token_ids: list[int]
    stats: dict = field(default_factory=dict)


@dataclass
class Plan:
    """How generation runs: the profiler's choice, or the user's."""
    mode: str = "sequential"
    budget: int = 16
    width: int = 4
    shape: str = "dynamic"
    draft_threads: int = 1
    target_threads: int = 1
    draft_cores: list[int] | None = None
    target_cores: list[int] | None = None
    draft_ms_per_token: float = 50.0
    source: str = "defaults"


def default_plan(mode: str, budget: int | None) -> Plan:
    """Without a saved profile: split the cores for overlap, share them for the sequential schedule."""
    cores = sorted(os.sched_getaffinity(0))
    mode = "sequential" if mode == "auto" else mode
    plan = Plan(mode=mode, budget=budget or 16)
    if mode == "overlap" and len(cores) >= 2:
        n_draft = max(1, len(cores) // 4) if len(cores) >= 8 else 1
        plan.draft_cores, plan.target_cores = cores[-n_draft:], cores[:-n_draft]
        plan.draft_threads, plan.target_threads = n_draft, len(cores) - n_draft
    else:
        plan.draft_threads = plan.target_threads = min(len(cores), 8) if mode != "target" else len(cores)
    return plan


def _sentinel(i: int) -> str:
    return f"\x00duo{i}\x00"


def encode_chat(tokenizer, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
    """Chat template → token ids, with message contents tokenized as plain text.

    Special-token strings typed by the user (e.g. "<|im_end|>") must stay text, so the template is
    rendered with sentinels in place of the contents, its own parts are tokenized with special tokens,
    and each content separately with special tokens split.
    """
    masked = [dict(m, content=_sentinel(i)) for i, m in enumerate(messages)]
    skeleton = tokenizer.apply_chat_template(masked, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids: list[int] = []
    rest = skeleton
    for i, m in enumerate(messages):
        before, _, rest = rest.partition(_sentinel(i))
        ids += tokenizer.encode(before, add_special_tokens=False)
        ids += tokenizer.encode(m["content"], add_special_tokens=False, split_special_tokens=True)
    ids += tokenizer.encode(rest, add_special_tokens=False)
    return ids


def encode_plain(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    return ids


class TextStream:
    """Incremental detokenizer: yields only complete UTF-8 text, and never text that may start a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids: list[int] = []
        self.text = ""          # decoded so far (complete characters only)
        self.emitted = 0        # chars of text already handed out
        self.stopped = False

    def push(self, ids: list[int]) -> str:
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):     # a multi-byte character is still incomplete
            return ""
        self.text = text
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s) + 1))
            if at >= 0:
                self.text, self.stopped = text[:at], True
        hold = 0 if self.stopped else max((k for s in self.stop for k in range(1, len(s))
                                           if self.text.endswith(s[:k])), default=0)
        out = self.text[self.emitted:len(self.text) - hold]
        self.emitted += len(out)
        return out

    def finish(self) -> str:
        out = self.text[self.emitted:] if self.stopped else self.tokenizer.decode(self.ids, skip_special_tokens=True)[self.emitted:]
        self.emitted += len(out)
        return out


class Engine:
    """A target model on `device` and a draft model in a CPU worker process, ready to generate.

    model / draft: alias, GGUF file or Hugging Face directory (draft: alias or GGUF); None = defaults.
    mode: auto | overlap | sequential | target (target = no draft, plain decoding).
    budget: "auto" (profile) or drafted tokens per round. Requests from several threads run one at a time.
    """

    def __init__(self, model: str | None = None, draft: str | None = None, *, device: str = "auto",
                 dtype: str = "auto", budget: int | str = "auto", mode: str = "auto", width: int | None = None,
                 shape: str = "dynamic", lookup: bool = True, context: int = 8192, plan: Plan | None = None,
                 progress: bool = True):
        from . import models
        from .runtime.target import TargetError, load_target

        if mode not in ("auto",) + MODES:
            raise DuoError(f"unknown mode {mode!r}: use auto, overlap, sequential or target")
        if budget != "auto" and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise DuoError(f"budget must be 'auto' or an integer >= 1, got {budget!r}")
        self._lock = threading.Lock()
        self._draft = None
        self.plan = plan or self._plan(mode, None if budget == "auto" else budget)
        if width is not None:
            self.plan.width = width
        self.plan.shape, self.lookup = shape, lookup
        try:
            tref = models.resolve_target(model, progress=progress)
            dref = models.resolve_draft(draft, progress=progress) if self.plan.mode != "target" else None
            self.target = load_target(tref.hf_dir, device=device, dtype=dtype, name=tref.name,
                                      threads=self.plan.target_threads)
            if dref is not None:
                models.check_vocab(dref.gguf, self.target.tokenizer, dref.name, tref.name)
        except (models.ModelError, TargetError) as e:
            raise DuoError(str(e)) from e
        self.context = min(context, self.target.max_context)
        self.draft_ref = dref
        if dref is not None:
            self._start_draft()

    # -- set-up -------------------------------------------------------------------------------
    @staticmethod
    def _plan(mode: str, budget: int | None) -> Plan:
        return default_plan(mode, budget)

    def _start_draft(self) -> None:
        from .runtime.draft_worker import DraftClient, DraftConfig, DraftError
        cfg = DraftConfig(gguf_path=str(self.draft_ref.gguf), n_threads=self.plan.draft_threads,
                          cores=self.plan.draft_cores, n_ctx=self.context,
                          max_nodes=max(64, 2 * self.plan.budget), max_seqs=max(8, self.plan.width + 1))
        try:
            self._draft = DraftClient(cfg)
        except DraftError as e:
            raise DuoError(f"draft model {self.draft_ref.name} failed to load: {e}") from e

    def _ensure_draft(self) -> None:
        """Restart the worker if it died or failed in an earlier generation."""
        if self._draft is not None and not self._draft.alive():
            try:
                self._draft.restart()
            except Exception as e:  # noqa: BLE001 - generation falls back to target-only
                log.warning("draft worker could not be restarted: %s", e)

    # -- generation ---------------------------------------------------------------------------
    def encode(self, prompt: str | Messages, system: str | None = None, chat: bool | None = None) -> list[int]:
        tok = self.target.tokenizer
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            if min(prompt) < 0 or max(prompt) >= self.target.vocab_size:
                raise DuoError("token ids out of the vocabulary's range")
            return list(prompt)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise DuoError("the prompt is empty: give some text")
            use_chat = chat if chat is not None else bool(getattr(tok, "chat_template", None))
            if not use_chat:
                return encode_plain(tok, prompt)
            prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        elif system and not any(m.get("role") == "system" for m in prompt):
            prompt = [{"role": "system", "content": system}] + list(prompt)
        if not prompt or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            raise DuoError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        return encode_chat(tok, prompt)

    def _decode_config(self, max_new_tokens, temperature, top_p, top_k, seed, n_prompt, overrides) -> DecodeConfig:
        sp = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        try:
            sp.validate()
        except SamplingError as e:
            raise DuoError(str(e)) from e
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise DuoError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if n_prompt >= self.context:
            raise DuoError(f"the prompt is {n_prompt} tokens but the context window is {self.context}: "
                           f"shorten the prompt")
        max_new = min(max_new_tokens, self.context - n_prompt)
        timeout = max(2.0, 20 * self.plan.budget * self.plan.draft_ms_per_token / 1000)
        cfg = DecodeConfig(max_new_tokens=max_new, sampling=sp, mode=self.plan.mode, budget=self.plan.budget,
                           width=self.plan.width, shape=self.plan.shape, lookup=self.lookup,
                           draft_timeout_s=timeout)
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        if cfg.mode not in MODES:
            raise DuoError(f"unknown mode {cfg.mode!r}: use overlap, sequential or target")
        return cfg

    def stream_tokens(self, prompt: str | Messages, *, max_new_tokens: int = 256, temperature: float = 0.0,
                      top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (),
                      system: str | None = None, chat: bool | None = None, stats: Stats | None = None,
                      mode: str | None = None, budget: int | None = None, width: int | None = None,
                      shape: str | None = None, lookup: bool | None = None,
                      ) -> Iterator[tuple[list[int], str]]:
        """Yield (committed token ids, new text) per round. The lower-level form of `stream`.

        The prompt is text, chat messages, or token ids. mode/budget/width/shape/lookup override the plan
        for this call (benchmarks and the profiler sweep them).
        """
        stop = [stop] if isinstance(stop, str) else list(stop or ())
        if any(not isinstance(s, str) or s == "" for s in stop):
            raise DuoError("stop strings must be non-empty text")
        ids = self.encode(prompt, system=system, chat=chat)
        cfg = self._decode_config(max_new_tokens, temperature, top_p, top_k, seed, len(ids),
                                  dict(mode=mode, budget=budget, width=width, shape=shape, lookup=lookup))
        stats = stats if stats is not None else Stats()
        with self._lock:
            if cfg.max_new_tokens == 0:
                return
            self._ensure_draft()
            draft = self._draft if cfg.mode != "target" else None
            text = TextStream(self.target.tokenizer, stop)
            with _affinity(self.plan.target_cores):
                gen = generate_tokens(self.target, draft, ids, cfg, stats)
                try:
                    for new in gen:
                        piece = text.push(new)
                        yield new, piece
                        if text.stopped:
                            stats.stop_reason = "stop"
                            break
                    else:
                        tail = text.finish()
                        if tail:
                            yield [], tail
                finally:
                    gen.close()

    def stream(self, prompt: str | Messages, **kw) -> Iterator[str]:
        """Yield text pieces as they are verified (valid UTF-8, stop strings never shown)."""
        for _, piece in self.stream_tokens(prompt, **kw):
            if piece:
                yield piece

    def generate(self, prompt: str | Messages, **kw) -> Result:
        """Generate a whole answer: Result(text, token_ids, stats)."""
        stats = Stats()
        ids, pieces = [], []
        for new, piece in self.stream_tokens(prompt, stats=stats, **kw):
            ids += new
            pieces.append(piece)
        return Result(text="".join(pieces), token_ids=ids, stats=stats.as_dict())

    # -- life cycle ---------------------------------------------------------------------------
    def close(self) -> None:
        if self._draft is not None:
            self._draft.close()
            self._draft = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class _affinity:
    """Pin this process to `cores` for the duration (the draft worker has the others)."""

    def __init__(self, cores):
        self.cores, self.saved = cores, None

    def __enter__(self):
        if self.cores:
            self.saved = os.sched_getaffinity(0)
            os.sched_setaffinity(0, self.cores)

    def __exit__(self, *exc):
        if self.saved:
            os.sched_setaffinity(0, self.saved)
