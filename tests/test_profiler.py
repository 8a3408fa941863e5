"""Profiler: the cost model's choice on synthetic curves, profile files, fingerprints, and one tiny end-to-end run."""
import itertools
import json
import logging
import random

import pytest

from duo.profiler import cost
from duo.profiler import profile as P
from duo.profiler.inventory import GPU, Inventory


# ------------------------------------------------------------------------------------------- synthetic
def cpu_like(n_cores=4, draft_ms=30.0, hazard=0.8, v1=200.0, slope=12.0, **kw):
    """Verify grows with n and shrinks with threads; draft ms per step by threads and width."""
    threads = [1, 2, 4, 8][: max(1, n_cores.bit_length())]
    threads = sorted({t for t in threads if t <= n_cores} | {n_cores})
    verify = {t: {k: (v1 + slope * (k - 1)) * n_cores / t for k in (1, 2, 4, 8, 16, 32, 64)}
              for t in sorted({n_cores} | {n_cores - d for d in threads if d < n_cores})}
    draft = {t: {w: draft_ms * (1 + 0.25 * (w - 1)) / t ** 0.5 for w in (1, 2, 4)} for t in threads}
    acc = kw.pop("acceptance", None) or cost.Acceptance([hazard] * 12, [hazard, 0.08, 0.03, 0.01])
    return cost.Measurements(n_cores=n_cores, draft_ms=draft, verify_ms=verify, acceptance=acc, **kw)


def gpu_like(draft_ms=30.0, hazard=0.85, verify_ms=20.0, n_cores=8):
    """Verification flat in n (a GPU); the draft on the CPU is the slow side."""
    verify = {n_cores: {k: verify_ms * (1 + 0.002 * k) for k in (1, 2, 4, 8, 16, 32, 64)}}
    draft = {t: {w: draft_ms / t ** 0.3 * (1 + 0.1 * (w - 1)) for w in (1, 2, 4)} for t in (1, 2, 4, 7)}
    return cost.Measurements(n_cores=n_cores, draft_ms=draft, verify_ms=verify, gpu=True, channel_ms=0.1,
                             acceptance=cost.Acceptance([hazard] * 16, [hazard, 0.05]))


def random_measurements(seed):
    rng = random.Random(seed)
    n = rng.choice([2, 4, 8])
    hz = [min(0.97, max(0.05, rng.gauss(0.7, 0.15))) for _ in range(rng.randint(3, 14))]
    m = cpu_like(n_cores=n, draft_ms=rng.uniform(2, 120), v1=rng.uniform(20, 400), slope=rng.uniform(0, 40),
                 acceptance=cost.Acceptance(hz, [hz[0]] + [rng.uniform(0, 0.2) for _ in range(3)]),
                 channel_ms=rng.uniform(0, 2), overhead_ms=rng.uniform(0, 5), tree_factor=rng.uniform(1, 1.3),
                 interference={d: (rng.uniform(1, 1.5), rng.uniform(1, 1.5)) for d in (1, 2, 4)})
    if rng.random() < 0.3:
        m.supports_tree = False
    return m


def brute_force(m: cost.Measurements, margin=cost.DEFAULT_MARGIN):
    """Every grid point evaluated independently of choose_budget's search."""
    best_spec, best_target = None, None
    n_max = {t: max(c) for t, c in m.verify_ms.items()}
    for mode in ("target", "sequential", "overlap"):
        for dt, tt in m.splits(mode):
            if mode == "target":
                r = cost.evaluate(m, mode, 0, 1, dt, tt)
                best_target = r if best_target is None or r.tps > best_target.tps else best_target
                continue
            top = n_max[max(m.verify_ms)] if m.gpu else n_max[tt]
            for b, w in itertools.product(range(1, 64), (1, 2, 4)):
                if b + 1 > top or (w > 1 and (w > b or not m.supports_tree)):
                    continue
                r = cost.evaluate(m, mode, b, w, dt, tt)
                if best_spec is None or (r.tps, -r.budget, -r.width) > (best_spec.tps, -best_spec.budget, -best_spec.width):
                    best_spec = r
    if best_spec is None or best_spec.tps <= best_target.tps * (1 + margin):
        return best_target
    return best_spec


# ------------------------------------------------------------------------------------------- cost model
def test_expected_tokens_chain_is_one_plus_survival_sum():
    acc = cost.Acceptance.from_survival([0.9, 0.7, 0.5, 0.3, 0.2])
    assert cost.expected_tokens(acc, 3) == pytest.approx(1 + 0.9 + 0.7 + 0.5)
    assert cost.expected_tokens(acc, 5) == pytest.approx(1 + 0.9 + 0.7 + 0.5 + 0.3 + 0.2)
    assert cost.expected_tokens(acc, 1, width=4) == pytest.approx(1.9)  # one node: a chain whatever the width
    # beyond the measured depth the tail hazard continues the curve
    assert cost.expected_tokens(acc, 7) > cost.expected_tokens(acc, 5)
    assert cost.hit_probability(acc, 2) == pytest.approx(0.5)  # top path of 2 and the bonus guess: S(3)


def test_tree_adds_alternatives_and_splits_like_the_drafter():
    from duo.runtime.tree_shapes import split_budget

    assert cost.split_budget is split_budget   # the cost model splits with the drafter's own function
    want = {10: [5, 3, 2], 7: [6, 1], 4: [1, 1, 1, 1], 16: [13, 1, 1, 1]}   # 1 each + the rest pro rata
    for b, ws in [(10, [0.5, 0.2, 0.1]), (7, [0.9, 0.01]), (4, [0.3, 0.3, 0.3, 0.1]), (16, [1, 1e-3, 1e-3, 1e-3])]:
        got = split_budget(b, ws)
        assert got == want[b] and sum(got) == b and all(type(x) is int and x >= 1 for x in got)
    acc = cost.Acceptance([0.6] * 10, [0.6, 0.2, 0.1])
    chain, tree = cost.expected_tokens(acc, 8, 1), cost.expected_tokens(acc, 8, 3)
    lengths = cost.branch_lengths(acc, 8, 3)
    assert sum(lengths) == 8 and len(lengths) == 3
    manual = 1 + sum(acc.survival(d) for d in range(1, lengths[0] + 1)) + \
        sum(q * sum(0.6 ** (d - 1) for d in range(1, L + 1)) for q, L in zip((0.2, 0.1), lengths[1:]))
    assert tree == pytest.approx(manual)
    assert tree > chain  # here the alternatives are worth more than the chain's deep tail
    # a draft that never offers alternatives: width buys nothing
    flat = cost.Acceptance([0.6] * 10, [0.6, 0.0, 0.0])
    assert cost.branch_lengths(flat, 8, 4) == [8]


@pytest.mark.parametrize("seed", range(12))
def test_choice_equals_brute_force(seed):
    m = random_measurements(seed)
    got = cost.choose_budget(m)
    want = brute_force(m)
    assert (got.mode, got.budget, got.width, got.draft_threads, got.target_threads) == \
        (want.mode, want.budget, want.width, want.draft_threads, want.target_threads)
    assert got.predicted_tps == pytest.approx(want.tps)
    assert got.predicted_speedup == pytest.approx(want.tps / max(r.tps for r in got.table if r.mode == "target"))


def test_choice_matches_closed_form_on_a_simple_chain_model():
    """Constant hazard h, verify a + c n, draft s per token, sequential only: tps(b) = (1 + h + ... + h^b) / (s b + a + c (b+1))."""
    h, a, c, s = 0.8, 100.0, 5.0, 20.0
    m = cost.Measurements(n_cores=1, draft_ms={1: {1: s, 2: s, 4: s}},
                          verify_ms={1: {k: a + c * k for k in (1, 2, 4, 8, 16, 32, 64)}},
                          acceptance=cost.Acceptance([h] * 40), supports_tree=False)
    tps = {b: 1000 * sum(h ** d for d in range(b + 1)) / (s * b + a + c * (b + 1)) for b in range(1, 64)}
    best = max(tps, key=tps.get)
    got = cost.choose_budget(m, modes=("sequential",))
    assert (got.mode, got.budget, got.width) == ("sequential", best, 1)
    assert got.predicted_tps == pytest.approx(tps[best])


def test_picks_target_only_when_the_draft_is_slow():
    m = cpu_like(draft_ms=2000.0)
    c = cost.choose_budget(m)
    assert c.mode == "target" and c.predicted_speedup == pytest.approx(1.0)


def test_picks_target_only_when_acceptance_is_low():
    m = cpu_like(draft_ms=5.0, hazard=0.03)
    assert cost.choose_budget(m).mode == "target"


def test_drafting_pays_when_cheap_and_accepted():
    m = cpu_like(draft_ms=5.0, hazard=0.85)
    c = cost.choose_budget(m)
    assert c.mode != "target" and c.predicted_speedup > 1.5 and c.budget > 1


def test_picks_overlap_when_verification_is_flat_and_the_draft_is_the_bottleneck():
    m = gpu_like(draft_ms=15.0)  # a token drafted costs most of a verification pass
    c = cost.choose_budget(m)
    assert c.mode == "overlap" and c.budget > 1
    seq = cost.choose_budget(m, modes=("sequential",))
    assert c.predicted_tps > 1.1 * seq.predicted_tps
    # sequentially, drafting takes longer than verifying: the draft is the bottleneck that overlap hides
    row = cost.evaluate(m, "sequential", seq.budget, seq.width, seq.draft_threads, seq.target_threads)
    assert row.draft_ms > row.verify_ms


def test_round_times_per_schedule():
    m = cpu_like(n_cores=4, draft_ms=10.0, hazard=0.7, channel_ms=0.5, overhead_ms=2.0, interference={1: (1.2, 1.1)})
    v4, v3, step1 = m.verify(6, 4), m.verify(6, 3), m.step(1, 1)
    seq = cost.evaluate(m, "sequential", 5, 1, 1, 4)
    assert seq.round_ms == pytest.approx(5 * step1 + v4 + 0.5 + 2.0)
    assert seq.expected_tokens == pytest.approx(1 + sum(0.7 ** d for d in range(1, 6)))
    ov = cost.evaluate(m, "overlap", 5, 1, 1, 3)
    p = 0.7 ** 6  # the 5 drafted tokens and the draft's guess of the bonus token are all accepted
    assert ov.hit == pytest.approx(p)
    hit_round = max(v3 * 1.1, (5 * step1 + step1) * 1.2)
    miss_round = v3 * 1.1 + 5 * step1
    assert ov.round_ms == pytest.approx(p * hit_round + (1 - p) * miss_round + 0.5 + 2.0)
    tgt = cost.evaluate(m, "target", 0, 1, 0, 4)
    assert tgt.round_ms == pytest.approx(m.verify(1, 4) + 2.0) and tgt.expected_tokens == 1
    # a tree: the root and first token alone, then the unfinished branches batched
    tree = cost.evaluate(m, "sequential", 6, 2, 2, 4)
    L = cost.branch_lengths(m.acceptance, 6, 2)
    needs = [L[0] - 2, L[1] - 1]
    steps = 2 * m.step(2, 1) + sum(m.step(2, sum(n >= k for n in needs)) for k in range(1, max(needs) + 1))
    assert tree.draft_ms == pytest.approx(steps)


def test_sequential_when_overlap_would_starve_the_target():
    """On a CPU, overlap halves the target's threads; with fast drafting that loses to sequential."""
    m = cpu_like(n_cores=2, draft_ms=3.0, hazard=0.8, interference={1: (1.3, 1.3)})
    assert cost.choose_budget(m).mode == "sequential"


def test_restricted_search_respects_mode_and_budget():
    m = cpu_like(draft_ms=5.0, hazard=0.85)
    c = cost.choose_budget(m, modes=("overlap",), budgets=[3])
    assert c.mode == "overlap" and c.budget == 3
    assert cost.choose_budget(m, modes=("target",)).mode == "target"


# ------------------------------------------------------------------------------------------- profile files
def inventory(**kw):
    d = dict(cpu_model="Test CPU 9000", arch="x86_64", physical_cores=4, logical_cores=8, usable_cores=[0, 1, 2, 3],
             ram_total_gib=31.6, gpus=[], gpu_note="none", device="cpu", dtype="float32", torch="2.13.0",
             llama_cpp="0.3.36")
    d.update(kw)
    return Inventory(**d)


def synthetic_profile(inv=None, hazard=0.8, draft_ms=8.0):
    inv = inv or inventory()
    key = P.profile_key(inv, {"name": "t", "size": 10, "sha256_head_tail": "aa"}, {"name": "d", "size": 5})
    m = {
        "device": "cpu", "gpu": False, "cores": [0, 1, 2, 3], "n_cores": 4, "supports_tree": True,
        "draft": [dict(threads=t, width=w, ms=draft_ms * (1 + 0.2 * (w - 1)) / t, min_ms=1, max_ms=1, reps=2)
                  for t in (1, 2, 4) for w in (1, 2, 4)],
        "verify": [dict(threads=t, context=c, n=k, ms=(100 + 4 * k) * 4 / t * (1.1 if c == 512 else 1), min_ms=1,
                        max_ms=1, reps=2)
                   for t in (4, 3, 2) for c in (128, 512) for k in (1, 2, 4, 8, 16, 32, 64)],
        "tree_mask": {"n": 16, "chain_ms": 1, "tree_ms": 1.05, "factor": 1.05},
        "channel": {"ms": 0.1, "min_ms": 0.1, "max_ms": 0.2, "reps": 10},
        "overhead_ms": 1.0,
        "interference": [dict(draft_threads=1, target_threads=3, draft_factor=1.1, target_factor=1.1)],
        "acceptance": dict(hazard=[hazard] * 8, tail=hazard, rank=[hazard, 0.05, 0.02, 0.01], tested=[10] * 8,
                           accepted=[8] * 8, rounds=10, prompts=2, max_new_tokens=16, runs={}),
    }
    prof = {"format": P.FORMAT, "version": P.FORMAT_VERSION, "fingerprint": P.fingerprint(key),
            "created": "2025-01-01T00:00:00+00:00", "quick": True, "key": key, "environment": P.environment(inv),
            "inventory": inv.to_dict(), "measurements": m}
    P.finish(prof)
    return prof


def test_profile_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("DUO_CACHE", str(tmp_path))
    prof = synthetic_profile()
    path = P.save_profile(prof)
    assert path == tmp_path / "profiles" / f"{prof['fingerprint']}.json"
    back = P.load_profile(prof["fingerprint"])
    assert back == json.loads(json.dumps(prof))
    assert Inventory.from_dict(back["inventory"]) == inventory()
    plan = P.plan_from_profile(back)
    c = back["choice"]
    assert (plan.mode, plan.budget, plan.width) == (c["mode"], c["budget"], c["width"])
    assert plan.draft_threads == c["draft_threads"] and plan.target_threads == c["target_threads"]
    assert plan.draft_ms_per_token > 0 and plan.source.startswith("profile")
    assert P.load_profile("0" * 16) is None


def test_plan_follows_requested_mode_and_budget(tmp_path):
    prof = synthetic_profile()
    p = P.plan_from_profile(prof, mode="sequential", budget=5)
    assert (p.mode, p.budget) == ("sequential", 5) and p.draft_cores is None
    p = P.plan_from_profile(prof, mode="overlap")
    assert p.mode == "overlap" and p.draft_cores and p.target_cores
    assert not set(p.draft_cores) & set(p.target_cores)
    assert P.plan_from_profile(prof, mode="target").mode == "target"
    slow = synthetic_profile(draft_ms=5000.0)
    assert P.plan_from_profile(slow).mode == "target"


def test_unreadable_or_foreign_profiles_are_ignored(tmp_path, caplog):
    (tmp_path / "abc.json").write_text("{not json")
    (tmp_path / "def.json").write_text(json.dumps({"format": P.FORMAT, "version": 999}))
    with caplog.at_level(logging.WARNING, logger="duo"):
        assert P.load_profile("abc", tmp_path) is None
        assert P.load_profile("def", tmp_path) is None
    assert "unreadable" in caplog.text and "format version 999" in caplog.text


def test_fingerprint_changes_with_hardware_and_models():
    t, d = {"name": "t", "size": 10}, {"name": "d", "size": 5}
    base = P.profile_key(inventory(), t, d)
    assert P.fingerprint(base) == P.fingerprint(P.profile_key(inventory(), dict(t), dict(d)))
    assert P.fingerprint(base) == P.fingerprint(P.profile_key(inventory(ram_total_gib=31.9, load_avg_1m=3.0), t, d))
    variants = [P.profile_key(inventory(cpu_model="Other"), t, d),
                P.profile_key(inventory(usable_cores=[0, 1]), t, d),
                P.profile_key(inventory(ram_total_gib=64), t, d),
                P.profile_key(inventory(gpus=[GPU(0, "NVIDIA H100")], device="cuda:0", dtype="bfloat16"), t, d),
                P.profile_key(inventory(), {"name": "t", "size": 11}, d),
                P.profile_key(inventory(), t, {"name": "d2", "size": 5})]
    fps = {P.fingerprint(k) for k in variants} | {P.fingerprint(base)}
    assert len(fps) == len(variants) + 1


def test_mismatch_lists_what_changed(tmp_path, caplog):
    old = synthetic_profile(inventory())
    P.save_profile(old, tmp_path)
    new_key = P.profile_key(inventory(cpu_model="Faster CPU", ram_total_gib=64), old["key"]["target"],
                            {"name": "d", "size": 6})
    found, changes = P.closest_profile(new_key, tmp_path)
    assert found["fingerprint"] == old["fingerprint"]
    text = "\n".join(changes)
    assert "cpu_model: 'Test CPU 9000' -> 'Faster CPU'" in text
    assert "ram_gib: 32 -> 64" in text and "draft.size: 5 -> 6" in text
    assert len(changes) == 3
    # same key, other software: still the same profile, the change is reported
    env = dict(old["environment"], torch="9.9")
    assert P.check_profile(old, old["key"], env) == ["environment.torch: '2.13.0' -> '9.9'"]
    with caplog.at_level(logging.WARNING, logger="duo"):
        P.warn_changes(changes, "differs in")
    assert "Faster CPU" in caplog.text


def test_plan_for_uses_the_saved_profile_and_warns_about_the_closest(tmp_path, monkeypatch, caplog):
    from duo.models import DraftRef, TargetRef
    from duo.profiler import inventory as inventory_mod

    monkeypatch.setenv("DUO_CACHE", str(tmp_path))
    (tmp_path / "t.gguf").write_bytes(b"GGUF" + b"\0" * 100)
    (tmp_path / "d.gguf").write_bytes(b"GGUF" + b"\1" * 50)
    tref, dref = TargetRef("t", tmp_path, tmp_path / "t.gguf"), DraftRef("d", tmp_path / "d.gguf")
    inv = inventory()
    monkeypatch.setattr(inventory_mod, "collect", lambda device="auto", dtype="auto": inv)
    with caplog.at_level(logging.WARNING, logger="duo"):
        assert P.plan_for(tref, dref, quick_if_missing=False) is None
    prof = synthetic_profile(inv)
    key = P.key_for(tref, dref, inv)
    prof["key"], prof["fingerprint"] = key, P.fingerprint(key)
    P.save_profile(prof)
    plan = P.plan_for(tref, dref, quick_if_missing=False)
    assert plan is not None and plan.mode == prof["choice"]["mode"] and plan.source == f"profile {prof['fingerprint']}"
    (tmp_path / "d.gguf").write_bytes(b"GGUF" + b"\2" * 60)  # the draft file changed
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="duo"):
        assert P.plan_for(tref, dref, quick_if_missing=False) is None
    assert "draft.size: 54 -> 64" in caplog.text


# ------------------------------------------------------------------------------------------- end to end
def test_benchmarks_run_end_to_end_on_the_tiny_pair(tiny_pair, tmp_path):
    from duo.models import DraftRef, TargetRef
    from duo.profiler.cli import format_report
    from duo.profiler.timing import Settings

    s = Settings(contexts=(16, 32), ns=(1, 2, 4, 8), other_ns=(1, 8), context_ns=(1, 8), stop_ratio=None, min_reps=1, max_reps=1, draft_steps=2,
                 draft_context=16, ping_reps=3, max_new_tokens=8, chain_budget=3, tree_budget=3,
                 max_prompts=2, draft_threads=(1,))
    prof, path = P.create_profile(TargetRef("tiny", tiny_pair.target_hf_dir, tiny_pair.target_gguf),
                                  DraftRef("tiny-draft", tiny_pair.draft_gguf), device="cpu", dtype="float32",
                                  settings=s, progress=False, save=False)
    m = prof["measurements"]
    assert {(r["threads"], r["width"]) for r in m["draft"]} == {(1, 1), (1, 2), (1, 4)}
    assert {r["n"] for r in m["verify"] if r["context"] == 16 and r["threads"] == m["n_cores"]} == {1, 2, 4, 8}
    assert all(r["ms"] > 0 for r in m["draft"] + m["verify"])
    assert m["channel"]["ms"] > 0
    a = m["acceptance"]
    assert a["rounds"] > 0 and len(a["hazard"]) >= 1 and all(0 <= h <= 1 for h in a["hazard"])
    assert set(a["runs"]) == {"chain", "tree"}
    # each round's tree is matched with that round's tokens (not the prefill's first token): the tiny draft's
    # first token is accepted about half the time, and the trials say so
    assert a["accepted"][0] > 0 and a["hazard"][0] > 0.1, a
    assert m["llama_probe"]["chosen"] in ("extra-bufts", "plain") and len(m["llama_probe"]["variants"]) == 2
    assert prof["choice"]["mode"] in cost.MODES and prof["table"]
    json.dumps(prof)  # serialisable
    report = format_report(prof)
    assert "choice:" in report
    # precisions off (the default, as in the Engine's automatic profile): nothing measured, nothing reported
    assert "precisions" not in m and "precisions" not in prof and "recommended:" not in report
    P.plan_from_profile(prof)


def tiny_settings():
    from duo.profiler.timing import Settings

    return Settings(contexts=(16, 32), ns=(1, 2, 4, 8), other_ns=(1, 8), context_ns=(1, 8), stop_ratio=None,
                    min_reps=1, max_reps=1, draft_steps=2, draft_context=16, ping_reps=3, max_new_tokens=8,
                    chain_budget=3, tree_budget=3, max_prompts=2, draft_threads=(1,), interference=False)


def test_profile_measures_every_precision_when_asked(tiny_pair):
    import torch

    from duo.models import DraftRef, TargetRef
    from duo.profiler.cli import format_report
    from duo.profiler.precisions import PRECISION_NS
    from duo.runtime.precision import available_precisions

    prof, _ = P.create_profile(TargetRef("tiny", tiny_pair.target_hf_dir, tiny_pair.target_gguf),
                               DraftRef("tiny-draft", tiny_pair.draft_gguf), device="cpu", dtype="float32",
                               settings=tiny_settings(), progress=False, save=False, precisions=True)
    entries = prof["measurements"]["precisions"]
    names = available_precisions(torch.device("cpu"))
    assert set(entries) == set(names) and "int8" in names
    assert entries["float32"]["own"] and entries["float32"]["load_s"] is None
    for name, e in entries.items():
        assert "error" not in e, e
        assert e["verify"] and all(r["ms"] > 0 and r["context"] == 16 for r in e["verify"])
        assert e["footprint_bytes"] > 0
        if name != "float32":
            assert {r["n"] for r in e["verify"]} == set(PRECISION_NS) and e["load_s"] > 0
    size = {name: e["footprint_bytes"] for name, e in entries.items()}
    assert size["int8"] < size["bfloat16"] < size["float32"] and size["w8a8"] < size["bfloat16"]
    rows = {r["precision"]: r for r in prof["precisions"]}
    assert set(rows) == set(names)
    for r in rows.values():
        assert r["target_tps"] > 0 and r["duo_tps"] > 0 and r["verify_n1_ms"] > 0 and r["footprint_bytes"] > 0
    own = rows["float32"]
    assert own["own"] and (own["mode"], own["budget"], own["duo_tps"]) == (
        prof["choice"]["mode"], prof["choice"]["budget"], round(prof["choice"]["predicted_tps"], 3))
    report = format_report(prof)
    assert "verify n=1 / n=16 ms" in report and "duo predicted tok/s (plan)" in report
    assert all(any(line.strip().startswith(n) for line in report.splitlines()) for n in names)
    best = max(rows.values(), key=lambda r: r["duo_tps"])["precision"]
    assert f"recommended: {best} (run with --dtype {best}); precision changes the target's numerics: " \
           "duo never switches it by itself" in report
    json.dumps(prof)


def test_precision_predictions_use_the_profile_draft_and_acceptance():
    from duo.profiler import precisions
    from duo.profiler.cli import format_report

    prof = synthetic_profile()
    m = prof["measurements"]
    own_rows = [r for r in m["verify"] if r["context"] == 128 and r["threads"] == 4]
    fast = [dict(r, ms=r["ms"] / 2) for r in own_rows if r["n"] <= 32]      # twice as fast, whatever n
    m["precisions"] = {"float32": {"verify": own_rows, "footprint_bytes": 4 << 30, "load_s": None, "own": True},
                       "int8": {"verify": fast, "footprint_bytes": 1 << 30, "load_s": 1.0},
                       "bfloat16": {"error": "RuntimeError: no kernel"}}
    P.finish(prof)
    rows = {r["precision"]: r for r in prof["precisions"]}
    assert [r["precision"] for r in prof["precisions"]] == ["float32", "bfloat16", "int8"]
    assert rows["float32"]["duo_tps"] == round(prof["choice"]["predicted_tps"], 3)
    assert rows["int8"]["target_tps"] > 1.8 * rows["float32"]["target_tps"]
    assert rows["int8"]["duo_tps"] > rows["float32"]["duo_tps"] and "error" in rows["bfloat16"]
    # the other contexts and thread counts: the own rows scaled by the measured ratio (here 1/2)
    full = precisions.scaled_rows(m["verify"], fast)
    assert len(full) == len(m["verify"]) - 1        # n=64 at (128, 4) was not measured in int8
    r = next(r for r in full if (r["threads"], r["context"], r["n"]) == (2, 512, 64))
    assert r["ms"] == pytest.approx(next(o["ms"] for o in m["verify"] if (o["threads"], o["context"], o["n"]) ==
                                         (2, 512, 64)) / 2)
    report = format_report(prof)
    assert "recommended: int8 (run with --dtype int8)" in report and "not measured: RuntimeError" in report
    del prof["precisions"], m["precisions"]
    P.finish(prof)                                   # an old profile: no precisions, the report as before
    assert "precisions" not in prof and "recommended:" not in format_report(prof)


def test_verify_curve_is_made_monotone():
    from duo.profiler.profile import min_over_larger
    # n=1 measured slower than n=2 (a competing process): the model uses the faster, larger pass
    noisy = {1: 463.0, 2: 458.0, 4: 507.0, 8: 500.0, 16: 720.0}
    assert min_over_larger(noisy) == {1: 458.0, 2: 458.0, 4: 500.0, 8: 500.0, 16: 720.0}
    clean = {1: 280.0, 2: 300.0, 4: 430.0}
    assert min_over_larger(clean) == clean
    # the cost model's own smoothing (draft widths, any verify curve) is the running maximum; a profile's curve
    # is already non-decreasing, so the running maximum leaves it as it is
    assert cost.running_max({1: 10.0, 2: 9.0, 4: 12.0}) == {1: 10.0, 2: 10.0, 4: 12.0}
    assert cost.running_max(clean) == clean
    assert cost.running_max(min_over_larger(noisy)) == min_over_larger(noisy)


def test_recorder_forwards_the_draft_client_api_and_keeps_the_trees():
    from duo.plan import TreeSpec
    from duo.profiler.acceptance import Recorder

    class Client:
        stats = "stats"

        def __init__(self):
            self.calls = []

        def start(self, prompt, *, overlap, spec=None):
            self.calls.append(("start", prompt, overlap, spec))

        def request_tree(self, delta, spec, timeout):
            self.calls.append(("request_tree", delta, spec, timeout))
            return f"tree {len(self.calls)}"

        def catch_up(self, delta, timeout):
            self.calls.append(("catch_up", delta, timeout))
            return True

        def alive(self):
            return True

    client, spec = Client(), TreeSpec(3, 1, "chain")
    rec = Recorder(client)
    rec.start([1, 2], overlap=False, spec=spec)
    assert rec.request_tree([], spec, 5.0) == "tree 2" and rec.catch_up([7], 5.0) and rec.alive()
    assert rec.request_tree([8], spec, 5.0) == "tree 4"
    assert rec.trees == ["tree 2", "tree 4"] and rec.stats == "stats" and rec.draft_s >= 0
    assert client.calls == [("start", [1, 2], False, spec), ("request_tree", [], spec, 5.0), ("catch_up", [7], 5.0),
                            ("request_tree", [8], spec, 5.0)]


def test_the_draft_benchmark_child_imports_without_torch():
    import subprocess
    import sys

    code = ("import sys, duo.profiler.benchers, duo.profiler.timing; "
            "from duo.profiler.benchers import _draft_child; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_in_loop_slowdown_of_verification_is_calibrated_from_the_decodes():
    """The calibration decodes' verify ms per round, against the back-to-back curve at the same pass size,
    scale sequential rounds only (target-only passes run back to back)."""
    prof = synthetic_profile()
    plain = P.measurements_from_profile(prof)
    assert plain.loop_factor == 1.0                      # no calibration decodes recorded: no correction
    n_cores = prof["measurements"]["n_cores"]
    back_to_back = plain.verify(11, n_cores)             # budget 10 -> 11 tokens per pass
    prof["measurements"]["acceptance"]["runs"] = {
        "chain": dict(budget=10, width=1, rounds=20, verify_ms_per_round=1.25 * back_to_back),
        "tree": dict(budget=10, width=4, rounds=20, verify_ms_per_round=1.25 * 1.2 * back_to_back)}
    m = P.measurements_from_profile(prof)
    assert m.loop_factor == pytest.approx(1.25, rel=1e-3) and m.tree_factor == pytest.approx(1.2, rel=1e-3)
    seq, seq0 = (cost.evaluate(x, "sequential", 6, 1, n_cores, n_cores) for x in (m, plain))
    assert seq.verify_ms == pytest.approx(1.25 * seq0.verify_ms) and seq.round_ms > seq0.round_ms
    tgt, tgt0 = (cost.evaluate(x, "target", 0, 1, n_cores, n_cores) for x in (m, plain))
    assert tgt.round_ms == pytest.approx(tgt0.round_ms)
    prof["measurements"]["acceptance"]["runs"]["chain"]["verify_ms_per_round"] = 0.5 * back_to_back
    assert P.measurements_from_profile(prof).loop_factor == 1.0   # faster in the loop is noise: never below 1
