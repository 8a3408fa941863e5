"""Prometheus metrics of one server (their own registry, served at /metrics): requests, the queue, tokens,
latencies, and the speculative-decoding counters vLLM users know (num_drafts, num_draft_tokens,
num_accepted_tokens, accepted tokens per position)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("duo_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.queue_length = Gauge("duo_queue_length", "requests waiting for the engine", registry=r)
        self.running = Gauge("duo_running", "generations running (0 or 1)", registry=r)
        self.generations = Counter("duo_generations", "generations by outcome: finished, cancelled (the client "
                                   "went away), rejected (bad input), error", ["outcome"], registry=r)
        self.prompt_tokens = Counter("duo_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("duo_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("duo_time_to_first_token_seconds", "time to the first token, queue included",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("duo_time_per_output_token_seconds", "mean time per output token after the first",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("duo_e2e_request_latency_seconds", "request latency, queue included",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.num_drafts = Counter("duo_spec_decode_num_drafts", "verification passes over a drafted tree", registry=r)
        self.num_draft_tokens = Counter("duo_spec_decode_num_draft_tokens", "drafted tokens verified", registry=r)
        self.num_accepted_tokens = Counter("duo_spec_decode_num_accepted_tokens", "drafted tokens accepted",
                                           registry=r)
        self.accepted_per_pos = Counter("duo_spec_decode_num_accepted_tokens_per_pos",
                                        "rounds whose accepted path reached this depth", ["position"], registry=r)

    def record_generation(self, outcome: str, stats: dict, n_prompt: int, ttft_s: float | None,
                          e2e_s: float) -> None:
        """One generation, whatever its end (times from its arrival in the queue; ttft_s None: no token)."""
        n = stats.get("new_tokens", 0)
        self.generations.labels(outcome=outcome).inc()
        self.prompt_tokens.inc(n_prompt)
        self.generation_tokens.inc(n)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        self.e2e.observe(e2e_s)
        if n > 1 and ttft_s is not None:
            self.tpot.observe(max(0.0, e2e_s - ttft_s) / (n - 1))
        rounds = stats.get("rounds", 0)
        if stats.get("drafted"):
            self.num_drafts.inc(rounds - stats.get("plain_steps", 0))
            self.num_draft_tokens.inc(stats["drafted"])
            self.num_accepted_tokens.inc(stats.get("accepted", 0))
            for d, share in enumerate(stats.get("accepted_per_position", [])):
                self.accepted_per_pos.labels(position=str(d)).inc(round(share * rounds))

    def text(self) -> bytes:
        return generate_latest(self.registry)
