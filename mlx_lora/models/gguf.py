"""GGUF files as mlx-lm models, with their quantized blocks kept as they are where MLX can hold them.

A file from llama.cpp, Ollama or LM Studio is read in four steps: the container
(`gguf_file.py`), the architecture's config and converter transforms (`gguf_arch.py`), each
tensor's blocks as MLX arrays (`gguf_types.py`: native affine triplets where the block layout
is MLX's affine form, re-quantized or float where it is not), and the tensor names (the gguf
package's `TensorNameMap`, the table llama.cpp's converter itself uses). We decode tensors
ourselves rather than with `mx.load`, which has decoded Q4_1 (before ml-explore/mlx#3664) and
Q4_K (mlx 0.32: odd sub-blocks get their neighbour's scale) wrongly. The tokenizer and chat
template come from the file's metadata (`gguf_tokenizer.py`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .gguf_arch import ROPE_TENSORS, architecture_of, hf_config_from_header
from .gguf_file import GGUFHeader, read_header, tensor_bytes
from .gguf_tokenizer import load_gguf_tokenizer

HF_FOLDER_ADVICE = "use the model's Hugging Face folder (or its hub id) instead"
REPORT_ROWS = 64  # rows of one tensor per type compared with the reference decoder for the summary


@dataclass
class TensorTypeReport:
    """How the tensors of one GGML type are held in memory, and their measured weight error."""

    count: int = 0
    held_as: str = ""
    relative_error: float = 0.0  # ||held - reference|| / ||reference|| on REPORT_ROWS rows of one tensor

    def describe(self, type_name: str) -> str:
        error = "exact" if self.relative_error == 0 else f"relative error {self.relative_error:.2g}"
        return f"{type_name} x{self.count} {self.held_as} ({error})"


@dataclass
class GGUFReport:
    tensor_types: dict[str, TensorTypeReport] = field(default_factory=dict)

    def describe(self) -> str:
        return "; ".join(r.describe(t) for t, r in sorted(self.tensor_types.items()))

    def as_dict(self) -> dict:
        return {t: {"count": r.count, "held_as": r.held_as, "relative_error": r.relative_error}
                for t, r in sorted(self.tensor_types.items())}


def permute_rows(w, n_heads: int):
    """llama.cpp's rope row permutation (HF -> GGUF) of Q or K rows; works on numpy and mlx arrays."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w, n_heads: int):
    """Undo `permute_rows` (GGUF -> HF). Rows are independent, so packed weights, scales and
    biases of a quantized tensor can each be unpermuted without dequantizing."""
    half = w.shape[0] // n_heads // 2
    # GGUF rows are (head, half, pair); HF wants (head, pair, half).
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_names(arch_name: str, num_blocks: int, model_keys: list[str]) -> dict[str, str]:
    """mlx-lm parameter key -> GGUF tensor name, by the gguf package's TensorNameMap for the architecture."""
    import gguf

    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    table = gguf.get_tensor_name_map(arch_enum, num_blocks)
    names = {}
    for key in model_keys:
        module, _, leaf = key.rpartition(".")
        gguf_module = table.get_name(module)
        if gguf_module is not None:
            names[key] = f"{gguf_module}.{leaf}"
    return names


def _held_arrays(held, key: str, heads: int | None, shift: float) -> dict:
    """The MLX arrays of one decoded tensor under its mlx-lm key (".weight" -> triplet when quantized),
    with llama.cpp's Q/K row permutation undone (`heads`) and Gemma's norm offset removed (`shift`)."""
    import mlx.core as mx

    module, _, leaf = key.rpartition(".")
    arrays = {"weight": held.weight} if held.bits is None else {
        "weight": held.weight, "scales": held.scales, "biases": held.biases}
    if heads:  # rows are independent: packed weights, scales and biases unpermute alike
        arrays = {k: unpermute_rows(v, heads) for k, v in arrays.items()}
    if shift and held.bits is None:
        arrays["weight"] = (arrays["weight"].astype(mx.float32) - shift).astype(arrays["weight"].dtype)
    if held.bits is None:
        return {key: arrays["weight"]}
    return {f"{module}.{name}": value for name, value in arrays.items()}


def load_gguf(path: str | Path):
    """Load a GGUF file as (mlx-lm Model, TokenizerWrapper, Hugging Face style config, GGUFReport).

    Tensors whose blocks are an MLX affine form (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K) become
    nn.QuantizedLinear / nn.QuantizedEmbedding with those exact blocks (group size 32); others
    are held as `gguf_types.py` decides (re-quantized or float), each type's weight error in the
    report. The config carries "quantization" as mlx-lm writes it, so a saved copy reloads with
    mlx_lm.utils.load. Raises ValueError (one line, naming the file) for an architecture, tensor
    type or tensor set the kit cannot load.
    """
    import importlib

    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx.utils import tree_flatten

    from .gguf_types import TENSOR_TYPES, decode_tensor, reference_dequantize, relative_error

    header = read_header(path)
    path = header.path
    arch = architecture_of(header)
    config = hf_config_from_header(header)
    unsupported = {n: i.type_name for n, i in header.tensors.items() if i.type_name not in TENSOR_TYPES}
    if unsupported:
        examples = ", ".join(f"{n} ({t})" for n, t in list(unsupported.items())[:3])
        raise ValueError(f"{path}: tensor types mlx-lora cannot load: {examples}"
                         f"{' and more' if len(unsupported) > 3 else ''}; supported are {', '.join(TENSOR_TYPES)}. "
                         f"Use a Q4_K_M, Q5_K_M, Q6_K, Q8_0 or Q4_0 file of this model, or {HF_FOLDER_ADVICE[4:]}")
    module = importlib.import_module(f"mlx_lm.models.{arch.model_type}")
    model = module.Model(module.ModelArgs.from_dict(config))
    model_keys = [k for k, _ in tree_flatten(model.parameters())]
    names = _gguf_names(arch.name, config["num_hidden_layers"], model_keys)
    # a tied head has no tensor of its own; mlx-lm's sanitize ties it (Gemma 3 builds lm_head either way)
    optional = {"lm_head.weight"} if config["tie_word_embeddings"] else set()
    model_keys = [k for k in model_keys if not (k in optional and names.get(k) not in header.tensors)]
    missing = [k for k in model_keys if names.get(k) not in header.tensors]
    unexpected = sorted(set(header.tensors) - set(names.values()) - set(ROPE_TENSORS))
    if missing or unexpected:
        parts = ([f"missing {', '.join(names.get(k, k) for k in missing[:4])}"] if missing else []) + \
                ([f"unexpected {', '.join(unexpected[:4])}"] if unexpected else [])
        raise ValueError(f"{path}: the tensors do not fit a {arch.name} model with this metadata "
                         f"({'; '.join(parts)}); the file is damaged or a variant we cannot load: {HF_FOLDER_ADVICE}")
    report = GGUFReport()
    weights, bits = {}, {}
    for key in model_keys:
        info = header.tensors[names[key]]
        shape = info.shape if len(info.shape) == 2 else (1, int(np.prod(info.shape)))
        raw = tensor_bytes(header, info)
        held = decode_tensor(info.type_name, raw.reshape(-1), shape)
        if len(info.shape) != 2:
            held.weight = held.weight.reshape(info.shape)
        entry = report.tensor_types.setdefault(info.type_name, TensorTypeReport(held_as=held.how))
        entry.count += 1
        if entry.count == 1 and not held.how.startswith("native") and len(info.shape) == 2:
            rows = min(REPORT_ROWS, shape[0])
            sample = decode_tensor(info.type_name, raw[:rows].reshape(-1), (rows, shape[1]))
            entry.relative_error = relative_error(sample, reference_dequantize(info.type_name, raw[:rows].reshape(-1),
                                                                                 (rows, shape[1])))
        module_path = key.rpartition(".")[0]
        heads = None
        if arch.permute_qk and key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if ".q_proj." in key else config["num_key_value_heads"]
        shift = arch.norm_shift if module_path.endswith("norm") else 0.0
        weights.update(_held_arrays(held, key, heads, shift))
        if held.bits is not None:
            bits[module_path] = (held.bits, held.group_size)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)  # as mlx_lm.utils.load does: ties heads, drops rope caches
    nn.quantize(model, class_predicate=lambda p, m: {"group_size": bits[p][1], "bits": bits[p][0]} if p in bits else False)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as err:
        raise ValueError(f"{path}: the tensors do not fit a {arch.name} model with this metadata ({err})") from err
    mx.eval(model.parameters())
    float_types = {i.type_name for i in header.tensors.values() if len(i.shape) == 2} & {"BF16", "F16"}
    config["torch_dtype"] = "bfloat16" if "BF16" in float_types else "float16" if bits or float_types else "float32"
    if bits:
        (default_bits, default_group), _ = Counter(bits.values()).most_common(1)[0]
        quantization: dict[str, Any] = {"group_size": default_group, "bits": default_bits, "mode": "affine"}
        # mlx-lm reads per-layer settings from here where they differ from the default (and the
        # layers left float need no entry: it quantizes only modules whose scales it finds)
        quantization.update({p: {"group_size": g, "bits": b, "mode": "affine"}
                             for p, (b, g) in sorted(bits.items()) if (b, g) != (default_bits, default_group)})
        config["quantization"] = quantization
        config["quantization_config"] = dict(quantization)
    return model, load_gguf_tokenizer(path, header), config, report
