"""`mlx-lora serve`: settings (flags, or a YAML file), `--from-run` (fuse a training run, then serve), uvicorn.

    mlx-lora serve --model demo --adapter dates=runs/demo --adapter other=runs/other
    mlx-lora serve --from-run configs/demo.yaml            # fuse runs/demo, serve the fused model
    mlx-lora serve --from-run configs/demo.yaml --no-fuse  # serve base + adapters
    mlx-lora serve serve.yaml port=9000                     # settings from YAML, key=value overrides
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

LOOPBACK = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "MLX_LORA_API_KEY"


def _help(text: str, **kwargs) -> dict:
    return {"metadata": {"help": text}, **kwargs}


# Browser pages served from this machine, any port (Ollama's default set of allowed origins, less its app schemes).
LOCAL_ORIGINS = ("http://localhost", "https://localhost", "http://127.0.0.1", "https://127.0.0.1", "http://[::1]",
                 "https://[::1]")


@dataclass(frozen=True)
class ServeConfig:
    model: str = field(default="", **_help("Base model source: HF folder, hub id, .gguf or `demo`."))
    adapters: tuple[str, ...] = field(default=(), **_help("NAME=DIR adapter folders served on the base (YAML: a mapping name: dir)."))
    model_name: str = field(default="", **_help("Id of the base in /v1/models (default: from the source)."))
    default_model: str = field(default="", **_help("Model used when a request names none; listed first (default: the base)."))
    host: str = field(default="127.0.0.1", **_help("Interface to bind; anything but loopback exposes the server."))
    port: int = field(default=8080, **_help("TCP port."))
    api_key: Optional[str] = field(default=None, **_help(f"Require `Authorization: Bearer KEY` (or set {API_KEY_ENV})."))
    max_tokens: int = field(default=2048, **_help("Largest max_tokens a request may ask for."))
    default_max_tokens: int = field(default=512, **_help("max_tokens when a request gives none (capped to what the context and KV budget leave after its prompt)."))
    max_body_bytes: int = field(default=1_000_000, **_help("Largest request body; larger ones get 413."))
    max_queue: int = field(default=256, **_help("Requests waiting for a batch slot before new ones get 429 with Retry-After."))
    max_batch: int = field(default=8, **_help("Sequences decoding together in one batch (continuous batching)."))
    max_context: int = field(default=8192, **_help("Most prompt + completion tokens of one request (also capped by the model's context); more get 400."))
    prefill_chunk: int = field(default=512, **_help("Prompt tokens per sequence read between two decode steps, so long prompts do not stall streams."))
    prefill_seconds: float = field(default=0.25, **_help("A prefill chunk is sized to take about this long (measured) while other requests decode, 4x this while none do, at least 16 tokens, at most prefill_chunk; 0: always prefill_chunk tokens."))
    prompt_cache_size: int = field(default=16, **_help("KV prefixes kept per (adapter, tokens) for reuse by later requests; 0 turns the prompt cache off."))
    prompt_cache_bytes: int = field(default=1 << 30, **_help("Memory bound of the prompt cache in bytes."))
    adapter_dirs: tuple[str, ...] = field(default=(), **_help("Folders POST /v1/adapters may load adapters from (nothing else is opened); none: the endpoint is off."))
    cors_origins: tuple[str, ...] = field(default=LOCAL_ORIGINS, **_help("Web pages (origins) whose scripts may call the server from a browser (CORS): by default pages served from this machine (localhost, 127.0.0.1, [::1], any port), as Ollama allows; `*` any site; empty: none."))
    kv_memory: str = field(default="auto", **_help("Memory for the running batch's KV caches (a size such as 2GB, `auto`: half the memory free after loading, `none`): sequences wait for room; one that can never fit gets 400 naming max_tokens."))
    float_weights: str = field(default="auto", **_help("Quantized base on CPU: `float` keeps float32 copies (fast decode), `quantized` keeps 4-bit, `auto` picks float when it takes under half the free memory."))
    cpu_decode: str = field(default="auto", **_help("CPU only: `auto` times, at start-up (a few seconds; more on a busy machine), the BLAS's two product orientations and our panel kernel (compiled once per MLX version, ~12 s, cached in ~/.cache/mlx-lora/kernels; MLX_LORA_NO_PANEL_KERNEL=1 skips it) for a decode step's rows and uses the fastest, and reads rotary embeddings from a table; `none` keeps the library's own (same tokens, slower steps)."))


def load_serve_config(path: str | None, overrides: list[str], flags: dict) -> ServeConfig:
    """ServeConfig from an optional YAML file, `key=value` overrides, then command-line flags."""
    import yaml

    from ..config import ConfigError, _build, apply_overrides, keys_given_twice, yaml_error_line

    data: dict = {}
    source = "command line"
    problems: list[str] = []
    if path is not None:
        source = path
        if not Path(path).is_file():
            raise ConfigError([f"serve config not found: {path}"], source)
        text = Path(path).read_text(encoding="utf-8")
        try:
            problems += keys_given_twice(yaml.compose(text, Loader=yaml.SafeLoader))
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError([yaml_error_line(err)], source) from err
        if not isinstance(data, dict):
            raise ConfigError(["top level must be a mapping of keys"], source)
    data = apply_overrides(data, overrides)
    if isinstance(data.get("adapters"), dict):
        data["adapters"] = [f"{name}={folder}" for name, folder in data["adapters"].items()]
    for key, value in flags.items():
        if value is not None and value != ():
            data[key] = list(value) + list(data.get(key) or []) if key == "adapters" else value
    cfg = _build(ServeConfig, data, "", problems)
    if not cfg.model:
        problems.append("model: required (pass --model SOURCE, --from-run CONFIG, or `model:` in the YAML)")
    if not 0 < cfg.port < 65536:
        problems.append(f"port: must be 1-65535, got {cfg.port}")
    if cfg.float_weights not in ("auto", "float", "quantized"):
        problems.append(f"float_weights: must be auto, float or quantized, got {cfg.float_weights!r}")
    if cfg.cpu_decode not in ("auto", "none"):
        problems.append(f"cpu_decode: must be auto or none, got {cfg.cpu_decode!r}")
    for key in ("max_tokens", "default_max_tokens", "max_body_bytes", "max_queue", "max_batch", "max_context",
                "prefill_chunk"):
        if getattr(cfg, key) < 1:
            problems.append(f"{key}: must be positive, got {getattr(cfg, key)}")
    for folder in cfg.adapter_dirs:
        if not Path(folder).expanduser().is_dir():
            problems.append(f"adapter_dirs: {folder} is not a folder; create it, or leave it out")
    for origin in cfg.cors_origins:
        if origin != "*" and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+/?", origin):
            problems.append(f"cors_origins: {origin!r} is not an origin; write scheme://host[:port], e.g. "
                            f"http://{origin.split('://')[-1].split('/')[0] or 'localhost:3000'}, or * for any site")
    if not cfg.prefill_seconds >= 0:
        problems.append(f"prefill_seconds: must be 0 or more, got {cfg.prefill_seconds}")
    if cfg.kv_memory not in ("auto", "none"):
        from ..memory.plan import parse_memory

        try:
            parse_memory(cfg.kv_memory)
        except ValueError as err:
            problems.append(f"kv_memory: {err}; or auto, or none")
    parse_adapters(cfg.adapters, problems)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def parse_adapters(items, problems: list[str] | None = None) -> dict[str, str]:
    """{name: folder} from NAME=DIR strings; a malformed item or a name given twice is a problem
    (appended to `problems`, else raised as ValueError)."""
    adapters = {}
    for item in items:
        name, sep, folder = item.partition("=")
        name, folder = name.strip(), folder.strip()
        if not sep or not name or not folder:
            message = f"adapters: {item!r} is not NAME=DIR (e.g. dates=runs/demo)"
        elif name in adapters:  # a dict would keep only the last folder
            message = f"adapters: adapter name {name!r} is used twice ({adapters[name]} and {folder})"
        else:
            adapters[name] = folder
            continue
        if problems is None:
            raise ValueError(message)
        problems.append(message)
    return adapters


def from_run(train_config: str, fuse: bool, report=print, overrides: list[str] = ()) -> dict:
    """Serve settings for a training run: its fused model (fused first when stale), or base + adapters.
    `overrides` are the training config's `key=value`s, as `train` and `fuse` take them."""
    from ..adapters import ADAPTER_WEIGHTS
    from ..config import load_config

    cfg = load_config(train_config, list(overrides))
    run_dir = Path(cfg.output_dir)
    weights = run_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"no trained adapters at {weights}: train first (./train_by_mlx.sh {train_config})")
    name = run_dir.name
    if not fuse:
        return {"model": cfg.model, "adapters": (f"{name}={run_dir}",), "model_name": "base", "default_model": name}
    from ..fuse import FUSED_DIRNAME, fuse_adapters

    fused_dir = run_dir / FUSED_DIRNAME
    marker = fused_dir / "config.json"
    if marker.is_file() and marker.stat().st_mtime >= weights.stat().st_mtime:
        report(f"fused model is up to date: {fused_dir}")
    else:
        report(f"fusing {weights} into {cfg.model} -> {fused_dir}")
        result = fuse_adapters(cfg.model, run_dir, fused_dir, check_prompts=Path(cfg.data.path) / "test.jsonl")
        for warning in result.warnings:
            print(f"WARNING: {warning}", file=sys.stderr)
    return {"model": str(fused_dir), "model_name": name}


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="OpenAI-compatible server for a model and its LoRA adapters.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("items", nargs="*", metavar="[SERVE.yaml] [key=value ...]")
    parser.add_argument("--model", help="base model source (HF folder, hub id, .gguf, demo)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="serve an adapter (repeatable)")
    parser.add_argument("--from-run", nargs="?", const="", metavar="TRAIN_CONFIG",
                        help="serve a training run (default config: configs/demo.yaml)")
    parser.add_argument("--no-fuse", action="store_true", help="with --from-run: serve base + adapters, do not fuse")
    parser.add_argument("--name", dest="model_name", help="id of the base model in /v1/models")
    parser.add_argument("--host", help="interface to bind (default 127.0.0.1; others expose the server)")
    parser.add_argument("--port", type=int)
    parser.add_argument("--api-key", help=f"require this Bearer key (better: set {API_KEY_ENV})")
    parser.add_argument("--max-tokens", type=int, help="largest max_tokens a request may ask for")
    parser.add_argument("--max-batch", type=int, help="sequences decoding together (default 8)")
    parser.add_argument("--adapter-dir", dest="adapter_dirs", action="append", default=[], metavar="DIR",
                        help="allow POST /v1/adapters to load adapters from DIR (repeatable)")
    parser.add_argument("--kv-memory", help="memory for the batch's KV caches: a size (2GB), auto or none")
    parser.add_argument("--float-weights", choices=("auto", "float", "quantized"),
                        help="quantized base on CPU: float32 copies for fast decode, or keep 4-bit (default auto)")
    return parser


def serve(cfg: ServeConfig) -> None:
    """Load the model and adapters, print how to call the server, and serve until Ctrl-C."""
    import uvicorn

    from ..kernel_cache import start_preamble_pch
    from .app import ServerLimits, create_app
    from .engine import Engine, EngineLimits

    if cfg.host not in LOOPBACK:
        print(f"WARNING: binding {cfg.host}: the server is reachable from other machines"
              + ("" if cfg.api_key else "; consider --api-key"), file=sys.stderr)
    check_port_free(cfg.host, cfg.port)  # before the model loads: a taken port said at once, not after "serving on"
    print(f"loading {cfg.model}" + (f" with adapters {', '.join(cfg.adapters)}" if cfg.adapters else ""), flush=True)
    start_preamble_pch()  # in the background: MLX's CPU kernels build faster once it is there
    engine_limits = EngineLimits(max_batch=cfg.max_batch, max_queue=cfg.max_queue, max_context=cfg.max_context,
                                 prefill_chunk=cfg.prefill_chunk, prefill_seconds=cfg.prefill_seconds,
                                 prompt_cache_size=cfg.prompt_cache_size,
                                 prompt_cache_bytes=cfg.prompt_cache_bytes)
    engine = Engine.from_source(cfg.model, parse_adapters(cfg.adapters), base_name=cfg.model_name or None,
                                default_model=cfg.default_model or None, limits=engine_limits,
                                float_weights=cfg.float_weights, kv_memory=cfg.kv_memory, cpu_decode=cfg.cpu_decode)
    limits = ServerLimits(max_tokens=cfg.max_tokens, default_max_tokens=min(cfg.default_max_tokens, cfg.max_tokens),
                          max_body_bytes=cfg.max_body_bytes, api_key=cfg.api_key, adapter_dirs=tuple(cfg.adapter_dirs),
                          cors_origins=tuple(cfg.cors_origins))
    app = create_app(engine, limits)
    shown_host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{shown_host}:{cfg.port}/v1"
    auth = ' -H "Authorization: Bearer $MLX_LORA_API_KEY"' if cfg.api_key else ""
    print(f"models: {', '.join(engine.model_names())}")
    if engine.decode_setup is not None and engine.decode_setup.products is not None:
        print(engine.decode_setup.summary())
    if engine.scheduler.kv_tokens is not None:
        print(f"KV-cache budget: {engine.limits.kv_budget_bytes / 2**20:.0f} MiB = {engine.scheduler.kv_tokens} tokens "
              f"in flight at {engine.kv_bytes_per_token} bytes per token (kv_memory {cfg.kv_memory})" +
              (f"; {sum(w is not None for w in engine.kv_windows)} of {len(engine.kv_windows)} layers keep a sliding "
               f"window of {max(w for w in engine.kv_windows if w is not None)} tokens" if engine.kv_windows else ""))
    print(f"serving on {url}  (OpenAPI docs: http://{shown_host}:{cfg.port}/docs; Ctrl-C stops)")
    print("try:\n  curl " + url + "/chat/completions -H 'Content-Type: application/json'" + auth +
          " -d '{\"model\": \"" + engine.default_model + "\", \"messages\": [{\"role\": \"user\", "
          "\"content\": \"Hello!\"}], \"max_tokens\": 64}'", flush=True)
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # Ctrl-C: open streams end with an error event, then uvicorn closes
            engine.cancel_all()
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5)).run()


def check_port_free(host: str, port: int) -> None:
    """ValueError (one line) when `port` on `host` cannot be bound, e.g. another server holds it."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as err:
        raise ValueError(f"port {port} on {host}: {err.strerror or err} (another server?); choose another with "
                         "--port, or stop the one that holds it") from None


def split_run_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """With --from-run: (serve settings' key=value items, the training config's): a key the serve
    settings lack (output_dir=runs/b, data.path=...) is the training run's, as `train` and `fuse` take it."""
    serve_keys = {f.name for f in dataclasses.fields(ServeConfig)}
    training = [item for item in items if item.split("=", 1)[0].split(".")[0] not in serve_keys]
    return [item for item in items if item not in training], training


def run(args) -> int:
    path = args.items[0] if args.items and "=" not in args.items[0] else None
    overrides = args.items[1:] if path else args.items
    flags = {"model": args.model, "adapters": tuple(args.adapter), "model_name": args.model_name, "host": args.host,
             "port": args.port, "api_key": args.api_key or os.environ.get(API_KEY_ENV) or None,
             "max_tokens": args.max_tokens, "max_batch": args.max_batch, "adapter_dirs": tuple(args.adapter_dirs),
             "float_weights": args.float_weights, "kv_memory": args.kv_memory}
    if args.from_run is not None:
        from ..cli import _default_config

        overrides, training = split_run_overrides(overrides)
        flags.update(from_run(args.from_run or _default_config(), fuse=not args.no_fuse, overrides=training))
        flags["adapters"] = tuple(flags.get("adapters") or ()) + tuple(args.adapter)
    elif args.no_fuse:
        raise ValueError("--no-fuse only applies with --from-run")
    serve(load_serve_config(path, overrides, flags))
    return 0


def main(argv: list[str] | None = None, prog: str = "mlx-lora serve") -> int:
    """Entry point of `mlx-lora serve`; returns the exit code."""
    from ..cli import run_command

    args = build_parser(prog).parse_args(argv)
    return run_command(run, args)


def describe_settings() -> list[tuple[str, str, str]]:
    """(key, default, help) rows of the serve settings, for docs."""
    return [(f.name, str(f.default), f.metadata.get("help", "")) for f in dataclasses.fields(ServeConfig)]
