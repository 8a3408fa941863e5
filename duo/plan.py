"""How a generation runs: the schedule (`Plan`) and the shape of each round's draft tree (`TreeSpec`).

Every knob is named and validated here once; the Engine, the profiler, the decode loop and the channel
to the draft worker all take these objects (configuration flows one way, from the caller down).

    MODES:  overlap (the draft drafts while the target verifies) | sequential | target (no draft)
    SHAPES: chain | dynamic (DuoDecoding: branch where p > p1 * p2) | eagle (EAGLE-2: top-k by path score)
    PRECISIONS: float32 | bfloat16 | float16 | int8 (int8 weights, bf16 activations) | w8a8 (int8 weights and
                activations, CPU): the target's numerics
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .errors import UsageError
from .runtime.tree_shapes import SHAPES

MODES = ("overlap", "sequential", "target")
PRECISIONS = ("float32", "bfloat16", "float16", "int8", "w8a8")   # the target's (runtime/precision.py), or "auto"
PRECISION_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "w8": "int8"}


def _int_in(value, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise UsageError(f"{name} must be an integer {rng}, got {value!r}")
    return value


@dataclass(frozen=True)
class TreeSpec:
    """One round's draft tree, as asked of the draft worker."""
    budget: int = 16           # drafted nodes per round (0: none, only keep the draft's cache in step)
    width: int = 4             # max branches (dynamic) / frontier width (eagle); chain ignores it
    shape: str = "dynamic"     # a name in SHAPES

    def validate(self, max_nodes: int | None = None, max_seqs: int | None = None) -> "TreeSpec":
        """Itself, or a UsageError naming the bad value (limits: the worker's capacity, when known)."""
        if self.shape not in SHAPES:
            raise UsageError(f"unknown shape {self.shape!r}: use {', '.join(SHAPES)}")
        _int_in(self.budget, "budget", 0, max_nodes)
        _int_in(self.width, "width", 1, max_seqs)
        return self

    @property
    def cells_per_node(self) -> int:
        """KV cells a node may hold in the draft's cache while drafting (eagle's live branches: width)."""
        return self.width if self.shape == "eagle" else 1

    def replace(self, **changes) -> "TreeSpec":
        """A copy with the given fields changed (None leaves a field as it is)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


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

    @property
    def tree(self) -> TreeSpec:
        return TreeSpec(self.budget, self.width, self.shape)

    @property
    def draft_has_own_cores(self) -> bool:
        """The draft is pinned to cores the target does not use (it can work while the target does)."""
        return bool(self.draft_cores and self.target_cores and not set(self.draft_cores) & set(self.target_cores))


def check_mode(mode: str, allow_auto: bool = True) -> str:
    allowed = (("auto",) if allow_auto else ()) + MODES
    if mode not in allowed:
        raise UsageError(f"unknown mode {mode!r}: use {', '.join(allowed)}")
    return mode


def on_gpu(device) -> bool:
    """Does the target run on a GPU? `device`: "cpu", "cuda", "cuda:N" or "auto" (a GPU if torch sees one)."""
    d = str(device)
    if d == "auto":
        import torch   # only here: the draft worker imports this module without torch
        return torch.cuda.is_available()
    return d.startswith("cuda")


def default_plan(mode: str, budget: int | None, device="cpu") -> Plan:
    """Without a saved profile. On a GPU target the schedule overlaps: the target's host thread keeps the first
    core, the draft has the others. On the CPU: sequential, sharing the cores; an asked-for overlap splits them."""
    cores = sorted(os.sched_getaffinity(0))
    gpu = mode != "target" and on_gpu(device)
    mode = ("overlap" if gpu else "sequential") if mode == "auto" else mode
    plan = Plan(mode=mode, budget=budget or 16)
    if gpu and mode == "overlap":   # the GPU computes; its host thread needs about one core
        plan.target_cores, plan.draft_cores = cores[:1], cores[1:] or cores
        plan.target_threads, plan.draft_threads = 1, len(plan.draft_cores)
    elif mode == "overlap" and len(cores) >= 2:
        n_draft = max(1, len(cores) // 4) if len(cores) >= 8 else 1
        plan.draft_cores, plan.target_cores = cores[-n_draft:], cores[:-n_draft]
        plan.draft_threads, plan.target_threads = n_draft, len(cores) - n_draft
    else:
        plan.draft_threads = plan.target_threads = min(len(cores), 8) if mode != "target" else len(cores)
    return plan
