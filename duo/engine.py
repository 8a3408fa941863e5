"""The public API: `Engine` loads a target (torch) and a draft (llama.cpp worker process) and generates.

    with Engine() as engine:                       # default Qwen2.5-Coder 1.5B target, 0.5B draft
        print(engine.generate("Write a prime test in Python", max_new_tokens=128).text)
        for piece in engine.stream([{"role": "user", "content": "Hi"}]):
            print(piece, end="", flush=True)

The Engine is where the pieces are put together (configuration flows one way from here): the target
(runtime/target.py, or SIMULATION runtime/simulate.py) with the planner that knows its costs (profiler/),
the plan (plan.py), the draft worker (runtime/draft_client.py) and, per call, the decode loop
(runtime/decode.py). Errors meant for the user are `DuoError`s / `UsageError`s (errors.py).
Importing this module is cheap: torch and the runtime are imported when an Engine is built.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

from .arguments import check_engine_args, sampling_params
from .adaptation import Adaptation, check_adaptation_args
from .draft_quant import resolve_draft
from .errors import DuoError, UsageError, is_oom
from .plan import Plan, check_mode, default_plan
from .prompt import Messages, TextStream, encode_prompt
from .retrieval import DEFAULT_CACHE_TOKENS, Retrieval, check_retrieval_args

if TYPE_CHECKING:
    from .runtime.decode import DecodeConfig, Stats

log = logging.getLogger("duo")

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
        dtype: target precision: "auto", "float32", "bfloat16", "float16", "int8" or "w8a8" (CPU).
        budget: drafted tokens per round, or "auto" (the plan's choice).
        mode: "auto", "overlap" (draft while the target verifies), "sequential", or "target" (no draft).
        width, shape, lookup: tree shape options (max branches; chain | dynamic | eagle; n-gram candidates).
        datastore, output_cache, output_cache_file: retrieved candidates (duo.retrieval): a datastore
            directory (`duo datastore build`), tokens of earlier generations kept (0 = none), their file.
        adapter, record, adapt_online: the draft's LoRA adapter ("auto": the pair's latest from `duo adapt`, a
            path, "off"); record generations for `duo adapt`; adapt in the background (duo.adaptation).
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
        compile: the static, compiled verify pass (runtime/static_target.py): "auto" (on a GPU), "on" or "off".
        draft_quant: the draft's weights: "auto" (a Q4_0 copy where it drafts faster), "keep", "q4_0" (draft_quant.py).

    Raises UsageError for bad arguments (a missing model file, a draft that is not GGUF, a draft and a target
    with different vocabularies, a CUDA device without a GPU, ...) and DuoError when loading fails (out of
    memory, a corrupt file, a download). Requests from several threads are served one at a time (a lock).
    """

    def __init__(self, model: str | None = None, draft: str | None = None, *, device: str = "auto",
                 dtype: str = "auto", budget: int | str = "auto", mode: str = "auto", width: int | None = None,
                 shape: str = "dynamic", lookup: bool = True, context: int = 8192, plan: Plan | None = None,
                 progress: bool = True, target_model=None, profile: str = "saved", simulate=None,
                 datastore: str | None = None, output_cache: int = DEFAULT_CACHE_TOKENS,
                 output_cache_file: str | None = None, adapter: str = "auto", record: bool = False,
                 adapt_online: bool = False, compile: str = "auto", draft_quant: str = "auto"):
        from . import models
        from .runtime.static_target import with_static_verify
        from .runtime.target import TargetError, storage_dtype

        self._closed, self._draft, self._draft_failed = True, None, False
        self.retrieval, self.adaptation = Retrieval(), Adaptation()
        self._lock, self._owner = threading.Lock(), None   # the owner: thread id of the generation holding the lock
        self.draft_llama = None     # llama_probe.Verdict: the llama.cpp configuration the draft runs with
        accelerator = check_engine_args(model, draft, device, dtype, budget, mode, width, context, plan, profile,
                                  simulate, target_model, compile)
        check_retrieval_args(datastore, output_cache, output_cache_file)
        check_adaptation_args(adapter, record, adapt_online)
        self.plan = plan or default_plan(mode, None if budget == "auto" else budget, getattr(target_model, "device", device))
        self.plan.adaptive = self.plan.adaptive and budget == "auto"
        self.plan.width = self.plan.width if width is None else width
        self.plan.shape, self.lookup = shape, lookup
        try:
            tref = models.resolve_target(model, progress=progress, dtype=storage_dtype(device, dtype))
            dref = resolve_draft(draft, draft_quant, progress) if self.plan.mode != "target" else None
            self.target, planner = self._target_and_planner(tref, target_model, device, dtype, accelerator,
                                                            plan is None, progress)
            if dref is not None:
                models.check_vocab(dref.gguf, self.target.tokenizer, dref.name, tref.name)
            if plan is None and dref is not None and "auto" in (mode, budget) and profile != "off":
                self._use_profile(planner, tref, dref, device, dtype, mode, budget, quick=profile == "auto",
                                  progress=progress)
            self.target = with_static_verify(self.target, compile, min(context, self.target.max_context),
                                             max(64, 2 * self.plan.budget), progress)   # the draft's max_nodes
        except models.VocabMismatchError as e:
            raise UsageError(str(e)) from e
        except (models.ModelError, TargetError) as e:
            raise DuoError(str(e)) from e
        self.context, self.draft_ref = min(context, self.target.max_context), dref
        self.retrieval = Retrieval.open(datastore, output_cache, output_cache_file, len(self.target.tokenizer),
                                        tref.name)
        self.adaptation = Adaptation.open(adapter, record, adapt_online, tref.name, dref.identity if dref else None,
                                          dref.gguf if dref else None, progress)
        if dref is not None:
            self._start_draft()
        self._closed = False

    # -- set-up -------------------------------------------------------------------------------
    def _target_and_planner(self, tref, target_model, device, dtype, accelerator, own_plan: bool, progress: bool):
        """The target and the planner that knows its costs: the torch model with this machine's profile
        (profiler/profile.py), or, SIMULATION, the recorded target timed like `accelerator` with the
        accelerator's pass times and this machine's draft (profiler/simulated.py)."""
        from .profiler import profile
        from .runtime.target import load_target

        if target_model is None:
            try:
                target_model = load_target(tref.hf_dir, device=device, dtype=dtype, name=tref.name,
                                           threads=self.plan.target_threads, progress=progress)
            except (OSError, ValueError, KeyError) as e:   # transformers: a broken or incomplete directory
                first = (str(e).strip().splitlines() or [""])[0]
                raise DuoError(f"the target model in {tref.hf_dir} failed to load ({type(e).__name__}: "
                               f"{first}); check that it is a complete Hugging Face model directory") from e
        if accelerator is None:
            return target_model, profile.plan_for
        from .profiler import simulated
        from .runtime.simulate import SimulatedTarget
        if own_plan:   # the simulated accelerator uses no core: the draft gets them all, unpinned
            self.plan.draft_threads, self.plan.target_threads = len(os.sched_getaffinity(0)), 1
            self.plan.draft_cores = self.plan.target_cores = None
        return SimulatedTarget(target_model, accelerator), simulated.plan_for

    def _use_profile(self, planner, tref, dref, device, dtype, mode, budget, quick: bool, progress: bool) -> None:
        """Take mode/budget/threads from the planner (this machine's saved `duo profile`, if there is one);
        with `quick`, measure a quick profile first when there is none."""
        chosen = planner(tref, dref, device, dtype, mode, None if budget == "auto" else budget,
                         quick_if_missing=quick, target_model=self.target, progress=progress)
        if chosen is None:
            return
        chosen.width = self.plan.width if self.plan.source == "user" else chosen.width
        chosen.shape, chosen.adaptive = self.plan.shape, self.plan.adaptive
        self.plan = chosen
        if chosen.mode == "target" and mode == "auto":
            log.warning("speculation is off: this machine's profile (%s) predicts the target alone to be "
                        "fastest; re-measure with `duo profile`, or force it with --mode sequential", chosen.source)

    def _start_draft(self) -> None:
        from .runtime.draft_client import DraftClient, DraftConfig, DraftError
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
        return encode_prompt(self.target.tokenizer, self.target.vocab_size, self.target.name, prompt, system, chat)

    def _decode_config(self, max_new_tokens, sampling, n_prompt, overrides) -> DecodeConfig:
        from .runtime.decode import DecodeConfig
        if n_prompt >= self.context:
            raise UsageError(f"the prompt is {n_prompt} tokens but the context window is {self.context}: "
                             f"shorten the prompt")
        p = self.plan
        mode = check_mode(overrides.get("mode") or p.mode, allow_auto=False)
        tree = p.tree.replace(budget=overrides.get("budget"), width=overrides.get("width"), shape=overrides.get("shape"))
        if mode != "target" and self._draft is not None:   # else the draft would refuse it: a fallback
            tree.validate(self._draft.cfg.max_nodes, self._draft.cfg.max_seqs)
        adaptive = p.adaptive and overrides.get("budget") is None
        timeout = max(2.0, 20 * 2 * p.budget * p.draft_ms_per_token / 1000)   # 20x its profiled speed: hung
        return DecodeConfig(max_new_tokens=min(max_new_tokens, self.context - n_prompt), sampling=sampling,
                            mode=mode, tree=tree, lookup=self.lookup if overrides.get("lookup") is None else overrides.get("lookup"),
                            draft_timeout_s=timeout, budget_range=(max(1, p.budget // 4), 2 * p.budget) if adaptive else None,
                            draft_prefill_alongside=p.draft_has_own_cores or not self.target.uses_host_cores,
                            pause_when_slower=adaptive, datastore=self.retrieval.datastore,
                            output_cache=self.retrieval.cache)

    def draft_stats(self):
        """The draft worker's counters (runtime.channel.DraftStats: busy/idle time, overlap hits...), or None."""
        return self._draft.stats if self._draft is not None else None

    def draft_round_trips(self, n: int = 1) -> list[float]:
        """Seconds of n channel round trips to the draft worker (PING), [] without a draft."""
        return [self._draft.ping() for _ in range(n)] if self._draft is not None else []

    def accelerator_counters(self):
        """SIMULATION: the simulated accelerator's counters (busy, idle between passes, gaps); None for a real target."""
        return self.target.counters

    def stream_tokens(self, prompt: str | Messages | Sequence[int], *, max_new_tokens: int = 256,
                      temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                      stop: str | Sequence[str] = (), system: str | None = None, chat: bool | None = None,
                      stats: Stats | None = None, mode: str | None = None, budget: int | None = None,
                      width: int | None = None, shape: str | None = None, lookup: bool | None = None,
                      retrieval: bool = True, remember: bool = True, logprobs: int | None = None,
                      model_draft: bool = True) -> Iterator[tuple[list[int], str]]:
        """Yield (committed token ids, new text) per round. The lower-level form of `stream`.

        Takes the arguments of `generate`, plus `stats` (a runtime.decode.Stats filled in as it goes) and
        mode/budget/width/shape/lookup, which override the plan for this call (benchmarks and the profiler
        sweep them); retrieval=False drafts without the datastore and the output cache, model_draft=False without
        the draft model (the free sources alone: REST as its authors run it), remember=False keeps
        this answer out of the cache (a bench warm-up); logprobs=K fills stats.token_logprobs with each token's
        logprob under the target and its K likeliest. The text may be "" for a round not complete yet.
        """
        from .runtime.decode import Stats, generate_tokens
        from .runtime.notices import warn_if_not_speculating
        from .runtime.placement import pinned, torch_threads

        stop = [stop] if isinstance(stop, str) else list(stop or ())
        if any(not isinstance(s, str) or s == "" for s in stop):
            raise UsageError("stop strings must be non-empty text")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        sampling = sampling_params(temperature, top_p, top_k, seed)
        stats = stats if stats is not None else Stats()
        stats.verify = getattr(self.target, "verify", "eager")
        with self._exclusive():
            ids = self.encode(prompt, system=system, chat=chat)
            cfg = self._decode_config(max_new_tokens, sampling, len(ids),
                                      dict(mode=mode, budget=budget, width=width, shape=shape, lookup=lookup))
            if not retrieval:
                cfg.datastore = cfg.output_cache = None
            cfg.logprobs, cfg.model_draft, cfg.record_top_k = logprobs, model_draft, self.adaptation.top_k
            if cfg.max_new_tokens == 0:
                return
            try:   # SIMULATION: the recording it replays, made once per prompt (a real target: nothing to do)
                self.target.prepare(ids, cfg.max_new_tokens, cfg.sampling)
            except ValueError as e:
                raise UsageError(str(e)) from e
            self._ensure_draft()
            draft = self._draft if cfg.mode != "target" and model_draft else None
            self.adaptation.before_generation(draft)
            stats.adapter = self.adaptation.applied if draft is not None else None
            text = TextStream(self.target.tokenizer, stop)
            produced: list[int] = []
            with pinned(self.plan.target_cores), torch_threads(self.plan.target_threads):
                gen = generate_tokens(self.target, draft, ids, cfg, stats)
                try:
                    for new in gen:
                        produced += new
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
                    if not is_oom(e):
                        raise
                    raise DuoError(f"out of memory while generating on {self.target.device}: use a shorter prompt, "
                                   f"fewer new tokens or a smaller --budget") from e
                finally:
                    gen.close()
                    if remember and produced:
                        self.retrieval.remember(ids + produced)
                    self._draft_failed = stats.fallback is not None and draft is not None
                    warn_if_not_speculating(stats, draft is not None)
                    self.adaptation.after_generation(ids + produced, len(ids), stats)

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
        temperature: 0 = greedy, the target's own output (fp32: token for token; else up to near-ties); > 0 samples.
        top_p: nucleus mass in (0, 1]; top_k: sample among the k most likely tokens (0 = all).
        seed: with a seed, sampling is reproducible; the tokens follow the target's own distribution.
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
        self.retrieval.close()
        self.adaptation.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
