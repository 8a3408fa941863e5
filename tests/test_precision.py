"""Every target precision (duo.runtime.precision) keeps decoding lossless relative to the target as loaded.

Greedy duo output equals the same-precision target alone (one token at a time), token for token; a
divergence is allowed only at a proven near-tie: the reference's top-2 logit gap there is below the
precision's bound: float32's fixed 1e-4; for the others *measured* here, not assumed: twice the largest
logit difference between the target's one-token steps and one batched pass over the same tokens (the
numeric noise of evaluating a position in a different batch shape), and at least 1e-4.
"""
import pytest
import torch

from duo import Engine
from duo.runtime.precision import W8A8Linear, available_precisions

from test_exactness import NEAR_TIE, PROMPTS, assert_exact_or_near_tie, cut_at_eos, reference_greedy

PRECISIONS = available_precisions(torch.device("cpu"))


@pytest.fixture(scope="module", params=PRECISIONS)
def engine(request, tiny_pair):
    with Engine(str(tiny_pair.target_hf_dir), str(tiny_pair.draft_gguf), device="cpu", dtype=request.param,
                mode="sequential", budget=8, shape="dynamic", progress=False, profile="off") as e:
        yield e


@torch.inference_mode()
def batch_noise(tm, ids, ref_tokens, ref_logits) -> float:
    """max |logits of one-token steps - logits of one batched pass over the same tokens|."""
    seq = torch.tensor([ids + ref_tokens[:-1]])
    batched = tm.model(input_ids=seq).logits[0, len(ids) - 1:].float()
    steps = torch.stack(ref_logits[:batched.shape[0]])
    return float((batched[:len(steps)] - steps).abs().max())


def test_precision_is_what_was_asked(engine, tiny_pair):
    tm = engine.target
    assert tm.precision in PRECISIONS and tm.footprint > 0
    if tm.precision == "int8":
        assert tm.dtype == torch.bfloat16
        assert any(b.dtype == torch.int8 for b in tm.model.buffers()), "no int8 weights"
    elif tm.precision == "w8a8":
        assert tm.dtype == torch.bfloat16
        kinds = {type(m) for m in tm.model.modules()}
        assert W8A8Linear in kinds and torch.nn.Linear not in kinds, kinds
    else:
        assert all(p.dtype == getattr(torch, tm.precision) for p in tm.model.parameters())


def test_greedy_equals_same_precision_target_alone(engine):
    tm = engine.target
    outs, noise = [], 0.0
    for p in PROMPTS[:8]:
        ids = engine.encode(p)
        ref, logits = reference_greedy(tm, ids, 32)
        noise = max(noise, batch_noise(tm, ids, ref, logits))
        outs.append((p, ids, cut_at_eos(ref, tm.eos_ids), logits, engine.generate(p, max_new_tokens=32)))
    bound = NEAR_TIE if tm.precision == "float32" else max(NEAR_TIE, 2 * noise)   # fp32: the fixed 1e-4 rule
    drafted = accepted = 0
    ties = []
    for p, ids, ref, logits, res in outs:
        got = res.token_ids
        assert res.stats["fallback"] is None, res.stats["fallback"]
        drafted += res.stats["drafted"]
        accepted += res.stats["accepted"] - res.stats["accepted_from_lookup"]
        tie = assert_exact_or_near_tie(got, ref, logits, what=f"{tm.precision} {p!r}", bound=bound)
        if tie is not None:
            ties.append((p, *tie))
    print(f"\n{tm.precision}: near-tie bound {bound:.3g} (batch noise {noise:.3g}); near-ties {ties}")
    assert accepted > 0 and drafted > accepted, (drafted, accepted)   # speculation ran, and was also rejected


def test_a_w8a8_linear_gives_a_row_the_same_result_in_any_pass():
    """int8 x int8 sums are exact: a row's output does not depend on the other rows of the pass, and it is
    the int32 product of the rounded row and weights, scaled back."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 200, bias=True)
    layer = W8A8Linear(lin, torch.float32)
    x = torch.randn(33, 96) * torch.linspace(0.1, 30, 33)[:, None]
    full = layer(x)
    for rows in ([5], [0, 1], list(range(3, 20)), list(range(33))[::-1]):
        assert torch.equal(layer(x[rows]), full[rows])
    w = lin.weight.detach().double()
    s = w.abs().amax(1) / 127
    a = x.double().abs().amax(1, keepdim=True) / 127
    ref = (torch.round(x.double() / a) @ torch.round(w / s[:, None]).t()) * a * s + lin.bias.detach().double()
    assert (full.double() - ref).abs().max() < 1e-5 * ref.abs().max()
    assert (full.double() - lin(x).detach().double()).abs().max() > 1e-4 * ref.abs().max()   # it is quantized


def test_w8a8_is_refused_on_a_gpu_with_the_fix():
    from duo.runtime.precision import PrecisionError, resolve_precision
    with pytest.raises(PrecisionError, match="CPU only.*int8"):
        resolve_precision("w8a8", torch.device("cuda", 0))


def test_fused_w8a8_linears_give_each_part_exactly_its_columns():
    """q/k/v (and gate/up) stacked into one W8A8 matmul: each part gets bit for bit what it computed alone,
    whatever order the parts are called in, and a part called again or on another input runs it again."""
    from duo.runtime.fused_linears import FusedLinears
    torch.manual_seed(0)
    layers = [torch.nn.Linear(96, 64, bias=True), torch.nn.Linear(96, 32, bias=True), torch.nn.Linear(96, 32, bias=False)]
    fused = FusedLinears(layers, torch.float32)
    alone = [W8A8Linear(m, torch.float32) for m in layers]
    parts = [fused.part(i) for i in range(3)]
    x = torch.randn(7, 96) * torch.linspace(0.1, 30, 7)[:, None]
    for order in ([0, 1, 2], [2, 0, 1]):
        got = {i: parts[i](x) for i in order}
        assert all(torch.equal(got[i], alone[i](x)) for i in range(3))
    x2 = torch.randn(3, 96)
    assert torch.equal(parts[1](x2), alone[1](x2)) and torch.equal(parts[1](x2), alone[1](x2))
    assert torch.equal(parts[0](x), alone[0](x))


def test_the_w8a8_target_with_fused_linears_gives_the_unfused_logits(tiny_pair):
    from duo.runtime.fused_linears import FusedPart
    from duo.runtime.precision import footprint_bytes, quantize_linears
    from duo.runtime.target import load_target
    fused = load_target(tiny_pair.target_hf_dir, device="cpu", dtype="w8a8", progress=False)
    plain = load_target(tiny_pair.target_hf_dir, device="cpu", dtype="bfloat16", progress=False)
    quantize_linears(plain.model, torch.bfloat16, "w8a8")
    assert sum(isinstance(m, FusedPart) for m in fused.model.modules()) == 5 * len(fused.model.model.layers)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 64, 8]])
    with torch.inference_mode():
        assert torch.equal(fused.model(input_ids=ids).logits, plain.model(input_ids=ids).logits)
    assert fused.footprint == footprint_bytes(plain.model)      # the same int8 bytes, packed together
