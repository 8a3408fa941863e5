"""w8a8: the Linears that read the same input run as one matmul (q, k, v; gate, up), bit for bit as before.

A W8A8Linear quantizes its input rows (one scale per row), multiplies in int32 (exact) and scales each output
column by its own weight scale, so a column's value depends only on the input row and that column's weights:
stacking the weights of q, k and v (or gate and up) into one layer gives each of them exactly the columns it
gave alone. One matmul instead of three reads the input once, quantizes it once and calls oneDNN once.

    fused = FusedLinears([q_proj, k_proj, v_proj], dtype)     weights stacked [sum(out), in], biases too
    q_proj = fused.part(0)  k_proj = fused.part(1) ...        each a module: x -> its columns of fused(x)

The model calls the parts one after another with the same input tensor: the first call runs the fused layer
and keeps its output until every part has taken its columns (a part called again, or with another input,
runs it again).
"""
from __future__ import annotations

import torch

from .precision import W8A8Linear

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))   # Llama / Qwen2 / Mistral names


class FusedLinears(torch.nn.Module):
    def __init__(self, linears: list[torch.nn.Linear], dtype: torch.dtype):
        super().__init__()
        stacked = torch.nn.Linear(linears[0].in_features, sum(m.out_features for m in linears),
                                  bias=any(m.bias is not None for m in linears))
        with torch.no_grad():
            stacked.weight.copy_(torch.cat([m.weight.detach().float() for m in linears]))
            if stacked.bias is not None:
                stacked.bias.copy_(torch.cat([m.bias.detach().float() if m.bias is not None
                                              else torch.zeros(m.out_features) for m in linears]))
        self.layer = W8A8Linear(stacked, dtype)
        self.bounds = [0]
        for m in linears:
            self.bounds.append(self.bounds[-1] + m.out_features)
        self._x = self._y = None
        self._taken: set[int] = set()

    def columns(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if torch.compiler.is_compiling():                 # no state in a traced graph (it may dedupe the calls)
            return self.layer(x)[..., self.bounds[i]:self.bounds[i + 1]]
        if x is not self._x or i in self._taken:
            self._x, self._y, self._taken = x, self.layer(x), set()
        self._taken.add(i)
        y = self._y[..., self.bounds[i]:self.bounds[i + 1]]
        if len(self._taken) == len(self.bounds) - 1:      # every part has its columns: keep nothing
            self._x = self._y = None
        return y

    def part(self, i: int) -> "FusedPart":
        return FusedPart(self, i)


class FusedPart(torch.nn.Module):
    """One of a FusedLinears' layers: its columns of the fused output."""

    def __init__(self, fused: FusedLinears, i: int):
        super().__init__()
        self.fused, self.i = fused, i
        self.in_features = fused.layer.in_features
        self.out_features = fused.bounds[i + 1] - fused.bounds[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.columns(x, self.i)


def fuse_shared_inputs(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Replace each group of GROUPS found in one module (all plain Linears over the same input size) by the
    parts of one FusedLinears; returns the groups fused."""
    n = 0
    for module in list(model.modules()):
        for names in GROUPS:
            layers = [getattr(module, name, None) for name in names]
            if all(type(m) is torch.nn.Linear for m in layers) and len({m.in_features for m in layers}) == 1:
                fused = FusedLinears(layers, dtype)
                for i, name in enumerate(names):
                    setattr(module, name, fused.part(i))
                n += 1
    return n
