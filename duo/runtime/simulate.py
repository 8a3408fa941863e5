"""A simulated accelerator: the target replayed from a recording of its own output, timed like a GPU.

SIMULATION, for machines without the accelerator. With greedy decoding the verification of any draft
tree depends only on the target's own greedy continuation of the prompt, so the real target runs alone
once per prompt (`record_target`: the target-only path of the round loop, cached on disk) and then

    prefill(prompt)         sleeps prefill_ms(len(prompt))
    forward_tree(root+tree) the target's choice at a node = record[n_new + depth] when the node's path
                            from the root matches the record so far, else -1 (no token: never a child);
                            takes forward_ms(1 + len(tree)), a blocking sleep (never a busy wait)
    compact_cache           keeps prefix + root + accepted path, as the real cache does

so the output is the recording token for token, while the draft runs for real in its own process,
with every core to itself (the simulated accelerator uses none). `SimulatedTarget` implements the
Target interface (target_interface.py), as the torch TargetModel does.

Accelerator profiles (name, forward_ms(n) = base_ms + per_token_ms * (n - 1), prefill, and the
published measurement behind them) live in configs/accelerators.json; see configs/accelerators.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from .tree import Tree

ACCELERATORS_PATH = Path(__file__).resolve().parent.parent.parent / "configs" / "accelerators.json"
NO_TOKEN = -1   # the simulated target's choice at a node off the recorded path: equals no draft token


class SimulationError(ValueError):
    """The simulation cannot do what was asked (sampling, an unknown profile, a prompt not recorded)."""


# ------------------------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class Accelerator:
    """Timing of a simulated accelerator, in ms."""
    name: str
    base_ms: float                          # one forward pass over 1 token (a decode step)
    per_token_ms: float = 0.0               # each further token of the same pass
    prefill_ms_per_token: float | None = None   # prompt processing; None: per_token_ms
    description: str = ""
    source: str = ""                        # the published measurement the numbers come from
    estimated: str = ""                     # which numbers are estimates, and how they were made

    def forward_ms(self, n: int) -> float:
        """One target pass over n tokens (root + tree)."""
        return self.base_ms + self.per_token_ms * (max(1, int(n)) - 1)

    def prefill_ms(self, n: int) -> float:
        """Prefill of n prompt tokens: at least one pass, else the prompt-processing rate."""
        if n <= 0:
            return 0.0
        rate = self.per_token_ms if self.prefill_ms_per_token is None else self.prefill_ms_per_token
        return max(self.forward_ms(1), n * rate)

    def curve(self, max_n: int = 64) -> dict[int, float]:
        return {n: self.forward_ms(n) for n in range(1, max_n + 1)}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, name: str | None = None) -> "Accelerator":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SimulationError(f"unknown accelerator field(s) {', '.join(sorted(unknown))}; "
                                  f"known: {', '.join(sorted(known))}")
        d = dict(d, name=d.get("name") or name or "custom")
        try:
            acc = cls(**d)
        except TypeError as e:
            raise SimulationError(f"accelerator {d['name']!r}: {e}") from e
        if not (acc.base_ms >= 0 and acc.per_token_ms >= 0 and (acc.prefill_ms_per_token or 0) >= 0):
            raise SimulationError(f"accelerator {acc.name!r}: times must be >= 0")
        return acc


def load_accelerators(path: str | Path | None = None) -> dict[str, Accelerator]:
    """The profiles in configs/accelerators.json (or `path`), by name."""
    p = Path(path) if path else ACCELERATORS_PATH
    data = json.loads(p.read_text(encoding="utf-8"))
    return {k: Accelerator.from_dict(v, k) for k, v in data["accelerators"].items()}


def get_accelerator(spec) -> Accelerator:
    """An Accelerator from a profile name, a dict of its fields, a JSON file holding one, or itself."""
    if isinstance(spec, Accelerator):
        return spec
    if isinstance(spec, dict):
        return Accelerator.from_dict(spec)
    if isinstance(spec, (str, os.PathLike)):
        known = load_accelerators()
        if str(spec) in known:
            return known[str(spec)]
        p = Path(spec).expanduser()
        if p.is_file():
            data = json.loads(p.read_text(encoding="utf-8"))
            if "accelerators" in data:
                raise SimulationError(f"{p} holds several accelerators: name one of them instead")
            return Accelerator.from_dict(data, p.stem)
        raise SimulationError(f"unknown accelerator {str(spec)!r}: use one of {', '.join(known)} "
                              f"(configs/accelerators.json), or a JSON file with one profile")
    raise SimulationError(f"an accelerator is a name, a dict or a JSON file, not {type(spec).__name__}")


# ------------------------------------------------------------------------------------------- recordings
@dataclass
class Record:
    """The target's own greedy output for one prompt."""
    tokens: list[int]
    stop: str                  # eos | length
    max_new_tokens: int
    model: str
    prompt_hash: str
    prompt_len: int
    wall_s: float = 0.0        # what recording took (the real target, on this machine)

    def covers(self, max_new_tokens: int) -> bool:
        return self.stop == "eos" or len(self.tokens) >= max_new_tokens


def records_dir() -> Path:
    from ..models import cache_dir
    return cache_dir() / "simulate" / "records"


def model_key(tm) -> str:
    """Names the target a recording is valid for: its name, precision and a hash of a few of its weights."""
    fp = tm.extra.get("sim_fingerprint") if isinstance(getattr(tm, "extra", None), dict) else None
    if fp is None:
        import torch
        h = hashlib.sha256()
        with torch.inference_mode():
            emb = tm.model.get_input_embeddings().weight
            h.update(emb[:8, :64].detach().float().cpu().numpy().tobytes())
            h.update(emb[-8:, -64:].detach().float().cpu().numpy().tobytes())
        h.update(f"{tm.vocab_size}:{sum(p.numel() for p in tm.model.parameters())}".encode())
        fp = h.hexdigest()[:12]
        if isinstance(getattr(tm, "extra", None), dict):
            tm.extra["sim_fingerprint"] = fp
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(tm.name))[:60]
    precision = getattr(tm, "precision", None) or str(tm.dtype).replace("torch.", "")   # int8 is not its bf16
    return f"{name}-{precision}-{fp}"


def prompt_hash(ids) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def record_path(model: str, ids, max_new_tokens: int, directory: str | Path | None = None) -> Path:
    return Path(directory or records_dir()) / f"{model}-{prompt_hash(ids)}-{max_new_tokens}.json"


_MEMORY: dict[tuple[str, str], Record] = {}   # (model key, prompt hash) -> the longest recording seen


def load_record(model: str, ids, max_new_tokens: int, directory: str | Path | None = None) -> Record | None:
    """A saved recording of this model and prompt covering max_new_tokens (any longer one will do)."""
    h = prompt_hash(ids)
    best = None
    for p in sorted(Path(directory or records_dir()).glob(f"{model}-{h}-*.json")):
        try:
            r = Record(**json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            continue
        if r.model == model and r.prompt_hash == h and r.covers(max_new_tokens) and \
                (best is None or len(r.tokens) < len(best.tokens)):
            best = r
    return best


def save_record(rec: Record, directory: str | Path | None = None) -> Path:
    path = Path(directory or records_dir()) / f"{rec.model}-{rec.prompt_hash}-{rec.max_new_tokens}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(asdict(rec)) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def record_target(tm, ids, max_new_tokens: int, directory: str | Path | None = None,
                  use_cache: bool = True) -> Record:
    """The target's greedy output for `ids`: from memory or disk if recorded before, else by running the
    real target alone (duo's target-only path) with every core, and saving it."""
    import torch

    from .decode import DecodeConfig, Stats, generate_tokens

    model = model_key(tm)
    h = prompt_hash(ids)
    mem = _MEMORY.get((model, h))
    if use_cache and mem is not None and mem.covers(max_new_tokens):
        return mem
    rec = load_record(model, ids, max_new_tokens, directory) if use_cache else None
    if rec is None:
        saved = torch.get_num_threads()
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        try:
            stats, out = Stats(), []
            t0 = time.perf_counter()
            with torch.inference_mode():
                for new in generate_tokens(tm, None, list(ids), DecodeConfig(max_new_tokens=max_new_tokens,
                                                                             mode="target", lookup=False), stats):
                    out += new
        finally:
            torch.set_num_threads(saved)
        rec = Record(out, stats.stop_reason, max_new_tokens, model, h, len(ids), round(time.perf_counter() - t0, 3))
        if use_cache:
            save_record(rec, directory)
    if mem is None or len(rec.tokens) > len(mem.tokens) or rec.stop == "eos":
        _MEMORY[(model, h)] = rec
    return rec


# ------------------------------------------------------------------------------------------- the target
@dataclass
class SimCache:
    """Stands in for the KV cache: the token ids it would hold (committed[:-1], then the tree nodes)."""
    tokens: list[int] = field(default_factory=list)
    prompt_len: int = 0
    record: Record | None = None


@dataclass
class SimCounters:
    forwards: int = 0
    forward_tokens: int = 0
    busy_s: float = 0.0        # simulated accelerator time (prefill + forwards)
    prefill_s: float = 0.0
    overrun_s: float = 0.0     # host work of a pass beyond the accelerator's time (should stay ~0)
    idle_s: float = 0.0        # the accelerator idle between passes, from the end of a generation's first
    gaps: int = 0              # pass on (steady state: its prefill and first tree excluded), and how often


class SimulatedTarget:
    """A TargetModel stand-in that replays `target`'s recorded output with `accelerator`'s timing.

    Call `prepare(prompt_ids, max_new_tokens)` before generating (the Engine does): it records the
    prompt with the real target once (or loads the recording). Greedy decoding only."""

    uses_host_cores = False   # the accelerator's passes are sleeps: the draft may have every core

    def __init__(self, target, accelerator, directory: str | Path | None = None, use_cache: bool = True):
        self.target = target
        self.accelerator = get_accelerator(accelerator)
        self.directory, self.use_cache = directory, use_cache
        self.counters = SimCounters()
        self._records: dict[tuple, Record] = {}
        self._last_end: float | None = None   # end of the previous pass of this generation

    # the rest of what the round loop and the Engine read of a target: the real one's (tokenizer, vocab_size...)
    def __getattr__(self, name):
        if name == "target":
            raise AttributeError(name)
        return getattr(self.target, name)

    @property
    def name(self) -> str:
        return f"{self.target.name} (simulated {self.accelerator.name})"

    def prepare(self, ids, max_new_tokens: int, sampling=None) -> Record:
        """Make sure the recording of `ids` covers max_new_tokens; greedy only."""
        if sampling is not None and not sampling.greedy:
            raise SimulationError("the simulated accelerator replays the target's greedy output: sampling "
                                  "(temperature > 0) cannot be simulated; use temperature 0")
        rec = self._records.get(tuple(ids))
        if rec is None or not rec.covers(max_new_tokens):
            rec = record_target(self.target, ids, max_new_tokens, self.directory, self.use_cache)
            self._records[tuple(ids)] = rec
        return rec

    def record(self, ids) -> Record:
        rec = self._records.get(tuple(ids))
        if rec is None:
            raise SimulationError("no recording of this prompt: call SimulatedTarget.prepare(prompt_ids, "
                                  "max_new_tokens) before generating")
        return rec

    # -- the Target interface (target_interface.py), simulated ------------------------------------
    def _wait(self, t0: float, ms: float) -> None:
        """Until t0 + ms: a blocking sleep, so the draft has every core meanwhile."""
        left = t0 + ms / 1000.0 - time.perf_counter()
        if left > 0:
            time.sleep(left)
        else:
            self.counters.overrun_s -= left
        self.counters.busy_s += ms / 1000.0

    def new_cache(self) -> SimCache:
        return SimCache()

    def cache_length(self, cache: SimCache) -> int:
        return len(cache.tokens)

    def compact_cache(self, cache: SimCache, n_keep: int, path: list[int]) -> None:
        cache.tokens = cache.tokens[:n_keep] + [cache.tokens[n_keep + k] for k in path]

    def choose_tokens(self, choices: np.ndarray, sampling, u) -> np.ndarray:
        """forward_tree returns the choices themselves."""
        if not sampling.greedy:
            raise SimulationError("the simulated accelerator replays greedy decoding only (temperature 0)")
        return choices

    def token_logprobs(self, choices, rows, tokens, top) -> list:
        """A replay has no distribution to give."""
        return []

    def prefill(self, cache: SimCache, tokens) -> np.ndarray:
        """The whole prompt; returns the target's first token (the recording's), as the real prefill's logits
        give it."""
        t0 = time.perf_counter()
        self._last_end = None
        if not cache.tokens:
            cache.prompt_len = len(tokens)
            cache.record = self.record(list(tokens))
        cache.tokens.extend(int(t) for t in tokens)
        ms = self.accelerator.prefill_ms(len(tokens))
        self.counters.prefill_s += ms / 1000.0
        self._wait(t0, ms)
        rec = cache.record.tokens
        return np.array([rec[0] if rec else NO_TOKEN], dtype=np.int64)

    def forward_tree(self, cache: SimCache, root: int, tree: Tree) -> np.ndarray:
        """The target's choice after the root and after every node (no logits: the choices themselves)."""
        t0 = time.perf_counter()
        if cache.record is None:
            cache.record = self.record(cache.tokens + [int(root)])
        rec = cache.record.tokens
        n_new = len(cache.tokens) + 1 - cache.prompt_len
        committed = cache.tokens[cache.prompt_len:] + [int(root)] if n_new > 0 else []
        if committed != rec[:n_new]:
            raise SimulationError(f"the committed output left the recording at token {n_new}: the round loop "
                                  f"emitted a token the target would not have")
        n = len(tree)
        choices = np.full(n + 1, NO_TOKEN, dtype=np.int64)
        if n_new < len(rec):
            choices[0] = rec[n_new]
        on_path = np.zeros(n, dtype=bool)
        depth = tree.depths() if n else np.zeros(0, np.int64)
        for k in range(n):
            p, at = int(tree.parents[k]), n_new + int(depth[k]) - 1
            if (p < 0 or on_path[p]) and at < len(rec) and int(tree.tokens[k]) == rec[at]:
                on_path[k] = True
                if at + 1 < len(rec):
                    choices[k + 1] = rec[at + 1]
        cache.tokens.append(int(root))
        cache.tokens.extend(int(t) for t in tree.tokens)
        if self._last_end is not None:
            self.counters.idle_s += t0 - self._last_end
            self.counters.gaps += 1
        self.counters.forwards += 1
        self.counters.forward_tokens += n + 1
        self._wait(t0, self.accelerator.forward_ms(n + 1))
        self._last_end = time.perf_counter()
        return choices
