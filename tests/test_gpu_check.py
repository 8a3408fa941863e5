"""bench.gpu_check: the scaled-down CPU run lists every stage and passes; a failing stage fails the run and the
others still run; the bench's near-tie check feeds the target on the target's own device."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import gpu_check
from bench.gpu_check_parts import Outcome, Skipped

ROOT = Path(__file__).resolve().parents[1]
STATIC_BUILT = importlib.util.find_spec("duo.runtime.static_target") is not None
NAMES = [name for name, _ in gpu_check.STAGES]


@pytest.fixture(scope="module")
def cpu_run(tiny_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "check.json"
    p = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--quick", "--pair",
                        str(tiny_pair.root), "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=240)
    assert out.exists(), p.stderr
    return p, json.loads(out.read_text())


def test_the_cpu_run_lists_every_stage_and_passes(cpu_run):
    p, report = cpu_run
    rows = {r["stage"]: r for r in report["rows"]}
    assert list(rows) == NAMES and report["device"] == "cpu"
    for i, name in enumerate(NAMES, 1):
        assert f"| {i} | {name} |" in p.stdout, p.stdout                      # one table, a row per stage
        assert f"gpu_check: [{i}/{len(NAMES)}] {name}: {rows[name]['status']} in " in p.stderr   # progress, time
    assert rows["syncs"]["status"] == rows["memory"]["status"] == "skipped (cpu)"
    fails = [name for name, r in rows.items() if r["status"] == "FAIL"]
    if STATIC_BUILT:
        assert p.returncode == 0 and fails == [], p.stdout + p.stderr
    else:   # until duo.runtime.static_target lands, the static column is the one FAIL
        assert p.returncode == 1 and fails == ["verify"], p.stdout + p.stderr
        assert "n/a (not built)" in rows["verify"]["result"]
    for name in ("environment", "trees", "exactness", "profile"):
        assert rows[name]["status"] == "ok", rows[name]


def test_the_cpu_run_measures_what_it_reports(cpu_run):
    _, report = cpu_run
    rows = {r["stage"]: r for r in report["rows"]}
    assert rows["environment"]["details"]["gpu_offload"] is False
    for case in rows["trees"]["details"]["cases"]:   # exact enough, and a wrong mask would have been seen
        assert case["error"] <= case["tol"] < case["wrong_mask"], case
    runs = rows["exactness"]["details"]["runs"]
    assert {(r["dtype"], r["mode"]) for r in runs} == {(d, m) for d in ("float32", "bfloat16")
                                                        for m in ("sequential", "overlap")}
    for r in runs:
        assert r["diverged"] == [] and r["accepted"] > 0 and r["fallbacks"] == 0, r
        assert r["equal"] + len(r["near_ties"]) == r["prompts"] > 0
        assert r["bound"] == 1e-4 if r["dtype"] == "float32" else r["bound"] >= 2 * r["noise"]
    eager = [c for c in report["verify_grid"] if c["path"] == "eager"]
    assert {(c["context"], c["n"]) for c in eager} == {(c, n) for c in (64, 128) for n in (1, 2, 4, 8, 16)}
    assert all(c["ms"] > 0 for c in eager)
    assert rows["profile"]["details"]["choice"]["mode"] in ("overlap", "sequential", "target")


def boom(s):
    raise RuntimeError("the stage broke\nmore detail")


def skip(s):
    raise Skipped("cpu")


def test_a_failing_stage_fails_the_run_and_the_others_still_run(monkeypatch, capsys, tmp_path):
    stages = [("boom", boom), ("fine", lambda s: Outcome("fine", "1.0")), ("skip", skip),
              ("wrong", lambda s: Outcome("x", ok=False))]
    rows = gpu_check.run_stages(stages, None)
    assert [r.status for r in rows] == ["FAIL", "ok", "skipped (cpu)", "FAIL"]
    assert rows[0].result == "error: RuntimeError: the stage broke"
    assert gpu_check.exit_code(rows) == 1 and gpu_check.exit_code(rows[1:3]) == 0
    assert "| 1 | boom | error: RuntimeError: the stage broke |" in gpu_check.table(rows)
    monkeypatch.setattr(gpu_check, "STAGES", stages[:2])       # main: the table printed, exit code 1
    assert gpu_check.main(["--device", "cpu", "--workdir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "| boom |" in out and "| fine |" in out and "1 FAIL of 2 stages" in out
    assert gpu_check.main(["--device", "cpu", "--stages", "fine", "--workdir", str(tmp_path)]) == 0


def test_bad_arguments_are_one_line_errors(capsys):
    assert gpu_check.main(["--device", "cpu", "--stages", "nine"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    if not torch.cuda.is_available():
        assert gpu_check.main(["--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "cuda" in err.lower() and err.strip().count("\n") == 0


def test_near_tie_check_feeds_the_target_on_its_device():
    """bench.near_ties.check builds its inputs where the target is (it made them on the CPU: a GPU target failed)."""
    from bench.near_ties import check

    seen = []
    logits = torch.tensor([[0.0, 2.0, 1.99995]])

    class Model:
        def generate(self, x, **kw):
            seen.append(x.device)
            return SimpleNamespace(logits=[logits] * kw["max_new_tokens"])

        def __call__(self, input_ids):
            seen.append(input_ids.device)
            return SimpleNamespace(logits=logits.expand(input_ids.shape[1], -1)[None])

    tm = SimpleNamespace(model=Model(), device=torch.device("meta"), precision="float32")
    d = check(tm, [5, 6], [1, 2], [1, 1])
    assert seen == [torch.device("meta")] * 2
    assert (d.position, d.duo, d.ref, d.near_tie) == (1, 2, 1, True)


def test_the_exact_column_gives_the_gap_of_a_divergence():
    """bench.report.exact_cell: near-ties with their largest gap, a real divergence with its smallest."""
    from bench.report import Row, exact_cell

    ties = [{"prompt": 0, "near_tie": True, "gap": 3e-5}, {"prompt": 1, "near_tie": True, "gap": 5e-3}]
    row = Row("x", "duo", exact=False, mismatches=[0, 1], extra={"divergences": ties})
    assert exact_cell(row) == "near-ties (2, gap <= 0.005)"
    ties[1]["near_tie"] = False
    assert exact_cell(row) == "NO (2, gap 0.005)"
    assert exact_cell(Row("x", "duo", exact=False, mismatches=[3])) == "NO (1)"     # not checked: no gap to give
    assert exact_cell(Row("x", "duo", exact=True)) == "yes"
