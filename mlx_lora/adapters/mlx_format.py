"""Adapter files: save and load the MLX adapter format (the one mlx-lm reads).

`adapters.safetensors` holds `<module path>.lora_a` (in, rank) and `.lora_b` (rank, out);
`adapter_config.json` holds what mlx-lm needs (`fine_tune_type`, `num_layers`,
`lora_parameters` with `rank`, `scale`, `dropout`, `keys`) plus our own fields (`alpha`,
`target_modules`, `quantization`, `model`). PEFT conversion lives in `peft_format.py`; reading either
format into a model in `load.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoints import run_file, save_safetensors, write_json
from ..config import LoraConfig

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
        # the names adapted (all-linear resolved), so PEFT and mlx-lm read the same selection
        "target_modules": sorted({key.rsplit(".", 1)[-1] for key in keys}),
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
    path = run_file(folder, ADAPTER_CONFIG)  # a run's checkpoint folder reads the run's config
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {ADAPTER_CONFIG}; pass the run's output_dir, one of its "
                                "checkpoints/step_N folders, or an adapter folder")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f"{path}:{err.lineno}:{err.colno}" if isinstance(err, json.JSONDecodeError) else str(path)
        raise ValueError(f"{where}: not valid JSON ({getattr(err, 'msg', err)}); fix the file or write the "
                         "adapter again") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: holds a JSON {type(raw).__name__}, not an adapter config object")
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
