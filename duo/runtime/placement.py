"""Where the target side runs on the host: its torch threads and the cores it is pinned to, for a while.

The draft worker pins itself (DraftConfig.cores); these keep the target off the draft's cores in the
overlapped schedule and restore the caller's settings afterwards.
"""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def torch_threads(n: int):
    """Use n torch threads for the duration."""
    import torch
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def pinned(cores: list[int] | None):
    """Pin this process to `cores` for the duration (None: leave it as it is)."""
    saved = os.sched_getaffinity(0) if cores else None
    if cores:
        os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        if saved:
            os.sched_setaffinity(0, saved)
