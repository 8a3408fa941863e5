"""Acceptance: duo's own decoding (sequential, no prompt lookup) with a chain and with the dynamic tree on the
calibration prompts; every verified node whose parent was accepted is one trial, giving the acceptance
hazard by depth and the share of paths through each root branch rank.

    Recorder            stands in for the DraftClient in generate_tokens and keeps every tree it hands out
    AcceptanceCounts    the trials, by depth and by root branch rank
    run_acceptance      decode every calibration prompt: the profile's `acceptance`
    decode_calibration  a draft worker for it, the channel round trip, then run_acceptance and the loop
                        overhead (what both a profile and a simulation's calibration measure)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .benchers import channel_round_trip, target_threads
from .timing import BenchError, Settings


class Recorder:
    """Stands in for the DraftClient in generate_tokens and keeps every tree it hands out."""

    def __init__(self, client):
        self.client = client
        self.trees: list = []
        self.draft_s = 0.0

    @property
    def stats(self):
        return self.client.stats

    def alive(self) -> bool:
        return self.client.alive()

    def start(self, prompt, *, overlap: bool, spec=None):
        return self.client.start(prompt, overlap=overlap, spec=spec)

    def catch_up(self, delta, timeout: float) -> bool:
        return self.client.catch_up(delta, timeout)

    def request_tree(self, delta, spec, timeout: float):
        t0 = time.perf_counter()
        tree = self.client.request_tree(delta, spec, timeout)
        self.draft_s += time.perf_counter() - t0
        self.trees.append(tree)
        return tree


@dataclass
class AcceptanceCounts:
    """Trials: a node whose parent (or the root) was accepted, so the target judged it."""
    tested: dict = field(default_factory=dict)        # depth -> greedy (rank 0) nodes judged
    accepted: dict = field(default_factory=dict)      # depth -> of which accepted
    rank_seen: dict = field(default_factory=dict)     # root branch rank -> rounds where it existed
    rank_accepted: dict = field(default_factory=dict)  # root branch rank -> rounds whose path went through it
    tree_rounds: int = 0                               # rounds of the dynamic-tree runs
    rounds: int = 0

    def add_round(self, tree, new: list[int], is_tree: bool) -> None:
        """`tree` as verified, `new` = the committed tokens of that round (path + bonus)."""
        kids = tree.children()
        depth = tree.depths()
        path, cur = [], -1
        for tok in new:
            nxt = next((c for c in kids[cur + 1] if int(tree.tokens[c]) == int(tok)), None)
            if nxt is None:
                break
            path.append(nxt)
            cur = nxt
        on_path = set(path)
        self.rounds += 1
        self.tree_rounds += is_tree
        for p in [-1] + path:
            ranked = sorted(kids[p + 1], key=lambda c: (-float(tree.probs[c]), c))
            for r, c in enumerate(ranked):
                ok = c in on_path
                if r == 0:
                    d = int(depth[c])
                    self.tested[d] = self.tested.get(d, 0) + 1
                    self.accepted[d] = self.accepted.get(d, 0) + ok
                if p == -1 and is_tree:
                    self.rank_seen[r] = self.rank_seen.get(r, 0) + 1
                    self.rank_accepted[r] = self.rank_accepted.get(r, 0) + ok

    def hazards(self, prior_weight: float = 2.0) -> tuple[list[float], float]:
        """h(d) = (accepted + w * pooled) / (tested + w), pooled = all depths >= 2; and the tail hazard."""
        if not self.tested:
            return [], 0.0
        deep_t = sum(v for d, v in self.tested.items() if d >= 2)
        deep_a = sum(v for d, v in self.accepted.items() if d >= 2)
        all_t, all_a = sum(self.tested.values()), sum(self.accepted.values())
        pooled = deep_a / deep_t if deep_t else (all_a / all_t if all_t else 0.0)
        hz = []
        for d in range(1, max(self.tested) + 1):
            t, a = self.tested.get(d, 0), self.accepted.get(d, 0)
            hz.append((a + prior_weight * pooled) / (t + prior_weight))
        return hz, pooled

    def ranks(self, width: int) -> list[float]:
        n = max(self.tree_rounds, 1)
        return [self.rank_accepted.get(r, 0) / n for r in range(width)]


def run_acceptance(tm, client, prompt_ids: list[list[int]], s: Settings, seq_threads: int, tick=None) -> dict:
    """Decode every calibration prompt (sequential, lookup off) with a chain and a dynamic tree."""
    from ..plan import TreeSpec
    from ..runtime.decode import DecodeConfig, Stats, generate_tokens
    from ..runtime.tree import prune_depth

    counts = AcceptanceCounts()
    runs = {}
    jobs = []
    for i, ids in enumerate(prompt_ids):
        shapes = ("chain", "tree") if s.both_shapes else (("chain", "tree")[i % 2],)
        jobs += [(ids, shape) for shape in shapes]
    for ids, shape in jobs:
        budget, width = (s.chain_budget, 1) if shape == "chain" else (s.tree_budget, s.tree_width)
        cfg = DecodeConfig(max_new_tokens=s.max_new_tokens, mode="sequential",
                           tree=TreeSpec(budget, width, "chain" if shape == "chain" else "dynamic"), lookup=False,
                           draft_timeout_s=120.0, pause_when_slower=False)   # every round speculates: each is a trial
        rec, stats, news = Recorder(client), Stats(), []
        with target_threads(seq_threads, None):
            for new in generate_tokens(tm, rec, ids, cfg, stats):
                news.append(new)
        if stats.fallback:
            raise BenchError(f"the draft worker failed during calibration: {stats.fallback}")
        done = len(news[0])   # the first token comes from the prefill, each later commit from one round's tree
        for k, (tree, new) in enumerate(zip(rec.trees, news[1:])):
            remaining = s.max_new_tokens - done
            done += len(new)
            if k == len(news) - 2 or any(t in tm.eos_ids for t in new):
                continue  # truncated by EOS or the token limit: not a clean trial
            verified = prune_depth(tree if tm.supports_tree else tree.top_chain(), remaining - 1)
            counts.add_round(verified, new, shape == "tree")
        _add_decode(runs.setdefault(shape, dict(budget=budget, width=width, prompts=0, rounds=0, tokens=0,
                                                decode_s=0.0, verify_s=0.0, draft_wait_s=0.0, other_s=0.0,
                                                accepted_per_position=[])), stats)
        if tick:
            tick()
    for r in runs.values():
        _per_round(r)
    hz, tail = counts.hazards()
    return dict(hazard=hz, tail=tail, rank=counts.ranks(s.tree_width),
                tested=[counts.tested.get(d, 0) for d in range(1, len(hz) + 1)],
                accepted=[counts.accepted.get(d, 0) for d in range(1, len(hz) + 1)],
                rank_seen=[counts.rank_seen.get(r, 0) for r in range(s.tree_width)],
                rank_accepted=[counts.rank_accepted.get(r, 0) for r in range(s.tree_width)],
                rounds=counts.rounds, tree_rounds=counts.tree_rounds, prompts=len(prompt_ids),
                max_new_tokens=s.max_new_tokens, runs=runs)


def _add_decode(r: dict, stats) -> None:
    """One decode's decode.Stats into its shape's run totals."""
    r["prompts"] += 1
    r["rounds"] += stats.rounds
    r["tokens"] += stats.new_tokens - 1       # the rounds' tokens (the first one is the prefill's)
    r["decode_s"] += stats.wall_s - stats.prefill_s
    r["verify_s"] += stats.verify_s
    r["draft_wait_s"] += stats.target_idle_s
    r["other_s"] += max(0.0, stats.wall_s - stats.prefill_s - stats.verify_s - stats.target_idle_s)
    app = r["accepted_per_position"]
    app += [0] * (len(stats.accepted_per_position) - len(app))
    for d, a in enumerate(stats.accepted_per_position):
        app[d] += a


def _per_round(r: dict) -> None:
    """A run's totals per round (and per second): tokens_per_round, tokens_per_s, P_depth, *_ms_per_round."""
    n = max(r["rounds"], 1)
    r["tokens_per_round"] = r["tokens"] / n
    r["tokens_per_s"] = r["tokens"] / r["decode_s"] if r["decode_s"] > 0 else 0.0
    r["P_depth"] = [a / n for a in r["accepted_per_position"]]  # P(accepted depth >= d), this run
    for k in ("verify_s", "draft_wait_s", "other_s"):
        r[k.replace("_s", "_ms_per_round")] = 1000 * r[k] / n


def overhead_ms(acceptance: dict) -> float:
    """Host ms per decoding round outside verification and waiting for the draft, over all calibration runs."""
    runs = acceptance["runs"].values()
    return round(sum(r["other_s"] for r in runs) * 1000 / max(1, sum(r["rounds"] for r in runs)), 4)


def decode_calibration(tm, draft_gguf, prompt_ids: list[list[int]], s: Settings, draft_threads: int,
                       seq_threads: int, bar, what: str = "acceptance (decoding calibration prompts)") -> dict:
    """A draft worker of `draft_threads` threads sized for the calibration prompts; its channel round trip, then
    run_acceptance with the target on `seq_threads` threads. {channel, acceptance, overhead_ms}; `bar` ticks
    once for the channel and once per decoded prompt and shape, described by `what` while decoding."""
    from ..runtime.draft_client import DraftClient, DraftConfig

    bar.set_description("channel round trip")
    longest = max(len(p) for p in prompt_ids) + s.max_new_tokens + max(s.chain_budget, s.tree_budget) + 8
    cfg = DraftConfig(gguf_path=str(draft_gguf), n_threads=draft_threads, n_ctx=max(512, longest), max_nodes=64,
                      max_seqs=max(8, s.tree_width + 1))
    with DraftClient(cfg) as client:
        channel = channel_round_trip(client, s.ping_reps)
        bar.update(1)
        bar.set_description(what)
        acceptance = run_acceptance(tm, client, prompt_ids, s, seq_threads, tick=lambda: bar.update(1))
    return dict(channel=channel, acceptance=acceptance, overhead_ms=overhead_ms(acceptance))
