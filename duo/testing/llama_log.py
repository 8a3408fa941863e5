"""Load a GGUF in llama.cpp in a throwaway process and report, from llama.cpp's own log, where its
weights went: which buffer types hold them ("CPU_Mapped", "CPU_REPACK", "AMX", ...) and which tensors
the CPU backend repacked into an interleaved layout.

A subprocess, because the log callback is process-wide (it would swallow or reroute other tests'
llama.cpp output) and because a CPU that traps an extra buffer type's instructions (AMX on some VMs)
kills the process with SIGILL: here that is a return code, not a dead test session.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field

__all__ = ["LoadReport", "llama_load_report", "EXTRA_BUFFER_TYPES"]

# llama.cpp's CPU "extra" buffer types: weights in them run on kernels plain CPU buffers never use.
EXTRA_BUFFER_TYPES = ("CPU_REPACK", "AMX", "CPU_KLEIDIAI")

_CHILD = r"""
import ctypes, json, sys
import llama_cpp

lines = []

@llama_cpp.llama_log_callback
def _log(level, text, user_data):
    lines.append(text.decode("utf-8", "replace") if text else "")

llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_batch=64, n_threads=1, n_threads_batch=1,
                      n_gpu_layers=0, verbose=True)
llm.eval(list(range(3, 3 + 40)))   # a batch (gemm kernels) ...
for t in (50, 60, 70):             # ... and single tokens (gemv kernels)
    llm.eval([t])
llm.close()
sys.stdout.write("\n" + json.dumps({"system_info": info, "log": "".join(lines)}) + "\n")
sys.stdout.flush()
"""


@dataclass
class LoadReport:
    returncode: int
    system_info: str = ""
    log: str = ""
    buffers: dict[str, float] = field(default_factory=dict)   # buffer type -> MiB of model weights
    repacked: dict[str, str] = field(default_factory=dict)    # tensor -> interleaved layout ("q4_0_8x8")
    lines: list[str] = field(default_factory=list)            # the log lines that say so
    stderr: str = ""

    @property
    def crashed(self) -> str | None:
        """"killed by SIGILL (illegal instruction)" etc. when the child died by a signal, else None."""
        from duo.runtime.llama_probe import died_by_signal
        return died_by_signal(self.returncode)

    @property
    def extra(self) -> dict[str, float]:
        """The extra buffer types holding some of the weights (MiB)."""
        return {k: v for k, v in self.buffers.items() if k in EXTRA_BUFFER_TYPES and v > 0}

    @property
    def has_repack(self) -> bool:
        """Whether this llama.cpp build was compiled with the CPU repack buffer type."""
        return bool(re.search(r"\bREPACK = 1\b", self.system_info))


def llama_load_report(gguf_path, timeout: float = 120.0) -> LoadReport:
    """Load ``gguf_path`` with llama.cpp's defaults (extra buffer types on), decode a batch and a few
    single tokens, and report the buffer types from the load log."""
    p = subprocess.run([sys.executable, "-c", _CHILD, str(gguf_path)], capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL, env=_cpu_env())
    rep = LoadReport(p.returncode, stderr=p.stderr[-4000:])
    last = (p.stdout.strip().splitlines() or [""])[-1]
    try:
        d = json.loads(last)
    except ValueError:
        return rep
    rep.system_info, rep.log = d["system_info"], d["log"]
    for line in rep.log.splitlines():
        m = re.search(r"(\S+) model buffer size\s*=\s*([0-9.]+) MiB", line)
        if m:
            rep.buffers[m.group(1)] = rep.buffers.get(m.group(1), 0.0) + float(m.group(2))
            rep.lines.append(line.strip(" .\n"))
        m = re.search(r"repack tensor (\S+) with (\S+)", line) or re.search(r"amx repack tensor (\S+) of type (\S+)", line)
        if m:
            rep.repacked[m.group(1)] = m.group(2)
            rep.lines.append(line.strip(" .\n"))
    return rep


def _cpu_env() -> dict:
    import os

    return dict(os.environ, CUDA_VISIBLE_DEVICES="")
