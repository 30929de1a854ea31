"""Quantization of the frozen base model: none, MLX affine (`nn.quantize`) or NF4 (QLoRA), in place.

Owns the NF4 format (bitsandbytes-compatible layout), `NF4Linear`, and the size/error report.
The fast products with these frozen weights live in `frozen_matmul.py`; LoRA wrapping in `lora.py`.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

MODES = ("none", "affine", "nf4")
AFFINE_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize supports in affine mode
AFFINE_GROUP_SIZES = (32, 64, 128)

# The 16 NormalFloat4 levels: quantiles of N(0, 1) normalised to [-1, 1] with an exact zero
# (QLoRA, Dettmers et al. 2023, appendix E), as float32, identical to bitsandbytes' get_4bit_type("nf4").
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


# The decode tables are built from numpy, never from mx ops: a table first built inside an
# `mx.compile` trace would otherwise be cached as a placeholder of that trace.
@lru_cache(maxsize=1)
def _byte_table() -> mx.array:
    """(256, 2) float32: the two NF4 levels each byte packs, the first element in the high nibble."""
    import numpy as np

    levels, byte = np.array(NF4_LEVELS, np.float32), np.arange(256)
    return mx.array(np.stack([levels[byte >> 4], levels[byte & 0xF]], axis=-1))


@lru_cache(maxsize=1)
def _pair_table() -> mx.array:
    """(65536, 4) float32: the four NF4 levels of each little-endian uint16 (two packed bytes).

    A constant built once (1 MiB). Decoding two bytes per gather is ~1.5x faster than one byte per
    gather with MLX's CPU `take` (measured: 2.1 vs 3.2 ms for a 1536x576 weight).
    """
    import numpy as np

    table, word = np.array(_byte_table()), np.arange(65536)
    return mx.array(np.concatenate([table[word & 0xFF], table[word >> 8]], axis=-1))


@lru_cache(maxsize=1)
def _dynamic_table() -> mx.array:
    import numpy as np

    return mx.array(np.array(dynamic_map(), np.float32))


def _decode_packed(packed: mx.array) -> mx.array:
    """(n / 2,) uint8 packed NF4 codes -> (n,) float32 levels, in element order."""
    if packed.size % 2 == 0 and sys.byteorder == "little":  # every Apple silicon and x86 machine
        return mx.take(_pair_table(), mx.view(packed, mx.uint16), axis=0).reshape(-1)
    return mx.take(_byte_table(), packed, axis=0).reshape(-1)


@lru_cache(maxsize=1)
def dynamic_map() -> tuple[float, ...]:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`), bit for bit, as 256 floats.

    Used by double quantization for the block absmax values. Rebuilt here in float32 arithmetic that
    mirrors torch's (linspace with fused multiply-add, float32 products), so no torch is needed.
    """
    import numpy as np

    def torch_linspace(n: int) -> "np.ndarray":  # torch.linspace(0.1, 1, n, dtype=float32)
        start, end = np.float32(0.1), np.float32(1.0)
        step = np.float64(np.float32((end - start) / np.float32(n - 1)))
        i = np.arange(n)
        low = (np.float64(start) + step * i).astype(np.float32)  # one rounding, as an FMA
        high = (np.float64(end) - step * (n - 1 - i)).astype(np.float32)
        return np.where(i < n // 2, low, high)

    values = [np.array([0.0, 1.0], np.float32)]
    for i in range(7):  # 7 exponent bits: decades 1e-6 .. 1, 2**i fraction steps in each
        bounds = torch_linspace(2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scale = np.float32(10.0 ** (i - 6))
        values += [scale * means, -scale * means]
    return tuple(float(v) for v in np.sort(np.concatenate(values).astype(np.float32)))


def _nearest_sorted(x: mx.array, levels: tuple[float, ...]) -> mx.array:
    """Index (uint32) of the nearest of the sorted `levels` for each x; ties go to the lower level.

    A branch-free binary search over the float32 midpoints, as bitsandbytes' `bucketize`:
    the index is the number of midpoints strictly below x. log2(len) passes, no (n, levels) matrix.
    """
    table = mx.array(levels, dtype=mx.float32)
    midpoints = (table[:-1] + table[1:]) / 2
    steps = [1 << k for k in reversed(range(math.ceil(math.log2(len(levels)))))]
    padded = mx.concatenate([midpoints, mx.full((sum(steps) + 1 - midpoints.size,), mx.inf)])
    index = mx.zeros(x.shape, dtype=mx.uint32)
    for step in steps:
        candidate = index + step
        index = mx.where(mx.take(padded, candidate - 1) < x, candidate, index)
    return index


def _blockwise_absmax(flat: mx.array, block_size: int) -> tuple[mx.array, mx.array]:
    """(blocks, absmax): `flat` zero-padded to whole blocks (nblocks, block_size) and its (nblocks,) absmax."""
    pad = -flat.size % block_size
    if pad:  # zeros leave every absmax unchanged, so the last partial block is as in bitsandbytes
        flat = mx.concatenate([flat, mx.zeros((pad,), flat.dtype)])
    blocks = flat.reshape(-1, block_size)
    return blocks, mx.abs(blocks).max(axis=1)


def _scaled(blocks: mx.array, absmax: mx.array) -> mx.array:
    """blocks / absmax in [-1, 1] as bitsandbytes computes it (times the float32 reciprocal); 0 for zero blocks."""
    inverse = mx.where(absmax > 0, 1.0 / mx.where(absmax > 0, absmax, 1.0), 0.0)
    return mx.clip(blocks * inverse[:, None], -1.0, 1.0)


def _check_block_size(name: str, block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(f"{name} must be a positive even integer (bitsandbytes uses 32..4096, "
                         f"QLoRA 64), got {block_size!r}")


def nf4_quantize(w: mx.array, block_size: int = 64, double_quant: bool = False,
                 double_quant_block_size: int = 256) -> dict[str, mx.array]:
    """Blockwise NF4 quantization of `w` (any shape), in the layout of bitsandbytes' `quantize_4bit`.

    Blocks are `block_size` consecutive elements of the row-major flattened weight; each is scaled
    by its absmax and every element takes the nearest NF4 level; codes are packed two per byte,
    the first element in the high nibble. The last block is zero-padded if needed.

    Returns:
        "weight": (ceil(n / block_size) * block_size // 2,) uint8 packed codes, and either
        "absmax": (nblocks,) float32, or with `double_quant` (QLoRA's double quantization, as
        bitsandbytes' `compress_statistics=True`): "absmax" (nblocks,) uint8 codes of
        `absmax - offset` in the 8-bit dynamic map, blockwise over `double_quant_block_size`
        blocks, "nested_absmax" (nblocks2,) float32 their scales, "offset" (1,) float32 the mean.
    """
    _check_block_size("block_size", block_size)
    _check_block_size("double_quant_block_size", double_quant_block_size)
    if w.size == 0:
        raise ValueError("cannot NF4-quantize an empty weight")
    blocks, absmax = _blockwise_absmax(w.reshape(-1).astype(mx.float32), block_size)
    codes = _nearest_sorted(_scaled(blocks, absmax), NF4_LEVELS).astype(mx.uint8)
    pairs = codes.reshape(-1, 2)
    params = {"weight": (pairs[:, 0] << 4) | pairs[:, 1]}  # (n_padded / 2,) uint8
    if not double_quant:
        params["absmax"] = absmax
        return params
    offset = mx.mean(absmax.astype(mx.float32), keepdims=True)  # (1,), as bitsandbytes: absmax.mean()
    nested_blocks, nested_absmax = _blockwise_absmax(absmax - offset, double_quant_block_size)
    nested_codes = _nearest_sorted(_scaled(nested_blocks, nested_absmax), dynamic_map())
    params["absmax"] = nested_codes.reshape(-1)[: absmax.size].astype(mx.uint8)
    params["nested_absmax"] = nested_absmax
    params["offset"] = offset
    return params


def nf4_dequantize(params: dict[str, mx.array], shape: tuple[int, ...], block_size: int = 64,
                   double_quant_block_size: int = 256) -> mx.array:
    """The float32 weight of `shape` from `nf4_quantize`'s params (double quantization detected by keys).

    Vectorized: a table gather unpacks and decodes two bytes at a time, one broadcast multiply
    applies absmax; no loop over blocks.
    """
    absmax = params["absmax"]
    if "nested_absmax" in params:  # (nblocks,) uint8 -> float32, as bitsandbytes: code[q] * scale + offset
        codes = absmax
        pad = -codes.size % double_quant_block_size
        if pad:
            codes = mx.concatenate([codes, mx.zeros((pad,), codes.dtype)])
        decoded = mx.take(_dynamic_table(), codes.reshape(-1, double_quant_block_size), axis=0)
        absmax = (decoded * params["nested_absmax"][:, None]).reshape(-1)[: params["absmax"].size]
        absmax = absmax + params["offset"]
    weight = _decode_packed(params["weight"]).reshape(-1, block_size) * absmax[:, None]  # (nblocks, block_size)
    n = math.prod(shape)
    weight = weight.reshape(-1)
    if weight.size != n:
        weight = weight[:n]
    return weight.reshape(shape)


class NF4Linear(nn.Module):
    """A frozen linear layer with an NF4 weight (QLoRA): y = x @ dequantize(W).T + bias.

    Parameters mirror bitsandbytes' names: `weight` (packed uint8), `absmax` (float32, or uint8 with
    double quantization plus `nested_absmax` and `offset`), and the optional float `bias`.
    """

    def __init__(self, input_dims: int, output_dims: int, params: dict[str, mx.array],
                 bias: mx.array | None = None, block_size: int = 64, double_quant_block_size: int = 256):
        super().__init__()
        _check_block_size("block_size", block_size)
        self.input_dims = input_dims
        self.output_dims = output_dims
        self.block_size = block_size
        self.double_quant_block_size = double_quant_block_size
        self._names = tuple(name for name in ("weight", "absmax", "nested_absmax", "offset") if name in params)
        for name in self._names:
            setattr(self, name, params[name])
        if bias is not None:
            self.bias = bias
        self.freeze()

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = False,
                    double_quant_block_size: int = 256) -> "NF4Linear":
        """NF4-quantize an nn.Linear (its weight is read, not modified; the bias is shared)."""
        output_dims, input_dims = linear.weight.shape
        params = nf4_quantize(linear.weight, block_size, double_quant, double_quant_block_size)
        return cls(input_dims, output_dims, params, linear.get("bias"), block_size, double_quant_block_size)

    @property
    def double_quant(self) -> bool:
        return "nested_absmax" in self._names

    def weight_arrays(self) -> tuple[mx.array, ...]:
        """The arrays the dense weight is built from, in the order `dequantize` takes them."""
        return tuple(self[name] for name in self._names)

    def dequantize(self, *weight_arrays: mx.array) -> mx.array:
        """The float32 (out, in) weight from `weight_arrays` alone (so callers may recompute it lazily)."""
        return nf4_dequantize(dict(zip(self._names, weight_arrays)), (self.output_dims, self.input_dims),
                              self.block_size, self.double_quant_block_size)

    def _extra_repr(self) -> str:
        return (f"input_dims={self.input_dims}, output_dims={self.output_dims}, bias={'bias' in self}, "
                f"block_size={self.block_size}, double_quant={self.double_quant}")

    def __call__(self, x: mx.array) -> mx.array:
        # No fused NF4 kernel exists on either device: dequantize + matmul, with the weight
        # recomputed in the backward pass instead of kept alive (see frozen_matmul).
        from .frozen_matmul import frozen_linear

        return frozen_linear(self, x)


@dataclass
class QuantizationReport:
    """What `quantize_model` did: sizes, accuracy of the quantized weights, and what it left alone."""

    mode: str
    bits: int | None  # bits per quantized weight (None for "none")
    group_size: int | None = None  # affine: weights per scale/bias; nf4: weights per absmax
    double_quant: bool = False
    layers_quantized: int = 0
    source_quantized: int = 0  # layers already quantized in the source (GGUF, MLX 4-bit), left as they were
    source_formats: dict[str, int] = field(default_factory=dict)  # e.g. {"4-bit group 32": 210}
    bytes_before: int = 0
    bytes_after: int = 0
    # ||W - deq(Q(W))||_F / ||W||_F over all weights quantized here, together (None when none were)
    relative_error: float | None = None
    skipped: list[str] = field(default_factory=list)  # "path: reason" for each layer left in float

    def describe(self) -> str:
        """One line for logs, e.g. 'nf4 4-bit (block 64): 14 layers, 540.1 MB -> 160.3 MB, rel. error 0.0951'."""
        if self.mode == "none":
            text = "none (float base)"
        elif not self.layers_quantized and self.source_quantized:
            text = f"{self.mode}: nothing left in float to quantize"
        else:
            unit = "group" if self.mode == "affine" else "block"
            dq = ", double quant" if self.double_quant else ""
            text = f"{self.mode} {self.bits}-bit ({unit} {self.group_size}{dq}): {self.layers_quantized} layers"
        text += f", {self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB"
        if self.relative_error is not None:
            text += f", rel. error {self.relative_error:.4f}"
        if self.source_quantized:
            formats = ", ".join(f"{name}: {count}" for name, count in sorted(self.source_formats.items()))
            text += f"; {self.source_quantized} layers kept as the source quantized them ({formats})"
        if self.skipped:
            text += f", {len(self.skipped)} skipped"
        return text


def model_nbytes(model: nn.Module) -> int:
    """Bytes of all arrays of `model` (trainable or frozen)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _format_of(module: nn.Module) -> str:
    if isinstance(module, NF4Linear):
        return f"nf4 block {module.block_size}"
    return f"{getattr(module, 'bits', '?')}-bit group {getattr(module, 'group_size', '?')}"


def _is_source_quantized(module: nn.Module) -> bool:
    return isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding, NF4Linear)) or "scales" in module


def _validate(mode: str, bits: int, group_size: int, block_size: int) -> None:
    if mode not in MODES:
        raise ValueError(f"quantization.mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "affine" and bits not in AFFINE_BITS:
        raise ValueError(f"quantization.bits must be one of {AFFINE_BITS} for affine mode, got {bits!r}")
    if mode == "affine" and group_size not in AFFINE_GROUP_SIZES:
        raise ValueError(f"quantization.group_size must be one of {AFFINE_GROUP_SIZES}, got {group_size!r}")
    if mode == "nf4":
        _check_block_size("quantization.block_size", block_size)


def _skipped_by_name(path: str, skip: tuple[str, ...]) -> bool:
    return path in skip or path.rsplit(".", 1)[-1] in skip


def quantize_model(model: nn.Module, mode: str, bits: int = 4, group_size: int = 64, block_size: int = 64,
                   double_quant: bool = False, skip: tuple[str, ...] = ()) -> QuantizationReport:
    """Quantize the float linear layers of `model` in place; returns what was done.

    Args:
        mode: "none" (leave float), "affine" (MLX affine via `to_quantized`, `bits` and `group_size`,
            embeddings included as mlx-lm does), or "nf4" (nn.Linear -> NF4Linear with `block_size`
            and optional `double_quant`; embeddings and `lm_head` stay float, as QLoRA/bitsandbytes do).
        skip: layer paths or last path components (e.g. "lm_head") to leave in float.

    Layers already quantized (nn.QuantizedLinear from a GGUF or an MLX 4-bit model) are left as
    they are and counted in `source_quantized`; layers whose input dims are not a multiple of the
    group/block size stay float and are listed in `skipped`.
    """
    _validate(mode, bits, group_size, block_size)
    bytes_before = model_nbytes(model)
    report = QuantizationReport(mode=mode, bits=None if mode == "none" else (4 if mode == "nf4" else bits),
                                group_size={"affine": group_size, "nf4": block_size}.get(mode),
                                double_quant=mode == "nf4" and double_quant, bytes_before=bytes_before)
    modules = model.named_modules()
    source = [m for _, m in modules if _is_source_quantized(m) and "weight" in m]
    report.source_quantized = len(source)
    report.source_formats = dict(Counter(_format_of(m) for m in source))
    if mode == "none":
        report.bytes_after = bytes_before
        return report

    unit = "group_size" if mode == "affine" else "block_size"
    size = group_size if mode == "affine" else block_size
    error_sq, norm_sq = 0.0, 0.0
    replacements = []
    for path, module in modules:
        if _is_source_quantized(module):
            continue
        if mode == "affine":
            eligible = hasattr(module, "to_quantized") and "weight" in module
        else:
            eligible = isinstance(module, nn.Linear)
        if not eligible:
            continue
        if mode == "nf4" and path.rsplit(".", 1)[-1] == "lm_head":
            report.skipped.append(f"{path}: the output head stays float in nf4 mode (QLoRA convention)")
            continue
        if _skipped_by_name(path, skip):
            report.skipped.append(f"{path}: in skip list")
            continue
        input_dims = module.weight.shape[-1]
        if input_dims % size:
            report.skipped.append(f"{path}: input dims {input_dims} not a multiple of {unit} {size}")
            continue
        if not mx.all(mx.isfinite(module.weight)).item():
            raise ValueError(f"layer {path} has non-finite weights (NaN or inf); cannot quantize it. "
                             f"Check the checkpoint, or add '{path}' to the skip list")
        if mode == "affine":
            new = module.to_quantized(group_size=group_size, bits=bits, mode="affine")
            restored = mx.dequantize(new.weight, new.scales, new.get("biases"), group_size=group_size,
                                     bits=bits, mode="affine", dtype=mx.float32)
        else:
            new = NF4Linear.from_linear(module, block_size, double_quant)
            restored = new.dequantize(*new.weight_arrays())
        original = module.weight.astype(mx.float32)
        err, norm = mx.sum(mx.square(original - restored)), mx.sum(mx.square(original))
        mx.eval(new.parameters(), err, norm)  # one layer at a time: no graph of the whole model
        error_sq += err.item()
        norm_sq += norm.item()
        replacements.append((path, new))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    report.layers_quantized = len(replacements)
    report.relative_error = math.sqrt(error_sq / norm_sq) if norm_sq > 0 else (0.0 if replacements else None)
    report.bytes_after = model_nbytes(model)
    return report
