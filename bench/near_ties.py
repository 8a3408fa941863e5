"""Greedy divergences of duo from the target alone on two MT-bench prompts (bf16): where they part, the
reference top-2 gap there, and the batched-vs-one-token logit noise (the bound a near-tie is judged by).
Run: python -m bench.near_ties (writes nothing)."""
import torch

from bench import datasets as ds
from duo import Engine


def main() -> None:
    torch.set_num_threads(2)
    plist = ds.load("mt-bench", 3)
    with Engine(dtype="bfloat16", progress=False) as e:
        tm = e.target
        print("plan", e.plan.mode, e.plan.budget, e.plan.width)
        for i in (0, 1):
            ids = e.encode(plist[i].messages)
            with torch.inference_mode():
                out = tm.model.generate(torch.tensor([ids]), max_new_tokens=128, do_sample=False, eos_token_id=list(tm.eos_ids),
                                        pad_token_id=list(tm.eos_ids)[0], output_logits=True, return_dict_in_generate=True,
                                        attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            ref = out.sequences[0, len(ids):].tolist(); logits = [l[0].float() for l in out.logits]
            got = e.generate(plist[i].messages, max_new_tokens=128).token_ids
            k = next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), None)
            with torch.inference_mode():
                batched = tm.model(input_ids=torch.tensor([ids + ref[:-1]])).logits[0, len(ids) - 1:].float()
            noise = float((batched - torch.stack(logits)).abs().max())
            top = torch.topk(logits[k], 2) if k is not None else None
            print(f"prompt {i}: diverge at {k}: duo {got[k] if k is not None else None} ref {ref[k] if k is not None else None}; "
                  f"ref top-2 {top.indices.tolist() if top is not None else None} gap {float(top.values[0]-top.values[1]) if top is not None else None:.4g}; "
                  f"batched-vs-step noise max {noise:.4g}, at divergence {float((batched[k]-logits[k]).abs().max()) if k is not None else 0:.4g}", flush=True)


if __name__ == "__main__":
    main()
