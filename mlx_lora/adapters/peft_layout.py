"""Any PEFT layer selection in mlx-lm's adapter format, exactly, and back.

mlx-lm's format has one rank and one `scale`, and adapts the same `keys` in each of the last
`num_layers` blocks. A PEFT LoRA may adapt any blocks (`layers_to_transform`, `layers_pattern`,
a regex `target_modules`) with per-module ranks (`rank_pattern`) and scalings (`alpha_pattern`,
`use_rslora`). Both fit mlx-lm's form without changing what the adapter computes:

- a module's scaling s_m becomes part of its B: B' = B * s_m / s, with s the one `scale`
  (scale * x A B' = s_m * x A B);
- a rank r_m below the largest rank R is zero-padded: A' = [A, 0] (in, R), B' = [B; 0] (R, out),
  and x A' B' = x A B;
- blocks from the first adapted one to the last block of the model carry every key; modules
  PEFT did not adapt get A = B = 0, which adds exactly nothing.

The PEFT config and each module's rank and scaling are kept in `adapter_config.json` under
`peft_layout`, so converting back gives the original tensors and config. Counting blocks from the
end needs the model's block count; where neither the caller nor the adapter gives it, the
conversion stops and says so. Weights here are MLX-keyed (`<module>.lora_a` (in, r),
`.lora_b` (r, out)); `peft_format.py` maps PEFT's names.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..config import LoraConfig
from .mlx_format import adapter_config

BLOCK_INDEX = re.compile(r"\.layers\.(\d+)\.")
BLOCK_PATH = re.compile(r"(.*\.layers\.)(\d+)\.(.+)")  # (prefix, block index, block-relative key)


def block_relative_keys(module_paths) -> list[str]:
    """`model.layers.3.self_attn.q_proj` -> `self_attn.q_proj`: the form mlx-lm records in `keys`."""
    keys = set()
    for path in module_paths:
        match = BLOCK_INDEX.search("." + path + ".")
        keys.add(path[match.end() - 1:] if match else path)
    return sorted(keys)


def block_indices(module_paths) -> list[int]:
    return sorted({int(m.group(1)) for p in module_paths if (m := BLOCK_INDEX.search("." + p + "."))})


def pattern_value(patterns: dict, module: str):
    """PEFT's per-module override lookup (`peft.utils.other.get_pattern_key`, used for
    rank_pattern / alpha_pattern): the first key that matches a dotted suffix of the module name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def peft_scaling(raw: dict, rank: int | None = None, alpha: float | None = None) -> float:
    """What PEFT multiplies B A x by: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    rank = int(raw["r"]) if rank is None else rank
    alpha = float(raw.get("lora_alpha", 8)) if alpha is None else alpha
    return alpha / math.sqrt(rank) if raw.get("use_rslora") else alpha / rank


def _model_block_count(raw: dict) -> int | None:
    """num_hidden_layers of base_model_name_or_path when it is a local model folder."""
    base = raw.get("base_model_name_or_path")
    config = Path(str(base)) / "config.json" if base else None
    if config is None or not config.is_file():
        return None
    hf = json.loads(config.read_text(encoding="utf-8"))
    count = hf.get("num_hidden_layers") or (hf.get("text_config") or {}).get("num_hidden_layers")
    return int(count) if count else None


def _block_count(raw: dict, blocks: list[int], num_blocks: int | None, source: str) -> int:
    if num_blocks is None:
        num_blocks = _model_block_count(raw)
    if num_blocks is None:
        selects = raw.get("layers_to_transform") is not None or isinstance(raw.get("target_modules"), str)
        if not selects and blocks == list(range(blocks[-1] + 1)):
            return blocks[-1] + 1  # every block adapted: the adapter shows the count
        raise ValueError(
            f"{source}: the adapter adapts blocks {blocks} only, and mlx-lm's format counts adapted blocks from the "
            f"model's last block, whose index the adapter does not record (base_model_name_or_path "
            f"{raw.get('base_model_name_or_path')!r} is not a local model folder); pass --num-blocks N "
            "(the base model's num_hidden_layers)")
    if blocks[-1] >= num_blocks:
        raise ValueError(f"{source}: the adapter adapts block {blocks[-1]}, but the model has {num_blocks} blocks; "
                         "it was made for another model")
    return num_blocks


def mlx_from_peft_layout(raw: dict, weights: dict, source: str, num_blocks: int | None = None) -> tuple[dict, LoraConfig, dict]:
    """(adapter_config dict, LoraConfig, MLX weights) in mlx-lm's form for PEFT config `raw` and
    its unscaled MLX-keyed `weights`; `num_blocks` is the model's block count (see `_block_count`)."""
    import mlx.core as mx

    paths = sorted({k.rpartition(".")[0] for k in weights})
    outside = [p for p in paths if not BLOCK_PATH.fullmatch(p)]
    if outside:
        raise ValueError(f"{source}: LoRA on {', '.join(outside[:5])}, outside the transformer blocks; mlx-lm's "
                         "format adapts block layers only, so this adapter cannot be converted")
    missing = [f"{p}.{n}" for p in paths for n in ("lora_a", "lora_b") if f"{p}.{n}" not in weights]
    if missing:
        raise ValueError(f"{source}: {', '.join(missing[:5])} missing; every LoRA module needs lora_A and lora_B")
    ranks = {p: int(weights[f"{p}.lora_a"].shape[1]) for p in paths}
    alpha_pattern = raw.get("alpha_pattern") or {}
    alphas = {p: pattern_value(alpha_pattern, p) for p in paths}
    scales = {p: peft_scaling(raw, ranks[p], float(raw.get("lora_alpha", 8) if alphas[p] is None else alphas[p]))
              for p in paths}
    rank = max(ranks.values())
    scale = peft_scaling(raw)
    blocks = block_indices(paths)
    total = _block_count(raw, blocks, num_blocks, source)
    prefix = BLOCK_PATH.fullmatch(paths[0]).group(1)
    keys = block_relative_keys(paths)
    dims = {BLOCK_PATH.fullmatch(p).group(3): (weights[f"{p}.lora_a"].shape[0], weights[f"{p}.lora_b"].shape[1])
            for p in paths}
    out = {}
    for block in range(blocks[0], total):
        for key in keys:
            path = f"{prefix}{block}.{key}"
            in_dims, out_dims = dims[key]
            a, b = mx.zeros((in_dims, rank)), mx.zeros((rank, out_dims))
            if path in ranks:
                r = ranks[path]
                a[:, :r] = weights[f"{path}.lora_a"].astype(mx.float32)
                b[:r] = weights[f"{path}.lora_b"].astype(mx.float32) * (scales[path] / scale)
            out[f"{path}.lora_a"], out[f"{path}.lora_b"] = a, b
    lora = LoraConfig(rank=rank, alpha=scale * rank, dropout=float(raw.get("lora_dropout", 0.0)),
                      target_modules=tuple(sorted({k.rsplit(".", 1)[-1] for k in keys})), num_layers=total - blocks[0])
    layout = {"config": raw, "modules": {p: {"rank": ranks[p], "scaling": scales[p]} for p in paths}}
    extra = {"base_model_name_or_path": raw.get("base_model_name_or_path"), "converted_from": "peft",
             "peft_layout": layout}
    return adapter_config(lora, keys, total, extra), lora, out


def peft_from_mlx_layout(raw: dict, weights: dict) -> tuple[dict, dict]:
    """(PEFT config, unscaled MLX-keyed weights of the adapted modules only): the inverse of
    `mlx_from_peft_layout` for an adapter_config that records `peft_layout`."""
    layout = raw["peft_layout"]
    scale = float(raw["lora_parameters"]["scale"])
    out = {}
    for path, module in layout["modules"].items():
        r = int(module["rank"])
        out[f"{path}.lora_a"] = weights[f"{path}.lora_a"][:, :r]
        out[f"{path}.lora_b"] = weights[f"{path}.lora_b"][:r] * (scale / float(module["scaling"]))
    return dict(layout["config"]), out
