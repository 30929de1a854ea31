"""The base model's evaluation scores, kept between runs.

The "base" column of a run's before/after table depends on the frozen base, the test split and the
evaluation settings, never on the adapters, so a second run of the same set-up (another learning
rate, rank or step count) need not score the base again. The key is a BLAKE2b digest of everything
the scores depend on: the bytes of every frozen weight as the run holds them (quantized as it was
for training), the model's class and arguments, the tokenizer's vocabulary and end tokens, each test
example's tokens, loss mask, generation prompt and reference, the batch size and max_new_tokens, the
device and the versions of mlx, mlx-lm and mlx-lora. Any difference gives another key, so a stale
entry is never read; entries are small JSON files, written atomically.

Folder: `$MLX_LORA_CACHE_DIR/base-eval`, else `$XDG_CACHE_HOME/mlx-lora/base-eval`, else
`~/.cache/mlx-lora/base-eval`. `eval.cache_base: false` scores the base every time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

FORMAT = 1  # bump when what is stored, or how scores are computed, changes


def cache_dir() -> Path:
    """Where base scores are kept (see the module doc)."""
    if os.environ.get("MLX_LORA_CACHE_DIR"):
        return Path(os.environ["MLX_LORA_CACHE_DIR"]) / "base-eval"
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mlx-lora" / "base-eval"


def _frozen_weights_digest(model, digest) -> None:
    for name, value in sorted(tree_flatten(model.parameters()), key=lambda item: item[0]):
        if name.rpartition(".")[2] in ("lora_a", "lora_b"):
            continue
        mx.eval(value)
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        array = value if value.dtype != mx.bfloat16 else value.view(mx.uint16)  # numpy has no bfloat16
        digest.update(np.ascontiguousarray(np.asarray(array)).view(np.uint8).tobytes())


def base_eval_key(model, tokenizer, examples: list, prompts: list, batch_size: int, max_new_tokens: int) -> str:
    """Hex digest naming the base scores of `model` (adapters ignored) on `examples` with these settings.

    `prompts`: each example's generation prompt (token ids) or None, as `evaluate.prompt_tokens` gives.
    """
    import mlx_lm

    from . import __version__

    digest = hashlib.blake2b(digest_size=20)
    args = getattr(model, "args", None)
    header = {
        "format": FORMAT, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "mlx_lora": __version__,
        "device": str(mx.default_device()), "class": f"{type(model).__module__}.{type(model).__name__}",
        "args": repr(sorted(vars(args).items())) if args is not None else None,
        "batch_size": batch_size, "max_new_tokens": max_new_tokens,
        "eos": sorted(int(t) for t in getattr(tokenizer, "eos_token_ids", []) or []),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    digest.update(json.dumps(sorted(vocab.items(), key=lambda item: item[1]), ensure_ascii=False).encode())
    for example, prompt in zip(examples, prompts):
        digest.update(json.dumps([example.tokens, [bool(m) for m in example.mask], prompt, example.reference]).encode())
    _frozen_weights_digest(model, digest)
    return digest.hexdigest()


def load_base_scores(key: str) -> dict | None:
    """The stored base scores for `key`, or None (absent or unreadable: scored again)."""
    path = cache_dir() / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def store_base_scores(key: str, scores: dict) -> Path | None:
    """Keep `scores` under `key`; None when the cache folder cannot be written (not an error)."""
    from .checkpoints import write_json

    path = cache_dir() / f"{key}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, scores)
    except OSError:
        return None
    return path
