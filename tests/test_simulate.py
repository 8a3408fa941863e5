"""SIMULATED accelerator (duo.runtime.simulate): the target replayed from its recorded greedy output,
timed like an accelerator, with the draft running for real.

(a) the simulated output is the recording, token for token, for both schedules and several budgets;
(b) with a flat, slow simulated target and a fast draft, the overlapped schedule beats the sequential one
    by the margin the cost model predicts, on counted rounds and simulated time (not wall-clock speed);
(c) recordings round-trip through the on-disk cache;
and the profiler's choices for the accelerator profiles, and the pipeline-efficiency arithmetic.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from duo import Engine
from duo.errors import UsageError
from duo.plan import Plan
from duo.profiler import cost, simulated
from duo.runtime import simulate as S
from duo.runtime.tree import Tree

_PERSISTENT = os.environ.get("DUO_CACHE")   # read before any fixture points DUO_CACHE elsewhere (as conftest)
FAST = dict(name="test-fast", base_ms=1.0, per_token_ms=0.01)   # simulated passes that cost almost nothing
PROMPTS = [
    "Write a Python function that checks for primes.",
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "class Stack:\n    def __init__(self):",
    "1, 2, 3, 4, 5,",
    "json: {\"key\": \"value\", \"key2\":",
]
CONFIGS = [  # mode, budget, shape
    ("sequential", 4, "chain"),
    ("sequential", 16, "dynamic"),
    ("overlap", 8, "eagle"),
    ("overlap", 16, "dynamic"),
    ("overlap", "auto", "dynamic"),     # adaptive budget
]


@pytest.fixture(scope="module")
def sim_cache(tmp_path_factory):
    """Recordings and calibrations go to a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DUO_CACHE", str(tmp_path_factory.mktemp("duo-cache")))
        mp.setattr(S, "_MEMORY", {})
        yield


# ------------------------------------------------------------------------------------------- (a) exactness
def test_simulated_output_is_the_recording(tiny_pair, sim_cache):
    drafted = accepted = 0
    with Engine(str(tiny_pair.target_hf_dir), device="cpu", mode="target", progress=False) as alone:
        real = {p: alone.generate(p, max_new_tokens=40).token_ids for p in PROMPTS[:2]}
    for mode, budget, shape in CONFIGS:
        with Engine(str(tiny_pair.target_hf_dir), str(tiny_pair.draft_gguf), device="cpu", mode=mode, budget=budget,
                    shape=shape, progress=False, simulate=FAST) as e:
            assert not e.target.uses_host_cores and e.plan.draft_cores is None and e.plan.target_cores is None
            for p in PROMPTS:
                before = e.target.counters.forwards
                res = e.generate(p, max_new_tokens=40)
                rec = e.target.record(e.encode(p))
                assert res.token_ids == rec.tokens[:40], f"{mode} b={budget} {shape}: {p!r}"
                if p in real:   # and the recording is the target's own output
                    assert rec.tokens[:40] == real[p]
                assert e.target.counters.forwards - before == res.stats["rounds"]
                assert res.stats["fallback"] is None and res.stats["mode"] == mode
                drafted += res.stats["drafted"]
                accepted += res.stats["accepted"]
    assert drafted > 0 and 0 < accepted < drafted   # both acceptance and rejection were exercised


def test_simulation_refuses_sampling_and_unknown_profiles(tiny_pair, sim_cache):
    with pytest.raises(UsageError, match="unknown accelerator"):
        Engine(str(tiny_pair.target_hf_dir), device="cpu", mode="target", progress=False, simulate="no-such-gpu")
    with Engine(str(tiny_pair.target_hf_dir), device="cpu", mode="target", progress=False, simulate=FAST) as e:
        with pytest.raises(UsageError, match="greedy"):
            e.generate(PROMPTS[0], max_new_tokens=8, temperature=0.7, seed=1)


def test_forward_tree_answers_from_the_record():
    """A node's choice is the record's next token when its path matches the record, else no token."""
    class Fake:
        name, extra = "fake", {}
    sim = S.SimulatedTarget(Fake(), dict(name="t", base_ms=2.0, per_token_ms=0.5))
    prompt = [5, 6, 7]
    sim._records[tuple(prompt)] = S.Record([10, 11, 12, 13, 14], "length", 5, "fake", "h", 3)
    cache = sim.new_cache()
    assert sim.prefill(cache, prompt).tolist() == [10]   # the prompt's first token, as logits give it
    # root 10; tree: 11 -> 12 -> 99, 11 -> 13, 42
    tree = Tree([11, 12, 99, 13, 42], [-1, 0, 1, 0, -1], np.ones(5))
    ch = sim.forward_tree(cache, 10, tree)
    assert ch.tolist() == [11, 12, 13, S.NO_TOKEN, S.NO_TOKEN, S.NO_TOKEN]
    assert sim.cache_length(cache) == 3 + 1 + 5
    sim.compact_cache(cache, 4, [0, 1])          # accepted 11, 12; bonus 13
    assert cache.tokens == [5, 6, 7, 10, 11, 12]
    ch = sim.forward_tree(cache, 13, Tree([14], [-1], np.ones(1)))
    assert ch.tolist() == [14, S.NO_TOKEN]       # beyond the record: no token
    with pytest.raises(S.SimulationError, match="left the recording"):
        sim.compact_cache(cache, 7, [])
        sim.forward_tree(cache, 99, Tree.empty())   # 99 was never the target's token
    assert sim.counters.forwards == 2 and sim.counters.gaps == 1   # the gap before the first pass is not steady
    # prefill of 3 tokens (one pass), then passes over 6 and 2 tokens
    assert sim.counters.busy_s == pytest.approx((2 + (2 + 5 * 0.5) + (2 + 1 * 0.5)) / 1000, rel=1e-6)


# ------------------------------------------------------------------------------------------- (b) the overlap gain
V_OVER_D = 1.25                   # the flat simulated target's pass, in draft rounds: the overlap gains most
#                                   near 1 (the target waits least for a draft it overlaps); measured per run,
#                                   so a faster or slower CPU keeps the same margin
BUDGET = 16                       # a chain of 16 drafted tokens per round
GAIN_TOLERANCE = 0.08             # |measured gain / predicted gain - 1|; a miss costs one interrupted draft step
#                                   and a rollback more than the model's draft(), and the draft's speed drifts


@pytest.fixture(scope="module")
def matched_pair(tmp_path_factory):
    """A draft that agrees with its target ~99% of the time and decodes in a few ms (hidden 512)."""
    from duo.testing import build_tiny_pair
    root = Path(_PERSISTENT).expanduser() / "tiny" if _PERSISTENT else tmp_path_factory.mktemp("tiny-matched")
    return build_tiny_pair(root / "matched-512", hidden=512, n_layers=4, ffn=1536, draft_noise=0.001)


def _run(engine, prompt, max_new):
    c0, d0 = (engine.target.counters.busy_s, engine.target.counters.prefill_s), engine._draft.stats
    res = engine.generate(prompt, max_new_tokens=max_new)
    d1 = engine._draft.stats
    forward_s = engine.target.counters.busy_s - c0[0] - (engine.target.counters.prefill_s - c0[1])
    return dict(tokens=res.token_ids, rounds=res.stats["rounds"], idle_s=res.stats["target_idle_s"],
                forward_s=forward_s, hits=d1.overlap_hits - d0.overlap_hits, misses=d1.overlap_misses - d0.overlap_misses)


def _draft_ms_per_round(matched_pair, plan) -> float:
    """The draft's time for one round of this plan, measured behind a near-instant simulated target."""
    with Engine(str(matched_pair.target_hf_dir), str(matched_pair.draft_gguf), device="cpu", plan=plan,
                lookup=False, progress=False, simulate=dict(name="flat-1ms", base_ms=1.0, per_token_ms=0.0)) as e:
        r = _run(e, PROMPTS[0], 48)
    return 1000 * r["idle_s"] / r["rounds"]


def test_overlap_beats_sequential_by_the_predicted_margin(matched_pair, sim_cache):
    plans = {m: Plan(mode=m, budget=BUDGET, width=1, shape="chain", draft_threads=1, target_threads=1, adaptive=False)
             for m in ("sequential", "overlap")}
    v_ms = round(V_OVER_D * _draft_ms_per_round(matched_pair, plans["sequential"]), 1)
    flat = dict(name=f"flat-{v_ms}ms", base_ms=v_ms, per_token_ms=0.0)
    tot = {m: dict(tokens=0, rounds=0, idle_s=0.0, forward_s=0.0, hits=0, misses=0) for m in plans}
    engines = {m: Engine(str(matched_pair.target_hf_dir), str(matched_pair.draft_gguf), device="cpu", plan=p,
                         lookup=False, progress=False, simulate=flat) for m, p in plans.items()}
    try:
        for prompt in PROMPTS[:3]:
            runs = {m: _run(e, prompt, 96) for m, e in engines.items()}   # interleaved: both see the same load
            assert runs["sequential"]["tokens"] == runs["overlap"]["tokens"]
            assert runs["sequential"]["rounds"] == runs["overlap"]["rounds"]   # counted rounds: the same trees
            for m, r in runs.items():
                for k in ("rounds", "idle_s", "forward_s", "hits", "misses"):
                    tot[m][k] += r[k]
                tot[m]["tokens"] += len(r["tokens"])
    finally:
        for e in engines.values():
            e.close()
    seq, ovl = tot["sequential"], tot["overlap"]
    rounds = seq["rounds"]
    assert ovl["forward_s"] == pytest.approx(rounds * v_ms / 1000)
    # simulated time: the simulated target's passes plus its measured waiting for the draft
    t_seq, t_ovl = seq["forward_s"] + seq["idle_s"], ovl["forward_s"] + ovl["idle_s"]
    measured_gain = t_seq / t_ovl
    # the cost model, fed this run's measured draft time per round and the overlap's observed hit rate
    d_ms = 1000 * seq["idle_s"] / rounds
    hit = ovl["hits"] / (ovl["hits"] + ovl["misses"])
    m = cost.Measurements(n_cores=1, draft_ms={1: {1: d_ms / BUDGET}}, verify_ms={1: {1: v_ms, 64: v_ms}},
                          acceptance=cost.Acceptance([0.9]), gpu=True, host_cores=0)
    e_obs = seq["tokens"] / rounds
    p_seq = cost.evaluate(m, "sequential", BUDGET, 1, 1, 1, expected=e_obs)
    p_ovl = cost.evaluate(m, "overlap", BUDGET, 1, 1, 1, expected=e_obs, hit=hit)
    predicted_gain = p_ovl.tps / p_seq.tps
    info = (f"rounds {rounds}, E {e_obs:.2f}, draft {d_ms:.1f} ms/round, hit rate {hit:.2f}; simulated s/round "
            f"sequential {t_seq / rounds:.3f}, overlap {t_ovl / rounds:.3f}; gain measured {measured_gain:.3f}, "
            f"predicted {predicted_gain:.3f}")
    print(info)   # shown with pytest -s
    assert hit >= 0.6, f"the draft-ahead rarely hit: the test would not exercise the overlap ({info})"
    assert predicted_gain >= 1.2, f"the draft is too fast for a clear margin ({info})"
    assert abs(measured_gain / predicted_gain - 1) <= GAIN_TOLERANCE, info
    # the overlap wins clearly: implied by the two above (>= 1.2 predicted, within 8%), stated for the reader;
    # not a fixed 1.2, which a draft a little faster than this one would miss with the model still right
    assert measured_gain >= 1.2 * (1 - GAIN_TOLERANCE), info


# ------------------------------------------------------------------------------------------- (c) the cache
def test_record_cache_round_trip(tiny_pair, tmp_path, monkeypatch):
    from duo.runtime import decode
    from duo.runtime.target import load_target

    monkeypatch.setattr(S, "_MEMORY", {})
    tm = load_target(tiny_pair.target_hf_dir, device="cpu")
    ids = [17, 42, 99, 7, 300]
    rec = S.record_target(tm, ids, 20, directory=tmp_path)
    path = S.record_path(S.model_key(tm), ids, 20, tmp_path)
    assert path.is_file() and json.loads(path.read_text())["tokens"] == rec.tokens
    assert rec.covers(20) and rec.prompt_len == len(ids) and rec.model == S.model_key(tm)

    def no_target(*a, **k):
        raise AssertionError("the target was run although the recording is cached")
    monkeypatch.setattr(decode, "generate_tokens", no_target)
    monkeypatch.setattr(S, "_MEMORY", {})
    assert S.record_target(tm, ids, 20, directory=tmp_path).tokens == rec.tokens    # from disk
    monkeypatch.setattr(S, "_MEMORY", {})
    assert S.record_target(tm, ids, 12, directory=tmp_path).tokens == rec.tokens    # a longer one covers it
    sim = S.SimulatedTarget(tm, FAST, directory=tmp_path)
    assert sim.prepare(ids, 16).tokens == rec.tokens
    assert S.load_record("another-model", ids, 20, tmp_path) is None
    assert S.load_record(S.model_key(tm), ids + [1], 20, tmp_path) is None
    with pytest.raises(AssertionError, match="was run"):                           # longer: must record
        S.record_target(tm, ids, 40, directory=tmp_path)


# ------------------------------------------------------------------------------------------- profiler
DRAFT = [dict(threads=1, width=1, ms=37.0), dict(threads=1, width=2, ms=45.0), dict(threads=1, width=4, ms=60.0),
         dict(threads=2, width=1, ms=25.0), dict(threads=2, width=2, ms=30.0), dict(threads=2, width=4, ms=40.0)]
MEAS = dict(n_cores=2, draft=DRAFT, acceptance=dict(hazard=[0.8, 0.82, 0.85, 0.85, 0.86], rank=[0.8, 0.08, 0.04, 0.02]),
            channel=dict(ms=0.1), overhead_ms=1.0)   # like the 0.5B draft on this 2-core machine


def test_accelerator_profiles_are_documented():
    accs = S.load_accelerators()
    assert len(accs) >= 3
    text = (Path(S.ACCELERATORS_PATH).parent / "accelerators.md").read_text()
    for name, a in accs.items():
        assert a.source and a.description and name in text
        assert a.forward_ms(1) == a.base_ms and a.forward_ms(17) == pytest.approx(a.base_ms + 16 * a.per_token_ms)
        assert a.prefill_ms(0) == 0 and a.prefill_ms(1000) >= a.forward_ms(1)
    fwd = sorted(a.base_ms for a in accs.values())
    assert fwd[0] < 37 / 1.5 and fwd[-1] >= 300      # from draft-bound to hundreds of ms per pass


def test_profiler_choices_follow_the_accelerator():
    accs = S.load_accelerators()
    by_speed = sorted(accs, key=lambda n: accs[n].base_ms)
    choices = {n: simulated.choose(n, MEAS) for n in by_speed}
    fast, slow = choices[by_speed[0]], choices[by_speed[-1]]
    # the fastest GPU verifies a token before the draft has drafted one: drafting loses
    assert fast.mode == "target" or fast.budget <= 2
    # the slowest target hides the drafting completely: overlap, a large budget, a large gain
    assert slow.mode == "overlap" and slow.budget >= 8 and slow.predicted_speedup > 2
    spec = [choices[n].budget for n in by_speed if choices[n].mode != "target"]
    assert spec == sorted(spec)                       # slower passes, larger budgets
    # the target's time needs no core: the draft gets them all (2 threads), in both schedules
    assert slow.draft_threads == 2
    plan = simulated.plan_from(by_speed[-1], MEAS, source="test")
    assert (plan.mode, plan.budget, plan.draft_threads, plan.draft_cores) == ("overlap", slow.budget, 2, None)
    assert simulated.plan_from(by_speed[-1], MEAS, mode="sequential", budget=5).budget == 5
    report = simulated.report(by_speed[-1], MEAS, "test")
    assert "SIMULATED" in report and "choice: overlap" in report


def test_pipeline_efficiency_is_predicted_over_measured_time():
    """Steady state: from the end of the first round (both prefills and the first tree) on."""
    m = simulated.measurements(dict(name="flat", base_ms=100.0), dict(MEAS, overhead_ms=0.0, channel=dict(ms=0.0)))
    d, v = 4 * 37.0, 100.0
    seq = dict(mode="sequential", rounds=10, mean_budget=4, drafted=40, new_tokens=30, prefill_s=0.2,
               ttft_s=0.2 + 1.5, wall_s=0.2 + 1.5 + 9 * (d + v) / 1000, target_idle_s=1.5 + 9 * d / 1000,
               draft_idle_s=1.0, accelerator_idle_s=9 * d / 1000, accelerator_gaps=9)
    e = simulated.efficiency(m, [seq], width=1, draft_threads=1)
    assert e["efficiency"] == pytest.approx(1.0, abs=1e-3) and e["predicted_round_ms"] == pytest.approx(d + v)
    assert e["target_idle_ms_per_round"] == pytest.approx(d) and e["draft_idle_ms_per_round"] == pytest.approx(100)
    # overlap, 8 hits of 10: a hit costs max(v, d + step), a miss v + d; measured 10% slower than that
    t = 0.8 * max(v, d + 37.0) + 0.2 * (v + d)
    ovl = dict(seq, mode="overlap", wall_s=seq["ttft_s"] + 1.1 * 9 * t / 1000, overlap_hits=8, overlap_misses=2)
    e = simulated.efficiency(m, [ovl], width=1, draft_threads=1)
    assert e["efficiency"] == pytest.approx(1 / 1.1, abs=1e-3) and e["overlap_hit_rate"] == 0.8
    tgt = dict(mode="target", rounds=30, new_tokens=30, prefill_s=0.1, ttft_s=0.1 + v / 1000,
               wall_s=0.1 + 30 * v / 1000, drafted=0)
    assert simulated.efficiency(m, [tgt])["efficiency"] == pytest.approx(1.0, abs=1e-3)
    assert simulated.efficiency(m, [dict(tgt, rounds=1)]) == {}     # no steady state to measure
