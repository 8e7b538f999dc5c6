"""The HTTP service (FastAPI on uvicorn): the tutorial's `POST /`, OpenAI's `POST /v1/completions` (with
server-sent events), `GET /v1/models`, `GET /health` and `GET /metrics`, over one Engine.

The model loads in a thread once the server listens: /health says "loading" (503) until it is ready (200),
and requests meanwhile get 503 with Retry-After. Every 4xx carries OpenAI's error body, whose `param` names
the field at fault. A client that goes away (mid-stream, or while waiting for a whole answer) has its prompts
taken out of the batch at once. While the server drains (SIGTERM) it answers new requests with 503 and
finishes those it holds.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Job, QueueFull
from .metrics import Metrics
from .protocol import Limits, RequestError, budgets, parse_completions, parse_json, parse_processor

log = logging.getLogger("launcher.serve")
ENDPOINTS = ("/", "/v1/completions", "/v1/models", "/health", "/metrics")
FINISH = {"stop_token": "stop", "stop_string": "stop", "length": "length", "cancelled": "cancelled"}


class Unavailable(Exception):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.message, self.retry_after = message, retry_after


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


class Service:
    """What the handlers share: loading -> ready (-> draining), the engine, the limits, the metrics.

    `load()` -> (model, tokenizer) runs in a thread; `limits(model_config)` -> Limits; `on_failure(message)`
    is told when loading fails (the command line stops the server and exits 2)."""

    def __init__(self, load: Callable, limits: Callable, model_name: str,
                 on_failure: Callable[[str], None] | None = None):
        self._load, self._limits, self.model_name, self.on_failure = load, limits, model_name, on_failure
        self.state = "loading"
        self.error: str | None = None
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.tokenizer = None
        self.limits: Limits | None = None
        self.loaded = threading.Event()
        self.created = int(time.time())

    def start_loading(self) -> None:
        threading.Thread(target=self._load_now, name="load", daemon=True).start()

    def _load_now(self) -> None:
        try:
            model, tokenizer = self._load()
            limits = self._limits(model.config)
            engine = Engine(model, tokenizer, limits.max_batch_size, limits.max_queue, self.metrics)
            engine.start()
            self.tokenizer, self.limits, self.engine = tokenizer, limits, engine
            if self.state == "loading":  # not when SIGTERM came first: then it stays draining
                self.state = "ready"
            log.info("ready: %s", self.model_name)
        except Exception as exc:  # noqa: BLE001 -- reported as one line; UsageError says what it checked
            self.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.state = "failed"
            if self.on_failure is not None:
                self.on_failure(self.error)
        finally:
            self.loaded.set()

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    def check_accepting(self) -> None:
        if self.state == "ready":
            return
        if self.state == "loading":
            raise Unavailable("the model is loading", 5)
        if self.state == "draining":
            raise Unavailable("the server is shutting down", 5)
        raise Unavailable(f"the model failed to load: {self.error}", 60)


# ------------------------------------------------------------------------------------------ streamed text
class TextStream:
    """The text of a row's tokens as they come, released only once final: not an unfinished UTF-8 character
    (it decodes as U+FFFD until its last byte arrives) and not what may be the start of a stop string."""

    def __init__(self, decode, params):
        self.decode, self.stops, self.stop_ids = decode, params.stop_strings, set(params.stop_token_ids)
        self.tokens: list[int] = []
        self.sent = 0  # characters released

    def add(self, token: int) -> str:
        if token in self.stop_ids:  # ends the row; not text
            return ""
        self.tokens.append(token)
        text = self.decode(self.tokens).rstrip("\ufffd")
        end = len(text)
        for stop in self.stops:
            found = text.find(stop)
            if found >= 0:
                end = min(end, found)
            else:  # hold back the longest tail that a stop string starts with
                held = next((k for k in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:k])), 0)
                end = min(end, len(text) - held)
        if end <= self.sent:
            return ""
        out, self.sent = text[self.sent:end], end
        return out

    def finish(self, text: str) -> str:
        out, self.sent = text[self.sent:], len(text)
        return out


# ------------------------------------------------------------------------------------------ the app
def create_app(service: Service) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        service.start_loading()
        yield
        await asyncio.to_thread(service.stop)  # no request is left by now: uvicorn waited for them

    app = FastAPI(title="GPT-MoE", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Observe, metrics=service.metrics)

    @app.exception_handler(RequestError)
    async def _bad_request(request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Unavailable)
    async def _unavailable(request, exc: Unavailable):
        return JSONResponse(_error(exc.message, "server_unavailable"), status_code=503,
                            headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(ClientGone)
    async def _gone(request, exc):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return JSONResponse(_error(f"{request.method} {request.url.path}: {exc.detail}", "invalid_request_error"),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(_error("internal error (the server's own fault, logged)", "server_error"),
                            status_code=500)

    @app.get("/health")
    async def health():
        if service.state == "ready":
            return {"status": "ready", "model": service.model_name}
        body = {"status": service.state}
        if service.error:
            body["error"] = service.error
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                            "created": service.created, "owned_by": "gptmoe"}]}

    @app.post("/")
    async def processor(request: Request):
        req, jobs = await _submit(service, request, lambda body: parse_processor(body, service.limits))
        completions = await _wait_all(service, request, jobs)
        texts = [c.text(service.tokenizer.decode) for c in completions]
        return {"text": texts[0] if req.single else texts}

    @app.post("/v1/completions")
    async def completions(request: Request):
        vocab = service.engine.model.config.vocab_size if service.engine else 0
        req, jobs = await _submit(service, request, lambda body: parse_completions(body, service.limits, vocab))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": service.model_name}
        if req.stream:
            return StreamingResponse(_events(service, jobs, head, req.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        done = await _wait_all(service, request, jobs)
        decode = service.tokenizer.decode
        choices = [{"index": i, "text": c.text(decode), "logprobs": None, "finish_reason": FINISH[c.finish_reason]}
                   for i, c in enumerate(done)]
        return {**head, "choices": choices, "usage": _usage(jobs, done)}

    return app


def _error(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _usage(jobs: list[Job], done) -> dict:
    prompt = sum(len(j.prompt_ids) for j in jobs)
    completion = sum(len(c.token_ids) for c in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    too_big = f"at most {limit} bytes (--max-request-bytes)"
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(None, f"body: {declared} bytes; allowed: {too_big}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(None, f"body: more than {limit} bytes; allowed: {too_big}", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _submit(service: Service, request: Request, parse):
    """Check, tokenize and queue a request's prompts: (the parsed request, its jobs in prompt order)."""
    service.check_accepting()
    limits, tokenizer = service.limits, service.tokenizer
    req = parse(parse_json(await _read_body(request, limits.max_request_bytes)))
    if req.token_prompts is not None:
        prompts = req.token_prompts
    else:  # jieba and BPE take a while on long text: off the event loop
        prompts = await asyncio.to_thread(lambda: [tokenizer.encode(t) for t in req.texts])
    params = req.sampling_params(budgets(req, prompts, limits), (tokenizer.eod_id,))
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    jobs = [Job(ids, p, loop, stream=req.stream, events=events) for ids, p in zip(prompts, params)]
    service.check_accepting()  # it may have started draining while the prompts were tokenized
    try:
        service.engine.submit(jobs)
    except QueueFull as exc:
        raise Unavailable(f"the queue is full ({service.limits.max_queue} prompts waiting, --max-queue)",
                          exc.retry_after) from None
    return req, jobs


async def _collect(jobs: list[Job]) -> list:
    done = {}
    while len(done) < len(jobs):
        kind, job, value = await jobs[0].events.get()
        if kind == "done":
            done[job.key] = value
        elif kind == "error":
            raise RuntimeError(f"decoding failed: {value}")
    return [done[j.key] for j in jobs]


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _wait_all(service: Service, request: Request, jobs: list[Job]) -> list:
    """Every job's Completion, in order; ClientGone (and the jobs cancelled) if the client leaves first."""
    collect = asyncio.ensure_future(_collect(jobs))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():
            collect.cancel()
            service.engine.cancel(jobs)
            service.metrics.cancelled(len(jobs))
    if not collect.done() or collect.cancelled():
        raise ClientGone()
    return collect.result()


async def _events(service: Service, jobs: list[Job], head: dict, include_usage: bool):
    """Server-sent events in OpenAI's shape: a chunk per piece of text, one with each choice's finish_reason,
    the usage (stream_options.include_usage), then [DONE]. Leaving early (the client went away: Starlette
    cancels this generator) takes the unfinished jobs out of the batch."""
    decode = service.tokenizer.decode
    streams = {job.key: (i, TextStream(decode, job.params)) for i, job in enumerate(jobs)}
    finished: dict[int, object] = {}

    def chunk(choices, **extra) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra}, ensure_ascii=False)}\n\n"

    try:
        while len(finished) < len(jobs):
            kind, job, value = await jobs[0].events.get()
            index, stream = streams[job.key]
            if kind == "token":
                text = stream.add(value)
                if text:
                    yield chunk([{"index": index, "text": text, "logprobs": None, "finish_reason": None}])
            elif kind == "done":
                finished[job.key] = value
                yield chunk([{"index": index, "text": stream.finish(value.text(decode)), "logprobs": None,
                              "finish_reason": FINISH[value.finish_reason]}])
            else:
                yield f"data: {json.dumps(_error(f'decoding failed: {value}', 'server_error'))}\n\n"
                return
        if include_usage:
            yield chunk([], usage=_usage(jobs, [finished[j.key] for j in jobs]))
        yield "data: [DONE]\n\n"
    finally:
        left = [j for j in jobs if j.key not in finished]
        if left:
            service.engine.cancel(left)
            service.metrics.cancelled(len(left))


class _Observe:
    """ASGI middleware: every HTTP request counted by endpoint and status, timed to its last byte."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def observed_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            path = scope.get("path", "")
            self.metrics.request_done(path if path in ENDPOINTS else "other", status[0], time.perf_counter() - start)
