"""One adaptation of a pair: records -> train/held-out split -> LoRA -> (if it helps) the pair's accepted adapter.
`duo adapt` runs it in the foreground; online mode runs `python -m duo.adapt.job PAIR DRAFT PARENT_PID` in
a background process (see online.py), which dies with its parent and checkpoints when told to stop.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from pathlib import Path

from ..errors import UsageError
from .buffer import RecordBuffer, split
from .lora_gguf import write_lora_gguf
from .store import accept, new_adapter_path
from .train import AdaptConfig, AdaptResult, load_draft_torch, train_adapter


def adapt_pair(pair: Path, draft_gguf: Path, cfg: AdaptConfig, *, held_out: float = 0.2, progress: bool = True,
               model=None, base_gguf: Path | None = None) -> tuple[AdaptResult, Path | None]:
    """Train on the pair's records; returns the result and the adapter written (None: not kept).
    The adapter belongs to `draft_gguf` (the pair's draft); it is trained on the weights of `base_gguf`, the
    file the worker runs (the draft's Q4_0 copy where it runs one), so it also learns to undo that file's
    rounding: on GSM8K the copy agreed with the target on 0.891 of held-out tokens, the draft's own file on 0.906."""
    records = RecordBuffer(pair).load()
    if not records:
        raise UsageError("no recorded generations for this model pair yet: generate with `duo run --record` "
                         "(or Engine(record=True)) first")
    train, test = split(records, held_out, cfg.seed)
    if not train or not test:
        raise UsageError(f"only {len(records)} recorded generation(s) for this pair: record at least 2 (better a "
                         f"few dozen) before `duo adapt`")
    base_gguf = Path(base_gguf or draft_gguf)
    model = model if model is not None else load_draft_torch(base_gguf)
    n_head, n_kv = model.config.num_attention_heads, getattr(model.config, "num_key_value_heads", None)
    result = train_adapter(base_gguf, train, test, cfg, Path(pair) / "work", progress=progress, model=model)
    if not result.kept:
        return result, None
    path = write_lora_gguf(new_adapter_path(pair), result.lora, draft_gguf=draft_gguf, alpha=cfg.alpha, n_head=n_head,
                           n_head_kv=n_kv or n_head,
                           meta={"agreement_before": f"{result.agreement_before:.4f}",
                                 "agreement_after": f"{result.agreement_after:.4f}", "rank": cfg.rank,
                                 "trained_on": base_gguf.name, "last_layers": cfg.last_layers,
                                 "records": result.train_records, "steps": result.steps})
    accept(pair, path, result.summary())
    return result, path


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGTERM when the parent dies (no orphan trainer); if it is already gone, exit now."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:
        sys.exit(0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m duo.adapt.job")
    ap.add_argument("pair")
    ap.add_argument("draft")
    ap.add_argument("parent_pid", type=int)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-minutes", type=float, default=20.0)
    ap.add_argument("--merge", action="store_true", help="also merge a kept adapter into a Q4_0 draft")
    ap.add_argument("--base", help="train on this file's weights (the one the worker runs; default: the draft)")
    args = ap.parse_args(argv)
    _die_with_parent(args.parent_pid)

    def stop(signum, frame):          # SIGTERM: checkpoint and leave (train_adapter catches it)
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    try:
        result, path = adapt_pair(Path(args.pair), Path(args.draft),
                                  AdaptConfig(threads=args.threads, max_minutes=args.max_minutes), progress=False,
                                  base_gguf=Path(args.base) if args.base else None)
        if path is not None and args.merge:
            from .merge import merged_draft
            merged_draft(Path(args.draft), path, progress=False)
    except UsageError as e:
        print(f"duo adapt (online): {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"duo adapt (online): agreement {result.agreement_before:.3f} -> {result.agreement_after:.3f}, "
          f"{'kept ' + str(path) if path else 'not kept'}", file=sys.stderr)
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
