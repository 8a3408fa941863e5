"""`duo serve` (issue 18): the OpenAI routes on the tiny pair, their errors, authentication, the scheduler's
queue / timeout / cancellation, and logprobs that are the target's own distribution."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from duo import Engine  # noqa: E402
from duo.serve.app import create_app  # noqa: E402
from duo.serve.metrics import Metrics  # noqa: E402
from duo.serve.scheduler import Job, Scheduler  # noqa: E402
from duo.serve.schemas import APIError, GenRequest  # noqa: E402

MSGS = [{"role": "user", "content": "def fibonacci(n):"}]


@pytest.fixture(scope="module")
def engine(tiny_pair):
    with Engine(str(tiny_pair.target_hf_dir), str(tiny_pair.draft_gguf), device="cpu", mode="sequential", budget=8,
                progress=False, profile="off", output_cache=0) as e:
        yield e


@pytest.fixture(scope="module")
def client(engine):
    app = create_app(engine, model_name="tiny", max_body_bytes=4096)
    with TestClient(app) as c:
        yield c


def test_models_health_and_metrics(client):
    assert client.get("/health").json()["status"] == "ok"
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]
    client.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 8, "temperature": 0})
    text = client.get("/metrics").text
    for name in ("duo_requests_total", "duo_queue_length", "duo_prompt_tokens_total", "duo_generation_tokens_total",
                 "duo_time_to_first_token_seconds_bucket", "duo_spec_decode_num_drafts_total",
                 "duo_spec_decode_num_draft_tokens_total", "duo_spec_decode_num_accepted_tokens_total",
                 "duo_spec_decode_num_accepted_tokens_per_pos_total", 'duo_generations_total{outcome="finished"}'):
        assert name in text, name
    assert 'endpoint="/v1/chat/completions",status="200"' in text


def test_chat_completion_is_the_engines_answer_with_the_targets_logprobs(client, engine):
    import torch
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MSGS, "max_tokens": 24,
                                                  "temperature": 0, "logprobs": True, "top_logprobs": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = engine.generate(MSGS, max_new_tokens=24)
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": ref.text}
    assert choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] == len(ref.token_ids)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + len(ref.token_ids)
    assert body["duo"]["accepted"] > 0 and body["duo"]["fallback"] is None    # it speculated
    content = choice["logprobs"]["content"]
    assert len(content) == len(ref.token_ids)
    # the target's own log-softmax at each emitted token, from one plain forward pass over the answer
    ids = engine.encode(MSGS)
    with torch.inference_mode():
        logits = engine.target.model(input_ids=torch.tensor([ids + ref.token_ids])).logits[0].float()
    lp = torch.log_softmax(logits[len(ids) - 1:-1], dim=-1)
    for k, (tok, entry) in enumerate(zip(ref.token_ids, content)):
        assert entry["logprob"] == pytest.approx(float(lp[k, tok]), abs=1e-3)
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry["logprob"] == pytest.approx(tops[0], abs=1e-4)            # greedy: the likeliest
    assert any(e["logprob"] < -1e-3 for e in content)                            # not placeholders


def test_streaming_chunks_join_to_the_same_answer(client):
    req = {"messages": MSGS, "max_tokens": 24, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=req).json()
    with client.stream("POST", "/v1/chat/completions",
                       json={**req, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_text_completion_and_seeded_sampling(client):
    r = client.post("/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 16, "temperature": 0,
                                             "logprobs": 2, "stop": ["\n\n"]})
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert r.json()["object"] == "text_completion" and isinstance(c["text"], str)
    assert len(c["logprobs"]["tokens"]) == len(c["logprobs"]["token_logprobs"]) == r.json()["usage"]["completion_tokens"]
    a = client.post("/v1/completions", json={"prompt": "x y", "max_tokens": 12, "temperature": 0.9, "seed": 7}).json()
    b = client.post("/v1/completions", json={"prompt": "x y", "max_tokens": 12, "temperature": 0.9, "seed": 7}).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


BAD = [
    ("not json", 400, "invalid_json", None),
    ([1, 2], 400, "invalid_json", None),
    ({"model": "gpt-4", "messages": MSGS}, 404, "model_not_found", "model"),
    ({"messages": MSGS, "temperature": "hot"}, 400, "invalid_type", "temperature"),
    ({"messages": MSGS, "temperature": 5}, 400, "invalid_value", "temperature"),
    ({"messages": MSGS, "top_p": 0}, 400, "invalid_value", "top_p"),
    ({"messages": MSGS, "n": 2}, 400, "unsupported", "n"),
    ({"messages": []}, 400, "invalid_value", "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value", "messages[0]"),
    ({"messages": MSGS, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ({"messages": MSGS, "stop": 5}, 400, "invalid_value", "stop"),
    ({"messages": MSGS, "top_logprobs": 3}, 400, "invalid_value", "top_logprobs"),
    ({"messages": MSGS, "presence_penalty": 1.0}, 400, "unsupported", "presence_penalty"),
    ({"messages": [{"role": "user", "content": "word " * 1000}]}, 413, "body_too_large", None),
]


@pytest.mark.parametrize("body,status,code,param", BAD, ids=[f"{b[1]}-{b[2]}-{b[3]}" for b in BAD])
def test_bad_input_gets_an_openai_error(client, body, status, code, param):
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    r = client.post("/v1/chat/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == param and err["message"] and "Traceback" not in r.text
    assert client.get("/health").status_code == 200                             # the server lives on


def test_a_prompt_longer_than_the_context_and_unknown_routes(engine):
    app = create_app(engine, model_name="tiny", max_body_bytes=1 << 22)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": "a b " * (engine.context + 10), "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        r = c.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = c.get("/v1/chat/completions")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_an_api_key_is_required_when_set(engine):
    with TestClient(create_app(engine, model_name="tiny", api_key="s3cret")) as c:
        assert c.get("/health").status_code == 200
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


# ------------------------------------------------------------------------------------------ the scheduler
class FakeEngine:
    """Rounds of one token every `round_s`; `gate` holds the first round until set."""

    def __init__(self, round_s=0.01, gate=None):
        self.round_s, self.gate, self.rounds, self.runs = round_s, gate, 0, 0

    def encode(self, prompt, chat=None):
        return [1, 2, 3]

    def stream_tokens(self, ids, max_new_tokens, stats, **kw):
        self.runs += 1
        if self.gate is not None:
            self.gate.wait(10)
        for i in range(max_new_tokens):
            time.sleep(self.round_s)
            self.rounds += 1
            stats.new_tokens += 1
            yield [i], "x"
        stats.stop_reason = "length"


def _req(n=50):
    return GenRequest(MSGS, True, max_tokens=n)


def test_scheduler_queue_full_timeout_cancel_and_shutdown():
    async def main():
        loop = asyncio.get_running_loop()
        gate = threading.Event()
        eng = FakeEngine(gate=gate)
        metrics = Metrics()
        s = Scheduler(eng, max_queue=2, queue_timeout_s=0.3, metrics=metrics)
        running, w1, w2 = (Job(_req(3), loop) for _ in range(3))
        s.submit(running)
        while not s.busy:
            await asyncio.sleep(0.01)
        s.submit(w1)
        s.submit(w2)
        with pytest.raises(APIError) as e:                       # two wait: the third is refused
            s.submit(Job(_req(), loop))
        assert e.value.status == 429 and e.value.headers["Retry-After"]
        await asyncio.sleep(0.4)                                 # w1 and w2 wait past the timeout
        gate.set()
        events = [await running.events.get() for _ in range(5)]
        assert [ev[0] for ev in events] == ["start", "delta", "delta", "delta", "done"]
        for w in (w1, w2):
            ev = await w.events.get()
            assert ev[0] == "error" and ev[1].status == 503 and ev[1].code == "queue_timeout"
        # cancelling mid-generation stops it after the round under way, and frees the engine
        eng.gate, eng.rounds = None, 0
        job = Job(_req(500), loop)
        s.submit(job)
        while (await job.events.get())[0] != "delta":
            pass
        job.cancel.set()
        at = eng.rounds
        while (ev := await job.events.get())[0] == "delta":
            pass
        assert ev[0] == "done" and ev[1]["stop_reason"] == "cancelled" and eng.rounds <= at + 2
        nxt = Job(_req(2), loop)
        s.submit(nxt)
        assert (await nxt.events.get())[0] == "start"
        count = lambda outcome: metrics.registry.get_sample_value("duo_generations_total", {"outcome": outcome})  # noqa: E731
        assert count("cancelled") == 1 and count("finished") == 1    # the cancelled one is counted, as cancelled
        assert metrics.registry.get_sample_value("duo_generation_tokens_total") >= 3 + at
        # shutting down: a job still waiting gets an error, none is left without an answer
        eng.gate = threading.Event()
        held, waiting = Job(_req(2), loop), Job(_req(2), loop)
        s.submit(held)
        s.submit(waiting)
        closer = threading.Thread(target=s.close)
        closer.start()
        eng.gate.set()
        await asyncio.sleep(0.2)
        closer.join(5)
        got = []
        while not waiting.events.empty():
            got.append(await waiting.events.get())
        assert got and got[-1][0] == "error" and got[-1][1].code == "shutting_down"
    asyncio.run(main())
