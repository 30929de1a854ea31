"""LoRA layers by composition: `LoRALinear.from_base(layer)` wraps any frozen linear (float, MLX
affine-quantized, NF4) and `fuse()` returns a plain layer. `apply_lora` walks a model.

Parameter names follow mlx-lm (`<path>.lora_a` of shape (in, rank), `<path>.lora_b` of shape
(rank, out)), so mlx-lm loads our adapters; `adapters/peft_format.py` maps them to PEFT's names.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .config import LoraConfig
from .frozen_matmul import KEPT, frozen_linear, keep_float_weights


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(input_dims, output_dims) of a float, affine-quantized or NF4 linear layer."""
    if hasattr(layer, "input_dims") and hasattr(layer, "output_dims"):
        return layer.input_dims, layer.output_dims
    output_dims, packed = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        # Quantized weights pack 32 // bits values into each uint32.
        return packed * 32 // layer.bits, output_dims
    return packed, output_dims


def dense_weight(layer: nn.Module) -> mx.array:
    """The float32 (out, in) weight of a frozen linear layer, dequantized if needed."""
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size,
                             bits=layer.bits, mode=getattr(layer, "mode", "affine"), dtype=mx.float32)
    if hasattr(layer, "dequantize") and hasattr(layer, "weight_arrays"):
        return layer.dequantize(*layer.weight_arrays())
    return layer.weight.astype(mx.float32)


class LoRALinear(nn.Module):
    """y = base(x) + scaling * dropout(x) @ A @ B, with the base frozen and A, B trainable in float32."""

    @staticmethod
    def from_base(base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> "LoRALinear":
        input_dims, output_dims = linear_dims(base)
        return LoRALinear(base, input_dims, output_dims, rank, alpha, dropout)

    def __init__(self, base: nn.Module, input_dims: int, output_dims: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"lora.rank must be positive, got {rank}")
        base.freeze()
        self.linear = base
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank  # the PEFT convention; mlx-lm calls this value `scale` too
        self.dropout = nn.Dropout(p=dropout)
        # Same init as PEFT (kaiming-uniform with a=sqrt(5)) and mlx-lm: U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(input_dims, rank))  # (in, rank)
        self.lora_b = mx.zeros((rank, output_dims))  # (rank, out): zero, so step 0 equals the base

    def __call__(self, x):
        y = frozen_linear(self.linear, x)
        if self.scale == 0:  # switched off (the base of a base-vs-tuned evaluation)
            return y
        # Scaling the rank-wide intermediate, not the output, saves a full-width pass each way.
        z = ((self.dropout(x) @ self.lora_a) * self.scale) @ self.lora_b  # (..., out) in float32
        return y + z.astype(y.dtype)

    def delta_weight(self) -> mx.array:
        """scaling * (A @ B).T: the (out, in) update this adapter adds to the base weight."""
        return self.scale * (self.lora_a @ self.lora_b).T

    def fuse(self, dtype=mx.float32) -> nn.Linear:
        """A plain nn.Linear equal to base + adapter (dequantized), in `dtype`."""
        weight = dense_weight(self.linear) + self.delta_weight()
        output_dims, input_dims = weight.shape
        has_bias = "bias" in self.linear
        fused = nn.Linear(input_dims, output_dims, bias=has_bias)
        fused.weight = weight.astype(dtype)
        if has_bias:
            fused.bias = self.linear.bias.astype(dtype)
        return fused


def transformer_blocks(model: nn.Module) -> list:
    """The list of transformer blocks of an mlx-lm model."""
    blocks = getattr(model, "layers", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `layers` list of transformer blocks; LoRA cannot find where to go")
    return list(blocks)


def is_linear(module) -> bool:
    return isinstance(module, (nn.Linear, nn.QuantizedLinear)) or hasattr(module, "weight_arrays")


def available_modules(model: nn.Module) -> list[str]:
    """Names (last path component) of the linear layers inside transformer blocks."""
    names = set()
    for block in transformer_blocks(model):
        for path, module in block.named_modules():
            if is_linear(module):
                names.add(path.rsplit(".", 1)[-1])
    return sorted(names)


def apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Freeze `model` and wrap the targeted linears of its last `num_layers` blocks in LoRALinear.

    `config.target_modules` may be `all-linear`. Returns the block-relative keys adapted (e.g.
    "self_attn.q_proj"), the form mlx-lm records.
    Raises ValueError naming any target module the model does not have, or when the model
    already carries LoRA layers (adapters would wrap adapters).
    """
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; load the base again, or fuse the adapters first")
    model.freeze()
    blocks = transformer_blocks(model)
    targets = config.resolve_targets(available_modules(model))
    num_layers = len(blocks) if config.num_layers == -1 else min(config.num_layers, len(blocks))
    keys: set[str] = set()
    for block in blocks[len(blocks) - num_layers:]:
        wrapped = []
        for path, module in block.named_modules():
            if is_linear(module) and path.rsplit(".", 1)[-1] in targets:
                wrapped.append((path, LoRALinear.from_base(module, config.rank, config.alpha, config.dropout)))
                keys.add(path)
        block.update_modules(tree_unflatten(wrapped))
    return sorted(keys)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The trainable adapter arrays by their full mlx-lm key."""
    return dict(tree_flatten(model.trainable_parameters()))


def count_trainable(model: nn.Module) -> int:
    return sum(v.size for v in adapter_weights(model).values())


def fuse_lora(model: nn.Module, dtype=mx.float32) -> int:
    """Replace every LoRALinear in `model` by its fused plain layer; returns how many were fused."""
    fused = [(name, layer.fuse(dtype)) for name, layer in lora_layers(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


@contextmanager
def adapters_disabled(model: nn.Module):
    """Temporarily zero every LoRA layer's scale: the model computes exactly its base.

    Evaluation's "base" and DPO's reference model are this, so no second copy is loaded.
    """
    layers = lora_layers(model)
    saved = [layer.scale for _, layer in layers]
    for _, layer in layers:
        layer.scale = 0.0
    try:
        yield model
    finally:
        for (_, layer), scale in zip(layers, saved):
            layer.scale = scale


@contextmanager
def adapters_folded(model: nn.Module):
    """Generation on the CPU: a LoRA layer whose frozen base holds a kept float32 copy
    (`frozen_matmul.keep_float_weights`) multiplies by base + scale * (A @ B).T in one product,
    what `fuse` computes, instead of the base product and two adapter products; the kept copies
    are made again from the quantized weights on exit. Layers without a copy are unchanged.
    """
    folded = []
    for _, layer in lora_layers(model):
        kept = layer.linear.__dict__.get(KEPT)
        if kept is None or layer.scale == 0:
            continue
        fused = kept + layer.delta_weight().astype(kept.dtype)  # (out, in)
        mx.eval(fused)
        object.__setattr__(layer.linear, KEPT, fused)
        folded.append((layer, layer.scale))
        layer.scale = 0.0
    try:
        yield model
    finally:
        for layer, scale in folded:
            layer.linear.__dict__.pop(KEPT, None)
            keep_float_weights(layer.linear)  # the base's own copy again
            layer.scale = scale

