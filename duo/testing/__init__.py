"""Test helpers, none of them used at run time.

    tiny_pair.py (tiny_vocab.py, tiny_weights.py)   a tiny random-weight target/draft pair built locally
    faults.py      fault injection into the draft worker (DraftConfig.fault)
    llama_log.py   where llama.cpp put a GGUF's weights (its load log, from the probe's child)
    layout.py      the import graph, sizes and cycles of the code (python -m duo.testing.layout)
    procs.py       process helpers (gone: a pid has exited)
"""

from .tiny_pair import TinyPair, build_tiny_pair

__all__ = ["TinyPair", "build_tiny_pair"]
