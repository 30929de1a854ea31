"""The OpenAI-compatible HTTP API (FastAPI): routes, errors in OpenAI's shape, auth and limits.

Generation itself is the `Engine`'s; this module turns requests into `GenerationRequest`s and
hands the worker's events to `responses.py` (JSON or server-sent events). `ServerThread` runs
the app with uvicorn in a background thread (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import re
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, GenerationRequest
from .responses import Collected, Reply, final_body, stream_events, wait_event
from .sampling import SamplingParams
from .schemas import (AdapterUpload, ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest,
                      ErrorResponse, Health, MAX_STOP_SEQUENCES, ModelCard, ModelList, UNRECOGNIZED)

log = logging.getLogger("mlx_lora.serve")
RETRY_AFTER_S = 1  # what a 429 tells the client to wait
IGNORED_HEADER = "X-Ignored-Fields"  # OpenAI request fields that were accepted but not acted on
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_exceeded", 503: "server_busy", 500: "server_error"}
ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)}


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for."""

    max_tokens: int = 2048  # cap on max_tokens / max_completion_tokens
    default_max_tokens: int = 512
    max_body_bytes: int = 1_000_000
    api_key: Optional[str] = None
    adapter_dirs: tuple[str, ...] = ()  # folders POST /v1/adapters may load from (none: the endpoint is off)
    cors_origins: tuple[str, ...] = ()  # origins browser scripts may call from: "*", or scheme://host (any port)


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


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


def origins_pattern(origins: tuple[str, ...]) -> str:
    """A regex matching `origins` ("*": any; "http://localhost": that scheme and host, any port or none)."""
    if "*" in origins:
        return ".*"
    return "|".join(re.escape(origin.rstrip("/")) + r"(:\d+)?" for origin in origins)


async def _unparsable_body(request: Request) -> str:
    """Why a body could not be read as JSON, in one line (FastAPI says only "error parsing the body")."""
    try:
        body = await request.body()
        body.decode("utf-8")
    except UnicodeDecodeError as err:
        return (f"the body is not UTF-8 (byte 0x{err.object[err.start]:02x} at offset {err.start}): "
                "send the JSON encoded as UTF-8")
    except Exception:  # noqa: BLE001 - the body is gone; the generic answer stands
        pass
    return "the body is not valid JSON"


def _param(loc) -> str | None:
    """A validation error's location as a dotted path, without pydantic's names of the union member
    it tried (`messages.0.content.list[TextPart].0.type` -> `messages.0.content.0.type`)."""
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and (p in UNION_TAGS or "[" in p))]
    return ".".join(parts) or None


UNION_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}  # loc entries pydantic adds inside a Union


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

    app = FastAPI(title="mlx-lora", version="2", lifespan=lifespan,
                  description="OpenAI-compatible API for an MLX model and its LoRA adapters.")
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if limits.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origin_regex=origins_pattern(limits.cors_origins),
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"], allow_headers=["*"])
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
        return error_response(err.status, err.message, err.param, err.code, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        errors = err.errors() or [{"loc": (), "msg": "invalid request"}]
        kind = request.headers.get("content-type", "")
        if "json" not in kind and any(tuple(e.get("loc", ())) == ("body",) for e in errors):  # curl -d's default type
            return error_response(400, f"the body must be JSON sent with Content-Type: application/json (got "
                                       f"{kind or 'no Content-Type'})", None, "invalid_body")
        # an unknown field first; else the most specific (inside a Union, the member the value was meant for)
        first = next((e for e in errors if e.get("type") == UNRECOGNIZED), None) or max(
            errors, key=lambda e: (e.get("type") == "value_error", len(e.get("loc", ()))))
        kind = first.get("type", "")
        if kind == UNRECOGNIZED:  # OpenAI's own wording, with the field's path as param
            param = _param((*first.get("loc", ()), first["ctx"]["param"]))
            return error_response(400, f"Unrecognized request argument supplied: {param}{first['ctx']['hint']}", param,
                                  "unknown_parameter")
        param = None if kind == "json_invalid" else _param(first.get("loc", ()))
        message = ("the body is not valid JSON" if kind == "json_invalid"
                   else f"{param or 'body'}: {first.get('msg', 'invalid value')}")
        return error_response(400, message, param, "invalid_value" if param else "invalid_body")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err: StarletteHTTPException):
        if err.status_code == 400 and err.detail == "There was an error parsing the body":  # FastAPI's words
            return error_response(400, await _unparsable_body(request), None, "invalid_body")
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request, err: Exception):
        if isinstance(err, RecursionError):  # a request nested deeper than a library we call can walk: the
            log.warning("refused a request nested too deeply to process")  # client's fault; no traceback flood
            return error_response(400, "the request nests too deeply to process; flatten it", None, "invalid_body")
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(err).__name__}")

    logged_ignored: set[str] = set()

    def ignored_headers(body) -> dict:
        """The response header naming the OpenAI fields this request gave that we do not act on; each
        field is also logged, once per server (clients such as LangChain send `user` with every request)."""
        ignored = body.ignored_fields()
        # logged once per field whatever its list index (a chat echoes `refusal` in every assistant turn)
        new = sorted({re.sub(r"\.\d+\.", ".N.", name) for name in ignored} - logged_ignored)
        if new:
            logged_ignored.update(new)
            log.warning("request field(s) %s: accepted (OpenAI API) but ignored by this server; responses name "
                        "them in the %s header (logged once per field)", ", ".join(new), IGNORED_HEADER)
        return {IGNORED_HEADER: ", ".join(ignored)} if ignored else {}

    def unknown_model(model: str) -> APIError:
        return APIError(404, f"model {model!r} does not exist; available: {', '.join(engine.model_names())}",
                        "model", "model_not_found")

    def check_key(request: Request) -> None:
        if limits.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), limits.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", code="invalid_api_key")

    @app.get("/health", response_model=Health)
    async def health(request: Request):
        status = "degraded" if engine.failed_steps else "ok"
        try:
            check_key(request)
        except APIError:  # probes without the key learn whether it is up, not what it serves
            return JSONResponse({"status": status})
        return Health(status=status, models=engine.model_names(),
                      queued=engine.queued(), running=engine.running(), failed_steps=engine.failed_steps,
                      last_error=engine.last_error)

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, dependencies=[Depends(check_key)])
    async def models():
        return ModelList(data=[ModelCard(id=name, created=engine.created, owned_by="mlx-lora")
                               for name in engine.model_names()])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERROR_RESPONSES,
             dependencies=[Depends(check_key)])
    async def model_card(model: str):
        if model not in engine.model_names():
            raise unknown_model(model)
        return ModelCard(id=model, created=engine.created, owned_by="mlx-lora")

    @app.post("/v1/adapters", response_model=ModelList, responses=ERROR_RESPONSES, dependencies=[Depends(check_key)])
    async def add_adapter(body: AdapterUpload):
        folder = allowed_adapter_folder(body.path, limits.adapter_dirs)
        try:
            await asyncio.to_thread(engine.add_adapter, body.name, folder)
        except (ValueError, FileNotFoundError) as err:
            raise APIError(400, str(err), "path" if isinstance(err, FileNotFoundError) else "name"
                           if "adapter name" in str(err) else "path", "invalid_adapter") from None
        log.warning("adapter %r added from %s", body.name, folder)  # who serves what, in the server's log
        return await models()

    @app.delete("/v1/adapters/{name}", response_model=ModelList, responses=ERROR_RESPONSES,
                dependencies=[Depends(check_key)])
    async def delete_adapter(name: str):
        if name not in engine.adapters:
            raise APIError(404, f"adapter {name!r} does not exist; adapters: {', '.join(engine.adapters) or 'none'}",
                           "name", "model_not_found")
        try:
            engine.remove_adapter(name)
        except RuntimeError as err:
            raise APIError(409, str(err), "name", "adapter_in_use") from None
        log.warning("adapter %r removed", name)
        return await models()

    def common(body, max_tokens: int | None) -> GenerationRequest:
        model = body.model or engine.default_model
        if model not in engine.model_names():
            raise unknown_model(model)
        stops = body.stop_list()
        if len(stops) > MAX_STOP_SEQUENCES:
            raise APIError(400, f"stop: at most {MAX_STOP_SEQUENCES} sequences", "stop", "invalid_value")
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens: {max_tokens} is over this server's limit of {limits.max_tokens}",
                           "max_tokens", "invalid_value")
        bias = {}
        for key, value in (body.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= len(engine.tokenizer) or not -100 <= value <= 100:
                raise APIError(400, f"logit_bias: {key!r}: {value} must map a token id below {len(engine.tokenizer)} "
                                    "to a bias in [-100, 100]", "logit_bias", "invalid_value")
            bias[int(key)] = float(value)
        params = SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                                repetition_penalty=body.repetition_penalty, frequency_penalty=body.frequency_penalty,
                                presence_penalty=body.presence_penalty, logit_bias=bias, seed=body.seed)
        if max_tokens is None:  # the server's default, capped by the engine to what the context leaves
            return GenerationRequest(model=model, max_tokens=min(limits.default_max_tokens, limits.max_tokens),
                                     max_tokens_is_default=True, params=params, stop=stops)
        return GenerationRequest(model=model, max_tokens=max_tokens, params=params, stop=stops)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERROR_RESPONSES,
              dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response):
        from .constraints import ConstraintError, constraint_for

        gen = common(body, body.max_completion_tokens or body.max_tokens)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", "top_logprobs", "invalid_value")
        gen.params = SamplingParams(**{**gen.params.__dict__, "logprobs": bool(body.logprobs),
                                       "top_logprobs": body.top_logprobs or 0})
        gen.messages = [m.for_template() for m in body.messages]
        if body.tools and body.tool_choice != "none":
            if not getattr(engine.tokenizer, "has_tool_calling", False):
                raise APIError(400, "tools: this model's chat template has no tool support (no tool-call format "
                                    "known for it); send the request without tools", "tools", "unsupported")
            gen.tools = [t.model_dump() for t in body.tools]
        if body.response_format is not None and body.response_format.type != "text" or body.tool_choice not in (
                None, "auto", "none"):
            try:
                compiler = await asyncio.to_thread(engine.grammar_compiler)
                gen.constraint_factory = constraint_for(compiler, engine.tokenizer, body.response_format, gen.tools,
                                                        body.tool_choice)
            except ConstraintError as err:
                raise APIError(400, str(err), err.param, "invalid_value") from None
        return await respond(gen, body, request, response, chat=True, logprobs=bool(body.logprobs))

    @app.post("/v1/completions", response_model=Completion, responses=ERROR_RESPONSES,
              dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request, response: Response):
        gen = common(body, body.max_tokens)
        if body.echo:
            raise APIError(400, "echo: only false is supported", "echo", "unsupported")
        if isinstance(body.prompt, list):
            if not body.prompt:
                raise APIError(400, "prompt: the list is empty; send one prompt", "prompt", "invalid_value")
            if len(body.prompt) != 1:
                raise APIError(400, "prompt: only one prompt per request is supported", "prompt", "invalid_value")
            gen.prompt = body.prompt[0]
        else:
            gen.prompt = body.prompt
        logprobs = body.logprobs is not None
        gen.params = SamplingParams(**{**gen.params.__dict__, "logprobs": logprobs, "top_logprobs": body.logprobs or 0})
        return await respond(gen, body, request, response, chat=False, logprobs=logprobs)

    async def respond(gen: GenerationRequest, body, request: Request, response: Response, chat: bool, logprobs: bool):
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
            raise APIError(429, f"the server is busy ({engine.limits.max_queue} requests already wait); retry in "
                                f"{RETRY_AFTER_S} s", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        first = await wait_event(events, job, request)
        if first is None:
            return error_response(400, "client disconnected")
        if first[0] == "error":
            _, status, message, param, *code = first
            raise APIError(status, message, param, *code)
        reply = Reply(ident=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], created=int(time.time()),
                      model=gen.model, chat=chat, logprobs=logprobs, prompt_tokens=first[1],
                      include_usage=bool(body.stream and body.stream_options and body.stream_options.include_usage))
        headers = ignored_headers(body)
        if body.stream:
            return StreamingResponse(stream_events(events, job, reply, error_type), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **headers})
        response.headers.update(headers)  # FastAPI adds them to the JSON response it builds from our dict
        got = Collected()
        while True:
            event = await wait_event(events, job, request)
            if event is None:
                return error_response(400, "client disconnected")
            if event[0] == "delta":
                got.text.append(event[1])
                got.logprobs.extend(event[2] or [])
            elif event[0] == "tool_calls":
                got.tool_calls = event[1]
            elif event[0] == "error":
                raise APIError(*event[1:])
            elif event[0] == "done":
                _, finish, _, completion_tokens, cached_tokens = event
                return final_body(reply, got, finish, completion_tokens, cached_tokens)

    return app


def allowed_adapter_folder(path: str, roots: tuple[str, ...]) -> Path:
    """`path` resolved, when it lies inside one of `roots` (symlinks followed); else APIError 403/400.

    Relative paths are taken inside each root in turn; nothing outside the roots is ever opened.
    """
    if not roots:
        raise APIError(403, "adding adapters at run time is off: start the server with adapter_dirs "
                            "(--adapter-dir DIR) to allow folders", "path", "adapters_disabled")
    inside = False
    for root in roots:
        base = Path(root).resolve()
        candidate = (base / path).resolve()
        if candidate.is_relative_to(base):
            inside = True
            if candidate.is_dir():
                return candidate
    shown = path if len(path) <= 200 else path[:200] + "..."
    problem = "is no folder" if inside else "is not inside the allowed adapter_dirs"
    raise APIError(400, f"path: {shown!r} {problem} ({', '.join(roots)})", "path", "invalid_path")


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
