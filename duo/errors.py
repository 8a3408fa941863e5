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


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error from Python or torch."""
    import torch
    return isinstance(e, (MemoryError, torch.OutOfMemoryError))
