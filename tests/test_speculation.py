"""Speculation must happen, not only give equal outputs: the llama.cpp probe (a draft that would die by
SIGILL is caught and a configuration that runs is taken), the governor (plain decoding where speculation
loses, probing back), and the first token straight from the prefill."""
import json

import numpy as np
import pytest

from duo import Engine
from duo.runtime import llama_probe as P
from duo.runtime.decode import DecodeConfig, Stats, generate_tokens
from duo.plan import TreeSpec
from duo.runtime.draft_client import DraftClient, DraftConfig, DraftError
from duo.runtime.governor import Governor, cap_budget


@pytest.fixture
def fresh_probe(tmp_path, monkeypatch):
    """An empty probe cache (disk and memory)."""
    monkeypatch.setenv("DUO_CACHE", str(tmp_path))
    monkeypatch.setattr(P, "_MEMO", {})
    return tmp_path


# ------------------------------------------------------------------------------------------- the probe
def test_probe_measures_every_variant_and_remembers(tiny_pair, fresh_probe):
    v = P.llama_verdict(tiny_pair.draft_gguf)
    assert [r.variant for r in v.results] == list(P.VARIANTS)
    assert all(r.ok and r.ms_per_token > 0 and r.buffers for r in v.results), v.results
    assert v.chosen in P.VARIANTS and "ms/token" in v.summary()
    saved = list((fresh_probe / "llama-probe").glob("*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["chosen"] == v.chosen
    P._MEMO.clear()
    assert P.llama_verdict(tiny_pair.draft_gguf).results == v.results     # from disk, not probed again


def test_a_child_killed_by_sigill_is_caught_and_the_plain_variant_taken(tiny_pair, fresh_probe, monkeypatch):
    """As on an Intel VM whose CPUID advertises AMX but traps its instructions."""
    monkeypatch.setenv(P.FAULT_ENV, "sigill:extra-bufts")
    v = P.llama_verdict(tiny_pair.draft_gguf)
    bad, good = v.result("extra-bufts"), v.result("plain")
    assert not bad.ok and bad.error == "killed by SIGILL (illegal instruction)"
    assert good.ok and v.chosen == "plain" and v.extra_bufts is False
    # and the draft worker, which asks the probe, runs with the plain variant
    with DraftClient(DraftConfig(gguf_path=str(tiny_pair.draft_gguf), n_ctx=256, load_timeout_s=60)) as c:
        c.start([5, 6, 7, 8], overlap=False)
        assert len(c.request_tree([], TreeSpec(4, 1, "chain"), 30.0)) == 4


def test_a_draft_that_cannot_run_anywhere_is_an_error_naming_the_fix(tiny_pair, fresh_probe, monkeypatch):
    monkeypatch.setenv(P.FAULT_ENV, "sigill:all")
    v = P.llama_verdict(tiny_pair.draft_gguf)
    assert v.chosen is None
    with pytest.raises(P.DraftUnusable, match="reinstall llama-cpp-python"):
        v.extra_bufts
    with pytest.raises(DraftError, match="cannot run the draft on this CPU.*SIGILL.*--mode target"):
        DraftClient(DraftConfig(gguf_path=str(tiny_pair.draft_gguf), n_ctx=256, load_timeout_s=60))


# ------------------------------------------------------------------------------------------- the governor
def test_governor_pauses_when_speculation_loses_and_probes_back():
    g = Governor(window=2, min_backoff=4, max_backoff=8)
    g.measure_plain(1)
    g.record(False, 1, 0.10)                      # the target alone: 10 tokens/s
    assert g.speculate() and g.plain_s == pytest.approx(0.10)
    g.record(True, 9, 0.1)                        # the draft's prefill round: not counted
    for _ in range(2):
        g.record(True, 1, 0.15)                   # 6.7 tokens/s: losing
    assert not g.speculate() and g.pauses == 1 and g.plain_left == 4
    for _ in range(4):
        g.record(False, 1, 0.10)
    assert g.speculate()                          # probing back after 4 plain tokens
    g.record(True, 1, 0.15)                       # (skipped: the draft catches up)
    g.record(True, 1, 0.15)
    g.record(True, 1, 0.15)
    assert not g.speculate() and g.plain_left == 8 and g.backoff == 8   # the backoff doubled, capped
    for _ in range(8):
        g.record(False, 1, 0.10)
    for _ in range(3):
        g.record(True, 4, 0.15)                   # 26 tokens/s: winning
    assert g.speculate() and g.backoff == 4       # a winning probe resets the backoff


def test_cap_budget_follows_what_the_draft_makes_in_one_pass():
    assert cap_budget(16, 16, 2, 32, verify_s=0.1, wait_s=0.1) == 8     # waited as long as a pass: half
    assert cap_budget(8, 8, 2, 32, verify_s=0.1, wait_s=0.0) == 9        # no wait: grows by one
    assert cap_budget(32, 16, 2, 32, verify_s=0.1, wait_s=0.0) == 32     # ... up to the range's top
    assert cap_budget(3, 3, 2, 32, verify_s=0.01, wait_s=1.0) == 2       # never below the range's floor


# ------------------------------------------------------------------------------------------- first token
class _Recorder:
    """A draft stand-in that only records when it was started."""

    def __init__(self):
        self.events = []
        self.stats = type("S", (), {"idle_s": 0.0})()

    def start(self, prompt, **kw):
        self.events.append(("start", len(prompt)))

    def alive(self):
        return True

    def request_tree(self, delta, spec, timeout):
        from duo.runtime.tree import Tree
        self.events.append(("tree", len(delta)))
        return Tree.empty()


def test_first_token_comes_from_the_prefill_before_the_draft_starts(tiny_pair):
    with Engine(str(tiny_pair.target_hf_dir), device="cpu", mode="target", progress=False) as e:
        ids = e.encode("def fibonacci(n):")
        draft = _Recorder()
        gen = generate_tokens(e.target, draft, ids, DecodeConfig(max_new_tokens=6, lookup=False), Stats())
        first = next(gen)
        assert len(first) == 1 and draft.events == []     # emitted before the draft did anything
        rest = [t for new in gen for t in new]
        assert draft.events[0] == ("start", len(ids) + 1)  # the draft prefills the prompt + first token
        alone = e.generate(ids, max_new_tokens=6).token_ids
        assert first + rest == alone


def test_tiny_pair_speculates_without_fallback(tiny_pair):
    """Sequential and overlap: drafts accepted, nothing fell back, the governor on (auto budget)."""
    for mode in ("sequential", "overlap"):
        with Engine(str(tiny_pair.target_hf_dir), str(tiny_pair.draft_gguf), device="cpu", mode=mode,
                    progress=False, profile="off") as e:
            res = e.generate("def fibonacci(n):", max_new_tokens=48)
            st = res.stats
            assert st["fallback"] is None, st["fallback"]
            assert st["accepted"] - st["accepted_from_lookup"] > 0, f"{mode}: no draft token accepted"
            assert st["ttft_s"] <= st["wall_s"] and st["new_tokens"] == len(res.token_ids)


def test_catch_up_keeps_the_paused_draft_in_step(tiny_pair):
    """While the target decodes alone the draft decodes the committed tokens without being waited for; the
    next tree is the one a fresh worker drafts after the same tokens."""
    prompt, delta = [5, 6, 7, 8, 9], [11, 12, 13, 14]
    cfg = DraftConfig(gguf_path=str(tiny_pair.draft_gguf), n_ctx=256, load_timeout_s=60)
    with DraftClient(cfg) as a, DraftClient(cfg) as b:
        a.start(prompt, overlap=False)
        b.start(prompt, overlap=False)
        a.ping(timeout=30.0)                                    # START answered: nothing owed
        sent = [a.catch_up([t], timeout=30.0) for t in delta]   # False: still busy, kept for the next call
        assert sent[0] is True
        ta = a.request_tree([], TreeSpec(6, 1, "chain"), 30.0)
        tb = b.request_tree(delta, TreeSpec(6, 1, "chain"), 30.0)
        assert ta.tokens.tolist() == tb.tokens.tolist() and len(ta) == 6
        assert a.stats.n_decoded >= len(prompt) + len(delta) - 1
