"""The OpenAI-compatible HTTP API (FastAPI): routes, errors in OpenAI's shape, auth and body limits.

Generation itself is the `Engine`'s; this module turns requests into `GenerationRequest`s,
waits on the worker's events, and writes JSON or server-sent events. `ServerThread` runs the
app with uvicorn in a background thread (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, GenerationRequest
from .schemas import (ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, ErrorResponse, Health,
                      MAX_STOP_SEQUENCES, ModelCard, ModelList)

log = logging.getLogger("mlx_lora.serve")
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is still there
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 503: "server_busy", 500: "server_error"}
ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 500, 503)}


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for."""

    max_tokens: int = 2048  # cap on max_tokens / max_completion_tokens
    default_max_tokens: int = 512
    max_body_bytes: int = 1_000_000
    api_key: Optional[str] = None


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class BodyLimit:
    """ASGI middleware: answer 413 to a body over `max_bytes` (by Content-Length or as it arrives)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"request body larger than {self.max_bytes} bytes", code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for http.disconnect

        await self.app(scope, replay, send)


def _param(loc) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def create_app(engine: Engine, limits: ServerLimits = ServerLimits()) -> FastAPI:
    """The FastAPI application serving `engine`; the worker starts and stops with the app."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="mlx-lora", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API for an MLX model and its LoRA adapters.")
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    default_openapi = app.openapi

    def openapi() -> dict:
        # Invalid bodies are answered 400 in OpenAI's shape, never FastAPI's 422: say so in the schema.
        schema = default_openapi()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        return schema

    app.openapi = openapi

    @app.exception_handler(APIError)
    async def _api_error(_request, err: APIError):
        return error_response(err.status, err.message, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        kind = first.get("type", "")
        param = None if kind == "json_invalid" else _param(first.get("loc", ()))
        message = ("the body is not valid JSON" if kind == "json_invalid"
                   else f"{param or 'body'}: {first.get('msg', 'invalid value')}")
        return error_response(400, message, param, "invalid_value" if param else "invalid_body")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, err: StarletteHTTPException):
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request, err: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(err).__name__}")

    def check_key(request: Request) -> None:
        if limits.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), limits.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", code="invalid_api_key")

    @app.get("/health", response_model=Health)
    async def health():
        return Health(models=engine.model_names(), queued=engine.queued())

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, dependencies=[Depends(check_key)])
    async def models():
        return ModelList(data=[ModelCard(id=name, created=engine.created, owned_by="mlx-lora")
                               for name in engine.model_names()])

    def common(body, max_tokens: int | None) -> GenerationRequest:
        model = body.model or engine.default_model
        if model not in engine.model_names():
            raise APIError(404, f"model {model!r} does not exist; available: {', '.join(engine.model_names())}",
                           "model", "model_not_found")
        stops = body.stop_list()
        if len(stops) > MAX_STOP_SEQUENCES:
            raise APIError(400, f"stop: at most {MAX_STOP_SEQUENCES} sequences", "stop", "invalid_value")
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens: {max_tokens} is over this server's limit of {limits.max_tokens}",
                           "max_tokens", "invalid_value")
        return GenerationRequest(model=model, max_tokens=max_tokens or min(limits.default_max_tokens, limits.max_tokens),
                                 temperature=body.temperature, top_p=body.top_p, stop=stops, seed=body.seed)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERROR_RESPONSES,
              dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        gen = common(body, body.max_completion_tokens or body.max_tokens)
        gen.messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        return await respond(gen, body, request, chat=True)

    @app.post("/v1/completions", response_model=Completion, responses=ERROR_RESPONSES,
              dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request):
        gen = common(body, body.max_tokens)
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise APIError(400, "prompt: only one prompt per request is supported", "prompt", "invalid_value")
            gen.prompt = body.prompt[0]
        else:
            gen.prompt = body.prompt
        return await respond(gen, body, request, chat=False)

    async def respond(gen: GenerationRequest, body, request: Request, chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is closed: the server is gone
                pass

        try:
            job = engine.submit(gen, sink)
        except queue.Full:
            raise APIError(503, "the server is busy (request queue full); retry later", code="queue_full") from None
        first = await wait_event(events, job, request)
        if first is None:
            return error_response(400, "client disconnected")
        if first[0] == "error":
            _, status, message, param = first
            raise APIError(status, message, param)
        prompt_tokens = first[1]
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream_events(events, job, ident, created, gen.model, chat, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        parts = []
        while True:
            event = await wait_event(events, job, request)
            if event is None:
                return error_response(400, "client disconnected")
            if event[0] == "delta":
                parts.append(event[1])
            elif event[0] == "error":
                raise APIError(event[1], event[2], event[3])
            elif event[0] == "done":
                break
        _, finish, prompt_tokens, completion_tokens = event
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        text = "".join(parts)
        if chat:
            return {"id": ident, "object": "chat.completion", "created": created, "model": gen.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": finish, "logprobs": None}], "usage": usage}
        return {"id": ident, "object": "text_completion", "created": created, "model": gen.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}], "usage": usage}

    return app


async def wait_event(events: asyncio.Queue, job, request: Request):
    """The next worker event, or None (and the job cancelled) when the client has disconnected."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                return None
        except asyncio.CancelledError:
            job.cancel()
            raise


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def stream_events(events: asyncio.Queue, job, ident: str, created: int, model: str, chat: bool, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; cancels on disconnect."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(content: str | None, finish: str | None, role: bool = False) -> dict:
        if chat:
            delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": content} if content else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": content or "", "finish_reason": finish, "logprobs": None}
        return {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]}

    try:
        if chat:
            yield _sse(chunk(None, None, role=True))
        while True:
            event = await events.get()
            if event[0] == "delta":
                yield _sse(chunk(event[1], None))
            elif event[0] == "error":
                _, status, message, param = event
                yield _sse({"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                                      "param": param, "code": None}})
                break
            elif event[0] == "done":
                _, finish, prompt_tokens, completion_tokens = event
                yield _sse(chunk(None, finish))
                if include_usage:
                    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}
                    yield _sse({"id": ident, "object": kind, "created": created, "model": model,
                                "choices": [], "usage": usage})
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a no-op when finished; stops generation when the client went away


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerThread:
    """Run an ASGI app with uvicorn in a background thread: `with ServerThread(app) as url: ...`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level=log_level,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
