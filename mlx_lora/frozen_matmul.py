"""Products with frozen base weights (float, MLX affine-quantized or NF4), fast on CPU and GPU.

On the GPU, MLX's fused `quantized_matmul` is the fastest way to multiply by a 4-bit weight.
MLX's CPU `quantized_matmul` is a reference loop (~2 GFLOP/s measured here), while dequantizing
and calling BLAS reaches ~130 GFLOP/s, so on the CPU we dequantize on the fly. Done naively,
autodiff keeps every layer's dequantized float weight alive from the forward pass until the
backward pass (and `mx.compile` merges the two identical dequantize calls into one), so peak
memory grows by a float copy of the whole model. The custom VJP below instead dequantizes again
in the backward pass, and `mx.depends` ties each dequantize to the array that needs it, so the
scheduler cannot hoist it early and the compiler cannot merge it: one layer's float weight is
alive at a time, and the base stays 4-bit in memory during training.

Dequantizing is single-threaded element-wise work, and a training step does it twice per layer;
generation does it for a few rows per decoding step. `keep_float_weights(model)` dequantizes each
frozen weight once and keeps a float32 copy (4 bytes per weight) for every later product:
training does so when the memory planner says the copies fit (`training.float_weights`),
evaluation for its length (`float_weights_kept`, a `with` block).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn

_FORCE_PATH: str | None = None  # "dequantize" | "fused" | None (by device); for tests only


def use_dequantize_path() -> bool:
    """True when quantized products should dequantize + BLAS (the CPU) rather than fuse (the GPU)."""
    if _FORCE_PATH is not None:
        return _FORCE_PATH == "dequantize"
    return mx.default_device() == mx.cpu


class force_path:
    """Context manager pinning the path ("dequantize" or "fused") so tests can compare both."""

    def __init__(self, path: str):
        if path not in ("dequantize", "fused"):
            raise ValueError(f"path must be 'dequantize' or 'fused', got {path!r}")
        self.path = path

    def __enter__(self):
        global _FORCE_PATH
        self.previous, _FORCE_PATH = _FORCE_PATH, self.path
        return self

    def __exit__(self, *exc):
        global _FORCE_PATH
        _FORCE_PATH = self.previous


def dequantized_matmul(
    x: mx.array, dequantize: Callable[..., mx.array], weight_arrays: Sequence[mx.array]
) -> mx.array:
    """x @ W.T where W = dequantize(*weight_arrays) is (out, in) float32, recomputed in the backward.

    Returns float32; the gradient flows to `x` only (the weight is frozen).
    """
    weight_arrays = tuple(weight_arrays)

    @mx.custom_function
    def matmul(x, arrays):
        # (..., in) @ (in, out)
        arrays = mx.depends(list(arrays), [x])
        return x.astype(mx.float32) @ dequantize(*arrays).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, arrays = primals
        later = mx.depends(list(arrays), [cotangent])
        grad_x = (cotangent.astype(mx.float32) @ dequantize(*later)).astype(x.dtype)
        return grad_x, tuple(mx.zeros_like(a) for a in arrays)

    return matmul(x, weight_arrays)


ROW_CHUNK = 8192  # output rows dequantized at a time for very wide layers (a 49k-token output head)


def chunked_dequantized_matmul(x: mx.array, dequantize: Callable[..., mx.array], weight_arrays: Sequence[mx.array],
                               rows: int) -> mx.array:
    """dequantized_matmul over blocks of ROW_CHUNK output rows, so only one block is ever in float.

    x (..., in) float; returns (..., rows) float32; the gradient flows to x only. For an output
    head of 49k rows the float weight alone is ~113 MB (SmolLM2), 3.7 GB for Gemma 2's 256k x 3584;
    in blocks of 8192 rows it is ~19 / 117 MB. Each block's dequantize waits for the block before
    it (`mx.depends`), forward and backward: without that order the scheduler dequantized every
    block up front (a (64, 1024) x 65,536-row head peaked at 860 MB for a 268 MB float weight).
    Valid when each array's first axis is the output row (affine).
    """
    if rows <= ROW_CHUNK:
        return dequantized_matmul(x, dequantize, weight_arrays)
    blocks = [(start, min(start + ROW_CHUNK, rows)) for start in range(0, rows, ROW_CHUNK)]

    def block(arrays, start, stop, after):
        return mx.depends([a[start:stop] for a in arrays], [after])

    @mx.custom_function
    def matmul(x, arrays):
        parts, previous = [], x
        for start, stop in blocks:
            previous = x.astype(mx.float32) @ dequantize(*block(arrays, start, stop, previous)).T
            parts.append(previous)
        return mx.concatenate(parts, axis=-1)

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, arrays = primals
        grad_x, previous = None, cotangent
        for start, stop in blocks:
            part = cotangent[..., start:stop].astype(mx.float32) @ dequantize(*block(arrays, start, stop, previous))
            grad_x = previous = part if grad_x is None else grad_x + part
        return grad_x.astype(x.dtype), tuple(mx.zeros_like(a) for a in arrays)

    return matmul(x, tuple(weight_arrays))


def affine_dequantizer(layer: nn.Module) -> tuple[Callable[..., mx.array], tuple[mx.array, ...]]:
    """(dequantize function, arrays) for an MLX affine-quantized layer or embedding."""
    group_size, bits, mode = layer.group_size, layer.bits, getattr(layer, "mode", "affine")
    has_biases = "biases" in layer and layer["biases"] is not None

    def dequantize(weight, scales, *biases):
        return mx.dequantize(weight, scales, biases[0] if biases else None, group_size=group_size,
                             bits=bits, mode=mode, dtype=mx.float32)

    arrays = (layer.weight, layer.scales) + ((layer.biases,) if has_biases else ())
    return dequantize, arrays


KEPT = "_mlx_lora_float_weight"  # instance attribute (not a parameter) holding a kept float32 weight


def _dequantizer(layer: nn.Module):
    """(dequantize, arrays) of an affine-quantized or NF4 layer, or None for a float one."""
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return affine_dequantizer(layer)
    if hasattr(layer, "weight_arrays") and hasattr(layer, "dequantize"):  # NF4Linear
        return layer.dequantize, layer.weight_arrays()
    return None


def available_memory_bytes() -> int:
    """Free physical memory (Linux/macOS sysconf); 0 when unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def linear_input_dims(layer: nn.Module) -> int:
    """Input width of a quantized frozen layer (affine: packed uint32 columns * 32 // bits)."""
    if hasattr(layer, "input_dims"):
        return layer.input_dims
    return layer.weight.shape[1] * 32 // layer.bits


def keep_float_weights(model: nn.Module, budget_bytes: float = float("inf")) -> list[nn.Module]:
    """Give quantized frozen layers of `model` a float32 copy of their weight, used by every later
    product until `drop_float_weights` (CPU only: the GPU's fused product is faster; {} there).

    Layers are taken in model order while their copies fit in `budget_bytes`; layers that already
    hold a copy are skipped. Returns the layers given one (`kept_bytes` sums their copies). Results
    equal the dequantize-per-call path up to float rounding: same weights, same products.
    """
    kept: list[nn.Module] = []
    if not use_dequantize_path():
        return kept
    for _, module in model.named_modules():
        if _dequantizer(module) is None or KEPT in module.__dict__:
            continue
        size = 4 * module.weight.shape[0] * linear_input_dims(module)
        if size > budget_bytes:
            continue
        dequantize, arrays = _dequantizer(module)
        weight = dequantize(*arrays)
        mx.eval(weight)
        object.__setattr__(module, KEPT, weight)  # an attribute, so never saved or trained
        kept.append(module)
        budget_bytes -= size
    return kept


def kept_bytes(layers) -> int:
    """Bytes of the float32 copies held by `layers`."""
    return sum(layer.__dict__[KEPT].nbytes for layer in layers if KEPT in layer.__dict__)


def drop_float_weights(layers) -> None:
    """Free the float32 copies `keep_float_weights` made for `layers`."""
    for layer in layers:
        layer.__dict__.pop(KEPT, None)


class float_weights_kept:
    """Context manager: `keep_float_weights(model, budget_bytes)` on entry (default budget: half
    the free memory), the same copies dropped on exit; copies made earlier stay."""

    def __init__(self, model: nn.Module, budget_bytes: int | None = None):
        self.model, self.budget, self.layers = model, budget_bytes, []

    def __enter__(self):
        budget = available_memory_bytes() // 2 if self.budget is None else self.budget
        self.layers = keep_float_weights(self.model, budget)
        return self

    def __exit__(self, *exc):
        drop_float_weights(self.layers)


def frozen_linear(layer: nn.Module, x: mx.array) -> mx.array:
    """Apply a frozen linear layer (nn.Linear, nn.QuantizedLinear or NF4Linear) to x, output in x's dtype."""
    kept = layer.__dict__.get(KEPT)
    if kept is not None:
        y = x.astype(mx.float32) @ kept.T
    elif isinstance(layer, nn.QuantizedLinear):
        if not use_dequantize_path():
            return nn.QuantizedLinear.__call__(layer, x)
        dequantize, arrays = affine_dequantizer(layer)
        y = chunked_dequantized_matmul(x, dequantize, arrays, layer.weight.shape[0])
    elif hasattr(layer, "weight_arrays") and hasattr(layer, "dequantize"):  # NF4Linear
        y = dequantized_matmul(x, layer.dequantize, layer.weight_arrays())
    else:
        return layer(x)
    if "bias" in layer:
        y = y + layer.bias
    return y.astype(x.dtype)


class FastQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear whose product takes the fast path on each device (same parameters and keys)."""

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear) -> "FastQuantizedLinear":
        fast = cls.__new__(cls)
        nn.Module.__init__(fast)
        for key, value in layer.items():  # shares the arrays: nothing is copied
            fast[key] = value
        for name in ("group_size", "bits", "mode"):
            setattr(fast, name, getattr(layer, name, "affine"))
        fast.freeze()
        return fast

    def __call__(self, x):
        return frozen_linear(self, x)


class FastQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose tied output projection (`as_linear`) takes the fast path."""

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedEmbedding) -> "FastQuantizedEmbedding":
        fast = cls.__new__(cls)
        nn.Module.__init__(fast)
        for key, value in layer.items():
            fast[key] = value
        for name in ("group_size", "bits", "mode", "num_embeddings", "dims"):
            if hasattr(layer, name):
                setattr(fast, name, getattr(layer, name))
        fast.freeze()
        return fast

    def as_linear(self, x):
        kept = self.__dict__.get(KEPT)
        if kept is not None:
            return (x.astype(mx.float32) @ kept.T).astype(x.dtype)
        if not use_dequantize_path():
            return super().as_linear(x)
        dequantize, arrays = affine_dequantizer(self)
        return chunked_dequantized_matmul(x, dequantize, arrays, self.weight.shape[0]).astype(x.dtype)


def _float32_scales(layer: nn.Module) -> None:
    # MLX's CPU dequantize is ~10x slower with float16 scales/biases (GGUF stores them so) than
    # with float32 ones; the cost is 4 more bytes per group of 32-64 weights.
    for key in ("scales", "biases"):
        if key in layer and layer[key] is not None and layer[key].dtype != mx.float32:
            layer[key] = layer[key].astype(mx.float32)


def use_fast_frozen_layers(model: nn.Module) -> int:
    """Swap every MLX quantized linear/embedding in `model` for its fast-path twin; returns the count.

    Parameter names and shapes are unchanged, so checkpoints and mlx-lm stay compatible. On the
    CPU the scales and biases become float32 (same values), which the dequantize path needs.
    """
    swaps = []
    for name, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            swaps.append((name, FastQuantizedLinear.from_quantized(module)))
        elif type(module) is nn.QuantizedEmbedding:
            swaps.append((name, FastQuantizedEmbedding.from_quantized(module)))
    if use_dequantize_path():
        for _, fast in swaps:
            _float32_scales(fast)
    if swaps:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten(swaps))
    return len(swaps)
