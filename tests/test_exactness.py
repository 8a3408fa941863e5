"""Lossless decoding: greedy output equals the target alone, token for token; sampling is the target's distribution.

A greedy divergence is accepted only at a proven near-tie: the reference's top-2 logit gap there is
below 1e-4 (fp32) and duo's token is one of those two.
"""
from collections import Counter

import numpy as np
import pytest
import torch

from duo import Engine

PROMPTS = [
    "Write a Python function that checks for primes.",
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "List three colors:",
    "class Stack:\n    def __init__(self):",
    "Explain recursion in one sentence.",
    "for i in range(10):\n    print(i)\nfor i in range(10):",
    "Once upon a time",
    "import numpy as np\nx = np.",
    "Translate to French: good morning",
    "a b c d e f g a b c d",
    "What is 2 + 2?",
    "Summarize: the cat sat on the mat.",
    "SELECT * FROM users WHERE",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):",
    "Hello, world!",
    "Name a prime number bigger than 10.",
    "json: {\"key\": \"value\", \"key2\":",
    "1, 2, 3, 4, 5,",
    "The answer is",
]

CONFIGS = [  # mode, budget, shape
    ("sequential", 4, "chain"),
    ("sequential", 16, "dynamic"),
    ("overlap", 8, "eagle"),
    ("overlap", 16, "dynamic"),
]
NEAR_TIE = 1e-4


def reference_greedy(tm, ids, max_new):
    """Target alone, one token at a time (transformers generate), with the raw logits of every step."""
    out = tm.model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=None,
                            pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out.sequences[0, len(ids):].tolist(), [lg[0].float() for lg in out.logits]


def cut_at_eos(tokens, eos_ids):
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:i + 1]
    return tokens


def greedy_runs(engine, prompts, max_new: int) -> list:
    """engine.generate on each prompt, each checked against the target alone (near-tie rule) and run with a
    live draft (no fallback); returns the results."""
    out = []
    for p in prompts:
        ids = engine.encode(p)
        res = engine.generate(p, max_new_tokens=max_new)
        ref, logits = reference_greedy(engine.target, ids, max_new)
        assert_exact_or_near_tie(res.token_ids, cut_at_eos(ref, engine.target.eos_ids), logits, what=repr(p))
        assert res.stats["fallback"] is None, res.stats["fallback"]
        out.append(res)
    return out


def assert_exact_or_near_tie(got, ref, ref_logits, what="", bound=NEAR_TIE):
    """got == ref, or they part at a position where the reference's top-2 logits are within `bound` (1e-4 in
    fp32) and got's token is one of the two. Returns (position, gap) of such a near-tie, or None."""
    if got == ref:
        return None
    i = next((k for k, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    assert i < len(got) and i < len(ref), f"{what}: lengths differ without a token difference: {got} vs {ref}"
    top = torch.topk(ref_logits[i], 2)
    gap = float(top.values[0] - top.values[1])
    assert gap < bound and ref_logits[i][got[i]] >= top.values[1], (   # by value: tied tokens share a place
        f"{what}: diverged from the target at token {i} ({got[i]} vs {ref[i]}) where the top-2 gap is {gap:.3g} "
        f"(near-tie bound {bound:.3g})")
    return i, gap


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"{c[0]}-b{c[1]}-{c[2]}")
def engine(request, tiny_pair):
    mode, budget, shape = request.param
    with Engine(str(tiny_pair.target_hf_dir), str(tiny_pair.draft_gguf), device="cpu", mode=mode, budget=budget,
                shape=shape, progress=False) as e:
        yield e


def test_greedy_equals_target_alone(engine):
    tm = engine.target
    n_prompts = len(PROMPTS) if engine.plan.budget == 16 and engine.plan.mode == "sequential" else 8
    total_drafted = total_accepted = 0
    for p in PROMPTS[:n_prompts]:
        ids = engine.encode(p)
        res = engine.generate(p, max_new_tokens=40)
        ref, logits = reference_greedy(tm, ids, 40)
        ref = cut_at_eos(ref, tm.eos_ids)
        assert_exact_or_near_tie(res.token_ids, ref, logits, what=repr(p))
        assert res.stats["new_tokens"] == len(res.token_ids)
        assert res.stats["fallback"] is None, res.stats["fallback"]   # the draft ran: equality is not trivial
        total_drafted += res.stats["drafted"]
        total_accepted += res.stats["accepted"]
    # the tiny draft agrees only part of the time: both acceptance and rejection must be exercised
    assert total_drafted > 0 and 0 < total_accepted < total_drafted


def test_greedy_ends_by_eos(engine):
    """Make a token the reference emits mid-way an EOS: duo must stop right after it, like the target."""
    tm = engine.target
    p = PROMPTS[1]
    ids = engine.encode(p)
    ref, logits = reference_greedy(tm, ids, 30)
    eos = ref[12]
    saved = tm.eos_ids
    tm.eos_ids = frozenset({eos})
    try:
        res = engine.generate(p, max_new_tokens=30)
    finally:
        tm.eos_ids = saved
    expected = ref[:ref.index(eos) + 1]
    assert_exact_or_near_tie(res.token_ids, expected, logits, what="eos")
    assert res.stats["stop_reason"] == "eos"


def test_length_limit_and_zero(engine):
    res = engine.generate(PROMPTS[0], max_new_tokens=7)
    assert len(res.token_ids) <= 7
    assert engine.generate(PROMPTS[0], max_new_tokens=0).token_ids == []


# The Q4_0 draft: llama.cpp's quantized kernels (CPU_REPACK / AMX buffer types, where the worker's probe
# finds they run on this CPU) behind the worker.
Q_CONFIGS = [("sequential", 16, "dynamic"), ("overlap", 8, "eagle")]


@pytest.fixture(scope="module", params=Q_CONFIGS, ids=lambda c: f"q4_0-{c[0]}-b{c[1]}-{c[2]}")
def engine_q(request, tiny_pair_q):
    mode, budget, shape = request.param
    with Engine(str(tiny_pair_q.target_hf_dir), str(tiny_pair_q.draft_gguf), device="cpu", mode=mode,
                budget=budget, shape=shape, progress=False) as e:
        yield e


def test_greedy_equals_target_alone_quantized_draft(engine_q):
    """Greedy duo output equals the target alone with a quantized draft, and speculation really ran."""
    tm = engine_q.target
    drafted = accepted = 0
    for p in PROMPTS[:6]:
        ids = engine_q.encode(p)
        res = engine_q.generate(p, max_new_tokens=32)
        ref, logits = reference_greedy(tm, ids, 32)
        ref = cut_at_eos(ref, tm.eos_ids)
        assert_exact_or_near_tie(res.token_ids, ref, logits, what=repr(p))
        assert res.stats["fallback"] is None, res.stats["fallback"]
        drafted += res.stats["drafted"]
        accepted += res.stats["accepted"]
    assert drafted > 0 and 0 < accepted < drafted, (drafted, accepted)


def test_seeded_sampling_equals_target_alone(tiny_pair):
    """Position-keyed randomness: a seeded speculative run samples exactly what the target alone samples."""
    kw = dict(max_new_tokens=24, temperature=0.8, top_p=0.95)
    with Engine(str(tiny_pair.target_hf_dir), str(tiny_pair.draft_gguf), device="cpu", mode="sequential",
                budget=12, progress=False) as spec, \
            Engine(str(tiny_pair.target_hf_dir), device="cpu", mode="target", progress=False) as alone:
        differ = accepted = 0
        for seed, p in enumerate(PROMPTS[:10]):
            res = spec.generate(p, seed=seed, **kw)
            assert res.stats["fallback"] is None, res.stats["fallback"]
            accepted += res.stats["accepted"]
            b = alone.generate(p, seed=seed, **kw).token_ids
            differ += res.token_ids != b
        assert differ == 0 and accepted > 0
        # and the same seed twice gives the same text; another seed (almost surely) does not
        assert spec.generate(PROMPTS[0], seed=1, **kw).token_ids == spec.generate(PROMPTS[0], seed=1, **kw).token_ids


def exact_two_token_distribution(tm, ids, temperature, top_p):
    """P(t1, t2) of the target under temperature + top-p, from transformers' own logits warpers."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    def probs(prefixes):
        x = torch.tensor(prefixes)
        lg = tm.model(input_ids=x).logits[:, -1].float()
        lg = TemperatureLogitsWarper(temperature)(x, lg)
        if top_p < 1:
            lg = TopPLogitsWarper(top_p)(x, lg)
        return torch.softmax(lg, -1)

    with torch.inference_mode():
        p1 = probs([ids])[0]
        support = torch.nonzero(p1 > 0).flatten().tolist()
        p2 = probs([ids + [t] for t in support])
    return {(t1, t2): float(p1[t1] * p2[k, t2]) for k, t1 in enumerate(support)
            for t2 in torch.nonzero(p2[k] > 0).flatten().tolist()}


def total_variation(counts: Counter, n: int, dist: dict) -> float:
    keys = set(counts) | set(dist)
    return 0.5 * sum(abs(counts.get(k, 0) / n - dist.get(k, 0.0)) for k in keys)


def null_tv_threshold(dist: dict, n: int, rng, sims: int = 300) -> float:
    """99.9th percentile (approx.) of the TV distance of n true samples: simulated, not guessed."""
    keys = list(dist)
    p = np.array([dist[k] for k in keys])
    p = p / p.sum()
    tvs = [0.5 * np.abs(rng.multinomial(n, p) / n - p).sum() for _ in range(sims)]
    return float(np.max(tvs))


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (1.0, 0.95)])
def test_sampling_distribution_is_the_targets(tiny_pair_soft, temperature, top_p):
    n = 2000
    with Engine(str(tiny_pair_soft.target_hf_dir), str(tiny_pair_soft.draft_gguf), device="cpu", mode="sequential",
                budget=8, progress=False) as e:
        prompt = "The answer is"
        ids = e.encode(prompt)
        dist = exact_two_token_distribution(e.target, ids, temperature, top_p)
        counts = Counter()
        drafted = accepted = 0
        for seed in range(n):
            r = e.generate(prompt, max_new_tokens=3, temperature=temperature, top_p=top_p, seed=10_000 + seed)
            counts[tuple(r.token_ids[:2])] += 1
            drafted += r.stats["drafted"]
            accepted += r.stats["accepted"]
    assert accepted > 0, "no drafted token was ever accepted: the test would not exercise speculation"
    rng = np.random.default_rng(0)
    threshold = null_tv_threshold(dist, n, rng)
    tv = total_variation(counts, n, dist)
    assert tv <= threshold, f"TV distance {tv:.4f} above the null's max {threshold:.4f}"
    # power: the same samples are far from a different temperature's distribution
    other = exact_two_token_distribution(e.target, ids, 2 * temperature, top_p)
    assert total_variation(counts, n, other) > threshold
