"""The PEFT adapter format: MLX <-> PEFT key and shape mapping, scaling, and `convert-adapter`.

A PEFT LoRA folder holds `adapter_config.json` (`r`, `lora_alpha`, `target_modules`, ...) and
`adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` (rank, in) and
`.lora_B.weight` (out, rank). Our MLX format (`mlx_format.py`) stores the same matrices
transposed under `<module>.lora_a` (in, rank) and `.lora_b` (rank, out). Module paths are the
same on both sides (mlx-lm keeps the transformers names), so only the prefix, the parameter
name and the transpose change. The mapping functions work on any array type with `.T`
(numpy, MLX, torch), so the CUDA backend can use them without MLX.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .mlx_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_peft_adapter
from .peft_layout import block_indices, block_relative_keys, mlx_from_peft_layout, peft_from_mlx_layout
from ..checkpoints import load_safetensors, write_json
from ..config import LoraConfig

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"

# PEFT wraps the transformers model twice (PeftModelForCausalLM.base_model.model), and saves
# keys without the adapter name ("default").
PEFT_PREFIX = "base_model.model."
# MLX parameter name -> PEFT parameter name. Both are stored transposed relative to each other:
# MLX computes x @ A @ B with A (in, rank), B (rank, out); PEFT uses nn.Linear weights
# A (rank, in), B (out, rank).
MLX_TO_PEFT_PARAM = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}
PEFT_TO_MLX_PARAM = {peft: mlx for mlx, peft in MLX_TO_PEFT_PARAM.items()}

# PEFT options that change what a LoRA adapter computes and that the MLX layer cannot express.
UNSUPPORTED_PEFT_OPTIONS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token embeddings",
}
# PEFT parameter names of other LoRA variants, refused with their name when found in the weights.
UNSUPPORTED_PEFT_TENSORS = {
    "lora_magnitude_vector": "DoRA (weight-decomposed LoRA)",
    "lora_embedding_A": "LoRA on an embedding layer",
    "lora_embedding_B": "LoRA on an embedding layer",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
}
PEFT_CONFIG_DEFAULTS = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "use_rslora": False,
    "use_dora": False,
    "modules_to_save": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
}


# --- key and tensor mapping -------------------------------------------------------------------

def mlx_key_to_peft(key: str) -> str:
    """`model.layers.0.self_attn.q_proj.lora_a` -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    module, _, param = key.rpartition(".")
    if param not in MLX_TO_PEFT_PARAM or not module:
        raise ValueError(f"{key}: not an MLX LoRA parameter (expected <module>.lora_a or <module>.lora_b)")
    return f"{PEFT_PREFIX}{module}.{MLX_TO_PEFT_PARAM[param]}"


def peft_key_to_mlx(key: str) -> str:
    """The inverse of `mlx_key_to_peft`; refuses other adapter types by name."""
    for marker, what in UNSUPPORTED_PEFT_TENSORS.items():
        if marker in key:
            raise ValueError(f"{key}: {what} is not supported; only plain LoRA adapters convert")
    if not key.startswith(PEFT_PREFIX):
        raise ValueError(f"{key}: PEFT LoRA keys start with {PEFT_PREFIX!r}")
    body = key[len(PEFT_PREFIX):]
    for peft_param, mlx_param in PEFT_TO_MLX_PARAM.items():
        suffix = "." + peft_param
        if body.endswith(suffix):
            return f"{body[: -len(suffix)]}.{mlx_param}"
        # Adapters saved from a live PeftModel's state_dict keep the adapter name: lora_A.default.weight
        named = re.fullmatch(rf"(.+)\.{peft_param.split('.')[0]}\.[^.]+\.weight", body)
        if named:
            return f"{named.group(1)}.{mlx_param}"
    raise ValueError(f"{key}: not a LoRA A/B weight (expected ...lora_A.weight or ...lora_B.weight)")


def mlx_to_peft_weights(weights: dict) -> dict:
    """MLX adapter tensors (in, rank)/(rank, out) -> PEFT tensors (rank, in)/(out, rank)."""
    return {mlx_key_to_peft(k): v.T for k, v in weights.items()}


def peft_to_mlx_weights(weights: dict, module_scale: dict[str, float] | None = None) -> dict:
    """PEFT tensors -> MLX tensors; `module_scale[module]` multiplies lora_b (per-module alpha)."""
    out = {}
    for key, value in weights.items():
        mlx_key = peft_key_to_mlx(key)
        value = value.T
        factor = (module_scale or {}).get(mlx_key.rpartition(".")[0], 1.0)
        if factor != 1.0 and mlx_key.endswith(".lora_b"):
            value = value * factor
        out[mlx_key] = value
    return out


# --- config translation -----------------------------------------------------------------------

def peft_config_from_mlx(raw: dict, weights: dict, source: str) -> tuple[dict, dict]:
    """(PEFT adapter_config.json, MLX-keyed weights to write) for an MLX adapter (ours or mlx_lm.lora's),
    lora_alpha / r = its scale; one converted from PEFT gets its original config and tensors back.

    The rank comes from the tensors; `keys` may be absent (mlx_lm.lora leaves it out when it
    adapts its default modules), so the target modules come from the tensor names too.
    """
    if raw.get("fine_tune_type", "lora") != "lora":
        raise ValueError(f"{source}: fine_tune_type {raw.get('fine_tune_type')!r} is not supported (only lora)")
    if "peft_layout" in raw:  # converted from PEFT: give back the original selection, ranks and scalings
        return peft_from_mlx_layout(raw, weights)
    ranks = {tuple(v.shape)[1] for k, v in weights.items() if k.endswith(".lora_a")}
    if len(ranks) != 1:
        raise ValueError(f"{source}: expected lora_a tensors of one rank, found ranks {sorted(ranks) or 'none'}")
    rank = ranks.pop()
    params = raw.get("lora_parameters") or {}
    if "rank" in params and int(params["rank"]) != rank:
        raise ValueError(f"{source}: lora_parameters.rank is {params['rank']} but the tensors have rank {rank}")
    # mlx-lm's `scale` is what the layer multiplies by (alpha / rank in PEFT terms); ours records alpha too.
    if "scale" in params:
        scale = float(params["scale"])
    elif "alpha" in raw:
        scale = float(raw["alpha"]) / rank
    else:
        raise ValueError(f"{source}: no lora_parameters.scale and no alpha, so the adapter's scaling is unknown")
    alpha = scale * rank
    module_paths = sorted({k.rpartition(".")[0] for k in weights})
    layers = block_indices(module_paths)
    # MLX adapts the last `num_layers` blocks; when block 0 is untouched, say which blocks PEFT adapts.
    layers_to_transform = layers if layers and layers[0] != 0 else None
    config = dict(PEFT_CONFIG_DEFAULTS)
    config.update({
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": float(params.get("dropout", 0.0)),
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in module_paths}),
        "layers_to_transform": layers_to_transform,
        "base_model_name_or_path": raw.get("base_model_name_or_path") or raw.get("model"),
    })
    return config, weights


def check_peft_config(raw: dict, source: str) -> None:
    """Refuse PEFT adapters that are not plain LoRA, naming what they are."""
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(f"{source}: peft_type {raw.get('peft_type')!r} is not supported; only LORA adapters "
                         "can be used or converted")
    problems = [f"{what} ({key}: {raw[key]!r})" for key, what in UNSUPPORTED_PEFT_OPTIONS.items() if raw.get(key)]
    if raw.get("bias", "none") != "none":
        problems.append(f"trained biases (bias: {raw['bias']!r})")
    if "r" not in raw:
        problems.append("no `r` (rank)")
    if problems:
        raise ValueError(f"{source}: this LoRA uses options the MLX layer cannot express: " + "; ".join(problems))


def mlx_config_from_peft(raw: dict, weights: dict, source: str, num_blocks: int | None = None) -> tuple[dict, LoraConfig, dict]:
    """(MLX adapter_config dict, LoraConfig, MLX weights) for a PEFT config and its PEFT-keyed weights.

    Any layer selection, rank_pattern, alpha_pattern and use_rslora are carried exactly in
    mlx-lm's form (see `peft_layout.py`); `num_blocks` is the model's block count, needed when
    the adapter does not adapt every block and its base model folder is not at hand.
    """
    check_peft_config(raw, source)
    return mlx_from_peft_layout(raw, peft_to_mlx_weights(weights), source, num_blocks)


# --- files --------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no {path.name}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg})") from err


def _load_mlx_tensors(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no {path.name}")
    return load_safetensors(path, "train or export the adapter again")


def _save_mlx_tensors(path: Path, tensors: dict, fmt: str) -> None:
    import mlx.core as mx

    from ..checkpoints import save_safetensors

    # mx.save_safetensors needs row-contiguous data; .T is a view.
    save_safetensors(path, {k: mx.contiguous(v) for k, v in tensors.items()}, metadata={"format": fmt})


def read_peft_adapter(folder: str | Path, num_blocks: int | None = None) -> tuple[dict, LoraConfig, dict]:
    """(raw PEFT config, LoraConfig, weights by MLX key as mx.array) of a PEFT LoRA folder, in
    mlx-lm's form for a model of `num_blocks` blocks (see `mlx_config_from_peft`)."""
    folder = Path(folder)
    raw = _read_json(folder / PEFT_CONFIG)
    check_peft_config(raw, str(folder / PEFT_CONFIG))  # before reading tensors of an unknown layout
    peft_weights = _load_mlx_tensors(folder / PEFT_WEIGHTS)
    _, lora, weights = mlx_config_from_peft(raw, peft_weights, str(folder), num_blocks)
    return raw, lora, weights


def export_peft(mlx_adapter_dir: str | Path, peft_dir: str | Path) -> Path:
    """Write the PEFT form (adapter_config.json + adapter_model.safetensors) of an MLX adapter folder."""
    src, dst = Path(mlx_adapter_dir), Path(peft_dir)
    if src.resolve() == dst.resolve():
        raise ValueError(f"{dst}: the PEFT adapter needs its own folder (both formats name their config "
                         f"{ADAPTER_CONFIG}); e.g. {src / 'peft'}")
    raw = _read_json(src / ADAPTER_CONFIG)
    weights = _load_mlx_tensors(src / ADAPTER_WEIGHTS)
    config, weights = peft_config_from_mlx(raw, weights, str(src))
    dst.mkdir(parents=True, exist_ok=True)
    _save_mlx_tensors(dst / PEFT_WEIGHTS, mlx_to_peft_weights(weights), "pt")
    write_json(dst / PEFT_CONFIG, config)
    return dst


def import_peft(peft_dir: str | Path, mlx_adapter_dir: str | Path, num_blocks: int | None = None) -> Path:
    """Write the MLX form (adapters.safetensors + adapter_config.json) of a PEFT LoRA folder;
    `num_blocks` (the model's block count) is needed only when the adapter cannot tell it."""
    src, dst = Path(peft_dir), Path(mlx_adapter_dir)
    if src.resolve() == dst.resolve():
        raise ValueError(f"{dst}: write the MLX adapter to another folder than the PEFT one")
    raw = _read_json(src / PEFT_CONFIG)
    check_peft_config(raw, str(src / PEFT_CONFIG))  # before reading tensors of an unknown layout
    peft_weights = _load_mlx_tensors(src / PEFT_WEIGHTS)
    config, _, weights = mlx_config_from_peft(raw, peft_weights, str(src), num_blocks)
    dst.mkdir(parents=True, exist_ok=True)
    _save_mlx_tensors(dst / ADAPTER_WEIGHTS, weights, "mlx")
    write_json(dst / ADAPTER_CONFIG, config)
    return dst


def convert_adapter(src: str | Path, dst: str | Path, to: str, num_blocks: int | None = None) -> Path:
    """Convert an adapter folder to `to` ("peft" or "mlx"); the source format is detected.
    `num_blocks`: the base model's block count, for PEFT adapters of some blocks only."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {src}")
    source_is_peft = is_peft_adapter(src)
    if to == "peft":
        if source_is_peft:
            raise ValueError(f"{src} is already a PEFT adapter ({PEFT_WEIGHTS}); use --to mlx to convert it")
        return export_peft(src, dst)
    if to == "mlx":
        if not source_is_peft:
            raise ValueError(f"{src} has no {PEFT_WEIGHTS}, so it is not a PEFT adapter; use --to peft to convert an MLX one")
        return import_peft(src, dst, num_blocks)
    raise ValueError(f"--to must be peft or mlx, got {to!r}")


def main(argv: list[str] | None = None) -> int:
    """`mlx-lora convert-adapter SRC DST --to peft|mlx`."""
    parser = argparse.ArgumentParser(
        prog="mlx-lora convert-adapter",
        description="Convert a LoRA adapter between the MLX format (ours and mlx_lm.lora's) and PEFT's.")
    parser.add_argument("src", help="adapter folder (MLX: adapters.safetensors; PEFT: adapter_model.safetensors)")
    parser.add_argument("dst", help="folder to write (created if needed)")
    parser.add_argument("--to", required=True, choices=("peft", "mlx"), help="target format")
    parser.add_argument("--num-blocks", type=int, metavar="N",
                        help="--to mlx: the base model's number of transformer blocks (num_hidden_layers), needed "
                             "for a PEFT adapter of some blocks only (layers_to_transform, regex target_modules) "
                             "when its base_model_name_or_path is not a local model folder")
    args = parser.parse_args(argv)
    try:
        out = convert_adapter(args.src, args.dst, args.to, args.num_blocks)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.to} adapter to {out}")
    return 0
