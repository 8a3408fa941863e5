"""Tree verification: one pass over a tree equals verifying each branch alone; KV compaction is exact."""
import numpy as np
import pytest
import torch

from duo.runtime.tree import accept_path
from duo.runtime.target import (TargetModel, ancestor_matrix, check_tree_support, compact_cache,
                                forward_tree, new_cache, prefill)
from duo.runtime.tree import Tree

VOCAB = 97


def random_model(family: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, attn_implementation="sdpa")
    model = (Qwen2ForCausalLM(Qwen2Config(**kw)) if family == "qwen2" else LlamaForCausalLM(LlamaConfig(**kw)))
    with torch.no_grad():  # peaked logits: greedy ties become negligible
        model.lm_head.weight.mul_(50)
    return TargetModel(model=model.eval(), tokenizer=None, device=torch.device("cpu"), dtype=torch.float32,
                       vocab_size=VOCAB, max_context=512, eos_ids=frozenset())


def random_tree(rng, n):
    parents = [-1] + [int(rng.integers(-1, k)) for k in range(1, n)]
    return Tree(rng.integers(0, VOCAB, n), parents, rng.random(n))


def branch_of(tree, k):
    path = []
    while k >= 0:
        path.append(k)
        k = int(tree.parents[k])
    return path[::-1]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tm(request):
    return random_model(request.param)


def test_ancestor_matrix():
    anc = ancestor_matrix(np.array([-1, -1, 0, 2]))
    assert anc[4].tolist() == [True, True, False, True, True]
    assert anc[2].tolist() == [True, False, True, False, False]


def test_tree_support_detected(tm):
    assert check_tree_support(tm)


@torch.inference_mode()
@pytest.mark.parametrize("seed", range(6))
def test_tree_logits_equal_each_branch_alone(tm, seed):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, VOCAB, int(rng.integers(2, 40))).tolist()
    tree = random_tree(rng, int(rng.integers(1, 24)))
    cache = new_cache()
    prefill(tm, cache, prefix[:-1])
    logits = forward_tree(tm, cache, prefix[-1], tree)
    assert logits.shape == (len(tree) + 1, VOCAB)
    for k in range(len(tree)):
        path = branch_of(tree, k)
        seq = prefix + [int(tree.tokens[j]) for j in path]
        ref = tm.model(input_ids=torch.tensor([seq])).logits[0].float()
        rows = [0] + [j + 1 for j in path]
        torch.testing.assert_close(logits[rows], ref[len(prefix) - 1:], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
@pytest.mark.parametrize("seed", range(6))
def test_accepted_path_and_compaction_match_fresh_prefill(tm, seed):
    """Greedy walk over the tree == brute-force longest greedy branch; the compacted cache == fresh prefill."""
    rng = np.random.default_rng(100 + seed)
    prefix = rng.integers(0, VOCAB, 12).tolist()
    # a tree that contains the target's own greedy continuation somewhere, plus random siblings
    greedy = []
    seq = list(prefix)
    for _ in range(5):
        nxt = int(tm.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        greedy.append(nxt)
        seq.append(nxt)
    cut = int(rng.integers(0, 5))
    tokens, parents = [], []
    parent = -1
    for d in range(cut):
        for _ in range(int(rng.integers(0, 3))):  # decoy siblings
            tokens.append(int(rng.integers(0, VOCAB))); parents.append(parent)
        tokens.append(greedy[d]); parents.append(parent)
        parent = len(tokens) - 1
    tokens.append((greedy[cut] + 1) % VOCAB); parents.append(parent)  # a wrong guess at the cut
    tree = Tree(tokens, parents, np.ones(len(tokens)))
    # decoys may collide with greedy tokens: the walk takes the first matching child, which is fine

    cache = new_cache()
    prefill(tm, cache, prefix[:-1])
    n_past = cache.get_seq_length()
    logits = forward_tree(tm, cache, prefix[-1], tree)
    path, bonus = accept_path(tree, logits.argmax(-1).numpy())
    accepted = [int(tree.tokens[k]) for k in path]
    assert accepted + [bonus] == greedy[:cut + 1]

    compact_cache(cache, n_past + 1, path)
    assert cache.get_seq_length() == len(prefix) + len(path)
    nxt = forward_tree(tm, cache, bonus, Tree.empty())[0]
    fresh = tm.model(input_ids=torch.tensor([prefix + accepted + [bonus]])).logits[0, -1].float()
    torch.testing.assert_close(nxt, fresh, atol=1e-4, rtol=1e-4)


def test_accept_path_walk():
    tree = Tree([5, 6, 7, 8], [-1, -1, 1, 1], np.ones(4))
    # target wants 6 after root, then 8 after node 1, then 3 after node 3
    choices = np.array([6, 0, 8, 0, 3])
    assert accept_path(tree, choices) == ([1, 3], 3)
    assert accept_path(tree, np.array([9, 0, 0, 0, 0])) == ([], 9)
