"""The errors a user sees: one line naming the problem and the fix.

`DuoError` is a failure at run time (out of memory, a model that fails to load, a download): the CLI
exits with 1. `UsageError` (also a ValueError) marks bad arguments or input: the call must change, the
CLI exits with 2. Library code raises these where the user can act; internal errors stay internal.
"""
from __future__ import annotations


class DuoError(RuntimeError):
    """A user-facing error: the message names the problem and the fix (exit code 1)."""

    usage: bool = False
    exit_code: int = 1


class UsageError(DuoError, ValueError):
    """Bad arguments or input (unknown model path, sampling values, empty or too long prompt...): the call
    must change (exit code 2)."""

    usage = True
    exit_code = 2


# RuntimeError messages that mean an allocation failed: CUDA/HIP ("CUDA out of memory", "CUDA error: out of
# memory"), cuBLAS and cuDNN workspaces, torch's CPU allocator
OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", "hipErrorOutOfMemory", "can't allocate memory")


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error from Python or torch, a cuBLAS/cuDNN allocation failure included."""
    import torch
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(m.lower() in text for m in OOM_MESSAGES)


def release_after_oom(device=None) -> None:
    """After an out-of-memory error: drop what Python still holds and give torch's cached GPU blocks back to
    the driver (nothing on the CPU, or where CUDA was never initialised: this never creates a CUDA context)."""
    import gc

    import torch
    gc.collect()
    on_gpu = device is None or getattr(device, "type", str(device).split(":")[0]) == "cuda"
    if on_gpu and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
