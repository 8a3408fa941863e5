"""An adapter merged into the draft's weights (duo/adapt/merge.py): llama.cpp computes with the merged file
what it computes with the LoRA applied at run time, and an Engine whose draft runs Q4_0 drafts with the
merged Q4_0 file (no LoRA in the worker), speculating, with the target's output."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from duo import Engine
from duo.adapt import store
from duo.adapt.buffer import pair_dir
from duo.adapt.lora_gguf import write_lora_gguf
from duo.adapt.merge import merged_draft, merged_path, write_merged
from duo.adapt.train import TARGET_MODULES, load_draft_torch, lora_weights

from test_exactness import assert_exact_or_near_tie, cut_at_eos, reference_greedy

PROMPTS = ["def fibonacci(n):", "class Stack:", "import numpy as np"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DUO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def random_adapter(pair, path, scale: float, rank: int = 4):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(load_draft_torch(pair.draft_gguf), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                                        target_modules=list(TARGET_MODULES)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return write_lora_gguf(path, lora_weights(model), draft_gguf=pair.draft_gguf, alpha=2 * rank,
                           n_head=model.config.num_attention_heads, n_head_kv=model.config.num_key_value_heads)


def test_the_merged_draft_computes_what_the_lora_computes(tiny_pair, cache, tmp_path):
    from duo.runtime.drafter import DraftConfig, Drafter, run, sync

    adapter = random_adapter(tiny_pair, tmp_path / "a.gguf", 0.3)
    merged = tmp_path / "merged.gguf"
    assert write_merged(tiny_pair.draft_gguf, adapter, merged, dtype=np.float32) == 7 * 2   # 7 modules x 2 layers
    tokens = [5, 17, 42, 99, 7, 3, 250, 11]

    def logits(gguf, lora=None):
        d = Drafter(DraftConfig(str(gguf), n_ctx=64, extra_bufts=False))
        try:
            if lora:
                d.set_adapter(str(lora))
            return run(sync(d, tokens))
        finally:
            d.close()
    plain, with_lora, with_merged = logits(tiny_pair.draft_gguf), logits(tiny_pair.draft_gguf, adapter), logits(merged)
    moved = np.abs(with_lora - plain).max()
    assert moved > 0.1 * np.abs(plain).max()                          # the adapter changes the draft a lot ...
    assert np.abs(with_merged - with_lora).max() < 1e-3 * moved       # ... and merged it changes it the same way


def test_an_engine_with_a_q4_0_draft_runs_the_adapter_merged(tiny_pair_q, cache, tmp_path):
    pair = pair_dir("target_hf", tiny_pair_q.draft_gguf)
    adapter = store.accept(pair, random_adapter(tiny_pair_q, store.new_adapter_path(pair), 0.01), {})
    kw = dict(device="cpu", mode="sequential", budget=8, progress=False, profile="off", output_cache=0, lookup=False)
    with Engine(str(tiny_pair_q.target_hf_dir), str(tiny_pair_q.draft_gguf), adapter="auto", **kw) as e:
        assert not e.adaptation.merge           # opt-in: requantizing to Q4_0 loses the adapter (adapt/merge.py)
        e.adaptation.merge = True
        plain = e._draft.cfg.gguf_path
        results = [e.generate(p, max_new_tokens=40) for p in PROMPTS]
        assert e._draft.cfg.gguf_path == str(merged_path(adapter)) and e._draft.adapter is None   # merged, no LoRA
        assert all(r.stats["adapter"] == str(adapter) for r in results)
        refs = []
        for p in PROMPTS:
            ids = e.encode(p)
            ref, ref_logits = reference_greedy(e.target, ids, 40)
            refs.append((cut_at_eos(ref, e.target.eos_ids), ref_logits))
        e.adaptation.adapter = "off"
        off = e.generate(PROMPTS[0], max_new_tokens=40)
        assert e._draft.cfg.gguf_path == plain and off.stats["adapter"] is None   # back to the plain draft
    for res, (ref, ref_logits), p in zip(results, refs, PROMPTS):
        assert_exact_or_near_tie(res.token_ids, ref, ref_logits, what=f"merged adapter {p!r}")
        assert res.stats["fallback"] is None and res.stats["accepted"] > 0
    assert merged_draft(tiny_pair_q.draft_gguf, adapter, progress=False) == merged_path(adapter)   # made once
