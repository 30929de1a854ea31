"""Adapter files: save and load the MLX adapter format (the one mlx-lm reads).

`adapters.safetensors` holds `<module path>.lora_a` (in, rank) and `.lora_b` (rank, out);
`adapter_config.json` holds what mlx-lm needs (`fine_tune_type`, `num_layers`,
`lora_parameters` with `rank`, `scale`, `dropout`, `keys`) plus our own fields (`alpha`,
`target_modules`, `quantization`, `model`). PEFT conversion lives in `peft_format.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoints import save_safetensors, write_json
from .config import LoraConfig

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapter_config(lora: LoraConfig, keys: list[str], num_blocks: int, extra: dict | None = None) -> dict:
    """The adapter_config.json content for adapters made with `lora` on the given block keys."""
    num_layers = num_blocks if lora.num_layers == -1 else min(lora.num_layers, num_blocks)
    return {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": lora.rank, "scale": lora.scaling, "dropout": lora.dropout, "keys": list(keys)},
        "alpha": lora.alpha,
        "target_modules": list(lora.target_modules),
        **(extra or {}),
    }


def save_adapters(folder: str | Path, model, config: dict) -> None:
    """Write adapters.safetensors and adapter_config.json into `folder` (atomically, each)."""
    from mlx.utils import tree_flatten

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    save_safetensors(folder / ADAPTER_WEIGHTS, weights, metadata={"format": "mlx"})
    write_json(folder / ADAPTER_CONFIG, config)


def read_adapter_config(folder: str | Path) -> tuple[dict, LoraConfig]:
    """Read an MLX adapter config (ours or mlx_lm.lora's) as (raw dict, LoraConfig)."""
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {ADAPTER_CONFIG}; pass the run's output_dir or an adapter folder")
    raw = json.loads(path.read_text(encoding="utf-8"))
    if raw.get("fine_tune_type", "lora") != "lora":
        raise ValueError(f"{path}: fine_tune_type {raw.get('fine_tune_type')!r} is not supported (only lora)")
    params = raw.get("lora_parameters")
    if not isinstance(params, dict) or "rank" not in params:
        raise ValueError(f"{path}: missing lora_parameters.rank; is this an MLX adapter folder?")
    rank = int(params["rank"])
    # mlx_lm.lora records only `scale` (= PEFT's alpha / r); ours records alpha as well.
    alpha = float(raw["alpha"]) if "alpha" in raw else float(params.get("scale", 20.0)) * rank
    keys = params.get("keys") or []
    # mlx_lm.lora leaves `keys` out when it adapted its default set: every linear of a block.
    targets = raw.get("target_modules") or sorted({k.rsplit(".", 1)[-1] for k in keys}) or list(LoraConfig().target_modules)
    lora = LoraConfig(rank=rank, alpha=alpha, dropout=float(params.get("dropout", 0.0)),
                      target_modules=tuple(targets), num_layers=int(raw.get("num_layers", -1)))
    return raw, lora


def is_peft_adapter(folder: str | Path) -> bool:
    return (Path(folder) / "adapter_model.safetensors").is_file()


def read_adapter(folder: str | Path) -> tuple[dict, LoraConfig, dict]:
    """(raw config, LoraConfig, weights by MLX key) of an MLX or PEFT adapter folder."""
    import mlx.core as mx

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {folder}")
    if is_peft_adapter(folder):
        from .peft_format import read_peft_adapter

        return read_peft_adapter(folder)
    raw, lora = read_adapter_config(folder)
    weights_path = folder / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{folder}: no {ADAPTER_WEIGHTS}")
    return raw, lora, mx.load(str(weights_path))


def check_adapter_weights(model, weights: dict, source: str) -> None:
    """Raise listing every tensor that is missing, unexpected or of the wrong shape."""
    from mlx.utils import tree_flatten

    expected = dict(tree_flatten(model.trainable_parameters()))
    problems = [f"{k}: not an adapter parameter of this model" for k in weights if k not in expected]
    problems += [f"{k}: missing from the adapter" for k in expected if k not in weights]
    problems += [f"{k}: adapter shape {tuple(weights[k].shape)} != model shape {tuple(expected[k].shape)}"
                 for k in weights if k in expected and weights[k].shape != expected[k].shape]
    if problems:
        raise ValueError(f"{source} does not fit this model:\n  " + "\n  ".join(problems[:20]))


def load_adapters(model, folder: str | Path) -> dict:
    """Wrap `model` with the LoRA layers of an MLX or PEFT adapter folder and load their weights.

    Returns the raw adapter config.
    """
    import mlx.core as mx

    from .lora import apply_lora

    raw, lora, weights = read_adapter(folder)
    apply_lora(model, lora)
    check_adapter_weights(model, weights, str(folder))
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return raw
