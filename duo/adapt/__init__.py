"""The draft learns its target (issue 19): OSD-style online distillation with HASS's top-K objective,
trained as a LoRA adapter in torch and applied to the running llama.cpp draft.

    record      Engine(record=True): each generation's tokens, the target's top-K at every emitted token
                (from the verification passes it ran anyway) and where the draft's tree was rejected, into
                a bounded buffer per model pair (buffer.py)
    train       `duo adapt`: a LoRA on the draft's torch weights (peft), loss = the target's token + HASS
                top-K cross-entropy, rejected positions weighted up (OSD); kept only if the draft agrees
                with the target more often on held-out records (train.py)
    export      the adapter in llama.cpp's GGUF LoRA format, with the draft it was trained for (lora_gguf.py)
    apply       Engine(adapter="auto"|PATH|"off"): the worker swaps it in between generations, no restart
                (store.py finds the pair's latest accepted adapter)
    online      with recording on, adaptation runs by itself in a background process while the engine is
                idle, paused whenever a generation runs (online.py)

The target is never changed: every output stays the target's own, whatever adapter the draft has.
"""
