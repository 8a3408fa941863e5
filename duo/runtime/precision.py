"""The target's precision: the dtype its activations run in and how its weights are stored.

    float32 / bfloat16 / float16   dense weights in that dtype
    int8                           weight-only int8 (one scale per output channel, symmetric), activations in
                                   bfloat16 (float16 on a GPU without bf16): torch's own int8-weight matmul
                                   (torch._weight_int8pack_mm, CPU and CUDA); embeddings and norms stay dense
    w8a8                           int8 weights as above and int8 activations, quantized per row (per token) on
                                   the fly; int8 x int8 -> int32 (oneDNN, VNNI/AMX where the CPU has them);
                                   CPU only. Integer sums are exact, so a linear gives a row the same result
                                   whatever else is in the pass: only attention and norms differ between a
                                   verification pass and a step

Precision changes the target's numerics, so duo never switches it silently: "auto" is float32 on the CPU
and bfloat16 on a GPU that has it natively (compute capability 8.0+; float16 on older ones), and the
profiler only recommends (`duo profile` reports each one).
Exactness holds relative to the target as loaded in its precision: float32 token for token; in bfloat16,
float16, int8 and w8a8 a verification pass (1 + n rows) and one-token decoding (1 row) run different kernels, so
greedy output may part at a near-tie (top-2 logits closer than the rounding; the tests measure the bound).

    W8 matmul:    y = (x @ q.T) * s                 q int8 [out, in], s [out] = max |w_row| / 127, q = round(w / s)
    W8A8 matmul:  y = (round(x / a) @ q.T) * a * s  a [rows, 1] = max |x_row| / 127, the product in int32
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import PRECISION_ALIASES as ALIASES, PRECISIONS


@dataclass(frozen=True)
class Precision:
    name: str             # a key of PRECISIONS
    dtype: torch.dtype    # activations (and dense weights)
    weights: str          # "dense" | "int8" | "w8a8"

    @property
    def storage(self) -> str:
        """The dtype the converted weights are cached in (the int8 weights are made from them at load)."""
        return str(self.dtype).replace("torch.", "")


class PrecisionError(ValueError):
    pass


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: compute capability >= 8.0 (Ampere on) on a CUDA GPU, always on ROCm and the CPU.

    Not `torch.cuda.is_bf16_supported()`: it also counts emulation (T4, V100, RTX 20xx run bf16 slowly);
    `is_bf16_supported(including_emulation=False)` is this test, but on the current device only.
    """
    if device.type != "cuda" or torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def gpu_half(device: torch.device) -> torch.dtype:
    """A GPU's 16-bit dtype: bfloat16 where it is native, else float16 (load_target checks its logits are finite)."""
    return torch.bfloat16 if native_bf16(device) else torch.float16


def resolve_precision(name, device: torch.device) -> Precision:
    """'auto': float32 on the CPU, bfloat16 on a GPU that has it natively (else float16)."""
    if isinstance(name, torch.dtype):
        name = str(name).replace("torch.", "")
    name = ALIASES.get(name, name)
    if name == "auto":
        name = "float32" if device.type == "cpu" else str(gpu_half(device)).replace("torch.", "")
    if name not in PRECISIONS:
        raise PrecisionError(f"unknown dtype {name!r}: use auto, {', '.join(PRECISIONS)}")
    if name == "int8":
        return Precision("int8", gpu_half(device), "int8")
    if name == "w8a8":
        if device.type != "cpu":
            raise PrecisionError("--dtype w8a8 runs on the CPU only: on a GPU use int8 (or bfloat16)")
        return Precision("w8a8", torch.bfloat16, "w8a8")
    return Precision(name, getattr(torch, name), "dense")


def available_precisions(device: torch.device) -> list[str]:
    """The precisions this machine runs the target in (float16 only on a GPU: the CPU has no fast fp16 matmul)."""
    if device.type == "cpu":
        return ["float32", "bfloat16", "int8", "w8a8"]
    return ["float32"] + (["bfloat16"] if native_bf16(device) else []) + ["float16", "int8"]


def int8_weights(linear: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """q int8 [out, in] (contiguous), s float32 [out]: w = q * s per output channel, symmetric."""
    w = linear.weight.detach().to(torch.float32)
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous(), scale


class Int8Linear(torch.nn.Module):
    """A Linear with int8 weights and one scale per output channel."""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype):
        super().__init__()
        q, scale = int8_weights(linear)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scale.to(dtype))
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.scales.dtype)
        y = torch._weight_int8pack_mm(rows, self.qweight, self.scales).reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class W8A8Linear(torch.nn.Module):
    """A Linear with int8 weights (one scale per output channel) whose input rows are quantized to int8 too
    (one scale per row): an int32 matmul in oneDNN with the weights packed once for this CPU.

    oneDNN's fast kernels take unsigned activations: q + 128 with zero point 128 gives the same int32 sums.
    """

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype):
        super().__init__()
        q, scale = int8_weights(linear)
        self.packed = torch.ops.onednn.qlinear_prepack(q, [1, linear.in_features])   # opaque: not a buffer
        self.packed_bytes = q.numel()
        self.register_buffer("scales", scale)                                         # float32 [out]
        self.register_buffer("zero_points", torch.zeros(linear.out_features, dtype=torch.long))
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.float32)
        a = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0                 # [rows, 1]
        q = (rows / a).round_().add_(128).to(torch.uint8)                                 # round(x / a) + 128
        acc = torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, self.packed, self.scales, self.zero_points, None,
                                                 1.0, 0, torch.float32, "none", [], "")  # [rows, out] = (q-128) @ w
        y = (acc * a).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def quantize_linears(model: torch.nn.Module, dtype: torch.dtype, weights: str) -> int:
    """Replace every Linear (the output layer included) by the layer of Precision.weights ("int8": Int8Linear,
    "w8a8": W8A8Linear); returns how many."""
    kind = {"int8": Int8Linear, "w8a8": W8A8Linear}[weights]
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, kind(child, dtype))
                n += 1
    return n


def footprint_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights and buffers (tensors shared by tied layers counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total + sum(m.packed_bytes for m in model.modules() if isinstance(m, W8A8Linear))
