"""Sampling parameters and the target's token choice.

Every generated position t owns one uniform number u[t] drawn from a stream
keyed by the seed. The target's token at t is a deterministic function of its
logits and u[t] (argmax when greedy, inverse CDF otherwise). Verification then
only asks "is the target's own choice at this node one of the node's drafted
children?", so a seeded speculative run emits exactly the tokens the target
alone would have sampled with the same seed (in float32; in lower precisions,
up to near-ties where a many-row pass rounds a logit differently), and the
output distribution is the target's by construction, whatever the draft proposed.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch


class SamplingError(ValueError):
    """An invalid sampling value (temperature, top_p, top_k, seed, max_new_tokens, stop)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0         # nucleus mass in (0, 1]
    top_k: int = 0             # 0 = off
    seed: int | None = None    # None = fresh randomness

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> "SamplingParams":
        def number(name, v):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SamplingError(f"{name} must be a finite number, got {v!r}")
        number("temperature", self.temperature)
        number("top_p", self.top_p)
        if self.temperature < 0:
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise SamplingError(f"seed must be an integer >= 0, got {self.seed!r}")
        return self


class UniformStream:
    """u[t] for generated position t, in blocks of 4096 keyed by (seed, block)."""

    BLOCK = 4096

    def __init__(self, seed: int | None):
        self.seed = int.from_bytes(os.urandom(8), "little") if seed is None else seed
        self._blocks: dict[int, np.ndarray] = {}

    def __getitem__(self, t: int) -> float:
        b, i = divmod(int(t), self.BLOCK)
        if b not in self._blocks:
            self._blocks = {b: np.random.default_rng([self.seed, b]).random(self.BLOCK)}
        return float(self._blocks[b][i])

    def take(self, positions) -> np.ndarray:
        return np.array([self[t] for t in positions], dtype=np.float64)


def target_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """softmax(logits / T) restricted to top-k and the top-p nucleus, renormalised. logits: [n, V]."""
    x = logits.float() / p.temperature
    if p.top_k and p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if p.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
        # drop a token when the mass strictly before it already reaches top_p
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= p.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return probs / probs.sum(dim=-1, keepdim=True)


def choose_tokens(logits: torch.Tensor, p: SamplingParams, u: np.ndarray | None) -> np.ndarray:
    """The target's token at each row: argmax if greedy, else inverse CDF of target_probs at u[row]."""
    if p.greedy:
        return logits.argmax(dim=-1).cpu().numpy()
    probs = target_probs(logits, p).double()
    cdf = torch.cumsum(probs, dim=-1)
    uu = torch.as_tensor(u, dtype=torch.float64, device=cdf.device).unsqueeze(-1) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, uu, right=True).squeeze(-1)  # first index with cdf > u
    return tok.clamp_(max=logits.shape[-1] - 1).cpu().numpy()


def token_logprobs(logits: torch.Tensor, rows: list[int], tokens: list[int], top: int) -> list[tuple]:
    """(logprob of tokens[i], [(token, logprob)] of the `top` likeliest) at logits[rows[i]]: the target's own
    distribution (log-softmax of its logits, temperature 1), whatever sampled the token."""
    lp = torch.log_softmax(logits[rows].float(), dim=-1)                       # [len(rows), vocab]
    chosen = lp.gather(-1, torch.as_tensor(tokens, device=lp.device).unsqueeze(-1)).squeeze(-1).tolist()
    if top <= 0:
        return [(c, []) for c in chosen]
    vals, idx = torch.topk(lp, min(top, lp.shape[-1]), dim=-1)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, idx.tolist(), vals.tolist())]
