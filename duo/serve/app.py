"""The HTTP application: OpenAI's routes over one Engine, through the Scheduler (one generation at a time).

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /health   GET /metrics

Every error is an OpenAI error object with its status (400 bad input, 401 no or wrong key, 404 unknown
model or route, 413 body too large, 429 queue full, 503 waited too long / shutting down, 500 a failed
generation), never a traceback. A client that disconnects cancels its generation after the round under way.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import responses as R
from .metrics import Metrics
from .scheduler import Job, Scheduler
from .schemas import APIError, parse_chat, parse_completion

log = logging.getLogger("duo")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


class ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


def create_app(engine, *, model_name: str, api_key: str | None = None, max_queue: int = 16,
               queue_timeout_s: float = 300.0, max_body_bytes: int = 1 << 20, default_max_tokens: int = 512,
               scheduler: Scheduler | None = None) -> FastAPI:
    metrics = Metrics()
    sched = scheduler or Scheduler(engine, max_queue=max_queue, queue_timeout_s=queue_timeout_s, metrics=metrics)
    sched.metrics = metrics

    @asynccontextmanager
    async def lifespan(app):
        yield
        sched.close()

    app = FastAPI(title="duo", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.scheduler, app.state.metrics = sched, metrics
    tokenizer = engine.target.tokenizer

    # -- errors, authentication, request counting --------------------------------------------
    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        msg = (f"no route {request.method} {request.url.path}: this server has {', '.join(ENDPOINTS)}"
               if e.status_code in (404, 405) else str(e.detail))
        return error_response(APIError(e.status_code, msg, code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request, e):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(APIError(500, f"internal error ({type(e).__name__}); see the server log",
                                       type="server_error", code="internal_error"))

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next):
        path = request.url.path
        if api_key and path != "/health":
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                response = error_response(APIError(401, "missing or wrong API key: send 'Authorization: Bearer "
                                                        "<key>'", type="authentication_error",
                                                   code="invalid_api_key"))
                metrics.requests.labels(endpoint=path if path in ENDPOINTS else "other", status="401").inc()
                return response
        try:
            response = await call_next(request)
        except Exception as e:  # noqa: BLE001 - a handler's failure is still an OpenAI-style answer
            log.exception("unexpected error on %s", path)
            response = error_response(APIError(500, f"internal error ({type(e).__name__}); see the server log",
                                               type="server_error", code="internal_error"))
        metrics.requests.labels(endpoint=path if path in ENDPOINTS else "other", status=str(response.status_code)).inc()
        return response

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            raise APIError(413, f"the body is {declared} bytes, more than this server takes ({max_body_bytes}); "
                                f"shorten the prompt", code="body_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_body_bytes:
                raise APIError(413, f"the body is more than this server takes ({max_body_bytes} bytes); shorten "
                                    f"the prompt", code="body_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None

    # -- the routes ---------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queue": sched.waiting, "busy": sched.busy}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "duo"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    async def next_event(job: Job, request: Request) -> tuple:
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel.set()
                    raise ClientGone() from None

    async def generate(request: Request, chat: bool):
        body = await read_json(request)
        req = (parse_chat if chat else parse_completion)(body, model_name, default_max_tokens)
        job = Job(req, asyncio.get_running_loop())
        sched.submit(job)
        try:
            first = await next_event(job, request)
        except ClientGone:
            return Response(status_code=499)
        if first[0] == "error":
            raise first[1]
        n_prompt = first[1]
        rid = R.new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            return StreamingResponse(stream(job, req, rid, n_prompt), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, ids, lps = [], [], []
        try:
            while (ev := await next_event(job, request))[0] == "delta":
                ids += ev[1]; text.append(ev[2]); lps += ev[3]
        except ClientGone:
            return Response(status_code=499)
        if ev[0] == "error":
            raise ev[1]
        stats = ev[1]
        logprobs = None if req.logprobs is None else (
            R.chat_logprobs(tokenizer, ids, lps) if chat else R.completion_logprobs(tokenizer, ids, lps))
        make = R.chat_completion if chat else R.text_completion
        return make(rid, model_name, "".join(text), R.finish_reason(stats), n_prompt, len(ids), logprobs, stats)

    async def stream(job: Job, req, rid: str, n_prompt: int):
        chat, created, n_out, offset = req.chat, int(time.time()), 0, 0
        sse = lambda obj: f"data: {json.dumps(obj)}\n\n"   # noqa: E731
        try:
            if chat:
                yield sse(R.chunk(rid, model_name, chat, created, role=True))
            while True:
                ev = await job.events.get()
                if ev[0] == "error":
                    yield sse(ev[1].body())
                    break
                if ev[0] == "done":
                    stats = ev[1]
                    yield sse(R.chunk(rid, model_name, chat, created, reason=R.finish_reason(stats)))
                    if req.include_usage:
                        yield sse(R.usage_chunk(rid, model_name, chat, created, n_prompt, n_out, stats))
                    break
                _, ids, text, lps = ev
                n_out += len(ids)
                logprobs = None if req.logprobs is None else (
                    R.chat_logprobs(tokenizer, ids, lps) if chat else R.completion_logprobs(tokenizer, ids, lps, offset))
                offset += len(text)
                if text or logprobs:
                    yield sse(R.chunk(rid, model_name, chat, created, text=text, logprobs=logprobs))
            yield "data: [DONE]\n\n"
        finally:               # the client went away (or the stream ended): stop the generation after this round
            job.cancel.set()

    return app
