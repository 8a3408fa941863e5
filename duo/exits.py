"""The `duo` command's exit codes, and Terminated: SIGTERM raised in the main thread like Ctrl-C.

  0 success, 1 a failure at run time, 2 a usage error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
duo.cli installs the SIGTERM handler and maps errors to codes; duo.chat returns the code of an interrupted answer.
"""
from __future__ import annotations

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPT, EXIT_TERMINATED = 0, 1, 2, 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same clean-up runs."""


def interrupt_code(e: BaseException) -> int:
    return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPT
