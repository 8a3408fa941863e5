"""Where llama.cpp put a GGUF's weights, for tests: the buffer types holding them ("CPU_Mapped",
"CPU_REPACK", "AMX", ...) and the tensors the CPU backend repacked, from llama.cpp's own load log.

It runs the draft probe's throwaway child (duo.runtime.llama_probe, variant extra-bufts: llama.cpp's
defaults) with `report`: a subprocess, because the log callback is process-wide and because a CPU that
traps an extra buffer type's instructions (AMX on some VMs) kills the process with SIGILL: here that is
a return code, not a dead test session.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..runtime.llama_probe import died_by_signal, run_child

__all__ = ["LoadReport", "llama_load_report", "EXTRA_BUFFER_TYPES"]

# llama.cpp's CPU "extra" buffer types: weights in them run on kernels plain CPU buffers never use.
EXTRA_BUFFER_TYPES = ("CPU_REPACK", "AMX", "CPU_KLEIDIAI")


@dataclass
class LoadReport:
    returncode: int
    system_info: str = ""
    buffers: dict[str, float] = field(default_factory=dict)   # buffer type -> MiB of model weights
    repacked: dict[str, str] = field(default_factory=dict)    # tensor -> interleaved layout ("q4_0_8x8")
    lines: list[str] = field(default_factory=list)            # the log lines that say so
    stderr: str = ""

    @property
    def crashed(self) -> str | None:
        """"killed by SIGILL (illegal instruction)" etc. when the child died by a signal, else None."""
        return died_by_signal(self.returncode)

    @property
    def extra(self) -> dict[str, float]:
        """The extra buffer types holding some of the weights (MiB)."""
        return {k: v for k, v in self.buffers.items() if k in EXTRA_BUFFER_TYPES and v > 0}

    @property
    def has_repack(self) -> bool:
        """Whether this llama.cpp build was compiled with the CPU repack buffer type."""
        return bool(re.search(r"\bREPACK = 1\b", self.system_info))


def llama_load_report(gguf_path) -> LoadReport:
    """Load ``gguf_path`` with llama.cpp's defaults (extra buffer types on), decode a batch and single
    tokens (gemm and gemv kernels), and report the buffer types from the load log."""
    rc, d, stderr = run_child(gguf_path, "extra-bufts", 1, report=True)
    rep = LoadReport(rc, stderr=stderr[-4000:])
    if d and d.get("ok"):
        rep.system_info, rep.buffers, rep.repacked, rep.lines = d["system_info"], d["buffer_mib"], d["repacked"], d["lines"]
    return rep
