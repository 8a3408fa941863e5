"""Loading the target and its numerics on a GPU-ready path (issue 20): device maps and multi-GPU devices, the
free-memory check, auto dtype and fp16 overflow, sliding-window tree masks, OOM handling, the transformers API
duo uses, attention without repeat_kv, and compaction's index copies.

No GPU here: the CUDA queries are monkeypatched where that is the only way to reach a code path.
"""
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import duo.runtime.target as target
import duo.runtime.target_load as target_load
from duo.errors import is_oom, release_after_oom
from duo.runtime import attention
from duo.runtime.precision import available_precisions, resolve_precision
from duo.runtime.target import (TargetError, TargetModel, check_tree_support, compact_cache, forward_tree, load_target,
                                new_cache, prefill, resolve_device, resolve_devices, storage_dtype,
                                tree_attention_mask)
from duo.runtime.target_load import check_placement, placement, weight_bytes
from duo.runtime.tree import Tree
from test_verify import VOCAB, branch_of, random_tree   # trees over the same 97-token vocabulary

GiB = 2**30
WINDOW = 8


@pytest.fixture(scope="module")
def tm(tiny_pair):
    return load_target(tiny_pair.target_hf_dir, device="cpu", progress=False)


def fake_gpus(monkeypatch, n: int, capability=(8, 0)):
    """torch.cuda as on a machine with n GPUs of this compute capability (bf16 'supported' either way, as
    torch.cuda.is_bf16_supported() says with emulation)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    caps = capability if isinstance(capability, dict) else {}
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda d=None: caps.get(torch.device(d).index, capability) if caps else capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: n > 0)


@torch.inference_mode()
def tree_error(tm, prefix, tree) -> float:
    """max |forward_tree's rows - a plain causal run of each branch alone| (check_tree_support's comparison)."""
    cache = new_cache()
    prefill(tm, cache, prefix[:-1])
    got = forward_tree(tm, cache, prefix[-1], tree)
    err = 0.0
    for k in range(len(tree)):
        path = branch_of(tree, k)
        seq = prefix + [int(tree.tokens[j]) for j in path]
        ref = tm.model(input_ids=torch.tensor([seq])).logits[0].float()
        err = max(err, float((got[[0] + [j + 1 for j in path]] - ref[len(prefix) - 1:]).abs().max()))
    return err


# ---------------------------------------------------------------- 1. loading: device_map, devices, free memory


def test_load_target_puts_the_weights_straight_on_the_device(tiny_pair, monkeypatch):
    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    tm = load_target(tiny_pair.target_hf_dir, device="cpu", progress=False)
    assert seen["device_map"] == {"": torch.device("cpu")}
    assert seen["attn_implementation"] == attention.NAME and tm.model.config._attn_implementation == attention.NAME
    assert {p.device.type for p in tm.model.parameters()} == {"cpu"}
    assert tm.device == torch.device("cpu") and tm.supports_tree


def test_resolve_devices_parses_a_gpu_list(monkeypatch):
    fake_gpus(monkeypatch, 4)
    assert resolve_devices("cuda:0,1") == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert resolve_devices("cuda:1,cuda:3") == [torch.device("cuda", 1), torch.device("cuda", 3)]
    assert resolve_devices("auto") == [torch.device("cuda", i) for i in range(4)]
    assert resolve_devices("cuda") == [torch.device("cuda")]
    assert resolve_device("cuda:2,3") == torch.device("cuda", 2)    # the first: where the inputs go
    for bad, words in [("cuda:0,0", "twice"), ("cuda:0,7", "only 4 GPU"), ("cuda:a,b", "cuda:0,1"),
                       ("cpu,cuda:0", "cuda:0,1"), ("cuda:9", "only 4 GPU"), ("tpu", "use auto")]:
        with pytest.raises(TargetError, match=words) as e:
            resolve_devices(bad)
        assert "\n" not in str(e.value)
    fake_gpus(monkeypatch, 1)
    assert resolve_devices("auto") == [torch.device("cuda")]        # one GPU: as before, "cuda"
    fake_gpus(monkeypatch, 0)
    assert resolve_devices("auto") == [torch.device("cpu")]
    with pytest.raises(TargetError, match="no CUDA GPU"):
        resolve_devices("cuda:0,1")


def test_the_cli_takes_a_gpu_list_and_names_the_forms_it_takes():
    import argparse

    from duo.flags import _device
    for ok in ("auto", "cpu", "cuda", "cuda:1", "cuda:0,1", "cuda:0,cuda:1,2"):
        assert _device(ok) == ok
    for bad in ("gpu", "cuda:", "cuda:0,", "cpu,cuda:0"):
        with pytest.raises(argparse.ArgumentTypeError, match="cuda:N,M"):
            _device(bad)


def test_placement_spreads_over_the_gpus_only_when_needed(monkeypatch):
    fake_gpus(monkeypatch, 2)
    free = {0: 10 * GiB, 1: 10 * GiB}
    monkeypatch.setattr(target_load, "free_bytes", lambda d: free.get(d.index, 10 * GiB))
    gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert placement(gpus, 5 * GiB, "bfloat16", auto=True) == (gpus[:1], {"device_map": {"": gpus[0]}})
    used, where = placement(gpus, 15 * GiB, "bfloat16", auto=True)
    assert used == gpus and where == {"device_map": "auto", "max_memory": {0: 10 * GiB, 1: 10 * GiB}}
    assert placement(gpus, 5 * GiB, "bfloat16", auto=False)[1]["device_map"] == "auto"   # asked for both
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert placement([torch.device("cuda")], GiB, "bfloat16", auto=False)[1] == {"device_map": {"": gpus[1]}}
    with pytest.raises(TargetError, match=r"need 25.0 GiB but cuda:0 \+ cuda:1 has 20.0 GiB free: use --dtype int8"):
        placement(gpus, 25 * GiB, "bfloat16", auto=True)
    with pytest.raises(TargetError, match=r"more GPUs \(--device cuda:0,1\)"):
        placement(gpus[:1], 15 * GiB, "int8", auto=False)


def test_weight_bytes_come_from_the_safetensors_headers(tiny_pair, tm):
    f32 = weight_bytes(tiny_pair.target_hf_dir, torch.float32)
    assert f32 == sum(p.numel() * 4 for p in tm.model.parameters())
    assert weight_bytes(tiny_pair.target_hf_dir, torch.bfloat16) * 2 == f32     # stored f32, loaded bf16
    size = sum(f.stat().st_size for f in Path(tiny_pair.target_hf_dir).glob("*.safetensors"))
    assert f32 <= size < f32 + 64 * 1024


def test_load_refuses_a_target_larger_than_free_memory(tiny_pair, monkeypatch):
    monkeypatch.setattr(target_load, "free_bytes", lambda d: 1000)

    def never(*a, **k):
        raise AssertionError("from_pretrained called although the weights cannot fit")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(TargetError, match=r"float32 weights need .* GiB but the host has 0.0 GiB free: use --dtype "
                                          r"bfloat16 \(or int8\)") as e:
        load_target(tiny_pair.target_hf_dir, device="cpu", progress=False)
    assert "\n" not in str(e.value)


def test_weights_left_off_the_gpus_are_refused(tm):
    with pytest.raises(TargetError, match="did not fit on cuda:0 \\+ cuda:1 \\(weights left on cpu\\)"):
        check_placement(tm.model, [torch.device("cuda", 0), torch.device("cuda", 1)])
    check_placement(tm.model, [torch.device("cpu")])


def test_a_converted_gguf_is_stored_in_the_precision_it_loads_in(monkeypatch):
    assert storage_dtype("cpu", "auto") == "float32"
    fake_gpus(monkeypatch, 1, (8, 0))
    assert storage_dtype("auto", "auto") == "bfloat16"
    fake_gpus(monkeypatch, 1, (7, 5))
    assert storage_dtype("auto", "auto") == "float16"


# ---------------------------------------------------------------- 3. dtype auto, fp16 overflow


def test_auto_is_bfloat16_only_where_the_gpu_has_it_natively(monkeypatch):
    gpu = torch.device("cuda", 0)
    fake_gpus(monkeypatch, 1, (7, 5))    # T4: is_bf16_supported() is True (emulated)
    assert resolve_precision("auto", gpu).dtype == torch.float16
    assert resolve_precision("int8", gpu).dtype == torch.float16
    assert "bfloat16" not in available_precisions(gpu)
    fake_gpus(monkeypatch, 1, (8, 0))
    assert resolve_precision("auto", gpu).dtype == torch.bfloat16
    assert "bfloat16" in available_precisions(gpu)
    fake_gpus(monkeypatch, 2, {0: (8, 6), 1: (7, 0)})     # one old GPU among two: float16 on both
    assert target_load.devices_precision("auto", resolve_devices("cuda:0,1")).dtype == torch.float16


def test_float16_logits_that_overflow_are_refused(tiny_pair, tmp_path):
    ok = load_target(tiny_pair.target_hf_dir, device="cpu", dtype="float16", progress=False)
    assert ok.dtype == torch.float16
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_pair.target_hf_dir), dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(1e4)     # logits ~1e5: beyond float16's 65504
    model.save_pretrained(tmp_path)
    ok.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(TargetError, match="logits overflow in float16 .* use --dtype bfloat16 or float32"):
        load_target(tmp_path, device="cpu", dtype="float16", progress=False)
    assert load_target(tmp_path, device="cpu", dtype="float32", progress=False).supports_tree


# ---------------------------------------------------------------- 5. sliding windows


def windowed_model(family: str, window: int = WINDOW) -> TargetModel:
    """A random 3-layer model with a sliding window: qwen2 (layer 0 full, 1-2 windowed: one mask per kind of
    layer) or mistral (every layer windowed: one mask)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, sliding_window=window,
              attn_implementation=attention.attn_implementation())
    model = (Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, max_window_layers=1, **kw)) if family == "qwen2"
             else MistralForCausalLM(MistralConfig(**kw)))
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    return TargetModel(model=model.eval(), tokenizer=None, device=torch.device("cpu"), dtype=torch.float32,
                       vocab_size=VOCAB, max_context=512, eos_ids=frozenset())


@pytest.fixture(scope="module", params=["qwen2", "mistral"])
def windowed(request):
    return windowed_model(request.param)


def test_the_models_have_the_windows_meant(windowed):
    kinds, window = attention.layer_windows(windowed.model.config)
    assert window == WINDOW
    assert kinds == (["full_attention", "sliding_attention"] if "Qwen2" in type(windowed.model).__name__ else None)


@pytest.mark.parametrize("seed", range(3))
def test_windowed_tree_equals_each_branch_alone_beyond_the_window(windowed, seed):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, VOCAB, 3 * WINDOW + int(rng.integers(1, 6))).tolist()
    for tree in (random_tree(rng, 10), Tree(rng.integers(0, VOCAB, 5), [-1, 0, 1, 2, 3], np.ones(5))):  # + a chain
        assert tree_error(windowed, prefix, tree) < 1e-4


def test_a_tree_mask_without_the_window_is_wrong_and_the_probe_sees_it(windowed, monkeypatch):
    """The control: the old mask (one full mask for every layer) fails the same comparison, and check_tree_support."""
    rng = np.random.default_rng(7)
    prefix = rng.integers(0, VOCAB, 3 * WINDOW).tolist()
    tree = random_tree(rng, 10)
    assert check_tree_support(windowed)
    def full_mask(config, parents, n_past, dtype, device):   # the mask before the fix, whatever the layer
        return tree_attention_mask(parents, n_past, dtype, device)

    monkeypatch.setattr(target, "verify_mask", full_mask)
    assert tree_error(windowed, prefix, tree) > 1e-2
    assert not check_tree_support(windowed)


def test_the_probe_reaches_past_a_large_window(monkeypatch):
    tm = windowed_model("qwen2", window=4096)
    lengths = []
    real = target.prefill
    monkeypatch.setattr(target, "prefill", lambda tm, cache, ids: lengths.append(len(ids)) or real(tm, cache, ids))
    assert check_tree_support(tm)
    assert lengths == [3 * attention.PROBE_WINDOW + 4]           # the window shrunk to 8 for the probe...
    assert tm.model.config.sliding_window == 4096                 # ...and given back


def test_the_cache_keeps_every_position_in_every_layer(windowed):
    cache = new_cache()
    prefill(windowed, cache, list(range(3 * WINDOW)))
    assert cache.get_seq_length() == 3 * WINDOW and not any(cache.is_sliding)
    assert all(layer.keys.shape[2] == 3 * WINDOW for layer in cache.layers)


# ---------------------------------------------------------------- 8. out of memory


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: out of memory"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
    MemoryError(),
])
def test_is_oom_recognises_allocation_failures(error):
    assert is_oom(error)


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: device-side assert triggered"),
                                   RuntimeError("The size of tensor a (9) must match the size of tensor b (5)"),
                                   ValueError("out of memory"), TypeError("bad argument")])
def test_is_oom_rejects_other_errors(error):
    assert not is_oom(error)


def test_release_after_oom_empties_the_cuda_cache_only_where_cuda_runs(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    release_after_oom(torch.device("cuda", 1))
    assert emptied == [1]
    release_after_oom(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)    # never creates a CUDA context
    release_after_oom(torch.device("cuda"))
    assert emptied == [1]


def raising(error):
    def forward_tree(*args, **kwargs):
        raise error
    return forward_tree


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"),
                                   RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")])
def test_check_tree_support_raises_out_of_memory(tm, monkeypatch, error):
    released = []
    monkeypatch.setattr(target, "forward_tree", raising(error))
    monkeypatch.setattr(target, "release_after_oom", released.append)
    with pytest.raises(TargetError, match="out of memory checking tree verification on cpu: .*smaller --dtype"):
        check_tree_support(tm)
    assert released == [tm.device]


def test_check_tree_support_lets_device_errors_through(tm, monkeypatch):
    monkeypatch.setattr(target, "forward_tree", raising(RuntimeError("CUDA error: device-side assert triggered")))
    with pytest.raises(RuntimeError, match="device-side assert"):
        check_tree_support(tm)


@pytest.mark.parametrize("error", [TypeError("forward() got an unexpected keyword argument 'position_ids'"),
                                   ValueError("attention_mask must be 2D"),
                                   RuntimeError("The size of tensor a (9) must match the size of tensor b (5) at "
                                                "non-singleton dimension 3")])
def test_check_tree_support_says_no_for_a_model_that_rejects_the_mask(tm, monkeypatch, error):
    monkeypatch.setattr(target, "forward_tree", raising(error))
    assert check_tree_support(tm) is False


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_load_target_turns_an_oom_into_a_target_error(tiny_pair, monkeypatch, device):
    released = []

    def oom(*a, **k):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED" if device != "cpu" else "can't allocate memory")

    fake_gpus(monkeypatch, 1 if device != "cpu" else 0)
    monkeypatch.setattr(target_load, "free_bytes", lambda d: 64 * GiB)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", oom)
    monkeypatch.setattr(target, "release_after_oom", released.append)
    words = "out of memory loading the target on " + ("the host" if device == "cpu" else "cuda:0")
    with pytest.raises(TargetError, match=words):
        load_target(tiny_pair.target_hf_dir, device=device, progress=False)
    assert released == [torch.device(device)]


# ---------------------------------------------------------------- 10. the transformers API duo uses


def test_the_installed_transformers_is_in_the_pinned_range():
    from packaging.requirements import Requirement
    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    req = next(Requirement(d) for d in deps if d.startswith("transformers"))
    assert req.specifier.contains(transformers.__version__), (str(req), transformers.__version__)


def test_passes_raise_no_deprecation_warning(tm):
    rng = np.random.default_rng(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        cache = new_cache()
        prefill(tm, cache, rng.integers(0, tm.vocab_size, 20).tolist())
        forward_tree(tm, cache, 5, Tree([1, 2, 3], [-1, -1, 0], np.ones(3)))        # a tree (4D mask)
        compact_cache(cache, 21, [0, 2])
        forward_tree(tm, cache, 7, Tree([4, 5], [-1, 0], np.ones(2)))               # a chain (no mask)


# ---------------------------------------------------------------- GQA without repeat_kv


@pytest.fixture(scope="module")
def sdpa_twin(tiny_pair, tm):
    """The same target with transformers' own sdpa attention."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_pair.target_hf_dir), dtype=torch.float32,
                                                              attn_implementation="sdpa").eval()
    return TargetModel(model=model, tokenizer=tm.tokenizer, device=tm.device, dtype=tm.dtype,
                       vocab_size=tm.vocab_size, max_context=tm.max_context, eos_ids=tm.eos_ids)


@pytest.mark.parametrize("seed", range(4))
def test_duo_attention_equals_sdpa(tm, sdpa_twin, seed):
    assert tm.model.config.num_attention_heads > tm.model.config.num_key_value_heads    # GQA
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, tm.vocab_size, int(rng.integers(2, 60))).tolist()
    tree = Tree(rng.integers(0, tm.vocab_size, 12), [-1] + [int(rng.integers(-1, k)) for k in range(1, 12)],
                np.ones(12))
    outs = []
    for t in (tm, sdpa_twin):
        cache = new_cache()
        first = prefill(t, cache, prefix[:-1] or prefix)
        outs.append((first, forward_tree(t, cache, prefix[-1], tree)))
    for a, b in zip(*outs):
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def test_duo_attention_does_not_repeat_kv(tm, sdpa_twin, monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa
    calls = []
    real = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda x, n: calls.append(n) or real(x, n))
    tree = Tree([1, 2, 3, 4], [-1, -1, 0, 1], np.ones(4))
    counts = []
    for t in (tm, sdpa_twin):
        cache = new_cache()
        prefill(t, cache, list(range(1, 30)))
        calls.clear()
        forward_tree(t, cache, 5, tree)
        counts.append(len(calls))
    assert counts == [0, 2 * tm.model.config.num_hidden_layers]   # none with duo's; K and V per layer with sdpa


def test_stacked_rows_equal_repeated_heads_with_a_mask_per_head():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Layer(torch.nn.Module):
        num_key_value_groups = 3
        is_causal = True

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 5, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    per_head = torch.rand(1, 6, 5, 40) > 0.3
    per_head[..., 0] = True                    # every row sees a key
    for mask in (per_head, torch.randn(1, 1, 5, 40)):
        got, _ = attention.duo_sdpa(Layer(), q, k, v, mask, scaling=0.25)
        ref, _ = sdpa_attention_forward(Layer(), q, k, v, mask, scaling=0.25)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- compact_cache


def test_compaction_copies_its_index_to_the_device_once(tm, monkeypatch):
    cache = new_cache()
    prefill(tm, cache, list(range(1, 20)))
    forward_tree(tm, cache, 5, Tree([1, 2, 3, 4], [-1, -1, 0, 1], np.ones(4)))
    made = []
    real = torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda *a, **k: made.append(1) or real(*a, **k))
    compact_cache(cache, 20, [1, 3])            # not contiguous: node 3 moves to node 1's place
    assert len(made) == 1 and len(cache.layers) > 1
    assert cache.get_seq_length() == 22


def test_the_stacked_mask_is_made_once_per_pass(tm, monkeypatch):
    made = []
    real = attention.stack_rows
    monkeypatch.setattr(attention, "stack_rows", lambda mask, n: made.append(n) or real(mask, n))
    cache = new_cache()
    prefill(tm, cache, list(range(1, 30)))
    forward_tree(tm, cache, 5, Tree([1, 2, 3, 4], [-1, -1, 0, 1], np.ones(4)))
    assert tm.model.config.num_hidden_layers > 1 and len(made) == 1
    foreign = torch.zeros(1, 1, 5, 9)     # not verify_mask's (a buffer that may be rewritten in place): every call
    attention.stacked_mask(foreign, 2), attention.stacked_mask(foreign, 2)
    assert len(made) == 3
