"""The Engine's side of draft adaptation (duo/adapt/): recording each generation into the pair's buffer,
the LoRA adapter its draft worker applies, and the background adaptation of online mode.

    adapter   "auto": the pair's latest accepted adapter, looked up again before every generation (a new
              one from `duo adapt` or online mode is swapped in at the next generation); a path; "off"
    LoRA      llama.cpp applies the adapter in the running worker (the default, and where merging fails)
    merge     opt-in (Adaptation.merge): the adapter merged into a Q4_0 copy of the draft (adapt/merge.py)
              that the worker restarts on, at the plain draft's speed, but Q4_0's step (about 14x the
              adapter's largest change on GSM8K) erases the adapter and reshuffles the rounding: measured,
              worse than no adapter
    record    each generation's tokens, the target's top-K per token and the draft's rejections, appended
              to <cache>/adapt/<pair>/records (duo/adapt/buffer.py)
    online    with record: a background `duo adapt` whenever enough new records came in, run while the
              engine is idle and paused (SIGSTOP) while a generation runs (duo/adapt/online.py)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

log = logging.getLogger("duo")


def check_adaptation_args(adapter, record, online) -> None:
    from .adapt.store import check_adapter_arg
    check_adapter_arg(adapter)
    for name, v in (("record", record), ("adapt_online", online)):
        if not isinstance(v, bool):
            raise UsageError(f"{name} must be True or False, got {v!r}")
    if online and not record:
        raise UsageError("adapt_online learns from recorded generations: also pass record=True (--record)")
    if online and str(adapter) != "auto":
        raise UsageError(f"adapt_online swaps in the adapters it trains: use adapter='auto' (--adapter auto), not "
                         f"{adapter!r}")


@dataclass
class Adaptation:
    adapter: str = "off"            # auto | PATH | off
    pair: Path | None = None        # <cache>/adapt/<pair> (None: no draft)
    draft_gguf: Path | None = None
    buffer: object = None           # adapt.buffer.RecordBuffer when recording
    online: object = None           # adapt.online.OnlineAdapter in online mode
    run_gguf: Path | None = None    # the file the worker runs without an adapter (the draft or its Q4_0 copy)
    merge: bool = False             # apply adapters merged into a Q4_0 draft instead of as a LoRA: off, as
    # requantizing to Q4_0 loses the adapter (GSM8K: acceptance 0.65 -> 0.19 merged, 0.73 as a LoRA; adapt/merge.py)
    applied: str | None = None      # the adapter in effect for the current generation
    progress: bool = False

    @classmethod
    def open(cls, adapter: str, record: bool, online: bool, target_name: str, draft_gguf: Path | None,
             run_gguf: Path | None = None, progress: bool = False) -> "Adaptation":
        from .adapt import store
        from .adapt.buffer import RecordBuffer, pair_dir
        if draft_gguf is None:
            return cls(adapter=str(adapter))
        pair = pair_dir(target_name, draft_gguf)
        store.resolve(adapter, pair, draft_gguf)      # a bad PATH is refused now, before anything runs
        run_gguf = Path(run_gguf or draft_gguf)
        a = cls(adapter=str(adapter), pair=pair, draft_gguf=Path(draft_gguf),
                buffer=RecordBuffer(pair) if record else None, run_gguf=run_gguf, progress=progress)
        if online:
            from .adapt.online import OnlineAdapter
            a.online = OnlineAdapter(pair, draft_gguf, merge=a.merge, base_gguf=run_gguf)
        return a

    @property
    def top_k(self) -> int:
        from .adapt.buffer import TOP_K
        return TOP_K if self.buffer is not None else 0

    def before_generation(self, draft) -> None:
        """Pause any background training; give the worker the adapter wanted now (a swap only on change)."""
        from .adapt import store
        if self.online is not None:
            self.online.pause()
        if draft is None or self.pair is None:
            return
        want = store.resolve(self.adapter, self.pair, self.draft_gguf)
        model, lora = self.wanted(want)
        if (model, lora) == (draft.cfg.gguf_path, draft.adapter):
            return
        try:
            if model != draft.cfg.gguf_path:
                draft.set_model(model)
            if lora != draft.adapter:
                draft.set_adapter(lora)
            self.applied = str(want) if want is not None else None
            log.info("draft adapter: %s", f"{want} ({'a LoRA' if lora else 'merged'})" if want else "none")
        except Exception as e:  # noqa: BLE001 - the draft only loses speed; said once, plainly
            self.applied = None
            log.warning("the draft worker could not apply the adapter %s (%s): drafting without it", want, e)
            if draft.cfg.gguf_path != str(self.run_gguf):
                draft.set_model(str(self.run_gguf))

    def wanted(self, want: Path | None) -> tuple[str, str | None]:
        """(the GGUF the worker should run, the LoRA it should apply) for the adapter `want`."""
        plain = str(self.run_gguf)
        if want is None:
            return plain, None
        if self.merge:
            from .adapt.merge import merged_draft
            try:
                return str(merged_draft(self.draft_gguf, want, self.progress)), None
            except Exception as e:  # noqa: BLE001 - the LoRA at run time does the same, only slower
                log.warning("could not merge the adapter %s into the draft (%s): applying it as a LoRA", want, e)
        return plain, str(want)

    def after_generation(self, tokens: list[int], n_prompt: int, stats) -> None:
        """Record the generation (when recording) and let online mode train while the engine is idle."""
        if self.buffer is not None:     # (nothing is written for an empty answer)
            self.buffer.append(tokens, n_prompt, stats.target_top_k, stats.rejected_at)
        if self.online is not None:
            self.online.resume()

    def close(self) -> None:
        if self.online is not None:
            self.online.close()
            self.online = None
