"""`duo adapt`'s training: a LoRA on the draft's torch weights, learning the target from the record buffer.

Per answer token i (row r = the position before it), with q = the draft's softmax and p = the target's
top-K probabilities renormalised over its K tokens (HASS), w_i = rejected_weight where the draft's tree
was rejected (OSD's positions), 1 elsewhere:

    loss = sum_i w_i * ( -log q(t_i)  +  top_k_weight * -sum_{k in topK} p_k log q_k ) / sum_i w_i

Agreement, the number that decides: the share of held-out answer tokens where the draft's argmax is the
target's token (teacher-forced), before (adapter disabled) and after each epoch. The best epoch's adapter
is kept, and only if it beats the plain draft (early stopping on the held-out records). Checkpoints every
`checkpoint_every` steps make a stopped run resumable (same records, same settings); Ctrl-C saves one and leaves the pair's accepted adapter as it was.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .buffer import Record

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdaptConfig:
    rank: int = 8                 # rank 8 at lr 1e-4 kept an adapter on GSM8K where 16 at 3e-4 overfit (issue 19)
    alpha: float = 16.0           # 2 x rank, as `duo adapt` sets it
    lr: float = 1e-4
    epochs: int = 2
    max_len: int = 384            # tokens per record fed to the draft (the answer and the prompt's tail)
    top_k_weight: float = 1.0     # HASS's top-K term
    rejected_weight: float = 3.0  # OSD: the positions the draft got wrong weigh this much
    max_minutes: float = 20.0     # training stops here (then evaluates what it has)
    threads: int | None = None    # torch threads (None: all cores)
    bf16: bool | None = None      # bfloat16 autocast for the matmuls; None: where the hardware has it natively
    checkpoint_every: int = 20
    seed: int = 0
    modules: tuple = TARGET_MODULES   # the projections adapted (each costs llama.cpp ~4 small ops per layer per step)
    last_layers: int = 8          # adapt only the last N decoder layers (0: all). Per draft token on 2 threads
    # (Q4_0 0.5B, 13.5 ms): all 24 layers' LoRA cost +3.5-4.5 ms, the last 8 +0.3 ms (llama.cpp runs ~4 small ops per matrix)


@dataclass
class AdaptResult:
    kept: bool
    agreement_before: float       # held-out: draft argmax == target token, without the adapter
    agreement_after: float        # ... with it
    rejected_before: float        # the same at the held-out positions where the draft had been rejected
    rejected_after: float
    steps: int
    train_records: int
    test_records: int
    train_tokens: int
    loss_first: float
    loss_last: float
    wall_s: float
    peak_rss_mib: float
    resumed_from: int = 0         # the step a checkpoint resumed at (0: a fresh run)
    epoch_agreement: list = field(default_factory=list)   # held-out agreement after each epoch (or the time limit)
    best_step: int = 0            # the step whose adapter is kept (or would have been)
    interrupted: bool = False
    lora: dict = field(default_factory=dict, repr=False)   # module -> (A, B) numpy, when kept

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("lora")
        return d


def native_bf16(device) -> bool:
    """bfloat16 matmuls in hardware: a GPU that has them (not emulated), or a CPU with AVX512-BF16 / AMX-BF16
    (elsewhere torch emulates them, slower than float32)."""
    import torch
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_draft_torch(draft_gguf: Path, device: str = "cpu", progress: bool = False):
    """The draft's GGUF as a transformers model (the converted weights, cached once like a target's)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .. import models
    from ..gguf_file import quiet_transformers
    ref = models.resolve_target(str(draft_gguf), progress=progress)
    with quiet_transformers(False):
        model = AutoModelForCausalLM.from_pretrained(str(ref.hf_dir), dtype=torch.float32)
    return model.to(device)


def _rows(rec: Record, max_len: int):
    """The record's input ids (its tail of at most max_len tokens) and, per answer token kept, the row
    predicting it and its index in the answer."""
    start = max(0, len(rec.tokens) - max_len)
    first = max(rec.n_prompt, start + 1)           # the first answer token with a row before it
    idx = np.arange(first - rec.n_prompt, rec.n_out)
    return rec.tokens[start:], (idx + rec.n_prompt - 1 - start), idx


def record_loss(model, rec: Record, cfg: AdaptConfig, device):
    """The weighted loss of one record (a scalar tensor) and its answer-token count."""
    import torch
    ids, rows, idx = _rows(rec, cfg.max_len)
    x = torch.as_tensor(ids, device=device)[None]
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        hidden = model.get_base_model().model(input_ids=x).last_hidden_state[0, torch.as_tensor(rows, device=device)]
        logits = model.get_base_model().lm_head(hidden)
    logq = torch.log_softmax(logits.float(), -1)
    tgt = torch.as_tensor(rec.tokens[rec.n_prompt + idx], device=device)
    ce = -logq.gather(1, tgt[:, None])[:, 0]
    top_ids = torch.as_tensor(rec.top_ids[idx], device=device)
    p = torch.softmax(torch.as_tensor(rec.top_logp[idx], device=device), -1)     # renormalised over its K
    top = -(p * logq.gather(1, top_ids)).sum(-1)
    w = 1.0 + (cfg.rejected_weight - 1.0) * torch.as_tensor(rec.rejected[idx], device=device, dtype=torch.float32)
    return (w * (ce + cfg.top_k_weight * top)).sum() / w.sum(), len(idx)


def agreement(model, records: list[Record], cfg: AdaptConfig, device) -> tuple[float, float]:
    """(share of answer tokens where the draft's argmax is the target's token, the same at rejected positions)."""
    import torch
    hit = n = hit_r = n_r = 0
    with torch.inference_mode():
        for rec in records:
            ids, rows, idx = _rows(rec, cfg.max_len)
            x = torch.as_tensor(ids, device=device)[None]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = model(input_ids=x).logits[0, torch.as_tensor(rows, device=device)]
            ok = (logits.float().argmax(-1).cpu().numpy() == rec.tokens[rec.n_prompt + idx])
            rej = rec.rejected[idx]
            hit, n = hit + int(ok.sum()), n + len(ok)
            hit_r, n_r = hit_r + int(ok[rej].sum()), n_r + int(rej.sum())
    return hit / max(1, n), hit_r / max(1, n_r)


def lora_weights(model) -> dict:
    """{hf module name: (A (r, in), B (out, r))} of a peft model, as float32 numpy."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            base = name.split("base_model.model.", 1)[-1]
            out[base] = (mod.lora_A["default"].weight.detach().float().cpu().numpy(),
                         mod.lora_B["default"].weight.detach().float().cpu().numpy())
    return out


def lora_config(cfg: AdaptConfig, n_layers: int):
    """peft's LoraConfig for cfg: its modules in the last cfg.last_layers of n_layers decoder layers (0: all)."""
    from peft import LoraConfig
    layers = list(range(max(0, n_layers - cfg.last_layers), n_layers)) if cfg.last_layers else None
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(cfg.modules), layers_to_transform=layers)


def run_key(train: list[Record], cfg: AdaptConfig) -> str:
    """What a checkpoint must match to be resumed: the training records and the settings."""
    h = hashlib.sha256(json.dumps([r.name for r in train]).encode())
    h.update(json.dumps({k: v for k, v in asdict(cfg).items() if k not in ("max_minutes", "threads")},
                        sort_keys=True).encode())
    return h.hexdigest()[:16]


def train_adapter(draft_gguf: Path, train: list[Record], test: list[Record], cfg: AdaptConfig, work_dir: Path,
                  progress: bool = True, model=None) -> AdaptResult:
    """Train, evaluate before/after on `test`, return the result (with the LoRA weights when kept)."""
    import torch
    from peft import get_peft_model
    from tqdm import tqdm

    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    base = model if model is not None else load_draft_torch(draft_gguf)
    device = next(base.parameters()).device
    if cfg.bf16 is None:
        cfg = replace(cfg, bf16=native_bf16(device))
    peft_model = get_peft_model(base, lora_config(cfg, base.config.num_hidden_layers))
    with peft_model.disable_adapter():
        before, rej_before = agreement(peft_model, test, cfg, device)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    order = [i for _ in range(cfg.epochs) for i in random.Random(cfg.seed).sample(range(len(train)), len(train))]
    total = len(order)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, total)))))
    key, ckpt = run_key(train, cfg), Path(work_dir) / "checkpoint.pt"
    step, losses, resumed, interrupted = 0, [], 0, False
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        if state.get("key") == key:
            peft_model.load_state_dict(state["lora"], strict=False)
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            step = resumed = state["step"]
            losses = state["losses"]

    def save_checkpoint():
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        lora = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
        torch.save({"key": key, "lora": lora, "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                    "losses": losses}, ckpt.with_suffix(".part"))
        ckpt.with_suffix(".part").replace(ckpt)

    best = {"agreement": before, "rejected": rej_before, "step": 0, "lora": {}}
    seen = []                         # (agreement, at rejected positions) after each epoch

    def evaluate():                   # held-out agreement now; remember the best adapter so far
        peft_model.eval()
        ag, rej = agreement(peft_model, test, cfg, device)
        seen.append((ag, rej))
        if ag > best["agreement"]:
            best.update(agreement=ag, rejected=rej, step=step, lora=lora_weights(peft_model))
        peft_model.train()

    bar = tqdm(total=total, initial=step, desc="duo adapt", unit="rec", disable=not progress, dynamic_ncols=True)
    peft_model.train()
    try:
        while step < total and time.perf_counter() - t0 < 60 * cfg.max_minutes:
            loss, _ = record_loss(peft_model, train[order[step]], cfg, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            if step % cfg.checkpoint_every == 0:
                save_checkpoint()
            if step % len(train) == 0 and step < total:
                evaluate()
    except KeyboardInterrupt:
        interrupted = True
        save_checkpoint()
    finally:
        bar.close()
    if not interrupted:
        evaluate()
    peft_model.eval()
    kept = not interrupted and best["agreement"] > before
    after, rej_after = (best["agreement"], best["rejected"]) if kept else (seen or [(before, rej_before)])[-1]
    result = AdaptResult(kept=kept, agreement_before=before, agreement_after=after, rejected_before=rej_before,
                         rejected_after=rej_after, steps=step, train_records=len(train), test_records=len(test),
                         train_tokens=sum(r.n_out for r in train), loss_first=float(np.mean(losses[:10])) if losses else 0.0,
                         loss_last=float(np.mean(losses[-10:])) if losses else 0.0, wall_s=time.perf_counter() - t0,
                         peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, resumed_from=resumed,
                         interrupted=interrupted, epoch_agreement=[a for a, _ in seen], best_step=best["step"],
                         lora=best["lora"] if kept else {})
    if not interrupted:
        ckpt.unlink(missing_ok=True)       # finished: the next run starts afresh
    return result
