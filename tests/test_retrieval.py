"""Retrieval drafts (issue 17): the continuation trie, the output cache, the ledger that weighs the sources,
and, on the tiny pair, a datastore and the output cache whose candidates are accepted, losslessly."""
from __future__ import annotations

import numpy as np
import pytest

from duo import Engine
from duo.datastore.index import SuffixIndex
from duo.runtime.sources import extend_top_path, propose_free
from duo.runtime.sources.ledger import PROBE_EVERY, WARMUP, SourceLedger, expected_depth, matched_depth
from duo.runtime.sources.output_cache import OutputCache, OutputCacheDraft
from duo.runtime.sources.retrieval import continuation_tree, retrieve
from duo.runtime.tree import SOURCE_IDS, Tree

from test_exactness import (assert_exact_or_near_tie, cut_at_eos, exact_two_token_distribution, null_tv_threshold,
                            reference_greedy, total_variation)


# ------------------------------------------------------------------------------------------ the trie
def test_continuation_tree_counts_shares_and_prunes_rare_branches():
    conts = np.array([[5, 6, 7]] * 6 + [[5, 8, -1]] * 3 + [[9, 1, 2]])   # 9 is 1 in 10: pruned at 0.1? kept
    tree = continuation_tree(conts, trust=1.0, max_nodes=20, source="datastore", min_share=0.15)
    got = {(int(tree.tokens[k]), int(tree.tokens[p]) if p >= 0 else None): float(tree.probs[k])
           for k, p in enumerate(tree.parents)}
    assert got[(5, None)] == pytest.approx(0.9)
    assert got[(6, 5)] == pytest.approx(6 / 9) and got[(8, 5)] == pytest.approx(3 / 9)
    assert got[(7, 6)] == pytest.approx(1.0)
    assert (9, None) not in got and (1, 9) not in got          # a 10% branch is pruned with its subtree
    assert set(tree.source) == {SOURCE_IDS["datastore"]}
    small = continuation_tree(conts, 1.0, max_nodes=2, source="datastore")
    assert list(small.tokens) == [5, 6] and list(small.parents) == [-1, 0]   # the best nodes, still a tree
    ended = continuation_tree(np.full((4, 3), -1), 1.0, 8, "datastore")      # every match at a document's end
    assert len(ended) == 0


def test_retrieve_continues_the_longest_match():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, 300) for _ in range(20)]
    index = SuffixIndex.build(docs)
    history = list(rng.integers(0, 1000, 5)) + list(docs[7][:40])
    tree = retrieve(index, history, 8, "datastore")
    assert list(tree.tokens) == list(docs[7][40:48])
    assert retrieve(index, [1001, 1002, 1003], 8, "datastore").tokens.size == 0   # no match: nothing


# ------------------------------------------------------------------------------------------ output cache
def test_output_cache_merges_segments_logarithmically_and_stays_bounded(tmp_path):
    rng = np.random.default_rng(1)
    cache = OutputCache(max_tokens=20_000)
    docs = [rng.integers(0, 5000, rng.integers(50, 400)) for _ in range(150)]
    for k, d in enumerate(docs):
        cache.add(d)
        assert cache.n_tokens <= 20_000
        assert len(cache.segments) <= 2 + np.log2(max(2, len(cache.docs))) * 2
        firsts = [f for f, _ in cache.segments]
        assert firsts == sorted(firsts) and firsts[0] == 0
        assert sum(len(s) for _, s in cache.segments) == cache.n_tokens + len(cache.docs)   # + one SEP each
    kept = cache.docs
    assert all(np.array_equal(a, b) for a, b in zip(kept, docs[-len(kept):]))   # the newest ones, in order
    assert len(kept) < len(docs)
    src = OutputCacheDraft(cache)
    newest = docs[-2]
    tree = src.propose([4999, 4998] + list(newest[:30]), 6)
    assert list(tree.tokens[:6]) == list(newest[30:36])
    cache.save(tmp_path / "c.npz")
    again = OutputCache.load(tmp_path / "c.npz", max_tokens=20_000)
    assert [list(d) for d in again.docs] == [list(d) for d in kept]
    assert list(OutputCacheDraft(again).propose([4999, 4998] + list(newest[:30]), 6).tokens) == list(tree.tokens)
    (tmp_path / "bad.npz").write_bytes(b"not a cache")
    with pytest.raises(ValueError, match="not a saved output cache"):
        OutputCache.load(tmp_path / "bad.npz")


def test_output_cache_search_finds_the_longest_match_in_any_segment():
    rng = np.random.default_rng(2)
    cache = OutputCache()
    docs = [rng.integers(0, 30, 200) for _ in range(12)]   # a small alphabet: many short matches
    for d in docs:
        cache.add(d)
    for trial in range(30):
        ctx = list(rng.integers(0, 30, 12))
        length, found = cache.search(ctx)
        best = 0
        for L in range(2, 17):
            pat = ctx[-L:]
            if any(any(list(d[i:i + L]) == pat for i in range(len(d) - L + 1)) for d in docs):
                best = L
            else:
                break
        assert length == best
        assert sum(m.count for _, m in found) == sum(
            sum(list(d[i:i + best]) == ctx[-best:] for i in range(len(d) - best + 1)) for d in docs) if best else True


# ------------------------------------------------------------------------------------------ the ledger
def test_matched_depth_and_expected_depth():
    tree = Tree([1, 2, 3, 9], [-1, 0, 1, 0], [0.5, 0.5, 1.0, 0.5])
    assert matched_depth(tree, [1, 2, 3, 4]) == 3
    assert matched_depth(tree, [1, 9, 3]) == 2
    assert matched_depth(tree, [7]) == 0
    assert expected_depth(tree) == pytest.approx(0.5 + 0.25 + 0.25 + 0.25)


class _Fixed:
    def __init__(self, name, tokens):
        self.name, self.tokens, self.calls = name, tokens, 0

    def propose(self, history, budget):
        self.calls += 1
        return Tree.chain(self.tokens[:budget], np.full(min(budget, len(self.tokens)), 0.9))


def test_a_source_that_never_gains_stops_being_asked_and_is_probed_back():
    ledger = SourceLedger()
    good, bad = _Fixed("lookup", [1, 2, 3]), _Fixed("datastore", [7, 7, 7])
    for r in range(64):
        free, own = propose_free([good, bad], ledger, [0], 8)
        ledger.settle(own, free, [], [1, 2, 3, 4], verify_s=0.1)
    assert good.calls == 64
    assert WARMUP <= bad.calls < 64 and bad.calls <= WARMUP + 64 // PROBE_EVERY + 1
    rec = ledger.records
    assert rec["lookup"].gained == 3 * 64 and rec["datastore"].gained == 0
    assert rec["datastore"].skipped == 64 - bad.calls
    assert rec["lookup"].trust > 1.0 > rec["datastore"].trust      # 0.9-probability chains: claims 2.4, gives 3
    trusted = ledger.trusted("datastore", Tree.chain([7], [0.9]))
    assert trusted.probs[0] < 0.1


def test_free_tree_alone_when_it_commits_more_per_second():
    ledger = SourceLedger()
    model = _Fixed("model", [1, 2, 3, 4])
    free_tree = Tree.chain([1, 2, 3, 4, 5, 6], np.full(6, 0.95))
    assert not ledger.free_is_enough(free_tree)                     # nothing measured yet: draft
    for _ in range(3):
        ledger.proposed("model", model.propose([0], 4), 0.3)
        ledger.waited(0.3)
        ledger.settle({"model": model.propose([0], 4)}, Tree.empty(), [], [1, 2, 3, 4, 9], verify_s=0.25)
    # with the model: 4 + 1 tokens per 0.3 s wait + 0.25 s verify (9.1/s); the free tree alone: (E ~ 4.6) + 1
    # per 0.25 s (22/s); a weak free tree (E = 0.3): 5.2/s
    assert ledger.free_is_enough(free_tree)
    assert not ledger.free_is_enough(Tree.chain([1], [0.3]))        # a weak free tree: wait for the model
    assert not ledger.free_is_enough(Tree.empty())
    # free-only rounds that get far less than their trees promised: the free tree stops replacing the model's
    for _ in range(6):
        assert ledger.free_is_enough(free_tree) or _ > 0
        ledger.settle({}, free_tree, [], [9], verify_s=0.25, free_only=True)   # promised ~4.6, got 0
    assert not ledger.free_is_enough(free_tree)


def test_extend_top_path_continues_the_chain_from_its_end():
    ledger = SourceLedger()
    history = [10, 11, 12, 13, 14, 15, 10, 11]

    class Lookup:   # continues whatever ends in 12, 13
        name = "lookup"

        def propose(self, h, budget):
            return Tree.chain([14, 15], [0.8, 0.8]) if h[-2:] == [12, 13] else Tree.empty()

    tree = Tree.chain([12, 13], [0.9, 0.9])
    out = extend_top_path(tree, [Lookup()], ledger, history, budget=8)
    assert list(out.tokens) == [12, 13, 14, 15] and list(out.parents) == [-1, 0, 1, 2]
    assert list(extend_top_path(tree, [Lookup()], ledger, history, budget=2).tokens) == [12, 13]   # no budget left
    # a full budget: the continuation (score 0.81 * 0.8) displaces a weak branch (0.1), not a likely node
    weak = Tree([12, 13, 77], [-1, 0, -1], [0.9, 0.9, 0.1])
    out = extend_top_path(weak, [Lookup()], ledger, history, budget=3)
    assert sorted(out.tokens.tolist()) == [12, 13, 14]


# ------------------------------------------------------------------------------------------ on the tiny pair
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def reference(tiny_pair):
    with Engine(str(tiny_pair.target_hf_dir), mode="target", device="cpu", progress=False, profile="off",
                output_cache=0) as e:
        ids = e.encode(PROMPT)
        ref, logits = reference_greedy(e.target, ids, 48)
        return ids, cut_at_eos(ref, e.target.eos_ids), logits, len(e.target.tokenizer)


def test_a_datastore_is_drafted_from_and_accepted_losslessly(tiny_pair, reference, tmp_path):
    ids, ref, logits, vocab = reference
    SuffixIndex.build([ids + ref]).save(tmp_path / "ds", {"vocab_size": vocab, "model": "tiny"})
    with Engine(str(tiny_pair.target_hf_dir), str(tiny_pair.draft_gguf), device="cpu", mode="sequential",
                budget=8, progress=False, profile="off", lookup=False, output_cache=0,
                datastore=str(tmp_path / "ds")) as e:
        res = e.generate(PROMPT, max_new_tokens=48)
    st = res.stats
    assert_exact_or_near_tie(res.token_ids, ref, logits, what="datastore")
    assert st["fallback"] is None, st["fallback"]
    ds = st["sources"]["datastore"]
    assert ds["asked"] > 0 and ds["gained"] > 0 and ds["accepted"] > 0   # its nodes were on accepted paths
    assert st["accepted"] > 0
    # REST as its authors run it: the datastore alone drafts (no model, no lookup), every round on its trie
    with Engine(str(tiny_pair.target_hf_dir), str(tiny_pair.draft_gguf), device="cpu", mode="sequential",
                budget=8, progress=False, profile="off", output_cache=0, datastore=str(tmp_path / "ds")) as e:
        rest = e.generate(PROMPT, max_new_tokens=48, model_draft=False, lookup=False)
    st = rest.stats
    assert_exact_or_near_tie(rest.token_ids, ref, logits, what="datastore alone")
    assert st["mode"] == "free" and st["fallback"] is None and set(st["sources"]) == {"datastore"}
    assert st["free_rounds"] == st["rounds"] > 0 and st["sources"]["datastore"]["accepted"] == st["accepted"] > 0


def test_the_output_cache_drafts_a_repeated_request_and_remember_false_keeps_out(tiny_pair, reference):
    ids, ref, logits, _ = reference
    with Engine(str(tiny_pair.target_hf_dir), str(tiny_pair.draft_gguf), device="cpu", mode="sequential",
                budget=8, progress=False, profile="off", lookup=False) as e:
        first = e.generate(PROMPT, max_new_tokens=48, remember=False)
        assert e.retrieval.cache.docs == [] and "cache" not in first.stats["sources"]
        e.generate(PROMPT, max_new_tokens=48)
        assert len(e.retrieval.cache.docs) == 1 and list(e.retrieval.cache.docs[0]) == ids + first.token_ids
        again = e.generate(PROMPT, max_new_tokens=48)
        off = e.generate(PROMPT, max_new_tokens=48, retrieval=False)
    for res in (first, again, off):
        assert_exact_or_near_tie(res.token_ids, ref, logits, what="output cache")
        assert res.stats["fallback"] is None
    cache = again.stats["sources"]["cache"]
    assert cache["gained"] > 0 and cache["accepted"] > 0
    assert again.stats["mean_accepted_len"] > first.stats["mean_accepted_len"]   # the cache adds accepted depth
    assert "cache" not in off.stats["sources"]


def test_a_datastore_for_another_vocabulary_is_refused(tiny_pair, tmp_path):
    from duo.errors import UsageError
    SuffixIndex.build([[1, 2, 3]]).save(tmp_path / "ds", {"vocab_size": 151665, "model": "qwen"})
    with pytest.raises(UsageError, match="rebuild it"):
        Engine(str(tiny_pair.target_hf_dir), mode="target", device="cpu", progress=False, profile="off",
               datastore=str(tmp_path / "ds"))
    with pytest.raises(UsageError, match="not a datastore"):
        Engine(str(tiny_pair.target_hf_dir), mode="target", device="cpu", progress=False, profile="off",
               datastore=str(tmp_path))


def test_seeded_sampling_with_datastore_and_cache_candidates_equals_target_alone(tiny_pair, tmp_path):
    """Sampling stays the target's own with retrieved candidates in the tree: the datastore and the output
    cache hold the target's samples for these seeds, so their candidates are drafted and accepted."""
    kw = dict(max_new_tokens=24, temperature=0.8, top_p=0.95)
    prompts = ["def fibonacci(n):", "class Stack:", "import numpy as np"]
    with Engine(str(tiny_pair.target_hf_dir), device="cpu", mode="target", progress=False, profile="off",
                output_cache=0) as alone:
        refs = [alone.generate(p, seed=s, **kw).token_ids for s, p in enumerate(prompts)]
        docs = [alone.encode(p) + r for p, r in zip(prompts, refs)]
        vocab = len(alone.target.tokenizer)
    SuffixIndex.build(docs[:2]).save(tmp_path / "ds", {"vocab_size": vocab, "model": "tiny"})
    with Engine(str(tiny_pair.target_hf_dir), str(tiny_pair.draft_gguf), device="cpu", mode="sequential", budget=8,
                progress=False, profile="off", lookup=False, datastore=str(tmp_path / "ds")) as spec:
        spec.retrieval.remember(docs[2])                         # the third one's answer, in the output cache
        got = [spec.generate(p, seed=s, **kw) for s, p in enumerate(prompts)]
    assert [g.token_ids for g in got] == refs
    assert all(g.stats["fallback"] is None for g in got)
    assert sum(g.stats["sources"].get("datastore", {}).get("accepted", 0) for g in got[:2]) > 0
    assert got[2].stats["sources"]["cache"]["accepted"] > 0


def test_sampling_with_retrieved_candidates_is_the_targets_distribution(tiny_pair_soft, tmp_path):
    """The datastore holds the target's likeliest two-token continuations of the prompt, counted by their
    probability, so its trie drafts them beside the model's tree: the samples still follow the target's
    own distribution (and the datastore's candidates are accepted)."""
    n, temperature, top_p, prompt = 1500, 1.0, 0.95, "The answer is"
    with Engine(str(tiny_pair_soft.target_hf_dir), str(tiny_pair_soft.draft_gguf), device="cpu", mode="sequential",
                budget=8, progress=False, profile="off", output_cache=0) as e:
        ids = e.encode(prompt)
        dist = exact_two_token_distribution(e.target, ids, temperature, top_p)
        vocab = len(e.target.tokenizer)
    likely = sorted(dist, key=dist.get, reverse=True)[:24]
    docs = [ids + list(pair) for pair in likely for _ in range(1 + int(200 * dist[pair]))]
    SuffixIndex.build(docs).save(tmp_path / "ds", {"vocab_size": vocab, "model": "tiny"})
    counts, accepted_ds = {}, 0
    with Engine(str(tiny_pair_soft.target_hf_dir), str(tiny_pair_soft.draft_gguf), device="cpu", mode="sequential",
                budget=8, progress=False, profile="off", output_cache=0, datastore=str(tmp_path / "ds")) as e:
        for seed in range(n):
            r = e.generate(prompt, max_new_tokens=3, temperature=temperature, top_p=top_p, seed=20_000 + seed)
            key = tuple(r.token_ids[:2])
            counts[key] = counts.get(key, 0) + 1
            accepted_ds += r.stats["sources"].get("datastore", {}).get("accepted", 0)
            assert r.stats["fallback"] is None
    assert accepted_ds > 0, "no retrieved candidate was accepted: the test would not exercise retrieval"
    threshold = null_tv_threshold(dist, n, np.random.default_rng(0))
    tv = total_variation(counts, n, dist)
    assert tv <= threshold, f"TV distance {tv:.4f} above the null's max {threshold:.4f}"
