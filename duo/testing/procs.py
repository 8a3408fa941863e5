"""Process helpers for tests."""
from __future__ import annotations

import time

import psutil


def gone(pid: int, wait: float = 5.0) -> bool:
    """True once process `pid` has exited (or is a zombie) within `wait` seconds."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False
