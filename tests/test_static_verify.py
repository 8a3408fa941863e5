"""The static, compiled verify pass (duo.runtime.static_target): the same logits as the eager target within
float rounding, through padding, compaction of non-contiguous paths and rounds; compiled on the CPU for two
buckets; an Engine with compile="on" is lossless and speculates; the settings; trees past the largest bucket.

Measured on the tiny pair (fp32): static vs eager logits differ by ~6e-7 of max |logit| uncompiled, ~2e-6
compiled (reordered reductions); asserted below 1e-5.
"""
import argparse

import numpy as np
import pytest
import torch

from duo import Engine
from duo.errors import DuoError, UsageError
from duo.runtime import static_target as S
from duo.runtime.static_cache import Upload
from duo.runtime.target import TargetError, TargetModel, load_target
from duo.runtime.tree import Tree
from test_exactness import PROMPTS, greedy_runs

TIGHT = 1e-5        # max |static - eager| / max |eager| (measured ~6e-7 eager, ~2e-6 compiled)
BUCKETS = (4, 16)   # two graphs: compiling is slow on two cores


@pytest.fixture(scope="module")
def tm(tiny_pair):
    return load_target(tiny_pair.target_hf_dir, device="cpu", dtype="float32", progress=False)


def random_tree(rng, n: int, vocab: int) -> Tree:
    parents = [-1] + [int(rng.integers(-1, k)) for k in range(1, n)]
    return Tree(rng.integers(1, vocab, n), parents, np.ones(n))


def deepest_last_path(tree: Tree) -> list[int]:
    """From the root, always the last child: a path whose node indices are not contiguous in a branched tree."""
    kids, path, node = tree.children(), [], -1
    while kids[node + 1]:
        node = kids[node + 1][-1]
        path.append(node)
    return path


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def lockstep(st, eager, sizes, seed: int = 0, prompt_len: int = 40) -> list[float]:
    """Prefill, then one round per tree size on both targets (trees of random shape, compacted to a
    non-contiguous path; size 0 = an empty tree, -n = a chain of n accepted whole); the relative logit
    difference of each pass."""
    rng = np.random.default_rng(seed)
    vocab = eager.vocab_size
    committed = [int(t) for t in rng.integers(1, vocab, prompt_len)]
    ours, ref = st.new_cache(), eager.new_cache()
    errors = [relative(st.prefill(ours, committed[:-1]), eager.prefill(ref, committed[:-1]))]
    for n in sizes:
        tree = Tree.chain(rng.integers(1, vocab, -n)) if n < 0 else random_tree(rng, n, vocab) if n else Tree.empty()
        n_past = eager.cache_length(ref)
        assert st.cache_length(ours) == n_past
        got, want = st.forward_tree(ours, committed[-1], tree), eager.forward_tree(ref, committed[-1], tree)
        assert got.shape == want.shape == (len(tree) + 1, vocab) and got.dtype == torch.float32
        errors.append(relative(got, want))
        path = list(range(-n)) if n < 0 else deepest_last_path(tree)
        st.compact_cache(ours, n_past + 1, path)
        eager.compact_cache(ref, n_past + 1, path)
        committed += [int(tree.tokens[k]) for k in path] + [int(rng.integers(1, vocab))]
    assert st.cache_length(ours) == eager.cache_length(ref) == len(committed) - 1
    return errors


# ------------------------------------------------------------------------------------------- (a) uncompiled
def test_static_cache_matches_the_eager_target_through_rounds(tm):
    """Padding (3 -> 4, 10 -> 16 tokens), exact buckets, a tree past the largest bucket (20 nodes: eager at its
    size), chains, an empty tree, compactions of non-contiguous paths."""
    st = S.StaticTarget(tm, max_cache_len=256, buckets=BUCKETS, compile=False)
    errors = lockstep(st, tm, [2, 9, 15, 3, 20, -5, 0, 12, 1, -3, 7])
    assert max(errors) <= TIGHT, errors
    assert st.pool.allocated == 1     # the check at construction and this cache shared one slab


def test_a_dropped_cache_gives_its_slab_to_the_next(tm):
    st = S.StaticTarget(tm, max_cache_len=64, buckets=(4,), compile=False)
    first = st.new_cache()
    slab = first.slab
    held = st.new_cache()                 # while `first` lives, another cache gets a slab of its own
    assert held.slab is not slab
    del first
    again = st.new_cache()
    assert again.slab is slab and st.cache_length(again) == 0 and st.pool.allocated == 2
    del held, again


def test_compaction_is_one_gather_over_all_layers(tm):
    st = S.StaticTarget(tm, max_cache_len=64, buckets=(8,), compile=False)
    cache = st.new_cache()
    st.prefill(cache, list(range(5, 25)))
    st.forward_tree(cache, 3, Tree([7, 8, 9, 10, 11], [-1, -1, 1, 2, 0], np.ones(5)))
    before = cache.slab.slab[:, :, :, 20 + 1 + np.array([1, 2, 3])].clone()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        st.compact_cache(cache, 21, [1, 2, 3])
    gathers = [e for e in prof.events() if e.name == "aten::index_select"]
    assert len(gathers) == 1 and tm.model.config.num_hidden_layers > 1
    assert torch.equal(cache.slab.slab[:, :, :, 21:24], before) and st.cache_length(cache) == 24


@pytest.mark.parametrize("arch", ["qwen2-mixed", "mistral"])
def test_sliding_window_layers_see_only_their_window(arch):
    """Against transformers' own sliding masks (a plain causal run of each branch); the same pass with one full
    mask for every layer is far off, so the window matters here."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    dims = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")
    if arch == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=4, **dims))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1, **dims))
    model.eval()
    tm = TargetModel(model=model, tokenizer=None, device=torch.device("cpu"), dtype=torch.float32, vocab_size=97,
                     max_context=256, eos_ids=frozenset())
    st = S.StaticTarget(tm, max_cache_len=64, buckets=(8,), compile=False)
    assert st.layout == ("sliding" if arch == "mistral" else "mixed") and st.window == 4
    prefix = [(5 + 7 * i) % 97 for i in range(13)]
    tree = Tree([11, 22, 33, 44, 55, 66], [-1, -1, 0, 1, 2, 3], np.ones(6))
    cache = st.new_cache()
    st.prefill(cache, prefix[:-1])
    got = st.forward_tree(cache, prefix[-1], tree)
    windowless = S.StaticTarget(tm, max_cache_len=64, buckets=(8,), compile=False, check=False)
    windowless.layout = "full"
    c2 = windowless.new_cache()
    windowless.prefill(c2, prefix[:-1])
    wrong = windowless.forward_tree(c2, prefix[-1], tree)
    for branch in ([0, 2, 4], [1, 3, 5]):
        seq = prefix + [int(tree.tokens[k]) for k in branch]
        with torch.inference_mode():
            ref = model(input_ids=torch.tensor([seq])).logits[0, len(prefix) - 1:].float()
        rows = [0] + [k + 1 for k in branch]
        assert relative(got[rows], ref) <= TIGHT
        assert relative(wrong[rows], ref) > 100 * TIGHT


def test_the_clone_keeps_logits_from_being_overwritten_by_the_next_replay(tm, monkeypatch):
    """On a GPU a CUDA graph's output buffer is reused by its next replay: fp32 logits (where .float() is no
    copy) are cloned. The cudagraph branch, reached on the CPU."""
    st = S.StaticTarget(tm, max_cache_len=64, buckets=(4,), compile=False)
    outs = []

    def recording(*args):
        outs.append(S.verify_pass(*args))
        return outs[-1]

    st._pass, st.cuda_graphs = recording, True
    cache = st.new_cache()
    st.prefill(cache, [5, 6, 7])
    logits = st.forward_tree(cache, 8, Tree.chain([9, 10]))
    assert logits.data_ptr() != outs[-1].data_ptr() and torch.equal(logits, outs[-1][:3])
    assert cache.slab.slots is None


def test_the_pinned_upload_waits_for_the_last_copy_and_sends_what_was_written():
    """Upload's GPU path (pinned host buffer, asynchronous copy, an event) with CPU tensors and a fake event."""
    class Event:
        waits = records = 0

        def synchronize(self):
            Event.waits += 1

        def record(self):
            Event.records += 1

    u = Upload(8, torch.device("cpu"))
    u.on_gpu, u.host, u.event = True, torch.zeros(8, dtype=torch.int64), Event()
    u.view = u.host.numpy()
    got = u.put([4, 5, 6])
    assert got.tolist() == [4, 5, 6] and got.data_ptr() == u.dev.data_ptr()
    assert Event.waits == 1 and Event.records == 1
    assert u.put(list(range(20))).tolist() == list(range(20))    # longer than the buffer: a plain copy


def test_the_check_at_construction_catches_a_path_that_parts_from_the_eager_one(tm, monkeypatch):
    st = S.StaticTarget(tm, max_cache_len=64, buckets=(8,), compile=False)
    st.check_against_eager()
    full_view = lambda anc, pos, n_past, n_keys, dtype, window, layout: torch.zeros(1, 1, len(pos), n_keys)
    monkeypatch.setattr(S, "tree_masks", full_view)         # every row sees every slot: stale ones, the future
    with pytest.raises(TargetError, match="does not reproduce .* eager logits.*--compile off"):
        st.check_against_eager()


def test_failures_of_the_static_path_name_the_fix_and_device_errors_propagate():
    e = S.failure(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"), "compiling x", "cpu")
    assert isinstance(e, TargetError) and str(e) == "out of memory compiling x: use --compile off"
    e = S.failure(AttributeError("'SlabCache' object has no attribute 'is_sliding'\nmore"), "checking y", "cpu")
    assert str(e) == "checking y failed (AttributeError: 'SlabCache' object has no attribute 'is_sliding'); " \
                     "use --compile off"
    device_error = RuntimeError("CUDA error: device-side assert triggered")
    with pytest.raises(RuntimeError) as raised:
        S.failure(device_error, "compiling x", "cpu")
    assert raised.value is device_error


# ------------------------------------------------------------------------------------------- (e) big trees
def test_trees_past_the_largest_bucket_or_the_padding_room_run_eagerly_and_overflow_is_an_error(tm):
    st = S.StaticTarget(tm, max_cache_len=40, buckets=(2, 16), compile=False)
    errors = lockstep(st, tm, [10, 1], prompt_len=20)        # 11 tokens: bucket 16, 2: exact
    assert max(errors) <= TIGHT, errors
    cache, ref = st.new_cache(), tm.new_cache()
    st.prefill(cache, list(range(1, 31)))
    tm.prefill(ref, list(range(1, 31)))
    tree = Tree.chain([3, 4, 5, 6, 7, 8])       # 7 tokens: bucket 16 would need slots up to 46 > 40
    assert relative(st.forward_tree(cache, 2, tree), tm.forward_tree(ref, 2, tree)) <= TIGHT
    st.compact_cache(cache, 31, [])
    with pytest.raises(S.CacheFull, match="holds 40 tokens.*--compile off"):
        st.forward_tree(cache, 2, Tree.chain(list(range(3, 13))))       # 31 + 11 > 40
    assert isinstance(S.CacheFull("x"), DuoError) and st.cache_length(cache) == 31
    with pytest.raises(S.CacheFull):
        st.prefill(st.new_cache(), list(range(1, 45)))


# ------------------------------------------------------------------------------------------- (d) settings
@pytest.mark.parametrize("setting,device,on", [("auto", "cuda", True), ("auto", "cuda:1", True), ("auto", "cpu", False),
                                               ("on", "cpu", True), ("on", "cuda", True), ("off", "cuda", False),
                                               ("off", "cpu", False)])
def test_use_static(setting, device, on):
    assert S.use_static(setting, torch.device(device)) is on


def test_unknown_settings_are_usage_errors(tiny_pair):
    with pytest.raises(ValueError, match="auto, on or off"):
        S.use_static("yes", torch.device("cpu"))
    with pytest.raises(UsageError, match="compile setting 'maybe'"):
        Engine(str(tiny_pair.target_hf_dir), compile="maybe")
    from duo.cli import build_parser
    p = build_parser()
    for cmd in ["run", "serve", "bench"]:     # duo bench: where the bench package's entry point is installed
        try:
            args = p.parse_args([cmd, "--compile", "off"])
        except SystemExit:
            assert cmd == "bench"
            continue
        assert args.compile == "off" and p.parse_args([cmd]).compile == "auto"
    with pytest.raises(SystemExit) as e:
        p.parse_args(["run", "hi", "--compile", "maybe"])
    assert e.value.code == 2


def test_the_engine_wraps_only_where_asked_and_falls_back_from_a_failed_compile(tm, monkeypatch):
    assert S.with_static_verify(tm, "off", 128, 64) is tm
    assert S.with_static_verify(tm, "auto", 128, 64) is tm           # the CPU: auto is off
    other = argparse.Namespace(device=torch.device("cpu"))           # e.g. the simulated accelerator
    assert S.with_static_verify(other, "on", 128, 64) is other

    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("InductorError: no working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(S, "DEFAULT_BUCKETS", (4,))
    with pytest.raises(TargetError, match="compiling the verify pass for 4 tokens failed.*--compile off"):
        S.with_static_verify(tm, "on", 128, 64)
    monkeypatch.setattr(S, "use_static", lambda setting, device: True)
    warned = []
    monkeypatch.setattr(S.log, "warning", lambda msg, *a: warned.append(msg % a))
    assert S.with_static_verify(tm, "auto", 128, 64) is tm
    assert len(warned) == 1 and warned[0].startswith("verification stays eager: compiling the verify pass")


# ------------------------------------------------------------------------------------------- compiled
@pytest.fixture(scope="module")
def compile_works():
    try:
        torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(3))
    except Exception as e:  # noqa: BLE001 - no C++ compiler, no inductor for this platform...
        pytest.skip(f"torch.compile does not work here ({type(e).__name__}: {str(e).splitlines()[0][:120]})")


@pytest.fixture(scope="module")
def compiled_engine(tiny_pair, compile_works):
    """An Engine with compile="on", its graphs for two buckets (4 and 16 tokens) only."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S, "DEFAULT_BUCKETS", BUCKETS)
        with Engine(str(tiny_pair.target_hf_dir), str(tiny_pair.draft_gguf), device="cpu", mode="sequential",
                    budget=8, compile="on", context=256, progress=False) as engine:
            yield engine


@pytest.mark.slow
def test_compiled_passes_match_the_eager_target(compiled_engine):
    """(b) both graphs, padding, compaction, and a tree past the largest bucket (eager inside a compiled target)."""
    st = compiled_engine.target
    assert isinstance(st, S.StaticTarget) and st.compiled and st.buckets == BUCKETS
    assert st.verify == "compiled (buckets 4-16)"
    errors = lockstep(st, st.tm, [2, 9, 15, 3, 20, -5, 0, 12], seed=1)
    assert max(errors) <= TIGHT, errors


@pytest.mark.slow
def test_a_compiled_engine_is_lossless_and_speculates(compiled_engine):
    """(c) greedy output equals the target decoding one token at a time, with drafts accepted."""
    from duo.chat import stats_line

    engine = compiled_engine
    runs = greedy_runs(engine, PROMPTS[:6], 32)
    assert all(r.stats["verify"] == "compiled (buckets 4-16)" for r in runs)
    drafted, accepted = sum(r.stats["drafted"] for r in runs), sum(r.stats["accepted"] for r in runs)
    assert drafted > 0 and 0 < accepted < drafted, (drafted, accepted)
    assert "verify compiled (buckets 4-16)" in stats_line(runs[-1].stats)
