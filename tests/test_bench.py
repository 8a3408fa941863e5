"""`duo bench` on the tiny pair: every method runs, rows carry the documented keys, greedy outputs of the
speculative methods equal the target's, and the ratios are computed against `target`."""
from __future__ import annotations

import json

import pytest

from bench import datasets as ds
from bench.methods import parse_method
from bench.report import markdown, rows_json
from bench.run import run_bench

KEYS = {"dataset", "method", "prompts", "new_tokens", "tokens_per_s", "speedup", "ttft_s", "mean_accepted_len",
        "acceptance_rate", "exact"}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "prompts.jsonl"
    rows = [{"id": "a", "prompt": "a b c d"}, {"messages": [{"role": "user", "content": "def fib(n):"}]},
            {"prompt": "x y z"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_user_jsonl_prompts(prompts_file):
    got = ds.load(str(prompts_file), limit=2)
    assert [p.id for p in got] == ["a", "1"]
    assert got[1].messages == [{"role": "user", "content": "def fib(n):"}]
    with pytest.raises(ValueError, match="unknown dataset"):
        ds.load("no-such-dataset")


def test_seed_shuffles_before_limit(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "prompt": f"p{i}"}) + "\n" for i in range(50)))
    ids = lambda got: [p.id for p in got]   # noqa: E731
    assert ids(ds.load(str(path), limit=5)) == ["0", "1", "2", "3", "4"]   # no seed: the file's order
    a, b = ds.load(str(path), limit=5, seed=7), ds.load(str(path), limit=5, seed=7)
    assert ids(a) == ids(b) and ids(a) != ids(ds.load(str(path), limit=5))   # reproducible, shuffled
    assert ids(ds.load(str(path), seed=7)[:5]) == ids(a)    # the limit takes the shuffled order's first N
    assert sorted(ids(ds.load(str(path), seed=3)), key=int) == [str(i) for i in range(50)]


def test_method_options():
    assert parse_method("duo-sequential@chain,nolookup,b=8,w=2") == (
        "duo-sequential", {"shape": "chain", "lookup": False, "budget": 8, "width": 2})
    assert parse_method("duo") == ("duo", {})
    with pytest.raises(ValueError, match="unknown method option"):
        parse_method("duo@fast")


def test_every_method_side_by_side(tiny_pair, prompts_file):
    methods = ["target", "hf-assisted", "hf-prompt-lookup", "duo-sequential@chain,b=4", "duo-overlap", "duo"]
    rows = run_bench([str(prompts_file)], methods, limit=None, max_new=12, model=str(tiny_pair.target_hf_dir),
                     draft=str(tiny_pair.draft_gguf), device="cpu", log=lambda s: None)
    assert [r.method for r in rows] == methods
    out = rows_json(rows)
    for r in out:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["prompts"] == 3 and 0 < r["new_tokens"] <= 36 and r["tokens_per_s"] > 0
    base = out[0]
    assert base["speedup"] == pytest.approx(1.0) and base["exact"] is None
    for r in out[1:]:
        assert r["exact"] is True, (r["method"], r["mismatches"])       # greedy: the target's own tokens
        assert r["speedup"] == pytest.approx(r["tokens_per_s"] / base["tokens_per_s"])
    duo_rows = [r for r in out if r["method"].startswith("duo")]
    assert all(r["mean_accepted_len"] >= 1 and 0 <= r["acceptance_rate"] <= 1 for r in duo_rows)
    assert all(set(r["extra"]["round_ms"]) == {"round", "verify", "wait_for_draft", "other", "draft_idle"}
               for r in duo_rows)
    table = markdown(rows)
    assert table.count("\n| ") >= len(methods) and "Where one round's time goes" in table


def test_duo_with_the_sequential_plan_is_measured_once(tiny_pair, prompts_file):
    """Without a saved profile `duo` on the tiny pair plans the sequential schedule: the same engine as
    duo-sequential, so it is measured once and its row says so (numbers equal, not re-run)."""
    rows = run_bench([str(prompts_file)], ["duo", "target", "duo-sequential"], limit=2, max_new=8,
                     model=str(tiny_pair.target_hf_dir), draft=str(tiny_pair.draft_gguf), device="cpu",
                     log=lambda s: None)
    assert [r.method for r in rows] == ["target", "duo-sequential", "duo"]
    seq, duo = rows[1], rows[2]
    assert duo.extra["measured_as"] == "duo-sequential" and "measured_as" not in seq.extra
    assert (duo.tokens_per_s, duo.new_tokens, duo.exact) == (seq.tokens_per_s, seq.new_tokens, True)
    assert "duo = duo-sequential" in markdown(rows)


def test_sampling_runs_the_transformers_methods(tiny_pair, prompts_file):
    """--temperature with hf-assisted / hf-prompt-lookup: transformers gets do_sample once (it raised a
    TypeError when it was passed twice)."""
    rows = run_bench([str(prompts_file)], ["target", "hf-assisted", "hf-prompt-lookup"], limit=1, max_new=6,
                     temperature=0.7, seed=1, model=str(tiny_pair.target_hf_dir), draft=str(tiny_pair.draft_gguf),
                     device="cpu", log=lambda s: None)
    assert [r.method for r in rows] == ["target", "hf-assisted", "hf-prompt-lookup"]
    assert all(r.prompts == 1 and 0 < r.new_tokens <= 6 for r in rows)


def test_llama_cpp_peer_beside_the_target(tiny_pair, prompts_file):
    """llama-cpp: the target's GGUF alone in llama.cpp, a row beside the target's (tok/s, speedup against
    `target`, exactness not applicable: `-`), and the note under the table saying what ran."""
    rows = run_bench([str(prompts_file)], ["llama-cpp", "target"], limit=2, max_new=8,
                     model=str(tiny_pair.target_gguf), device="cpu", log=lambda s: None)
    assert [r.method for r in rows] == ["target", "llama-cpp"]
    base, peer = rows
    assert peer.prompts == 2 and 0 < peer.new_tokens <= 16 and peer.tokens_per_s > 0 and peer.ttft_s > 0
    assert peer.exact is None and not peer.mismatches
    assert peer.speedup == pytest.approx(peer.tokens_per_s / base.tokens_per_s)
    assert peer.extra["llama_cpp"].startswith("target GGUF target.gguf, ")
    table = markdown(rows)
    assert "| llama-cpp | 2 |" in table and "exactness does not apply" in table


def test_llama_cpp_needs_a_gguf_target(tiny_pair, prompts_file):
    with pytest.raises(ValueError, match="llama-cpp needs a GGUF target"):
        run_bench([str(prompts_file)], ["target", "llama-cpp"], limit=1, max_new=4,
                  model=str(tiny_pair.target_hf_dir), device="cpu", log=lambda s: None)


def test_llama_cpp_greedy_tokens_are_the_torch_targets(tiny_pair):
    """The tiny target is F32 in llama.cpp and in torch: the same greedy tokens, or a first difference only
    where torch's top two logits are all but tied (a rounding-order tie)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.llama_peer import LlamaPeer

    ids = AutoTokenizer.from_pretrained(str(tiny_pair.target_hf_dir))("def fib(n): return").input_ids
    peer = LlamaPeer(tiny_pair.target_gguf)
    try:
        got = peer.run(ids, 12, eos=()).tokens
    finally:
        peer.close()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_pair.target_hf_dir), dtype=torch.float32).eval()
    seq = list(ids)
    for i, tok in enumerate(got):
        with torch.inference_mode():
            logits = model(torch.tensor([seq])).logits[0, -1]
        top = torch.topk(logits, 2)
        if int(top.indices[0]) != tok:
            gap = float(top.values[0] - top.values[1])
            assert i > 0 and gap < 1e-3, (i, tok, top, gap)   # a near-tie, after an agreeing first token
            break
        seq.append(tok)
    assert len(got) == 12


def test_no_answer_finds_its_own_prompts_answer_in_the_output_cache(tiny_pair, prompts_file):
    """Two methods on one engine (duo@noretrieval, then duo): the second starts with an empty output cache,
    and a warm-up is not remembered, so on one prompt the cache never has anything to offer."""
    rows = run_bench([str(prompts_file)], ["duo-sequential@noretrieval", "duo-sequential"], limit=1, max_new=24,
                     model=str(tiny_pair.target_hf_dir), draft=str(tiny_pair.draft_gguf), device="cpu",
                     log=lambda s: None)
    assert [r.method for r in rows] == ["duo-sequential@noretrieval", "duo-sequential"]
    assert all("cache" not in r.extra["sources"] for r in rows), [r.extra["sources"] for r in rows]
    assert all(r.extra["sources"]["model"]["accepted"] > 0 for r in rows)   # speculation happened
    # with two prompts the second one drafts from the first one's answer (the cache is on in the second method)
    rows = run_bench([str(prompts_file)], ["duo-sequential"], limit=2, max_new=24, model=str(tiny_pair.target_hf_dir),
                     draft=str(tiny_pair.draft_gguf), device="cpu", log=lambda s: None)
    assert rows[0].extra["sources"]["cache"]["asked"] > 0


def target_answer(e, prompt: str, n: int):
    """(prompt ids, the target's greedy answer, its one-token logits per position), by transformers' generate."""
    import torch
    ids = e.encode(prompt)
    x = torch.tensor([ids])
    out = e.target.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                  eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return ids, out.sequences[0, len(ids):].tolist(), [lg[0].float() for lg in out.logits]


def test_a_divergence_is_checked_against_the_near_tie_bound(tiny_pair):
    """bench.near_ties.check finds where two answers part and judges the target's top-2 gap there."""
    import torch
    from bench.near_ties import NEAR_TIE, check
    from bench.report import Row, exact_cell
    from duo import Engine

    with Engine(str(tiny_pair.target_hf_dir), mode="target", device="cpu", progress=False, profile="off") as e:
        ids, ref, logits = target_answer(e, "def fib(n):", 12)
        second = int(torch.topk(logits[5], 2).indices[1])
        got = ref[:5] + [second] + ref[6:]
        d = check(e.target, ids, got, ref)
        gap = float(torch.topk(logits[5], 2).values.diff().abs())
        third = torch.topk(logits[5], 3)
        d3 = check(e.target, ids, ref[:5] + [int(third.indices[2])] + ref[6:], ref)
    assert (d.position, d.duo, d.ref) == (5, second, ref[5])
    assert d.gap == pytest.approx(gap, abs=1e-5) and d.bound == NEAR_TIE   # float32: the fixed rule
    assert d.near_tie == (gap < NEAR_TIE)
    assert d.rank == 2 and d.margin == pytest.approx(gap, abs=1e-5)
    # the target's third choice: never a near-tie, whatever the gap; its margin is measured to the top
    assert d3.rank == 3 and not d3.near_tie
    assert d3.margin == pytest.approx(float(third.values[0] - third.values[2]), abs=1e-5)
    row = Row("x", "duo", exact=False, mismatches=[0], extra={"divergences": [{"prompt": 0, "near_tie": True}]})
    assert exact_cell(row) == "near-ties (1)"
    row.extra["divergences"][0]["near_tie"] = False
    assert exact_cell(row) == "NO (1)"


def test_the_pass_shape_noise_compares_duos_own_verify_pass_with_the_step(tiny_pair):
    """near_ties.pass_shape_noise: in float32 duo's verify passes (chains, a chain with siblings) give the
    one-token step's logits at the divergence to rounding; a step that is off is measured as off."""
    from bench.near_ties import pass_shape_noise
    from duo import Engine

    with Engine(str(tiny_pair.target_hf_dir), mode="target", device="cpu", progress=False, profile="off") as e:
        ids, ref, logits = target_answer(e, "class Stack:", 20)
        assert pass_shape_noise(e.target, ids + ref[:18], logits[18]) < 1e-3
        assert pass_shape_noise(e.target, ids + ref[:18], logits[18] + 0.5) >= 0.5
