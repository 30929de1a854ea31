"""The generation engine: one base model, named adapters added and removed at run time, one worker thread.

Requests arrive from the HTTP layer (`submit`); the worker tokenizes them (the tokenizer is not
thread-safe), hands them to the `Scheduler` (continuous batching, `scheduler.py`) and runs its
steps. Each sequence carries its adapter's slot; `multi_lora.py` applies each row's adapter, so
requests for different adapters decode in one batch and the base is loaded once. Text, stop
strings and tool calls are `text.py`'s; HTTP is `app.py`'s.
"""

from __future__ import annotations

import queue
import re
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from .multi_lora import NO_ADAPTER, RowAdapters, install_adapter, read_checked_adapter, remove_adapter
from .sampling import SamplingParams
from .scheduler import Scheduler, Sequence
from .text import TextStream

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a JSON \uD800 escape without its pair: no character
HISTORY = 256  # finished-job summaries kept for /health and tests
CONTEXT_EXCEEDED = "context_length_exceeded"  # OpenAI's code: clients trim the history and retry on it
IDLE_WAIT_S = 0.05  # how long the idle worker sleeps between looks at its inbox


class RequestError(ValueError):
    """A request the worker refused (e.g. the prompt is too long); becomes an HTTP 400."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code  # code: OpenAI's error code, e.g. context_length_exceeded


@dataclass(frozen=True)
class EngineLimits:
    """What the engine holds at once."""

    max_batch: int = 8  # sequences decoding together
    max_queue: int = 256  # requests waiting for a batch slot; more get 429
    max_context: int = 8192  # prompt + completion tokens of one request
    prefill_chunk: int = 512  # prompt tokens per row read between two decode steps
    prefill_seconds: float = 0.25  # while others decode, a prefill chunk is sized to take about this long (0: off)
    prompt_cache_size: int = 16  # KV prefixes kept (0: no prompt cache)
    prompt_cache_bytes: int = 1 << 30
    kv_budget_bytes: Optional[int] = None  # KV caches of the running batch (None: unbounded); see kv_budget


@dataclass
class GenerationRequest:
    """One generation: chat `messages` or a text `prompt`, for the model (base or adapter) `model`."""

    model: str
    max_tokens: int
    max_tokens_is_default: bool = False  # the server's default, not the client's: capped to what the context leaves
    messages: Optional[list[dict]] = None
    prompt: Optional[str] = None
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    tools: Optional[list[dict]] = None
    constraint_factory: Optional[Callable[[], Any]] = None  # a fresh grammar constraint per request


@dataclass
class Job:
    """A submitted request; `sink` receives its events from the worker thread."""

    request: GenerationRequest
    sink: Callable[[tuple], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    disconnect_check: float = 0.0  # event-loop time of the next look for a gone client (responses.wait_event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Adapter:
    slot: int
    folder: str
    version: int  # distinguishes a re-added name in the prompt cache


class Engine:
    """A base model with named adapters behind one continuous-batching worker thread.

    Events sent to a job's sink, in order: ("start", prompt_tokens, cached_tokens), then
    ("delta", text, logprobs or None)* with ("tool_delta", delta.tool_calls entries)* among them
    and possibly ("tool_calls", calls) (the parsed whole, for non-streamed answers), then
    ("done", finish_reason, prompt_tokens, completion_tokens, cached_tokens);
    or ("error", status, message, param[, code]) at any point before "done".
    """

    def __init__(self, model: nn.Module, tokenizer, base_name: str, adapters: dict[str, str | Path] | None = None,
                 default_model: str | None = None, limits: EngineLimits = EngineLimits()):
        self.model, self.tokenizer, self.base_name, self.limits = model, tokenizer, base_name, limits
        self.rows = RowAdapters()
        self.adapters: dict[str, Adapter] = {}
        self._versions = 0
        self._model_lock = threading.Lock()  # held by the worker during a step, and to add/remove adapters
        for name, folder in (adapters or {}).items():
            self.add_adapter(name, folder)
        self.default_model = default_model or base_name
        if self.default_model not in self.model_names():
            raise ValueError(f"default model {self.default_model!r} is not one of {', '.join(self.model_names())}")
        from mlx_lm.models.cache import make_prompt_cache

        self.kv_bytes_per_token = kv_bytes_per_token(model)
        kv_tokens = None
        if limits.kv_budget_bytes is not None:
            if self.kv_bytes_per_token is None:
                raise ValueError("kv_memory: the memory planner does not know this model's shape, so a KV budget "
                                 "cannot be derived; use kv_memory: none")
            kv_tokens = limits.kv_budget_bytes // self.kv_bytes_per_token
        self.kv_windows = kv_windows(make_prompt_cache(model))
        self.scheduler = Scheduler(self._forward, lambda: make_prompt_cache(model), set(tokenizer.eos_token_ids),
                                   limits.max_batch, limits.prefill_chunk, limits.prompt_cache_size,
                                   limits.prompt_cache_bytes, kv_tokens, self.kv_windows,
                                   prefill_seconds=limits.prefill_seconds)
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()  # set when a job arrives
        self.history: deque = deque(maxlen=HISTORY)
        self.created = int(time.time())
        self.failed_steps = 0  # generation steps that raised (their requests got 500s; the worker went on)
        self.last_error: str | None = None
        self.decode_setup = None  # what `cpu_decode.use_cpu_decode` chose (from_source)
        self._grammar = None
        self._grammar_lock = threading.Lock()

    def grammar_compiler(self):
        """The llguidance tokenizer for constrained decoding, built on first use (~1 s); None when impossible."""
        from .constraints import GrammarCompiler

        with self._grammar_lock:
            if self._grammar is None:
                vocab = getattr(getattr(self.model, "args", None), "vocab_size", None) or len(self.tokenizer)
                try:
                    self._grammar = GrammarCompiler(self.tokenizer, vocab)
                except (ValueError, TypeError):  # not a fast HF tokenizer
                    self._grammar = False
            return self._grammar or None

    @classmethod
    def from_source(cls, source: str, adapters: dict[str, str | Path] | None = None, base_name: str | None = None,
                    default_model: str | None = None, limits: EngineLimits | None = None,
                    float_weights: str = "auto", kv_memory: str = "none", cpu_decode: str = "auto") -> "Engine":
        """Load the base from any model source (HF folder, hub id, GGUF, demo) and add the adapters.

        On the CPU, float16/bfloat16 weights are widened to float32 once: MLX's CPU half-precision
        matmul has no BLAS behind it and decodes ~4x slower (measured on the fused demo model).
        Quantized weights are handled per `float_weights` (see `decode_weights.prepare_for_decode`);
        `kv_memory` ("auto", "none" or a size such as 2GB) bounds the KV caches (see `kv_budget`);
        `cpu_decode` ("auto", "none", or "plain" / "transposed" to pin the products' orientation)
        is `cpu_decode.use_cpu_decode`'s.
        """
        from ..cpu_math import use_fast_cpu_math
        from ..frozen_matmul import use_fast_frozen_layers
        from ..models import load_model
        from .cpu_decode import use_cpu_decode
        from .decode_weights import prepare_for_decode

        model, tokenizer, info = load_model(source)
        use_fast_frozen_layers(model)
        use_fast_cpu_math(model)
        if mx.default_device() == mx.cpu:
            from ..fuse import cast_floats

            cast_floats(model, mx.float32)
        prepare_for_decode(model, float_weights)
        mx.eval(model.parameters())
        limits = limits or EngineLimits()
        context = int(info.hf_config.get("max_position_embeddings") or limits.max_context)
        if context < limits.max_context:
            limits = EngineLimits(**{**limits.__dict__, "max_context": context})
        decode = use_cpu_decode(model, limits.max_batch, limits.max_context + 1, cpu_decode)
        budget = kv_budget(kv_memory)
        if budget is not None:
            limits = EngineLimits(**{**limits.__dict__, "kv_budget_bytes": budget})
        engine = cls(model, tokenizer, base_name or default_base_name(source), adapters, default_model, limits)
        engine.decode_setup = decode
        return engine

    # --- models ---

    def add_adapter(self, name: str, folder: str | Path) -> None:
        """Serve the adapter in `folder` as `name`, without reloading the base. Raises ValueError."""
        if not ADAPTER_NAME.match(name):
            shown = name if len(name) <= 80 else name[:80] + "..."
            raise ValueError(f"adapter name {shown!r}: use letters, digits, '.', '_', ':' or '-' (at most 64), e.g. dates=runs/demo")
        if name == self.base_name or name in self.adapters:
            raise ValueError(f"adapter name {name!r} is used twice (the base is called {self.base_name!r})")
        weights, scaling = read_checked_adapter(self.model, folder)
        with self._model_lock:
            used = {a.slot for a in self.adapters.values()}
            slot = next(s for s in range(1, len(used) + 2) if s not in used)
            install_adapter(self.model, slot, weights, scaling, self.rows)
            self._versions += 1
            self.adapters[name] = Adapter(slot, str(folder), self._versions)

    def remove_adapter(self, name: str) -> None:
        """Stop serving adapter `name`. Raises KeyError when unknown, RuntimeError while requests use it."""
        adapter = self.adapters[name]
        with self._model_lock:
            busy = self.scheduler.uses_slot(adapter.slot) + sum(
                job.request.model == name for job in list(self._inbox.queue))
            if busy:
                raise RuntimeError(f"adapter {name!r} is in use by {busy} request(s); retry when they finish")
            remove_adapter(self.model, adapter.slot)
            del self.adapters[name]
            if self.default_model == name:
                self.default_model = self.base_name

    def model_names(self) -> list[str]:
        """Every servable name, the default first."""
        names = [self.base_name, *self.adapters]
        default = getattr(self, "default_model", self.base_name)
        return [default] + [n for n in names if n != default]

    def _forward(self, tokens: mx.array, caches: list, slots: list[int]) -> mx.array:
        self.rows.set(slots)
        if self.decode_setup is None:
            return self.model(tokens, cache=caches)
        with self.decode_setup.forward_pass():  # the batch's caches advance together: one set of rotary rows
            return self.model(tokens, cache=caches)

    # --- the worker ---

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="mlx-lora-generation", daemon=True)
            self._thread.start()

    def cancel_all(self) -> None:
        """Refuse queued work and cancel running work (each job gets its error event at the worker's next
        step) without waiting: what Ctrl-C does first, so open streams end before the server closes."""
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                break
            job.cancel()
            job.sink(("error", 503, "the server is shutting down", None))
        self.scheduler.cancel_all()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse queued work, cancel running work, and stop the worker after its current step."""
        if self._thread is None:
            return
        self.cancel_all()
        self._stopping.set()
        self._thread.join(timeout)
        self._thread = None

    def queued(self) -> int:
        return self._inbox.qsize() + self.scheduler.queued()

    def running(self) -> int:
        return self.scheduler.active()

    def submit(self, request: GenerationRequest, sink: Callable[[tuple], None]) -> Job:
        """Queue a request; raises queue.Full when `max_queue` requests already wait for a batch slot beyond the
        slots free now (the caller answers 429)."""
        if request.model not in self.model_names():
            raise KeyError(request.model)
        # Slots free now are taken at the worker's next step: their requests do not wait. Unless someone
        # already waits in the scheduler with slots free (the KV budget holds it back): then none are free.
        held_back = bool(self.scheduler.waiting)
        free_slots = 0 if held_back else max(0, self.limits.max_batch - self.running())
        if self.queued() - free_slots >= self.limits.max_queue:
            raise queue.Full
        job = Job(request, sink)
        self._inbox.put_nowait(job)
        self._wake.set()
        return job

    def _run(self) -> None:
        from ..thread_compile import release

        try:
            self._serve_until_stopped()
        finally:
            release()  # this thread's compiled kernels, while the GIL can still be taken (thread_compile.py)

    def _serve_until_stopped(self) -> None:
        while not self._stopping.is_set():
            self._take_new_jobs()
            if self.scheduler.idle():
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                continue
            try:
                with self._model_lock:
                    self.scheduler.step()
            except Exception as err:  # noqa: BLE001 - a failed step must not leave every later request hanging
                self._fail_step(err)
        self.scheduler.cancel_all()
        with self._model_lock:
            self.scheduler.step()  # finishes the cancelled sequences

    def _fail_step(self, err: Exception) -> None:
        """Answer every sequence the failed step held with a 500 naming the error, log it once with
        its traceback, and go on: waiting requests are tried next, each failing alike if the fault stays."""
        import traceback

        message = f"generation failed: {type(err).__name__}: {err}"
        self.failed_steps += 1
        self.last_error = message
        print(f"error: {message} (the requests in this step got a 500; the server goes on)", file=sys.stderr)
        traceback.print_exception(err, file=sys.stderr)
        for seq in self.scheduler.abandon():
            if seq.on_error is not None:
                seq.on_error(message)

    def _take_new_jobs(self) -> None:
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return
            if job.cancelled.is_set():
                self._record(job, 0, "cancelled")
                continue
            try:
                self.scheduler.add(self._sequence(job))
            except RequestError as err:
                job.sink(("error", 400, str(err), err.param, err.code))
            except Exception as err:  # noqa: BLE001 - one failing request must not stop the worker
                job.sink(("error", 500, f"generation failed: {type(err).__name__}: {err}", None))

    def _sequence(self, job: Job) -> Sequence:
        request = job.request
        tokens = self.tokenize(request)
        max_tokens = self.completion_budget(request, len(tokens))
        adapter = self.adapters.get(request.model)
        if adapter is None and request.model != self.base_name:
            raise RequestError(f"model {request.model!r} was removed", "model")
        stream = TextStream(self.tokenizer, job.sink, request.stop, request.tools)
        seq = Sequence(prompt=tokens, max_tokens=max_tokens, on_token=stream.on_token, on_finish=None,
                       slot=adapter.slot if adapter else NO_ADAPTER,
                       cache_key=f"{request.model}#{adapter.version if adapter else 0}", params=request.params,
                       constraint=request.constraint_factory() if request.constraint_factory else None,
                       cancelled=job.cancelled)

        def on_finish(reason: str) -> None:
            stream.finish(reason, len(tokens), len(seq.generated), seq.cached_tokens)
            self._record(job, len(seq.generated), reason, max_tokens)

        def on_error(message: str) -> None:
            job.sink(("error", 500, message, None))
            self._record(job, len(seq.generated), "error", max_tokens)

        seq.on_finish, seq.on_error = on_finish, on_error
        job.sink(("start", len(tokens), 0))
        return seq

    def tokenize(self, request: GenerationRequest) -> list[int]:
        """Prompt tokens: the chat template for messages, plain encoding for a text prompt (RequestError when
        empty or filling the context)."""
        lone = _lone_surrogate(request)
        if lone is not None:  # JSON's "\ud800" escape decodes to no character; tokenizers fail on it obscurely
            raise RequestError(f"{lone}: holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF escape without its pair), "
                               "which is no character; send valid Unicode", lone.split(".")[0])
        if request.messages is not None:
            extra = {"tools": request.tools} if request.tools else {}
            try:
                tokens = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True,
                                                            **extra)
            except Exception as err:  # jinja templates raise their own error types
                raise RequestError(f"the model's chat template rejected these messages: {err}", "messages") from err
            tokens = list(tokens["input_ids"] if isinstance(tokens, dict) else tokens)
        else:
            tokens = list(self.tokenizer.encode(request.prompt or ""))
        field_name = "messages" if request.messages is not None else "prompt"
        if not tokens:
            raise RequestError("the prompt is empty", field_name)
        context = self.limits.max_context
        if len(tokens) >= context:
            raise RequestError(f"the prompt has {len(tokens)} tokens; this server accepts at most {context - 1} "
                               f"(max_context {context} = prompt + completion)", field_name, CONTEXT_EXCEEDED)
        return tokens

    def completion_budget(self, request: GenerationRequest, prompt_tokens: int) -> int:
        """The most tokens this request may generate after a prompt of `prompt_tokens` (under max_context).

        A client's max_tokens is checked: past the context or the KV budget it is a RequestError
        naming max_tokens. The server's default (the client gave none) is capped to what the two
        leave, as OpenAI caps to the context; only a prompt that leaves no room at all is refused.
        """
        field_name = "messages" if request.messages is not None else "prompt"
        context, max_tokens = self.limits.max_context, request.max_tokens
        if request.max_tokens_is_default:
            max_tokens = min(max_tokens, context - prompt_tokens)
            if not self.scheduler.fits_alone(prompt_tokens, max_tokens):
                room = self.scheduler.most_tokens_alone(prompt_tokens)
                max_tokens = room if room > 0 else max_tokens  # no room: refused below, naming the prompt
        if prompt_tokens + max_tokens > context:
            raise RequestError(f"max_tokens: the prompt has {prompt_tokens} tokens, so at most "
                               f"{context - prompt_tokens} can be generated within this server's {context}-token "
                               "context; ask for fewer",
                               "max_tokens", CONTEXT_EXCEEDED)
        if not self.scheduler.fits_alone(prompt_tokens, max_tokens):
            room = self.scheduler.most_tokens_alone(prompt_tokens)
            raise RequestError(f"max_tokens: the prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) do "
                               f"not fit this server's KV-cache budget ({self.limits.kv_budget_bytes} bytes = "
                               f"{self.scheduler.kv_tokens} tokens, {self.scheduler.kv_step} of them held for cache "
                               f"growth); " + (f"ask for at most {room} tokens" if room > 0 else "shorten the prompt"),
                               "max_tokens" if room > 0 else field_name)
        return max_tokens

    def _record(self, job: Job, generated: int, finish: str, max_tokens: int | None = None) -> None:
        self.history.append({"model": job.request.model, "completion_tokens": generated, "finish_reason": finish,
                             "max_tokens": job.request.max_tokens if max_tokens is None else max_tokens,
                             "seconds": time.perf_counter() - job.submitted})


def _lone_surrogate(request: GenerationRequest) -> Optional[str]:
    """The field (`messages.2.content`, `prompt`) whose text holds an unpaired surrogate, or None."""
    def bad(text) -> bool:
        return isinstance(text, str) and LONE_SURROGATE.search(text) is not None

    if request.messages is None:
        return "prompt" if bad(request.prompt) else None
    for i, message in enumerate(request.messages):
        if bad(message.get("content")):
            return f"messages.{i}.content"
    return None


def kv_windows(cache: list) -> tuple[Optional[int], ...]:
    """Per layer of an mlx-lm prompt cache: None for a full KV cache, the window for a sliding-window one
    (`RotatingKVCache.max_size`); () when every layer is full."""
    from mlx_lm.models.cache import RotatingKVCache

    windows = tuple(layer.max_size if isinstance(layer, RotatingKVCache) else None for layer in cache)
    return windows if any(w is not None for w in windows) else ()


def kv_bytes_per_token(model: nn.Module) -> Optional[int]:
    """KV-cache bytes per token of a loaded mlx-lm model, by the memory planner; None for a shape it does not know.

    The shape comes from the model's own args (its config.json fields); the dtype is the model's
    float dtype after loading (float32 on the CPU, where the server widens half precision).
    """
    from mlx.utils import tree_flatten

    from ..memory.estimate import kv_cache_bytes_per_token
    from ..memory.shape import shape_from_config

    args = getattr(model, "args", None)
    try:
        shape = shape_from_config(dict(vars(args)), "the model's config") if args is not None else None
    except (ValueError, TypeError):
        return None
    floats = [v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    return kv_cache_bytes_per_token(shape, floats[0].size if floats else 4) if shape else None


def kv_budget(setting: str) -> Optional[int]:
    """Bytes for the running batch's KV caches from the `kv_memory` setting, or None (unbounded).

    "none": unbounded; a size ("2GB", "512MB"): that; "auto": half the memory available now
    (after the model is loaded; MemAvailable on Linux, else the planner's machine memory).
    Raises ValueError for anything else.
    """
    from ..memory.plan import machine_memory, parse_memory
    from .decode_weights import available_memory_bytes

    if setting == "none":
        return None
    if setting == "auto":
        available = available_memory_bytes()
        if available is None:  # a Mac: the GPU working set, less what the loaded model already holds
            available = machine_memory()[0] - mx.get_active_memory()
        return int(max(available, 0) // 2)
    try:
        return int(parse_memory(setting))
    except ValueError as err:
        raise ValueError(f"kv_memory: {err}; or auto, or none") from None


def default_base_name(source: str) -> str:
    """A model id for /v1/models from a source: `demo`, a folder's name, a GGUF's stem, a hub id."""
    path = Path(source)
    if source == "demo" or source.count("/") == 1 and not path.exists():
        return source
    name = path.stem if path.suffix.lower() == ".gguf" else path.name
    return name or "base"
