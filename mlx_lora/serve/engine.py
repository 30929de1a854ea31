"""The generation worker: one base model, any number of named adapters, one queue of requests.

Adapters live side by side in `MultiLoRALinear` layers wrapped around the base's linears; a
request's model name selects which one is active, so switching costs nothing and the base is
loaded once. A single worker thread takes requests in arrival order, tokenizes them (the
tokenizer is not thread-safe), and streams text back through a callback, checking between
tokens whether its client has gone. HTTP is `app.py`'s business.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from ..frozen_matmul import frozen_linear
from ..lora import is_linear, linear_dims, transformer_blocks

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
HISTORY = 256  # finished-job summaries kept for /health and tests


class ActiveAdapter:
    """Which adapter every MultiLoRALinear of a model applies (None: the bare base)."""

    def __init__(self) -> None:
        self.name: Optional[str] = None


class AdapterBank:
    """name -> (A (in, rank), B (rank, out), scaling); a plain object so MLX does not see parameters."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[mx.array, mx.array, float]] = {}


class MultiLoRALinear(nn.Module):
    """y = base(x) + scaling_k * x @ A_k @ B_k for the active adapter k (none: y = base(x))."""

    def __init__(self, base: nn.Module, active: ActiveAdapter):
        super().__init__()
        base.freeze()
        self.linear = base
        self._active = active
        self._bank = AdapterBank()

    def add(self, name: str, lora_a: mx.array, lora_b: mx.array, scaling: float) -> None:
        self._bank.entries[name] = (lora_a, lora_b, scaling)

    def __call__(self, x):
        y = frozen_linear(self.linear, x)
        entry = self._bank.entries.get(self._active.name)
        if entry is None:
            return y
        lora_a, lora_b, scaling = entry
        return y + (((x @ lora_a) * scaling) @ lora_b).astype(y.dtype)  # (..., in) @ (in, r) @ (r, out)


def install_adapter(model: nn.Module, name: str, folder: str | Path, active: ActiveAdapter) -> int:
    """Add the adapter in `folder` (MLX or PEFT format) under `name`; returns the layers it touches.

    Raises ValueError listing every module the model lacks or whose shape differs.
    """
    from mlx.utils import tree_unflatten

    from ..adapters import read_adapter

    _, lora, weights = read_adapter(folder, len(transformer_blocks(model)))
    modules = dict(model.named_modules())
    paths = sorted({key.rsplit(".", 1)[0] for key in weights})
    problems, new_wrappers = [], []
    for path in paths:
        lora_a, lora_b = weights.get(f"{path}.lora_a"), weights.get(f"{path}.lora_b")
        module = modules.get(path)
        base = module.linear if isinstance(module, MultiLoRALinear) else module
        if base is None or not is_linear(base):
            problems.append(f"{path}: no linear layer of that name in the base model")
            continue
        if lora_a is None or lora_b is None:
            problems.append(f"{path}: needs both lora_a and lora_b")
            continue
        in_dims, out_dims = linear_dims(base)
        if lora_a.shape != (in_dims, lora_a.shape[1]) or lora_b.shape != (lora_a.shape[1], out_dims):
            problems.append(f"{path}: adapter shapes {tuple(lora_a.shape)}, {tuple(lora_b.shape)} do not fit "
                            f"a ({in_dims} -> {out_dims}) layer")
            continue
        if not isinstance(module, MultiLoRALinear):
            module = MultiLoRALinear(base, active)
            new_wrappers.append((path, module))
            modules[path] = module
        module.add(name, lora_a.astype(mx.float32), lora_b.astype(mx.float32), lora.scaling)
    if problems:
        raise ValueError(f"adapter {name!r} ({folder}) does not fit the base model:\n  " + "\n  ".join(problems[:20]))
    if new_wrappers:
        model.update_modules(tree_unflatten(new_wrappers))
    mx.eval([w for path in paths for w in (weights[f"{path}.lora_a"], weights[f"{path}.lora_b"])])
    return len(paths)


class RequestError(ValueError):
    """A request the worker refused (e.g. the prompt is too long); becomes an HTTP 400."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class GenerationRequest:
    """One generation: chat `messages` or a text `prompt`, for the model (base or adapter) `model`."""

    model: str
    max_tokens: int
    messages: Optional[list[dict]] = None
    prompt: Optional[str] = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None


@dataclass
class Job:
    """A queued request; `sink` receives events from the worker thread (see `Engine.submit`)."""

    request: GenerationRequest
    sink: Callable[[tuple], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back a tail that may start one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for stop in self.stops:  # the longest suffix of pending that is a proper prefix of a stop
            for k in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:k]):
                    hold = k
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Engine:
    """A base model with named adapters behind one generation worker thread.

    Events sent to a job's sink, in order: ("start", prompt_tokens), then ("delta", text)*,
    then ("done", finish_reason, prompt_tokens, completion_tokens); or ("error", status, message, param).
    """

    def __init__(self, model: nn.Module, tokenizer, base_name: str, adapters: dict[str, str | Path] | None = None,
                 default_model: str | None = None, max_prompt_tokens: int = 8192, max_queue: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.active = ActiveAdapter()
        self.adapter_names: list[str] = []
        self.max_prompt_tokens = max_prompt_tokens
        for name, folder in (adapters or {}).items():
            self.add_adapter(name, folder)
        self.default_model = default_model or base_name
        if self.default_model not in self.model_names():
            raise ValueError(f"default model {self.default_model!r} is not one of {', '.join(self.model_names())}")
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self.history: deque = deque(maxlen=HISTORY)
        self.created = int(time.time())

    @classmethod
    def from_source(cls, source: str, adapters: dict[str, str | Path] | None = None, base_name: str | None = None,
                    default_model: str | None = None, **kwargs) -> "Engine":
        """Load the base from any model source (HF folder, hub id, GGUF, demo) and add the adapters.

        On the CPU, float16/bfloat16 weights are widened to float32 once: MLX's CPU half-precision
        matmul has no BLAS behind it and decodes ~4x slower (measured on the fused demo model).
        """
        from ..frozen_matmul import use_fast_frozen_layers
        from ..models import load_model

        model, tokenizer, info = load_model(source)
        use_fast_frozen_layers(model)
        if mx.default_device() == mx.cpu:
            from ..fuse import cast_floats

            cast_floats(model, mx.float32)
            mx.eval(model.parameters())
        kwargs.setdefault("max_prompt_tokens", int(info.hf_config.get("max_position_embeddings") or 8192))
        return cls(model, tokenizer, base_name or default_base_name(source), adapters, default_model, **kwargs)

    # --- models ---

    def add_adapter(self, name: str, folder: str | Path) -> None:
        if not ADAPTER_NAME.match(name):
            raise ValueError(f"adapter name {name!r}: use letters, digits, '.', '_', ':' or '-' (at most 64), e.g. dates=runs/demo")
        if name == self.base_name or name in self.adapter_names:
            raise ValueError(f"adapter name {name!r} is used twice (the base is called {self.base_name!r})")
        install_adapter(self.model, name, folder, self.active)
        self.adapter_names.append(name)

    def model_names(self) -> list[str]:
        """Every servable name, the default first."""
        names = [self.base_name, *self.adapter_names]
        default = getattr(self, "default_model", self.base_name)
        return [default] + [n for n in names if n != default]

    # --- the worker ---

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="mlx-lora-generation", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel queued work and stop the worker after its current token."""
        if self._thread is None:
            return
        pending = []
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            if job is not None:
                job.cancel()
                job.sink(("error", 503, "the server is shutting down", None))
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, request: GenerationRequest, sink: Callable[[tuple], None]) -> Job:
        """Queue a request; raises queue.Full when the queue is full (the caller answers 503)."""
        if request.model not in self.model_names():
            raise KeyError(request.model)
        job = Job(request, sink)
        self._queue.put_nowait(job)
        return job

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                self._record(job, 0, "cancelled")
                continue
            try:
                self._generate(job)
            except RequestError as err:
                job.sink(("error", 400, str(err), err.param))
            except Exception as err:  # noqa: BLE001 - one failing request must not stop the worker
                job.sink(("error", 500, f"generation failed: {type(err).__name__}: {err}", None))

    def tokenize(self, request: GenerationRequest) -> list[int]:
        """Prompt tokens: the chat template for messages, plain encoding for a text prompt."""
        if request.messages is not None:
            try:
                tokens = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True)
            except Exception as err:  # jinja templates raise their own error types
                raise RequestError(f"the model's chat template rejected these messages: {err}", "messages") from err
            tokens = list(tokens["input_ids"] if isinstance(tokens, dict) else tokens)
        else:
            tokens = list(self.tokenizer.encode(request.prompt or ""))
        if not tokens:
            raise RequestError("the prompt is empty", "prompt")
        if len(tokens) > self.max_prompt_tokens:
            raise RequestError(f"the prompt has {len(tokens)} tokens; this server accepts at most "
                               f"{self.max_prompt_tokens}", "messages" if request.messages is not None else "prompt")
        return tokens

    def _generate(self, job: Job) -> None:
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_sampler

        request = job.request
        tokens = self.tokenize(request)
        job.sink(("start", len(tokens)))
        self.active.name = None if request.model == self.base_name else request.model
        if request.seed is not None:
            mx.random.seed(request.seed)
        sampler = make_sampler(temp=request.temperature, top_p=request.top_p if request.top_p < 1.0 else 0.0)
        matcher = StopMatcher(request.stop)
        finish, generated = "length", 0
        for response in stream_generate(self.model, self.tokenizer, tokens, max_tokens=request.max_tokens, sampler=sampler):
            generated = response.generation_tokens
            if job.cancelled.is_set():
                finish = "cancelled"
                break
            text, stopped = matcher.feed(response.text)
            if text:
                job.sink(("delta", text))
            if stopped:
                finish = "stop"
                break
            if response.finish_reason is not None:
                finish = response.finish_reason
                tail = matcher.flush()
                if tail:
                    job.sink(("delta", tail))
        if finish != "cancelled":
            job.sink(("done", finish, len(tokens), generated))
        self._record(job, generated, finish)

    def _record(self, job: Job, generated: int, finish: str) -> None:
        self.history.append({"model": job.request.model, "completion_tokens": generated, "finish_reason": finish,
                             "max_tokens": job.request.max_tokens})


def default_base_name(source: str) -> str:
    """A model id for /v1/models from a source: `demo`, a folder's name, a GGUF's stem, a hub id."""
    path = Path(source)
    if source == "demo" or source.count("/") == 1 and not path.exists():
        return source
    name = path.stem if path.suffix.lower() == ".gguf" else path.name
    return name or "base"
