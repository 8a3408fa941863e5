"""Fault injection into the draft worker, for tests: ``DraftConfig(fault="<kind>:<n>")``.

The worker imports this module only when a fault is asked for; None (the default) costs one attribute
test per llama_decode and per reply.
"""
from __future__ import annotations

import os
import time

from ..runtime import channel as ch
from ..runtime.channel import Channel
from ..runtime.drafter import LlamaError

FAULTS = ("raise_at_decode", "hang_at_decode", "exit_at_decode", "slow_decode", "bad_round", "bad_token",
          "bad_parent", "bad_length")


class Fault:
    """One injected fault, counted from the worker's start:

    raise_at_decode:n  from the n-th llama_decode on (counted from the worker's start), every call
                       raises, as a failing llama.cpp would
    hang_at_decode:n   the n-th llama_decode never returns (the process stays alive, sleeping)
    exit_at_decode:n   the process exits at the n-th llama_decode (a crash inside llama.cpp)
    slow_decode:n      every llama_decode takes n ms longer (slow, not hung)
    bad_round:n        the n-th tree reply names another round
    bad_token:n        the n-th tree reply holds a token id outside the vocabulary
    bad_parent:n       the n-th tree reply holds a parent index that is not an earlier node
    bad_length:n       the n-th tree reply claims more nodes than the channel holds
    """

    def __init__(self, spec: str):
        kind, _, n = spec.partition(":")
        if kind not in FAULTS or not n.isdigit() or int(n) < 1:
            raise ValueError(f"fault must be '<kind>:<n>' with kind in {FAULTS} and n >= 1, not {spec!r}")
        self.kind, self.n, self.count = kind, int(n), 0
        self.at_decode = kind.endswith("_decode")
        self.parent = os.getppid()

    def before_decode(self) -> None:
        if not self.at_decode:
            return
        if self.kind == "slow_decode":
            time.sleep(self.n / 1000)
            return
        self.count += 1
        if self.count < self.n:
            return
        if self.kind == "raise_at_decode":
            raise LlamaError(f"injected fault: llama_decode call {self.count} failed")
        if self.kind == "exit_at_decode":
            os._exit(70)
        while os.getppid() == self.parent:  # hang_at_decode (but never outlive the target)
            time.sleep(0.5)
        os._exit(71)

    def corrupt_reply(self, chan: Channel, rnd: int, n_nodes: int) -> None:
        if self.at_decode:
            return
        self.count += 1
        if self.count != self.n:
            return
        c = chan.ctrl
        if self.kind == "bad_round":
            c[ch.RESP_ROUND] = rnd + 1000
        elif self.kind == "bad_length":
            c[ch.N_NODES] = chan.max_nodes + 1
        else:
            if n_nodes == 0:
                chan.tree_tokens[0], chan.tree_parents[0], chan.tree_probs[0], chan.tree_source[0] = 0, -1, 1.0, 0
                c[ch.N_NODES] = n_nodes = 1
            if self.kind == "bad_token":
                chan.tree_tokens[n_nodes - 1] = 1 << 30
            else:  # bad_parent
                chan.tree_parents[n_nodes - 1] = n_nodes + 5
