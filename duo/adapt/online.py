"""Online mode: the draft adapts by itself, in a background process, only while the engine is idle.

After a generation, when at least `every` new generations were recorded since the last run, a
`python -m duo.adapt.job` process starts; the engine stops it (SIGSTOP) before each generation and lets it go
on (SIGCONT) after, so on a machine whose cores the generation needs, training never competes with it.
Its accepted adapter is picked up by the engine's next generation (adapter "auto"). The process dies with
the engine (PR_SET_PDEATHSIG) and is stopped, with a checkpoint, when the engine closes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from .buffer import RecordBuffer

log = logging.getLogger("duo")
EVERY = 20     # new recorded generations that start a run


class OnlineAdapter:
    def __init__(self, pair: Path, draft_gguf: Path, every: int = EVERY,
                 max_minutes: float = 20.0, merge: bool = False, base_gguf: Path | None = None):
        self.pair, self.draft_gguf, self.every, self.max_minutes = Path(pair), Path(draft_gguf), every, max_minutes
        self.base_gguf = Path(base_gguf or draft_gguf)   # the weights trained on: the file the worker runs
        self.merge = merge          # also merge a kept adapter into a Q4_0 draft (adapt/merge.py), ready for use
        self.buffer = RecordBuffer(self.pair)
        self.seen = len(self.buffer.files())     # records when the last run started (or at start)
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self.paused = False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pause(self) -> None:
        """Before a generation: stop the trainer where it is (returns once the kernel has stopped it)."""
        if self.running() and not self.paused:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.paused = True
            child, deadline = psutil.Process(self.proc.pid), time.monotonic() + 1.0
            with contextlib.suppress(psutil.Error):
                while child.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE) and time.monotonic() < deadline:
                    time.sleep(0.002)

    def resume(self) -> None:
        """After a generation: let a paused trainer go on, or start one if enough new records came in."""
        if self.running():
            if self.paused:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.paused = False
            return
        if self.proc is not None:
            log.info("online adaptation finished (exit %s)", self.proc.returncode)
            self.proc = None
        n = len(self.buffer.files())
        if n - self.seen >= self.every:
            self.seen = n
            self.runs += 1
            self.proc = subprocess.Popen([sys.executable, "-m", "duo.adapt.job", str(self.pair),
                                          str(self.draft_gguf), str(os.getpid()),
                                          "--max-minutes", str(self.max_minutes), "--base", str(self.base_gguf)]
                                         + ["--merge"] * self.merge,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            self.paused = False
            log.info("online adaptation started on %d recorded generations (pid %d)", n, self.proc.pid)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the trainer (it checkpoints on SIGTERM) and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if self.paused:
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
