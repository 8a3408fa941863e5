"""The draft learns its target (issue 19), on the tiny pairs: recording, the LoRA's GGUF export computing in
llama.cpp what peft computes in torch, training that raises held-out agreement, the adapter swapped into
the running worker, exactness with it, online mode's pause/resume, and the bad inputs."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import psutil
import pytest
import torch

from duo import Engine
from duo.adapt import store
from duo.adapt.buffer import RecordBuffer, pair_dir, split
from duo.adapt.job import adapt_pair
from duo.adapt.lora_gguf import check_adapter, write_lora_gguf
from duo.adapt.train import TARGET_MODULES, AdaptConfig, load_draft_torch
from duo.errors import UsageError

from test_exactness import assert_exact_or_near_tie, cut_at_eos, reference_greedy

PROMPTS = ["def fibonacci(n):", "class Stack:", "import numpy as np", "def quicksort(xs):", "for i in range(10):",
           "The answer is", "def main():", "while True:", "print('hello')", "x = [1, 2, 3]", "import os", "try:"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DUO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def engine(pair, **kw):
    kw = {"device": "cpu", "mode": "sequential", "budget": 8, "progress": False, "profile": "off", "output_cache": 0,
          "lookup": False, **kw}
    return Engine(str(pair.target_hf_dir), str(pair.draft_gguf), **kw)


def stable_names(pair) -> None:
    """Records are named by the clock and split() sides them by a hash of the name: renamed by their order,
    the held-out set (and the agreement judged on it) is the same on every run."""
    for i, f in enumerate(sorted((pair / "records").glob("*.npz"))):
        f.rename(f.with_name(f"{i:03d}-0-{f.name.split('.')[0].rsplit('-', 1)[-1]}.npz"))


def record(pair, n: int, max_new: int = 40) -> list:
    with engine(pair, record=True, adapter="off") as e:
        return [e.generate(p, max_new_tokens=max_new) for p in PROMPTS[:n]]


def test_recording_keeps_the_targets_top_k_and_where_the_draft_was_rejected(tiny_pair, cache):
    with engine(tiny_pair, adapter="off") as plain:
        want = [plain.generate(p, max_new_tokens=40).token_ids for p in PROMPTS[:3]]
    got = record(tiny_pair, 3)
    assert [g.token_ids for g in got] == want                       # recording changes nothing
    assert all(g.stats["accepted"] > 0 for g in got)
    buf = RecordBuffer(pair_dir("target_hf", tiny_pair.draft_gguf))
    recs = buf.load()
    assert len(recs) == 3 and buf.n_tokens() == sum(len(w) for w in want)
    for rec, ids in zip(recs, want):
        out = rec.tokens[rec.n_prompt:]
        assert out.tolist() == ids
        assert rec.top_ids.shape == (len(ids), 10)
        assert (rec.top_ids[:, 0] == out).all()                     # greedy: the target's top token is the one emitted
        assert (np.diff(rec.top_logp, axis=1) <= 1e-3).all() and (rec.top_logp <= 0).all()
    rejected = sum(int(r.rejected.sum()) for r in recs)
    assert 0 < rejected < buf.n_tokens()                             # some rounds rejected the draft, not all
    train, test = split(recs + recs[:0], 0.34, seed=0)
    assert train and test and not {r.name for r in train} & {r.name for r in test}


@pytest.mark.parametrize("pair_name", ["tiny_pair", "tiny_pair_llama"])
def test_the_gguf_lora_computes_in_llama_cpp_what_peft_computes(pair_name, request, cache, tmp_path):
    """Names, shapes, transposition, the llama q/k row permutation and alpha/rank scaling all at once."""
    from peft import LoraConfig, get_peft_model

    from duo.runtime.drafter import DraftConfig, Drafter, run, sync

    pair = request.getfixturevalue(pair_name)
    model = get_peft_model(load_draft_torch(pair.draft_gguf), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                        target_modules=list(TARGET_MODULES)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    from duo.adapt.train import lora_weights
    path = write_lora_gguf(tmp_path / "a.gguf", lora_weights(model), draft_gguf=pair.draft_gguf, alpha=8,
                           n_head=model.config.num_attention_heads, n_head_kv=model.config.num_key_value_heads)
    check_adapter(path, pair.draft_gguf)
    tokens = [5, 17, 42, 99, 7, 3, 250, 11]
    with torch.inference_mode():
        want = model(input_ids=torch.tensor([tokens])).logits[0, -1].float().numpy()
        with model.disable_adapter():
            base = model(input_ids=torch.tensor([tokens])).logits[0, -1].float().numpy()
    d = Drafter(DraftConfig(str(pair.draft_gguf), n_ctx=64, extra_bufts=False))
    try:
        plain = run(sync(d, tokens))
        d.set_adapter(str(path))
        assert d.seqs[0] == []                                       # the swap cleared the KV cache
        adapted = run(sync(d, tokens))
        d.set_adapter(None)
        again = run(sync(d, tokens))
    finally:
        d.close()
    noise = np.abs(plain - base).max()               # llama.cpp against torch, same weights (f16 KV cache...)
    assert noise < 0.01 * np.abs(base).max()
    assert np.abs(want - base).max() > 20 * noise    # the adapter moves the logits far more than that ...
    assert np.abs(adapted - want).max() < 3 * noise + 1e-4          # ... and llama.cpp moves them as peft does
    assert np.abs(again - plain).max() < 1e-5                       # off: the plain draft again, exactly


def test_an_adapter_on_the_last_layers_only_has_only_their_matrices_and_llama_cpp_runs_it(tiny_pair, tmp_path):
    from peft import get_peft_model

    from duo.adapt.train import lora_config, lora_weights
    from duo.runtime.drafter import DraftConfig, Drafter, run, sync
    base = load_draft_torch(tiny_pair.draft_gguf)
    n = base.config.num_hidden_layers
    assert n >= 2
    model = get_peft_model(base, lora_config(AdaptConfig(last_layers=1), n))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    lora = lora_weights(model)
    assert {k.split(".layers.")[1].split(".")[0] for k in lora} == {str(n - 1)} and len(lora) == len(TARGET_MODULES)
    path = write_lora_gguf(tmp_path / "last.gguf", lora, draft_gguf=tiny_pair.draft_gguf, alpha=16,
                           n_head=base.config.num_attention_heads, n_head_kv=base.config.num_key_value_heads)
    tokens = [5, 17, 42, 99]
    d = Drafter(DraftConfig(str(tiny_pair.draft_gguf), n_ctx=64, extra_bufts=False))
    try:
        plain = run(sync(d, tokens))
        d.set_adapter(str(path))
        adapted = run(sync(d, tokens))
    finally:
        d.close()
    assert np.abs(adapted - plain).max() > 1e-3                     # the one layer's adapter is applied
    all_layers = get_peft_model(load_draft_torch(tiny_pair.draft_gguf), lora_config(AdaptConfig(last_layers=0), n))
    assert len(lora_weights(all_layers)) == n * len(TARGET_MODULES)


def test_adapt_raises_agreement_and_the_worker_swaps_the_adapter_in_without_restart(tiny_pair, cache):
    ids_of = {}
    with engine(tiny_pair, mode="target") as alone:
        for p in PROMPTS[:2]:
            ids = alone.encode(p)
            ref, logits = reference_greedy(alone.target, ids, 40)
            ids_of[p] = (cut_at_eos(ref, alone.target.eos_ids), logits)
    with engine(tiny_pair, adapter="auto") as e:                    # no adapter yet: the plain draft
        before = [e.generate(p, max_new_tokens=40) for p in PROMPTS[:2]]
        pid = e._draft._proc.pid
        assert e._draft.adapter is None
        record(tiny_pair, 24)
        pair = pair_dir("target_hf", tiny_pair.draft_gguf)
        stable_names(pair)
        result, path = adapt_pair(pair, tiny_pair.draft_gguf, AdaptConfig(rank=8, alpha=16, epochs=8, lr=3e-3,
                                                                          bf16=False), held_out=0.25, progress=False)
        assert result.kept and path is not None, result.summary()
        assert result.agreement_after > result.agreement_before and result.loss_last < result.loss_first
        assert len(result.epoch_agreement) == 8 and result.agreement_after == max(result.epoch_agreement)  # the best epoch
        assert result.best_step > 0 and result.best_step % result.train_records == 0
        assert store.latest(pair) == path
        after = [e.generate(p, max_new_tokens=40) for p in PROMPTS[:2]]  # auto: picked up at the next generation
        assert e._draft.adapter == str(path) and e._draft._proc.pid == pid   # swapped in the running worker
    for res, p in zip(before + after, PROMPTS[:2] * 2):             # the target's output, with or without adapter
        ref, logits = ids_of[p]
        assert_exact_or_near_tie(res.token_ids, ref, logits, what="adapter")
        assert res.stats["fallback"] is None and res.stats["accepted"] > 0


def test_adapter_bad_inputs_get_one_line_errors(tiny_pair, tiny_pair_llama, cache, tmp_path):
    pair = pair_dir("target_hf", tiny_pair.draft_gguf)
    with pytest.raises(UsageError, match="no recorded generations"):
        adapt_pair(pair, tiny_pair.draft_gguf, AdaptConfig(), progress=False)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(UsageError, match="not a usable adapter"):
        engine(tiny_pair, adapter=str(junk))
    with pytest.raises(UsageError, match="no adapter file"):
        engine(tiny_pair, adapter=str(tmp_path / "missing.gguf"))
    from peft import LoraConfig, get_peft_model
    from duo.adapt.train import lora_weights
    m = get_peft_model(load_draft_torch(tiny_pair_llama.draft_gguf), LoraConfig(r=2, target_modules=["v_proj"]))
    other = write_lora_gguf(tmp_path / "other.gguf", lora_weights(m), draft_gguf=tiny_pair_llama.draft_gguf,
                            alpha=4, n_head=4, n_head_kv=2)
    with pytest.raises(UsageError, match="trained for another draft"):
        engine(tiny_pair, adapter=str(other))
    with pytest.raises(UsageError, match="adapt_online"):
        engine(tiny_pair, adapt_online=True)
    p = subprocess.run([sys.executable, "-m", "duo", "adapt", "--model", str(tiny_pair.target_hf_dir), "--draft",
                        str(tiny_pair.draft_gguf)], capture_output=True, text=True, env={**__import__("os").environ})
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "no recorded generations" in p.stderr, p.stderr


def test_online_mode_trains_only_while_idle_and_leaves_no_process(tiny_pair, cache):
    with engine(tiny_pair, record=True, adapt_online=True) as e:
        online = e.adaptation.online
        online.every = 3
        for p in PROMPTS[:3]:
            e.generate(p, max_new_tokens=24)
        assert online.running(), "three new records should have started a background run"
        child = psutil.Process(online.proc.pid)
        online.pause()                                               # what a generation does first
        assert child.status() == psutil.STATUS_STOPPED
        online.resume()
        assert child.status() != psutil.STATUS_STOPPED
        e.generate(PROMPTS[3], max_new_tokens=24)                    # paused during it, resumed after
        assert child.status() != psutil.STATUS_STOPPED
        online.proc.wait(300)
        assert online.proc.returncode == 0
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
