"""Reading adapters into a model: an MLX or a PEFT adapter folder, checked tensor by tensor."""

from __future__ import annotations

import sys
from pathlib import Path

from ..checkpoints import load_safetensors
from ..config import LoraConfig
from .mlx_format import ADAPTER_WEIGHTS, is_peft_adapter, read_adapter_config
from .peft_format import read_peft_adapter


def read_adapter(folder: str | Path, num_blocks: int | None = None) -> tuple[dict, LoraConfig, dict]:
    """(raw config, LoraConfig, weights by MLX key) of an MLX or PEFT adapter folder.

    A PEFT adapter comes in mlx-lm's form for a model of `num_blocks` blocks (any layer
    selection becomes zero adapters on the other blocks; see `peft_layout.py`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {folder}")
    if is_peft_adapter(folder):
        return read_peft_adapter(folder, num_blocks)
    raw, lora = read_adapter_config(folder)
    weights_path = folder / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{folder}: no {ADAPTER_WEIGHTS}")
    return raw, lora, load_safetensors(weights_path, "train or convert the adapter again")


BASE_SHAPE_KEYS = ("model_type", "num_hidden_layers", "hidden_size")


def base_model_shape(config: dict) -> dict:
    """What an adapter records of the base it was trained on (config.json fields), to tell a wrong base."""
    return {key: config.get(key) for key in BASE_SHAPE_KEYS if config.get(key) is not None}


def base_mismatch(model, raw: dict, source: str) -> str | None:
    """A one-line warning when the adapter's recorded base (`base_model` in its adapter_config.json) is
    another architecture or depth than `model`; None when they agree or nothing was recorded.

    Shapes alone can agree across models (a 3-block adapter fits the last 3 blocks of any base of the
    same widths), so this catches an adapter served or evaluated on the wrong base.
    """
    recorded = raw.get("base_model") or {}
    args = getattr(model, "args", None)
    here = base_model_shape(dict(vars(args))) if args is not None else {}
    differ = [f"{key} {recorded[key]!r} (here {here[key]!r})" for key in BASE_SHAPE_KEYS
              if key in recorded and key in here and recorded[key] != here[key]]
    if not differ:
        return None
    trained_on = raw.get("model") or raw.get("base_model_name_or_path") or "another model"
    return (f"warning: {source} was trained on {trained_on}, whose {', '.join(differ)} differ from this base: "
            "its outputs will not be what the adapter learned; use the base it was trained on")


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

    from ..lora import apply_lora, transformer_blocks

    raw, lora, weights = read_adapter(folder, len(transformer_blocks(model)))
    warning = base_mismatch(model, raw, str(folder))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    apply_lora(model, lora)
    check_adapter_weights(model, weights, str(folder))
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return raw
