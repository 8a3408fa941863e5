"""Where and how the target is loaded: its devices, precision, whether its weights fit, and checks of the result.

    --device   auto          every visible GPU (one if the weights fit on it, else spread over all), else the CPU
               cpu | cuda | cuda:N          one device
               cuda:N,M,...  one target spread over these GPUs (transformers' device_map="auto", each GPU's
                             free memory as its max_memory); inputs go to the embedding's GPU
The weights go straight to their device (from_pretrained's device_map: never first in host RAM). Before
loading, their size in the chosen dtype (from the safetensors headers) is compared with the free memory of
the devices (torch.cuda.mem_get_info, psutil's available RAM): too large is a TargetError naming the fix.

    weight bytes = sum over tensors of numel * (dtype's size if floating, else the stored size)

load_target itself is in target.py (it needs TargetModel and check_tree_support); this module does not
import target.py.
"""
from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import torch

from .precision import Precision, PrecisionError, native_bf16, resolve_precision

FLOAT_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}          # scaled to the load dtype
OTHER_SIZES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FINITE_PROBE = "def fibonacci(n):\n    # the n-th Fibonacci number\n    return n if n < 2 else"


class TargetError(RuntimeError):
    """The target could not be loaded or run (device, memory, files)."""


def resolve_devices(device: str | torch.device = "auto") -> list[torch.device]:
    """The devices of a --device (module docstring); a one-line TargetError naming the fix for a bad one."""
    d = str(device).strip()
    if d == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 1:
            return [torch.device("cuda")]
        return [torch.device("cuda", i) for i in range(n)] or [torch.device("cpu")]
    if "," in d:
        return gpu_list(d)
    try:
        dev = torch.device(d)
    except (RuntimeError, ValueError) as e:
        raise TargetError(f"unknown device {d!r}: use auto, cpu, cuda, cuda:N or cuda:N,M") from e
    if dev.type == "cuda":
        check_gpus(d, [dev.index] if dev.index is not None else [])
    elif dev.type != "cpu":
        raise TargetError(f"unsupported device {d!r}: use auto, cpu, cuda, cuda:N or cuda:N,M")
    return [dev]


def gpu_list(d: str) -> list[torch.device]:
    """'cuda:0,1' or 'cuda:0,cuda:1' -> [cuda:0, cuda:1]."""
    parts = [p.strip().removeprefix("cuda:") for p in d.split(",")]
    if not d.startswith("cuda:") or not all(p.isdigit() for p in parts):
        raise TargetError(f"--device {d}: list GPUs by index, as cuda:0,1")
    index = [int(p) for p in parts]
    if len(set(index)) != len(index):
        raise TargetError(f"--device {d}: a GPU is listed twice")
    check_gpus(d, index)
    return [torch.device("cuda", i) for i in index]


def check_gpus(d: str, index: list[int]) -> None:
    if not torch.cuda.is_available():
        raise TargetError(f"--device {d} was asked for but no CUDA GPU is visible to torch; use --device cpu (or auto)")
    n = torch.cuda.device_count()
    if any(i >= n for i in index):
        raise TargetError(f"--device {d}: only {n} GPU(s) visible (cuda:0 to cuda:{n - 1})")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device the target's inputs go to: the first of resolve_devices ('cuda' without one is an error)."""
    return resolve_devices(device)[0]


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> Precision:
    """The target's precision (precision.py): 'auto' is float32 on the CPU, bfloat16 (or float16) on a GPU."""
    try:
        return resolve_precision(dtype, device)
    except PrecisionError as e:
        raise TargetError(str(e)) from e


def devices_precision(dtype: str | torch.dtype, devices: list[torch.device]) -> Precision:
    """The precision on every one of the devices: float16 activations if one of the GPUs lacks native bf16."""
    return min((resolve_dtype(dtype, d) for d in devices), key=lambda p: p.dtype == torch.bfloat16)


def storage_dtype(device: str = "auto", dtype: str = "auto") -> str:
    """The dtype a converted GGUF target is cached in for this precision (float32, bfloat16, float16)."""
    return devices_precision(dtype, resolve_devices(device)).storage


# ---------------------------------------------------------------- memory


def weight_bytes(hf_dir: str | Path, dtype: torch.dtype) -> int:
    """Bytes of the weights once loaded in `dtype` (module docstring); the .bin files' sizes where no
    safetensors are; 0 if there are neither."""
    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        return sum(f.stat().st_size for f in Path(hf_dir).glob("*.bin"))
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, t in header.items():
            if name != "__metadata__":
                numel = int(torch.Size(t["shape"]).numel())
                total += numel * (size if t["dtype"] in FLOAT_SIZES else OTHER_SIZES.get(t["dtype"], size))
    return total


def free_bytes(device: torch.device) -> int:
    """Memory free for the weights on one device: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil
    return int(psutil.virtual_memory().available)


def placement(devices: list[torch.device], need: int, precision: str, auto: bool) -> tuple[list, dict]:
    """The devices the weights go to and from_pretrained's device_map arguments for them; a TargetError when
    those devices' free memory cannot hold `need` bytes. `auto`: several GPUs are used only if one is too small."""
    if auto and len(devices) > 1 and need <= free_bytes(devices[0]):
        devices = devices[:1]
    free = [free_bytes(d) for d in devices]
    if need > sum(free):
        raise TargetError(too_large(need, sum(free), precision, devices))
    if len(devices) == 1:
        return devices, {"device_map": {"": indexed(devices[0])}}
    return devices, {"device_map": "auto", "max_memory": {d.index: f for d, f in zip(devices, free)}}


def indexed(device: torch.device) -> torch.device:
    """'cuda' -> 'cuda:N' for the current GPU (what a device_map names); any other device as it is."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def too_large(need: int, free: int, precision: str, devices: list[torch.device]) -> str:
    where = "the host" if devices[0].type == "cpu" else " + ".join(map(str, devices))
    fixes = [{"float32": "--dtype bfloat16 (or int8)", "bfloat16": "--dtype int8",
              "float16": "--dtype int8"}.get(precision, "")]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if devices[0].type == "cpu" and gpus:
        fixes.append("--device cuda")
    elif devices[0].type == "cuda" and gpus > len(devices):
        fixes.append(f"more GPUs (--device cuda:{','.join(map(str, range(gpus)))})")
    fixes = [f for f in fixes if f] + ["a smaller model"]
    return (f"the target's {precision} weights need {need / 2**30:.1f} GiB but {where} has {free / 2**30:.1f} GiB "
            f"free: use {', '.join(fixes[:-1]) + ' or ' if len(fixes) > 1 else ''}{fixes[-1]}")


def check_placement(model: torch.nn.Module, devices: list[torch.device]) -> None:
    """Every weight on one of `devices` (device_map="auto" offloads what does not fit to the CPU or disk)."""
    wanted = {str(indexed(d)) for d in devices}
    elsewhere = sorted({str(indexed(p.device)) for p in model.parameters()} - wanted)
    if elsewhere:
        raise TargetError(f"the target did not fit on {' + '.join(sorted(wanted))} (weights left on "
                          f"{', '.join(elsewhere)}): use a smaller --dtype, more GPUs or a smaller model")


# ---------------------------------------------------------------- after loading


def input_device(tm) -> torch.device:
    """Where a pass's inputs go: the embedding's device (the first GPU of a target spread over several)."""
    emb = tm.model.get_input_embeddings() if hasattr(tm.model, "get_input_embeddings") else None
    return emb.weight.device if emb is not None else tm.device


@torch.inference_mode()
def check_finite_logits(tm) -> None:
    """One short forward; a TargetError if any logit is inf or nan (Qwen2's activations overflow float16)."""
    ids = tm.tokenizer.encode(FINITE_PROBE) if tm.tokenizer is not None else list(range(1, 17))
    ids = [min(int(i), tm.vocab_size - 1) for i in ids][:64]
    logits = tm.model(input_ids=torch.tensor([ids], device=input_device(tm))).logits
    if not bool(torch.isfinite(logits).all()):
        better = "bfloat16 or float32" if native_bf16(tm.device) else "float32 (bfloat16 is emulated on this GPU)"
        raise TargetError(f"the target's logits overflow in {tm.precision} (inf or nan on a short prompt): "
                          f"use --dtype {better}")


@contextlib.contextmanager
def quiet_loading(progress: bool):
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


def use_onednn_linears(model: torch.nn.Module) -> int:
    """On the CPU, run every Linear through oneDNN instead of the default BLAS call.

    Same fp32 math; on a 2-core AVX-512 machine a 16-row matmul then costs ~2x one row instead of
    ~4x, i.e. verifying a tree is nearly as cheap as one decoding step. Returns the layers switched.
    """
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return 0

    def forward(self, x):
        return op(x, self.weight, self.bias, "none", [], "")

    n = 0
    for m in model.modules():
        if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32:
            try:
                op(torch.zeros(1, m.in_features), m.weight, m.bias, "none", [], "")
            except RuntimeError:
                return n
            m.forward = forward.__get__(m)
            n += 1
    return n
