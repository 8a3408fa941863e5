"""The public API: `Engine` loads a target (torch) and a draft (llama.cpp worker process) and generates.

    with Engine() as engine:                       # default Qwen2.5-Coder 1.5B target, 0.5B draft
        print(engine.generate("Write a prime test in Python", max_new_tokens=128).text)
        for piece in engine.stream([{"role": "user", "content": "Hi"}]):
            print(piece, end="", flush=True)

Errors meant for the user are `DuoError`s with a one-line message naming the problem and the fix;
`UsageError` (also a ValueError) marks bad arguments or input, a plain `DuoError` a failure at run time.
Importing this module is cheap: torch and the runtime are imported when an Engine is built.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:
    from .runtime.decode import DecodeConfig, Stats

log = logging.getLogger("duo")

Messages = Sequence[dict]
MODES = ("overlap", "sequential", "target")   # == duo.runtime.decode.MODES (checked in Engine.__init__)


class DuoError(RuntimeError):
    """A user-facing error: the message names the problem and the fix.

    A plain DuoError is a failure at run time (out of memory, a model that fails to load, a download);
    the CLI exits with 1. See UsageError for bad arguments.
    """

    usage: bool = False
    exit_code: int = 1


class UsageError(DuoError, ValueError):
    """Bad arguments or input (unknown model path, sampling values, empty or too long prompt...):
    the call must change. The CLI exits with 2."""

    usage = True
    exit_code = 2


@dataclass
class Result:
    """One finished generation.

    text: the answer (special tokens and any stop string excluded).
    token_ids: every token generated, in order (an end-of-sequence token included).
    stats: counters and timings (new_tokens, tokens_per_s, acceptance_rate, mean_accepted_len, mode,
        rounds, drafted, accepted, ttft_s, wall_s, fallback, stop_reason: eos | length | stop, ...).
    """

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
    adaptive: bool = True            # adapt the budget to acceptance at run time (off when the user fixes it)


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

    Use it as a context manager (or call `close()`): closing stops the draft worker process.

        with Engine("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", device="cuda") as engine:
            result = engine.generate("Write a haiku", max_new_tokens=64)
            print(result.text, result.stats["tokens_per_s"])

    Args:
        model: the target: a built-in alias, a GGUF file or a Hugging Face model directory (None: default).
        draft: the draft: a built-in alias or a GGUF file (None: default). Ignored with mode="target".
        device: where the target runs: "auto" (a GPU if torch sees one), "cpu", "cuda" or "cuda:N".
        dtype: target dtype: "auto", "float32", "bfloat16" or "float16".
        budget: drafted tokens per round, or "auto" (the plan's choice).
        mode: "auto", "overlap" (draft while the target verifies), "sequential", or "target" (no draft).
        width, shape, lookup: tree shape options (max branches; chain | dynamic | eagle; n-gram candidates).
        context: the longest prompt + answer, in tokens (capped by the target's own window).
        plan: a ready Plan (threads, cores, budget), overriding mode/budget.
        progress: show download / conversion progress on stderr.
        profile: where an "auto" mode or budget comes from: "saved" (this machine's saved `duo profile`
            if there is one, else built-in defaults), "auto" (as "saved", but measure a quick profile first
            when none is saved; `duo run` does this), or "off" (built-in defaults).
        simulate: SIMULATION: an accelerator profile (a name from configs/accelerators.json, a dict or a
            JSON file): the target answers from a recording of its own greedy output, taking the
            accelerator's time per pass, while the draft runs for real with every core (greedy only;
            see duo.runtime.simulate).

    Raises UsageError for bad arguments (a missing model file, a draft that is not GGUF, a draft and a target
    with different vocabularies, a CUDA device without a GPU, ...) and DuoError when loading fails (out of
    memory, a corrupt file, a download). Requests from several threads are served one at a time (a lock).
    """

    def __init__(self, model: str | None = None, draft: str | None = None, *, device: str = "auto",
                 dtype: str = "auto", budget: int | str = "auto", mode: str = "auto", width: int | None = None,
                 shape: str = "dynamic", lookup: bool = True, context: int = 8192, plan: Plan | None = None,
                 progress: bool = True, target_model=None, profile: str = "saved", simulate=None):
        self._closed = True
        self._draft = None
        self.draft_llama = None     # llama_probe.Verdict: the llama.cpp configuration the draft runs with
        from . import models
        from .runtime import decode
        from .runtime.target import TargetError, load_target, resolve_device, resolve_dtype

        assert decode.MODES == MODES
        if mode not in ("auto",) + MODES:
            raise UsageError(f"unknown mode {mode!r}: use auto, overlap, sequential or target")
        if budget != "auto" and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise UsageError(f"budget must be 'auto' or an integer >= 1, got {budget!r}")
        if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
            raise UsageError(f"width must be an integer >= 1, got {width!r}")
        if profile not in ("auto", "saved", "off"):
            raise UsageError(f"unknown profile {profile!r}: use auto, saved or off")
        if isinstance(context, bool) or not isinstance(context, int) or context < 16:
            raise UsageError(f"context must be an integer >= 16 (tokens), got {context!r}")
        accelerator = _accelerator(simulate) if simulate is not None else None
        if target_model is None:
            try:  # fail fast, before anything is downloaded or loaded
                resolve_dtype(dtype, resolve_device(device))
            except TargetError as e:
                raise UsageError(str(e)) from e
        registry = models.load_registry()
        _check_model_arg(model, "target", registry)
        if mode != "target" and (plan is None or plan.mode != "target"):
            _check_model_arg(draft, "draft", registry)
        self._lock = threading.Lock()
        self._owner: int | None = None      # thread id of the generation holding the lock
        self._draft_failed = False
        self.plan = plan or self._plan(mode, None if budget == "auto" else budget)
        self.plan.adaptive = self.plan.adaptive and budget == "auto"
        if width is not None:
            self.plan.width = width
        self.plan.shape, self.lookup = shape, lookup
        try:
            tref = models.resolve_target(model, progress=progress)
            dref = models.resolve_draft(draft, progress=progress) if self.plan.mode != "target" else None
            if target_model is None:
                try:
                    with _quiet_loading(progress):
                        target_model = load_target(tref.hf_dir, device=device, dtype=dtype, name=tref.name,
                                                   threads=self.plan.target_threads)
                except (OSError, ValueError, KeyError) as e:   # transformers: a broken or incomplete directory
                    first = (str(e).strip().splitlines() or [""])[0]
                    raise DuoError(f"the target model in {tref.hf_dir} failed to load ({type(e).__name__}: "
                                   f"{first}); check that it is a complete Hugging Face model directory") from e
            self.target = target_model
            if accelerator is not None:   # SIMULATION: the recorded target, timed like the accelerator
                self._simulate(accelerator, plan)
            if dref is not None:
                models.check_vocab(dref.gguf, self.target.tokenizer, dref.name, tref.name)
            if plan is None and dref is not None and "auto" in (mode, budget) and profile != "off":
                self._use_profile(tref, dref, device, dtype, mode, budget, quick=profile == "auto",
                                  progress=progress)
        except models.VocabMismatchError as e:
            raise UsageError(str(e)) from e
        except (models.ModelError, TargetError) as e:
            raise DuoError(str(e)) from e
        self.context = min(context, self.target.max_context)
        self.draft_ref = dref
        if dref is not None:
            self._start_draft()
        self._closed = False

    # -- set-up -------------------------------------------------------------------------------
    @staticmethod
    def _plan(mode: str, budget: int | None) -> Plan:
        return default_plan(mode, budget)

    def _use_profile(self, tref, dref, device, dtype, mode, budget, quick: bool, progress: bool) -> None:
        """Take mode/budget/threads from this machine's saved profile (`duo profile`), if there is one;
        with `quick`, measure a quick profile first when there is none."""
        if getattr(self.target, "simulated", False):   # the accelerator's pass times with this machine's draft
            from .profiler.simulated import plan_for
        else:
            from .profiler.profile import plan_for
        chosen = plan_for(tref, dref, device, dtype, mode, None if budget == "auto" else budget,
                          quick_if_missing=quick, target_model=self.target, progress=progress)
        if chosen is not None:
            chosen.width = self.plan.width if self.plan.source == "user" else chosen.width
            chosen.shape, chosen.adaptive = self.plan.shape, self.plan.adaptive
            self.plan = chosen
            if chosen.mode == "target" and mode == "auto":
                log.warning("speculation is off: this machine's profile (%s) predicts the target alone to be "
                            "fastest; re-measure with `duo profile`, or force it with --mode sequential",
                            chosen.source)

    def _simulate(self, accelerator, plan: Plan | None) -> None:
        """SIMULATION: replace the target by its recorded self, timed like `accelerator`; without a given
        plan the draft gets every core (the simulated accelerator uses none), unpinned."""
        from .runtime.simulate import SimulatedTarget
        self.target = SimulatedTarget(self.target, accelerator)
        if plan is None:
            self.plan.draft_threads, self.plan.target_threads = len(os.sched_getaffinity(0)), 1
            self.plan.draft_cores = self.plan.target_cores = None

    def _start_draft(self) -> None:
        from .runtime.draft_worker import DraftClient, DraftConfig, DraftError
        from .runtime.llama_probe import llama_verdict, unusable_message
        verdict = llama_verdict(self.draft_ref.gguf)   # which llama.cpp configuration runs on this CPU (cached)
        if verdict.chosen is None:
            raise DuoError(f"draft model {self.draft_ref.name}: {unusable_message(verdict)}")
        self.draft_llama = verdict
        log.info("%s", verdict.summary())
        cfg = DraftConfig(gguf_path=str(self.draft_ref.gguf), n_threads=self.plan.draft_threads,
                          cores=self.plan.draft_cores, n_ctx=self.context,
                          max_nodes=max(64, 2 * self.plan.budget), max_seqs=max(8, self.plan.width + 1),
                          extra_bufts=verdict.extra_bufts)
        try:
            self._draft = DraftClient(cfg)
        except DraftError as e:
            raise DuoError(f"draft model {self.draft_ref.name} failed to load in llama.cpp: {e}") from e

    def _ensure_draft(self) -> None:
        """Restart the worker if it died, hung or failed in an earlier generation."""
        if self._draft is not None and (self._draft_failed or not self._draft.alive()):
            self._draft_failed = False
            try:
                self._draft.restart()
            except Exception as e:  # noqa: BLE001 - generation falls back to target-only
                log.warning("draft worker could not be restarted: %s", e)

    # -- generation ---------------------------------------------------------------------------
    def encode(self, prompt: str | Messages | Sequence[int], system: str | None = None,
               chat: bool | None = None) -> list[int]:
        """The prompt's token ids, as the target will see them.

        prompt: text (wrapped in the chat template, when the target has one, unless chat=False),
            a list of chat messages ({"role": ..., "content": ...}), or token ids (used as they are).
        system: a system message put first (text or messages without one).
        """
        tok = self.target.tokenizer
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            if min(prompt) < 0 or max(prompt) >= self.target.vocab_size:
                raise UsageError(f"token ids must be in [0, {self.target.vocab_size}): the target's vocabulary")
            return list(prompt)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise UsageError("the prompt is empty: give some text")
            _check_text(prompt, "the prompt")
            use_chat = chat if chat is not None else bool(getattr(tok, "chat_template", None))
            if not use_chat:
                return encode_plain(tok, prompt)
            prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        elif not isinstance(prompt, (list, tuple)):
            raise UsageError(f"the prompt must be text, a list of messages or token ids, not {type(prompt).__name__}")
        if not prompt or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                 and isinstance(m.get("content"), str) for m in prompt):
            raise UsageError("messages must be a non-empty list of {'role': str, 'content': str} dicts")
        if system and not any(m.get("role") == "system" for m in prompt):
            prompt = [{"role": "system", "content": system}] + list(prompt)
        if not getattr(tok, "chat_template", None):
            raise UsageError(f"target {self.target.name} has no chat template: pass plain text instead of messages")
        for m in prompt:
            _check_text(m["content"], f"the content of a {m['role']!r} message")
        return encode_chat(tok, prompt)

    def _decode_config(self, max_new_tokens, temperature, top_p, top_k, seed, n_prompt, overrides) -> DecodeConfig:
        from .runtime.decode import DecodeConfig
        sp = _sampling(temperature, top_p, top_k, seed)
        if n_prompt >= self.context:
            raise UsageError(f"the prompt is {n_prompt} tokens but the context window is {self.context}: "
                             f"shorten the prompt")
        max_new = min(max_new_tokens, self.context - n_prompt)
        b = self.plan.budget
        adaptive = self.plan.adaptive and overrides.get("budget") is None
        # a worker slower than 20x its profiled speed for the largest tree hangs
        timeout = max(2.0, 20 * 2 * b * self.plan.draft_ms_per_token / 1000)
        own_cores = bool(self.plan.draft_cores and self.plan.target_cores
                         and not set(self.plan.draft_cores) & set(self.plan.target_cores))
        cfg = DecodeConfig(max_new_tokens=max_new, sampling=sp, mode=self.plan.mode, budget=b,
                           width=self.plan.width, shape=self.plan.shape, lookup=self.lookup,
                           draft_timeout_s=timeout, budget_range=(max(1, b // 4), 2 * b) if adaptive else None,
                           draft_prefill_alongside=own_cores or bool(getattr(self.target, "simulated", False)),
                           pause_when_slower=adaptive)
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        if cfg.mode not in MODES:
            raise UsageError(f"unknown mode {cfg.mode!r}: use overlap, sequential or target")
        if cfg.mode != "target" and self._draft is not None:   # else the draft would refuse them: a fallback
            dc = self._draft.cfg
            for name, lo, hi in (("budget", 0, dc.max_nodes), ("width", 1, dc.max_seqs)):
                v = getattr(cfg, name)
                if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                    raise UsageError(f"{name} must be an integer in [{lo}, {hi}] for this engine, got {v!r}")
            if cfg.shape not in ("chain", "dynamic", "eagle"):
                raise UsageError(f"unknown shape {cfg.shape!r}: use chain, dynamic or eagle")
        return cfg

    def stream_tokens(self, prompt: str | Messages | Sequence[int], *, max_new_tokens: int = 256,
                      temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                      stop: str | Sequence[str] = (), system: str | None = None, chat: bool | None = None,
                      stats: Stats | None = None, mode: str | None = None, budget: int | None = None,
                      width: int | None = None, shape: str | None = None, lookup: bool | None = None,
                      ) -> Iterator[tuple[list[int], str]]:
        """Yield (committed token ids, new text) per round. The lower-level form of `stream`.

        Takes the arguments of `generate`, plus `stats` (a runtime.decode.Stats filled in as it goes) and
        mode/budget/width/shape/lookup, which override the plan for this call (benchmarks and the profiler
        sweep them). The text may be "" for a round whose characters are not complete yet.
        """
        from .runtime.decode import Stats, generate_tokens

        stop = [stop] if isinstance(stop, str) else list(stop or ())
        if any(not isinstance(s, str) or s == "" for s in stop):
            raise UsageError("stop strings must be non-empty text")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        _sampling(temperature, top_p, top_k, seed)
        stats = stats if stats is not None else Stats()
        with self._exclusive():
            ids = self.encode(prompt, system=system, chat=chat)
            cfg = self._decode_config(max_new_tokens, temperature, top_p, top_k, seed, len(ids),
                                      dict(mode=mode, budget=budget, width=width, shape=shape, lookup=lookup))
            if cfg.max_new_tokens == 0:
                return
            if getattr(self.target, "simulated", False):   # the recording it replays (made once per prompt)
                _simulation_call(self.target.prepare, ids, cfg.max_new_tokens, cfg.sampling)
            self._ensure_draft()
            draft = self._draft if cfg.mode != "target" else None
            text = TextStream(self.target.tokenizer, stop)
            with _affinity(self.plan.target_cores), _torch_threads(self.plan.target_threads):
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
                except (MemoryError, RuntimeError) as e:
                    if not _is_oom(e):
                        raise
                    raise DuoError(f"out of memory while generating on {self.target.device}: use a shorter prompt, "
                                   f"fewer new tokens or a smaller --budget") from e
                finally:
                    gen.close()
                    self._draft_failed = stats.fallback is not None and draft is not None
                    _warn_if_not_speculating(stats, draft is not None)

    def stream(self, prompt: str | Messages | Sequence[int], *, max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               stop: str | Sequence[str] = (), system: str | None = None, chat: bool | None = None,
               **overrides) -> Iterator[str]:
        """Yield the answer as it is verified, in text pieces.

        Each piece is complete text: a multi-byte character is never split between pieces, and nothing
        that could be the start of a stop string is shown before it is known not to be one. The pieces
        joined are `generate(...).text` for the same arguments. Arguments: see `generate`.
        """
        for _, piece in self.stream_tokens(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                           top_p=top_p, top_k=top_k, seed=seed, stop=stop, system=system,
                                           chat=chat, **overrides):
            if piece:
                yield piece

    def generate(self, prompt: str | Messages | Sequence[int], *, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: str | Sequence[str] = (), system: str | None = None, chat: bool | None = None,
                 **overrides) -> Result:
        """Generate a whole answer: Result(text, token_ids, stats).

        prompt: text (in the target's chat template, if it has one, unless chat=False), a list of chat
            messages [{"role": "user", "content": ...}, ...], or token ids.
        max_new_tokens: at most this many new tokens (also bounded by the context window).
        temperature: 0 = greedy (the target's own greedy output, token for token); > 0 samples.
        top_p: nucleus mass in (0, 1]; top_k: sample among the k most likely tokens (0 = all).
        seed: with a seed, sampling is reproducible (and equal to the target's sampling alone).
        stop: text (or texts) that ends the answer; it is not included.
        system: a system message. chat: force (True) or skip (False) the chat template for text.

        Raises UsageError for invalid values or a prompt that does not fit the context window.
        """
        from .runtime.decode import Stats

        stats = Stats()
        ids, pieces = [], []
        for new, piece in self.stream_tokens(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                             top_p=top_p, top_k=top_k, seed=seed, stop=stop, system=system,
                                             chat=chat, stats=stats, **overrides):
            ids += new
            pieces.append(piece)
        return Result(text="".join(pieces), token_ids=ids, stats=stats.as_dict())

    @contextlib.contextmanager
    def _exclusive(self):
        """Hold the engine for one generation: other threads wait their turn; the same thread must not
        start a second generation while its first is still being iterated (that would deadlock)."""
        if self._closed:
            raise UsageError("this Engine is closed: create a new one")
        me = threading.get_ident()
        if self._owner == me:
            raise UsageError("a generation is already running in this thread: finish (or close) the "
                             "previous stream before starting another")
        with self._lock:
            if self._closed:
                raise UsageError("this Engine is closed: create a new one")
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    # -- life cycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the draft worker process and free its shared memory. Idempotent."""
        self._closed = True
        draft, self._draft = self._draft, None
        if draft is not None:
            draft.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def _warn_if_not_speculating(stats, had_draft: bool) -> None:
    """One warning line when speculation fell away (the worker died, hung, failed) or was paused for most
    of the answer (the target alone was faster on this text); the stats say the same."""
    if not had_draft or stats.stop_reason == "interrupted":
        return
    if stats.fallback is not None:
        log.warning("speculation stopped, the rest was decoded by the target alone: %s", stats.fallback)
    elif stats.new_tokens >= 16 and stats.plain_steps > stats.new_tokens / 2:
        log.warning("speculation paused for %d of %d tokens: the target alone was faster on this text",
                    stats.plain_steps, stats.new_tokens)


def _simulation_call(fn, *args):
    """fn(*args), with the simulation's errors (an unknown profile, sampling) as UsageErrors."""
    from .runtime.simulate import SimulationError
    try:
        return fn(*args)
    except SimulationError as e:
        raise UsageError(str(e)) from e


def _accelerator(spec):
    from .runtime.simulate import get_accelerator
    return _simulation_call(get_accelerator, spec)


def _check_text(text: str, what: str) -> None:
    """A UsageError for text the tokenizer cannot take: lone surrogates (e.g. bytes decoded with
    errors="surrogateescape") are not Unicode text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{what} is not valid Unicode text (a lone surrogate at character {e.start}, e.g. from "
                         f"undecodable bytes): decode the input as UTF-8 first") from None


def _sampling(temperature, top_p, top_k, seed):
    """Validated SamplingParams, or a UsageError naming the bad value."""
    from .sampling import SamplingError, SamplingParams
    try:
        return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed).validate()
    except SamplingError as e:
        raise UsageError(str(e)) from e


def _is_oom(e: BaseException) -> bool:
    import torch
    return isinstance(e, (MemoryError, torch.OutOfMemoryError))


def _check_model_arg(spec: str | None, role: str, registry) -> None:
    """Fail fast with a UsageError on a model argument that cannot work, before anything is loaded.

    None and built-in aliases pass (they are fetched later); a path must exist, be readable, and be
    a GGUF file (or, for a target, a Hugging Face directory with a config.json).
    """
    if spec is None or spec in registry.models:
        return
    if not isinstance(spec, (str, os.PathLike)):
        raise UsageError(f"{role} must be a model alias or a path, not {type(spec).__name__}")
    known = ", ".join(sorted(a for a, e in registry.models.items() if e.role in (role, ""))) or "none"
    path = Path(spec).expanduser()
    if not path.exists():
        s = str(spec)
        if os.sep in s or "/" in s or s.startswith((".", "~")) or s.lower().endswith(".gguf"):
            raise UsageError(f"{role} model not found: {path} does not exist; check the path "
                             f"(or use a built-in alias: {known})")
        raise UsageError(f"unknown {role} model '{s}': not a built-in alias ({known}) and no such file or "
                         f"directory; see 'duo models list'")
    if path.is_dir():
        if role == "draft":
            raise UsageError(f"draft model {path} is a directory; the draft runs in llama.cpp and must be a "
                             f".gguf file (convert it with llama.cpp's convert_hf_to_gguf.py)")
        if not (path / "config.json").is_file():
            raise UsageError(f"target model directory {path} has no config.json; pass a Hugging Face model "
                             f"directory, a .gguf file or a built-in alias")
        if not os.access(path, os.R_OK | os.X_OK):
            raise DuoError(f"cannot read target model directory {path}: permission denied; check its permissions")
        return
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise DuoError(f"cannot read {role} model {path}: {e.strerror}; check the file and its permissions") from e
    if magic != b"GGUF":
        what = ("the draft runs in llama.cpp and must be a .gguf file (convert it with llama.cpp's "
                "convert_hf_to_gguf.py)") if role == "draft" else \
            "pass a .gguf file, a Hugging Face model directory or a built-in alias"
        raise UsageError(f"{role} model {path} is not a GGUF file (it does not start with 'GGUF'); {what}")


@contextlib.contextmanager
def _quiet_loading(progress: bool):
    """Without progress: no transformers progress bars ("Loading weights") while the target loads."""
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not progress:
            hf_logging.enable_progress_bar()


class _torch_threads:
    """Use n torch threads for the duration."""

    def __init__(self, n):
        self.n, self.saved = n, None

    def __enter__(self):
        import torch
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch
        torch.set_num_threads(self.saved)


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
