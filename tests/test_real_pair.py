"""The real default pair (Qwen2.5-Coder 1.5B target, 0.5B draft), fetched into the cache on first use."""
import pytest

from duo import Engine
from test_exactness import assert_exact_or_near_tie, cut_at_eos, reference_greedy

pytestmark = [pytest.mark.real, pytest.mark.slow]

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about autumn.",
    "def quicksort(arr):",
    "Explain what a hash map is in two sentences.",
]


@pytest.fixture(scope="module")
def real_engine():
    with Engine(device="cpu", mode="sequential", budget=12, progress=False) as e:
        yield e


@pytest.fixture(scope="module")
def references(real_engine):
    tm = real_engine.target
    out = {}
    for p in PROMPTS:
        ids = real_engine.encode(p)
        toks, logits = reference_greedy(tm, ids, 40)
        out[p] = (cut_at_eos(toks, tm.eos_ids), logits)
    return out


@pytest.mark.parametrize("budget,shape", [(6, "chain"), (16, "dynamic")])
def test_real_pair_greedy_equals_target(real_engine, references, budget, shape):
    from_model = 0
    for p in PROMPTS:
        res = real_engine.generate(p, max_new_tokens=40, budget=budget, shape=shape)
        ref, logits = references[p]
        assert_exact_or_near_tie(res.token_ids, ref, logits, what=repr(p))
        assert res.stats["fallback"] is None, res.stats["fallback"]     # the real draft ran on this CPU
        from_model += res.stats["accepted"] - res.stats["accepted_from_lookup"]
    assert from_model > 0, "no token of the draft model was accepted: speculation did not happen"


def test_real_pair_ends_by_eos(real_engine, references):
    """A short answer ends by the model's own end-of-turn token, like the target alone."""
    p = PROMPTS[1]
    res = real_engine.generate(p, max_new_tokens=40)
    ref, logits = references[p]
    assert ref[-1] in real_engine.target.eos_ids, "the reference answer should end by EOS within 40 tokens"
    assert_exact_or_near_tie(res.token_ids, ref, logits)
    assert res.stats["stop_reason"] == "eos"
