"""`duo serve` as a real process on the tiny pair, driven by the official `openai` client and raw HTTP:
streaming equals non-streaming, greedy equals Engine.generate, seeded sampling, stop strings, 8 concurrent
clients all answered exactly, a disconnect frees the engine, the API key, and a clean exit on SIGTERM and
SIGINT (no child process, no shared memory left)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

from duo import Engine  # noqa: E402

pytestmark = pytest.mark.slow
MSGS = [{"role": "user", "content": "def fibonacci(n):"}]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tiny_pair, *extra):
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "duo", "serve", "--model", str(tiny_pair.target_hf_dir),
                             "--draft", str(tiny_pair.draft_gguf), "--device", "cpu", "--profile", "off",
                             "--budget", "8", "--output-cache", "0", "--port", str(port), *extra],
                            stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "ready:" in line:
            threading.Thread(target=lambda: [lines.append(x) for x in proc.stderr], daemon=True).start()
            return proc, f"http://127.0.0.1:{port}", lines
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail(f"duo serve did not start: {''.join(lines)}")


def segments(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"duo_{pid}_")] if os.path.isdir("/dev/shm") else []


@pytest.fixture(scope="module")
def server(tiny_pair):
    proc, url, lines = start(tiny_pair)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def reference(tiny_pair):
    with Engine(str(tiny_pair.target_hf_dir), str(tiny_pair.draft_gguf), device="cpu", budget=8, profile="off",
                progress=False, output_cache=0) as e:
        return e.generate(MSGS, max_new_tokens=32).text


def test_openai_client_stream_equals_whole_equals_engine(server, reference):
    _, url = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    model = client.models.list().data[0].id
    whole = client.chat.completions.create(model=model, messages=MSGS, max_tokens=32, temperature=0)
    assert whole.choices[0].message.content == reference
    assert whole.usage.completion_tokens > 0
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=whole.model, messages=MSGS, max_tokens=32, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == reference
    a, b = (client.chat.completions.create(model=whole.model, messages=MSGS, max_tokens=24, temperature=0.8, seed=3)
            .choices[0].message.content for _ in range(2))
    assert a == b
    stopped = client.chat.completions.create(model=whole.model, messages=MSGS, max_tokens=32, temperature=0,
                                             stop=[reference[5:8]]).choices[0]
    assert stopped.message.content == reference[:reference.index(reference[5:8])] and stopped.finish_reason == "stop"


def test_eight_concurrent_clients_all_answered_exactly(server, reference):
    _, url = server
    got, errors = [], []

    def one():
        try:
            c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
            model = c.models.list().data[0].id
            for _ in range(2):
                got.append(c.chat.completions.create(model=model, messages=MSGS, max_tokens=32,
                                                     temperature=0).choices[0].message.content)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and got == [reference] * 16


def test_a_disconnect_mid_stream_frees_the_engine(server):
    _, url = server
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", f"{url}/v1/chat/completions",
                      json={"messages": MSGS, "max_tokens": 2000, "temperature": 0, "stream": True}) as r:
            n = 0
            for line in r.iter_lines():
                n += line.startswith("data:")
                if n >= 3:
                    break
        deadline = time.monotonic() + 10
        while c.get(f"{url}/health").json()["busy"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not c.get(f"{url}/health").json()["busy"], "the engine still generates for a client that left"
        r = c.post(f"{url}/v1/chat/completions", json={"messages": MSGS, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200
        bad = c.post(f"{url}/v1/chat/completions", content=b"{", headers={"Content-Type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_api_key_and_a_clean_exit(tiny_pair, sig):
    proc, url, lines = start(tiny_pair, "--api-key", "k3y")
    kids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    assert kids, "no draft worker process"
    with httpx.Client(timeout=60) as c:
        assert c.get(f"{url}/v1/models").status_code == 401
        assert c.get(f"{url}/v1/models", headers={"Authorization": "Bearer k3y"}).status_code == 200
    proc.send_signal(sig)
    assert proc.wait(30) is not None
    deadline = time.monotonic() + 5
    while any(psutil.pid_exists(k) and psutil.Process(k).status() != psutil.STATUS_ZOMBIE for k in kids) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(psutil.pid_exists(k) and psutil.Process(k).status() != psutil.STATUS_ZOMBIE for k in kids)
    assert segments(proc.pid) == [] and all(segments(k) == [] for k in kids)
    assert "Traceback" not in "".join(lines)
