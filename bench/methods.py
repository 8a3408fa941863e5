"""The bench's methods, in one table (METHOD_TABLE), each built into one interface: `run(ids, max_new) -> Sample`
(the prompt's token ids in, at most max_new new tokens out, timed).

    target             transformers generate, the target alone: the baseline of every ratio and the reference
                       of every exactness check (under a simulated accelerator: duo's target-only engine)
    hf-assisted        transformers assisted generation, with the draft's weights as a transformers model
    hf-prompt-lookup   transformers prompt-lookup decoding (10 tokens)
    duo-sequential     duo, the draft and the target taking turns
    duo-overlap        duo, the draft drafting while the target verifies
    duo                duo as `duo run` runs it (mode auto: the saved profile's plan)
    rest               REST as its authors run it: the datastore's trie alone drafts, no draft model, no prompt
                       lookup, no output cache (needs --datastore); not by default
    llama-cpp          a peer, not a baseline: the target's GGUF alone in llama.cpp, greedy (bench.llama_peer);
                       another model than the torch target (quantized), so no exactness check; not by default

Options follow '@', comma-separated: 'duo-sequential@chain,nolookup,b=8,w=2' (see parse_method) sets the
tree shape, turns the prompt lookup off, fixes the budget and the width for that method; 'noretrieval'
leaves the datastore and the output cache out (duo methods remember their earlier answers of the run,
never a warm-up's: no answer finds its own prompt's answer in the cache).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from duo.runtime.tree_shapes import SHAPES

from .sample import Sample


Runner = Callable[..., Sample]   # run(ids, max_new, warmup=False) -> Sample; a warm-up is not remembered


@dataclass
class Shared:
    """What the methods run with: one target in memory, the engines, the assistant model, the sampling."""
    engines: dict = field(default_factory=dict)   # "target": the target-only engine; a duo method: its own
    target: Any = None          # the real target model (duo.runtime.target), loaded once, shared by every engine
    assistant: Any = None       # hf-assisted's assistant (transformers)
    llama_gguf: Any = None      # llama-cpp: the target's GGUF (set when the method is asked for)
    llama: Any = None           # llama-cpp: its bench.llama_peer.LlamaPeer, made when first used
    simulated: bool = False     # SIMULATION: the target is replayed, timed like an accelerator
    temperature: float = 0.0    # 0: greedy
    seed: int = 0

    @property
    def base(self):
        return self.engines["target"]

    def duo_sampling(self) -> dict:
        return dict(temperature=self.temperature, seed=self.seed) if self.temperature > 0 else {}

    def hf_sampling(self) -> dict:
        return dict(do_sample=True, temperature=self.temperature) if self.temperature > 0 else {}

    def close(self) -> None:
        for e in self.engines.values():
            e.close()
        if self.llama is not None:
            self.llama.close()

    def llama_peer(self):
        """llama-cpp's peer, made on first use (the model loads on its first answer), closed by close()."""
        if self.llama is None:
            from .llama_peer import LlamaPeer
            self.llama = LlamaPeer(self.llama_gguf)
        return self.llama


def hf_generate(model, ids, max_new, eos, **kw) -> Sample:
    """transformers generate (greedy unless kw samples); TTFT measured with a one-token call beforehand is not fair, so
    TTFT here is the prefill+first step timed by a streamer."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.t, self.n = None, 0

        def put(self, value):
            self.n += 1
            if self.n == 2 and self.t is None:   # first put is the prompt
                self.t = time.perf_counter()

        def end(self):
            pass

    s = FirstToken()
    x = torch.tensor([ids], device=model.device)
    t0 = time.perf_counter()
    kw.setdefault("do_sample", False)     # greedy unless the caller samples (do_sample=True, temperature=...)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                         eos_token_id=list(eos), pad_token_id=list(eos)[0], streamer=s, **kw)
    wall = time.perf_counter() - t0
    toks = out[0, len(ids):].tolist()
    return Sample(toks, wall, (s.t or time.perf_counter()) - t0)


def duo_sample(engine, ids, max_new, **kw) -> Sample:
    """One answer from a duo Engine, with its stats, the draft worker's overlap hits and misses during it and,
    under a simulated accelerator, the accelerator's idle time between passes (duo.runtime.simulate)."""
    from duo.runtime.decode import Stats

    stats = Stats()
    toks: list[int] = []
    d0 = engine.draft_stats()
    sim = engine.accelerator_counters()
    s0 = (sim.idle_s, sim.gaps) if sim else None
    t0 = time.perf_counter()
    for new, _ in engine.stream_tokens(ids, max_new_tokens=max_new, stats=stats, **kw):
        toks += new
    wall = time.perf_counter() - t0
    out = stats.as_dict()
    d1 = engine.draft_stats() if d0 is not None else None
    if d1 is not None:   # the worker's overlap hits (trees drafted ahead and used)
        out["overlap_hits"] = max(0, d1.overlap_hits - d0.overlap_hits)
        out["overlap_misses"] = max(0, d1.overlap_misses - d0.overlap_misses)
    if sim:   # SIMULATED accelerator: its idle time between passes, steady state
        sim = engine.accelerator_counters()
        out["accelerator_idle_s"], out["accelerator_gaps"] = sim.idle_s - s0[0], sim.gaps - s0[1]
    return Sample(toks, wall, stats.ttft_s, out)


# ------------------------------------------------------------------------------------------- the table
def _target(s: Shared, name: str, opts: dict) -> Runner:
    if s.simulated or opts:   # duo's own decoding on the target-only engine (replayed, timed like the accelerator)
        return _duo(s, name, opts)
    return lambda ids, max_new, warmup=False: hf_generate(s.target.model, ids, max_new, s.target.eos_ids,
                                                          **s.hf_sampling())


def _hf_assisted(s: Shared, name: str, opts: dict) -> Runner:
    _no_options(name, opts)
    return lambda ids, max_new, warmup=False: hf_generate(s.target.model, ids, max_new, s.target.eos_ids,
                                            assistant_model=s.assistant, **s.hf_sampling())


def _hf_prompt_lookup(s: Shared, name: str, opts: dict) -> Runner:
    _no_options(name, opts)
    return lambda ids, max_new, warmup=False: hf_generate(s.target.model, ids, max_new, s.target.eos_ids,
                                            prompt_lookup_num_tokens=10, **s.hf_sampling())


def _llama_cpp(s: Shared, name: str, opts: dict) -> Runner:
    _no_options(name, opts)
    if s.llama_gguf is None:
        raise ValueError("method llama-cpp needs a GGUF target (a .gguf file or an alias)")
    return lambda ids, max_new, warmup=False: s.llama_peer().run(ids, max_new, s.target.eos_ids)


def _no_options(name: str, opts: dict) -> None:
    if opts:
        raise ValueError(f"method {name} takes no options: they are duo's (duo-sequential, duo-overlap, duo)")


def _duo(s: Shared, name: str, opts: dict) -> Runner:
    return lambda ids, max_new, warmup=False: duo_sample(s.engines[name], ids, max_new, remember=not warmup,
                                                         **s.duo_sampling(), **opts)


def _rest(s: Shared, name: str, opts: dict) -> Runner:
    _no_options(name, opts)
    return lambda ids, max_new, warmup=False: duo_sample(s.engines[name], ids, max_new, model_draft=False,
                                                         lookup=False, remember=False, **s.duo_sampling())


@dataclass(frozen=True)
class Method:
    """One method: how it is built from the shared models, and where it applies."""
    name: str
    build: Callable[[Shared, str, dict], Runner]   # (shared, name, options) -> run(ids, max_new)
    duo_mode: str | None = None     # runs on an Engine of its own, in this mode
    default: bool = True            # in the default list (without a simulated accelerator)
    simulated: bool = False         # runs against a simulated accelerator (the default list there)
    peer: bool = False              # another model than the torch target: no exactness check, never a baseline


METHOD_TABLE: dict[str, Method] = {m.name: m for m in (
    Method("target", _target, simulated=True),
    Method("hf-assisted", _hf_assisted),
    Method("hf-prompt-lookup", _hf_prompt_lookup),
    Method("duo-sequential", _duo, duo_mode="sequential", simulated=True),
    Method("duo-overlap", _duo, duo_mode="overlap", default=False, simulated=True),
    Method("duo", _duo, duo_mode="auto", simulated=True),
    Method("rest", _rest, duo_mode="sequential", default=False),
    Method("llama-cpp", _llama_cpp, default=False, peer=True),
)}
METHODS = tuple(METHOD_TABLE)
DUO_MODES = {n: m.duo_mode for n, m in METHOD_TABLE.items() if m.duo_mode}
SIMULATED_METHODS = tuple(n for n, m in METHOD_TABLE.items() if m.simulated)
PEER_METHODS = tuple(n for n, m in METHOD_TABLE.items() if m.peer)


def default_methods(simulated: bool = False) -> list[str]:
    """What `duo bench` runs without --methods."""
    return [n for n, m in METHOD_TABLE.items() if (m.simulated if simulated else m.default)]


def parse_method(m: str) -> tuple[str, dict]:
    """'duo-sequential@chain,nolookup,b=8,w=2' -> ('duo-sequential', {shape, lookup, budget, width}); noretrieval."""
    name, _, spec = m.partition("@")
    opts: dict = {}
    for o in filter(None, spec.split(",")):
        if o in SHAPES:
            opts["shape"] = o
        elif o == "nolookup":
            opts["lookup"] = False
        elif o == "noretrieval":
            opts["retrieval"] = False
        elif o.startswith("b="):
            opts["budget"] = int(o[2:])
        elif o.startswith("w="):
            opts["width"] = int(o[2:])
        else:
            raise ValueError(f"unknown method option {o!r} in {m!r}: use {'|'.join(SHAPES)}|nolookup|noretrieval|b=N|w=N")
    return name, opts


def runner(m: str, shared: Shared) -> Runner:
    """run(ids, max_new) for a method as named on the command line ('duo-sequential@chain,b=8')."""
    name, opts = parse_method(m)
    return METHOD_TABLE[name].build(shared, name, opts)
