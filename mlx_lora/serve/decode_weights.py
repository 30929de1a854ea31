"""How a quantized base multiplies during serving on the CPU: float copies, or per-shape choice.

Training on the CPU dequantizes each 4-bit weight on the fly and calls BLAS (`frozen_matmul.py`):
right for long prompts, wrong for decoding one token at a time, where every step pays a full
dequantization of every layer for a single row. Serving can do better:

- `float`: keep one float32 copy of every quantized weight (4 bytes per weight; a 135M model
  takes ~0.5 GB) and use plain BLAS products. Fastest when the memory is there.
- `quantized`: keep the 4-bit weights and pick, per product, MLX's `quantized_matmul` for a few
  rows (decode) or dequantize + BLAS for many (prefill). Measured on the demo model (SmolLM2-135M
  Q4_1, CPU, OpenBLAS, a machine shared with other jobs; one whole decode step): 1 row 1.75 s
  fused vs 5.9 s dequantize, 4 rows 3.7 vs 7.5 s, 16 rows 18.0 vs 6.1 s; so `quantized_matmul`
  up to `QUANTIZED_ROWS_MAX` rows. A float copy took 0.74 s for 1 row in the same session.
- `auto` (default): `float` on the CPU when the copy takes under half the available memory,
  otherwise `quantized`. On the GPU nothing changes (MLX's fused kernels are already fastest).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..frozen_matmul import FastQuantizedEmbedding, FastQuantizedLinear, affine_dequantizer

MODES = ("auto", "float", "quantized")
QUANTIZED_ROWS_MAX = 6  # rows up to which CPU quantized_matmul beats dequantize + BLAS (see above)


def _rows(x: mx.array) -> int:
    return x.size // x.shape[-1]


class ShapeChoosingQuantizedLinear(FastQuantizedLinear):
    """A 4-bit linear that uses `quantized_matmul` for few rows and dequantize + BLAS for many (CPU)."""

    def __call__(self, x):
        if _rows(x) <= QUANTIZED_ROWS_MAX:
            return nn.QuantizedLinear.__call__(self, x)
        return super().__call__(x)


class ShapeChoosingQuantizedEmbedding(FastQuantizedEmbedding):
    """A 4-bit embedding whose tied output projection chooses its product like the linear above."""

    def as_linear(self, x):
        if _rows(x) <= QUANTIZED_ROWS_MAX:
            return nn.QuantizedEmbedding.as_linear(self, x)
        return super().as_linear(x)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def float_copy_bytes(model: nn.Module) -> int:
    """Bytes a float32 copy of every quantized weight in `model` would take."""
    total = 0
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            out_dims, packed = module.weight.shape
            total += out_dims * packed * (32 // module.bits) * 4  # 32 // bits weights per uint32
    return total


def choose_mode(model: nn.Module, mode: str) -> str:
    """The mode `mode` resolves to for this model on this device ("float" or "quantized")."""
    if mode not in MODES:
        raise ValueError(f"float_weights: {mode!r} is not one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    if mx.default_device() != mx.cpu:
        return "quantized"
    need, free = float_copy_bytes(model), available_memory_bytes()
    return "float" if need == 0 or (free is not None and need < free // 2) else "quantized"


def _float_linear(layer: nn.QuantizedLinear) -> nn.Linear:
    dequantize, arrays = affine_dequantizer(layer)
    weight = dequantize(*arrays)  # (out, in) float32
    has_bias = "bias" in layer
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
    linear.weight = weight
    if has_bias:
        linear.bias = layer.bias.astype(mx.float32)
    linear.freeze()
    return linear


def _float_embedding(layer: nn.QuantizedEmbedding) -> nn.Embedding:
    dequantize, arrays = affine_dequantizer(layer)
    weight = dequantize(*arrays)  # (vocab, dims) float32
    embedding = nn.Embedding(weight.shape[0], weight.shape[1])
    embedding.weight = weight
    embedding.freeze()
    return embedding


def _twin(cls, layer):
    """`layer` as `cls` (a FastQuantized* subclass), sharing its arrays."""
    return cls.from_quantized(layer)


def prepare_for_decode(model: nn.Module, mode: str = "auto") -> str:
    """Apply `mode` to `model`'s quantized layers (see the module doc); returns the mode used."""
    from mlx.utils import tree_unflatten

    chosen = choose_mode(model, mode)
    if mx.default_device() != mx.cpu and chosen == "quantized":
        return chosen
    swaps = []
    for name, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            swaps.append((name, _float_linear(module) if chosen == "float" else _twin(ShapeChoosingQuantizedLinear, module)))
        elif isinstance(module, nn.QuantizedEmbedding):
            swaps.append((name, _float_embedding(module) if chosen == "float"
                          else _twin(ShapeChoosingQuantizedEmbedding, module)))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
        mx.eval(model.parameters())
    return chosen
