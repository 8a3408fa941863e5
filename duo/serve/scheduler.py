"""One generation at a time (batch 1 is the product), from a bounded FIFO queue, in one worker thread.

    submit(job)   queued, or APIError 429 (Retry-After) when max_queue jobs already wait
    the worker    takes the oldest job; one that waited over queue_timeout_s gets a 503 instead; runs the
                  others through Engine.stream_tokens, putting events on the job's asyncio queue:
                    ("start", n_prompt_tokens)   the prompt is accepted (first round under way)
                    ("delta", ids, text, logprobs)   a round's committed tokens and their text
                    ("done", stats)              finished (stats: Stats.as_dict() + engine_s, the whole engine call:
                                                 encoding, prefill, rounds, indexing the answer)
                    ("error", APIError)          nothing more comes
    cancel        job.cancel.set() (a client that went away): the generation stops after the round
                  under way, and the engine is free for the next job

Nothing is lost: every job submitted gets "done" or "error", also when the server shuts down. The worker
records every generation in the metrics, finished, cancelled or failed, with its times from the queue.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from ..errors import DuoError, UsageError
from .schemas import APIError, GenRequest

log = logging.getLogger("duo")


@dataclass
class Job:
    req: GenRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.monotonic)

    def put(self, event: tuple) -> None:
        """From the worker thread: hand an event to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:     # the event loop is gone (shutting down): nobody is listening
            self.cancel.set()


class Scheduler:
    def __init__(self, engine, *, max_queue: int = 16, queue_timeout_s: float = 300.0, metrics=None):
        self.engine, self.max_queue, self.queue_timeout_s, self.metrics = engine, max_queue, queue_timeout_s, metrics
        self._jobs: queue.Queue = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.busy = False
        self._thread = threading.Thread(target=self._work, name="duo-serve-worker", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._stop.is_set():
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if self._waiting >= self.max_queue:
                raise APIError(429, f"the queue is full ({self.max_queue} requests wait): retry later",
                               type="rate_limit_error", code="queue_full", headers={"Retry-After": "5"})
            self._waiting += 1
        self._gauge()
        self._jobs.put(job)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop taking jobs; those waiting get an error; the one running is cancelled."""
        self._stop.set()
        self._jobs.put(None)
        self._thread.join(timeout_s)

    # -- the worker thread ------------------------------------------------------------------
    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_length.set(self._waiting)

    def _busy(self, busy: bool) -> None:
        self.busy = busy
        if self.metrics is not None:
            self.metrics.running.set(int(busy))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            with self._lock:
                self._waiting -= 1
            self._gauge()
            if self._stop.is_set():
                job.put(("error", APIError(503, "the server is shutting down", type="server_error",
                                           code="shutting_down")))
            elif job.cancel.is_set():
                continue                              # its client went away while it waited
            elif time.monotonic() - job.queued_at > self.queue_timeout_s:
                job.put(("error", APIError(503, f"the request waited over {self.queue_timeout_s:.0f} s for the "
                                                f"engine: retry later", type="server_error", code="queue_timeout",
                                           headers={"Retry-After": "30"})))
            else:
                self._busy(True)
                try:
                    self._run(job)
                finally:
                    self._busy(False)
        while not self._jobs.empty():                 # shutting down: nobody is left without an answer
            job = self._jobs.get_nowait()
            if job is not None:
                job.put(("error", APIError(503, "the server is shutting down", type="server_error",
                                           code="shutting_down")))

    def _run(self, job: Job) -> None:
        from ..runtime.decode import Stats
        r, stats, t0 = job.req, Stats(), time.perf_counter()
        n_prompt, first_at, outcome, done = 0, None, "error", None
        try:
            ids = self.engine.encode(r.prompt, chat=True if r.chat else False)
            n_prompt = len(ids)
            gen = self.engine.stream_tokens(ids, max_new_tokens=r.max_tokens, temperature=r.temperature,
                                            top_p=r.top_p, top_k=r.top_k, seed=r.seed, stop=r.stop, stats=stats,
                                            logprobs=r.logprobs)
            started, given = False, 0
            try:
                for new, text in gen:
                    if not started:
                        job.put(("start", n_prompt))
                        started, first_at = True, time.monotonic()
                    lps = stats.token_logprobs[given:given + len(new)]
                    given += len(new)
                    job.put(("delta", new, text, lps))
                    if job.cancel.is_set() or self._stop.is_set():
                        stats.stop_reason = "cancelled"
                        break
            finally:
                gen.close()
            if not started:
                job.put(("start", n_prompt))
            done = stats.as_dict()
            done["engine_s"] = time.perf_counter() - t0
            outcome = "cancelled" if stats.stop_reason == "cancelled" else "finished"
            job.put(("done", done))
        except UsageError as e:
            msg = str(e)
            code = "context_length_exceeded" if "context window" in msg else "invalid_value"
            outcome = "rejected"
            job.put(("error", APIError(400, msg, code=code)))
        except DuoError as e:
            job.put(("error", APIError(500, str(e), type="server_error", code="generation_failed")))
        except Exception as e:  # noqa: BLE001 - one bad request must not take the server down
            log.exception("generation failed")
            job.put(("error", APIError(500, f"the generation failed ({type(e).__name__}); see the server log",
                                       type="server_error", code="internal_error")))
        finally:
            if self.metrics is not None:
                now = time.monotonic()
                self.metrics.record_generation(outcome, done or stats.as_dict(), n_prompt,
                                               ttft_s=None if first_at is None else first_at - job.queued_at,
                                               e2e_s=now - job.queued_at)
