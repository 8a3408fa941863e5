"""A greedy divergence of a duo row from the target row, judged by the near-tie rule (tests/test_precision.py):
allowed only where the reference's top-2 logit gap is below the precision's bound, float32's fixed 1e-4, for
the others twice the measured noise of evaluating the same positions in another batch shape, and at least
1e-4; and only if duo's token is one of the two. The noise is the larger of
    over the answer    one-token steps against one batched causal pass, every position up to the divergence
    at the divergence  one-token step against duo's own verify pass (target.forward_tree) ending there, as a
                       chain of 2, 4, 8 and 16 tokens and as the 8-token chain with 8 sibling branches
(the first alone misses a divergence early in the answer: a few positions hold little of the noise).

    check(tm, ids, got, ref) -> Divergence     re-decodes the reference up to the divergence, with logits
"""
from __future__ import annotations

from dataclasses import dataclass

NEAR_TIE = 1e-4


@dataclass
class Divergence:
    position: int      # first answer token where duo and the target part
    duo: int           # duo's token there
    ref: int           # the target's
    gap: float         # the target's top-2 logit gap there (one-token decoding, as the target row ran)
    noise: float       # max |one-token step logits - one batched pass's| over the answer up to there ...
    bound: float       # the near-tie bound: 1e-4 in float32, else max(1e-4, 2 * noise)
    near_tie: bool     # gap < bound and duo's token is one of the top two (by value: ties share a rank)
    shape_noise: float = 0.0   # |step - duo's verify pass ending at the divergence|, max over pass shapes
    rank: int = 0              # duo's token's rank in the target's logits there (1: the target's own, 2: runner-up)
    margin: float = 0.0        # the target's logit of its token minus that of duo's (= gap when rank is 2)


def rank_of(logits, token: int) -> int:
    """1 + how many logits are strictly above the token's: by value, not topk's indices, since coarse logits tie
    (w8a8's come in steps of 0.125) and topk returns one tied token of several."""
    return int((logits > logits[token]).sum()) + 1


def check(tm, ids: list[int], got: list[int], ref: list[int]) -> Divergence:
    """Where got and ref part, and whether it is a near-tie (tm: the torch target, as loaded)."""
    import torch

    k = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    x = torch.tensor([ids], device=tm.device)      # where the target's weights are (a GPU too)
    with torch.inference_mode():
        out = tm.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k + 1, do_sample=False,
                                eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        steps = torch.stack([lg[0].float() for lg in out.logits])                  # positions 0..k
        seq = torch.tensor([ids + ref[:k]], device=tm.device)
        batched = tm.model(input_ids=seq).logits[0, len(ids) - 1:].float()
    noise = float((batched[:len(steps)] - steps[:len(batched)]).abs().max())
    shape = 0.0 if tm.precision == "float32" else pass_shape_noise(tm, ids + ref[:k], steps[k])
    top = torch.topk(steps[k], 2)
    gap = float(top.values[0] - top.values[1])
    bound = NEAR_TIE if tm.precision == "float32" else max(NEAR_TIE, 2 * max(noise, shape))
    token = got[k] if k < len(got) else -1
    rank = rank_of(steps[k], token) if token >= 0 else 0
    margin = float(top.values[0] - steps[k][token]) if token >= 0 else float("inf")
    return Divergence(k, token, ref[k] if k < len(ref) else -1, gap, noise, bound,
                      gap < bound and 1 <= rank <= 2, shape, rank, margin)


def pass_shape_noise(tm, seq: list[int], step) -> float:
    """max |step - the logits predicting the token after seq in duo's verify pass|, over pass shapes: the
    pass's root at len(seq) - w for chains of w = 2, 4, 8, 16 tokens, and the 8-chain with 8 sibling branches."""
    import torch

    from duo.runtime.tree import Tree

    out = 0.0
    shapes = [(w, 0) for w in (2, 4, 8, 16)] + [(8, 8)]
    base = max(1, len(seq) - max(w for w, _ in shapes))   # prefilled once; each pass's cache is cut back to it
    with torch.inference_mode():
        cache = tm.new_cache()
        tm.prefill(cache, seq[:base])
        for w, siblings in shapes:
            s = len(seq) - w                       # the pass's root; the cache holds seq[:s]
            if s < base:
                continue
            if s > base:
                tm.prefill(cache, seq[base:s])
            chain = seq[s + 1:]
            tokens = chain + [(seq[-1] + 1 + i) % tm.vocab_size for i in range(siblings)]
            parents = list(range(-1, len(chain) - 1)) + [-1] * siblings
            logits = tm.forward_tree(cache, seq[s], Tree(tokens, parents, [1.0] * len(tokens)))
            out = max(out, float((logits[len(chain)].float().to(step.device) - step).abs().max()))
            tm.compact_cache(cache, base, [])
    return out
