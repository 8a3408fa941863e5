"""Load test of `duo serve`: the server's overhead per request, streaming TTFT against the engine's own,
and C concurrent clients x R requests (nothing may be lost). Starts its own server process.

    python -m bench.serve_load [--model M --draft D ...] [--clients 8] [--requests 20] [--max-tokens 32]

overhead = the client's latency of a non-streamed request - the engine's own time for it (the response's
"duo".engine_s: the whole Engine call, encoding and indexing the answer included, as Engine.generate
takes it): HTTP, JSON, validation, the queue hand-off, building the response. The first request is a
warm-up, not counted. TTFT: the client's first content chunk against the engine's ttft_s. Prints one JSON
object (and --json PATH writes it).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

PROMPTS = ["Write a Python function that checks for primes", "Explain recursion in one paragraph",
           "def fibonacci(n):", "List three sorting algorithms", "What is 17 * 23?", "Write a haiku about CPUs"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra: list[str], port: int, timeout_s: float = 600):
    proc = subprocess.Popen([sys.executable, "-m", "duo", "serve", "--port", str(port), *extra],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s
    for line in proc.stderr:
        if "ready:" in line:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()   # keep draining
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"the server did not become ready (exit {proc.poll()})")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


def main(argv=None) -> int:
    import httpx

    ap = argparse.ArgumentParser(prog="python -m bench.serve_load")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--single", type=int, default=10, help="sequential requests for the overhead and TTFT")
    ap.add_argument("--json", metavar="PATH")
    args, extra = ap.parse_known_args(argv)
    port = free_port()
    proc = start_server(extra + ["--max-queue", str(max(16, args.clients))], port)
    url = f"http://127.0.0.1:{port}/v1"
    out: dict = {}
    try:
        with httpx.Client(timeout=600) as c:
            over, ttft_c, ttft_e = [], [], []
            c.post(f"{url}/chat/completions", json={"messages": [{"role": "user", "content": PROMPTS[0]}],
                                                    "max_tokens": 4, "temperature": 0})        # warm-up
            for i in range(args.single):
                body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                        "max_tokens": args.max_tokens, "temperature": 0}
                t = time.perf_counter()
                r = c.post(f"{url}/chat/completions", json=body).json()
                over.append(1e3 * (time.perf_counter() - t - r["duo"]["engine_s"]))
                t = time.perf_counter()
                first = None
                with c.stream("POST", f"{url}/chat/completions",
                              json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
                    for line in s.iter_lines():
                        if not line.startswith("data: {"):
                            continue
                        d = json.loads(line[6:])
                        if first is None and d["choices"] and d["choices"][0]["delta"].get("content"):
                            first = time.perf_counter() - t
                        if not d["choices"]:
                            ttft_e.append(d["duo"]["ttft_s"])
                ttft_c.append(first or 0.0)
            out["overhead_ms"] = {"median": statistics.median(over), "p90": pct(over, 0.9), "n": len(over)}
            out["stream_ttft_s"] = {"client_median": statistics.median(ttft_c), "engine_median": statistics.median(ttft_e)}
            out["stream_ttft_s"]["ratio"] = out["stream_ttft_s"]["client_median"] / out["stream_ttft_s"]["engine_median"]
        lat, fails, queue_max = [], [], [0]
        done = threading.Event()

        def poll():
            with httpx.Client(timeout=10) as c:
                while not done.is_set():
                    try:
                        queue_max[0] = max(queue_max[0], c.get(f"http://127.0.0.1:{port}/health").json()["queue"])
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.2)

        def client(k: int):
            with httpx.Client(timeout=1200) as c:
                for j in range(args.requests):
                    body = {"messages": [{"role": "user", "content": PROMPTS[(k + j) % len(PROMPTS)]}],
                            "max_tokens": args.max_tokens, "temperature": 0}
                    t = time.perf_counter()
                    try:
                        r = c.post(f"{url}/chat/completions", json=body)
                        ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
                    except httpx.HTTPError as e:
                        ok, r = False, e
                    lat.append(time.perf_counter() - t)
                    if not ok:
                        fails.append(str(getattr(r, "status_code", r)))

        threading.Thread(target=poll, daemon=True).start()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        out["load"] = {"clients": args.clients, "requests": len(lat), "failures": len(fails), "failed": fails[:5],
                       "p50_s": pct(lat, 0.5), "p99_s": pct(lat, 0.99), "wall_s": time.perf_counter() - t0,
                       "queue_max": queue_max[0]}
    finally:
        proc.terminate()
        out["server_exit"] = proc.wait(60)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if not out.get("load", {}).get("failures") else 1


if __name__ == "__main__":
    raise SystemExit(main())
