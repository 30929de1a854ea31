"""The training loss: masked cross-entropy, computed through the output head in vocabulary chunks.

For a small model the output head dominates training memory: SmolLM2's 49,152-token vocabulary
makes the logits of a batch of 4 x 72 tokens 57 MB in float32, and cross-entropy keeps several
arrays of that size alive (logits, log-softmax, their gradients). `chunked_cross_entropy` never
builds them: it walks the vocabulary in chunks of a few thousand rows with a running
log-sum-exp, and its backward pass recomputes each chunk's logits instead of storing them. A
quantized head is dequantized one chunk at a time (CPU) or multiplied with `quantized_matmul`
(GPU), so its float copy is never whole either.

The head runs only at positions that carry loss (`batch_loss` with `target_positions`): in a
chat dataset the prompt is most of each example (the demo's answers are ~18% of its tokens),
and the head at a position without loss is work thrown away. The hidden states of the target
positions are gathered first, so the head's cost follows the number of targets, padded to a
multiple of `POSITION_MULTIPLE` so that `mx.compile` sees few distinct shapes.

The chunked loss is used only where it provably equals the model's own: `enable_chunked_loss`
compares both on a real example and keeps the plain path for architectures whose head does
something else (scaling, a LoRA-adapted head). Gemma 2's logit soft cap is applied per chunk
(`OutputHead.softcap`, read from the model's `final_logit_softcapping`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .frozen_matmul import KEPT, affine_dequantizer, use_dequantize_path

CHUNK_LOGITS_BYTES = 2 * 1024 * 1024  # float32 logits per chunk; a chunk's backward holds ~10x this
# A head dequantized per chunk (CPU path): its float32 rows per chunk. MLX's CPU backend allocates an
# op's output when the op is queued, so ~7.5 chunks' dequantized rows are alive at once (measured on
# SmolLM2's 49,152 x 576 Q8_0 head at 64 positions: 141 MB with 8,192-row chunks, i.e. the whole head
# and more, 18 MB with 1,024; the head's forward + backward 0.54 s against 0.64 uncapped at 64 positions,
# 1.34 against 1.25 at 256, 3.99 against 4.50 at 1,024). Without this cap a batch with few loss
# positions gets the largest chunks: Llama-3.1-8B's head whole in float32 is 2.1 GB.
CHUNK_WEIGHT_BYTES = 4 * 1024 * 1024
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 512, 8192
POSITION_MULTIPLE = 32  # target counts are padded to this: few compiled shapes, little extra head work
PROBE_TOLERANCE = 1e-4  # relative difference between the chunked and the plain loss on the probe


@dataclass
class OutputHead:
    """A frozen (rows, hidden) output projection, usable one block of rows at a time."""

    rows: int
    arrays: tuple[mx.array, ...]  # every array's first axis is the output row
    project: Callable[[mx.array, list[mx.array]], mx.array]  # h (N, D), block -> h @ W_block.T (N, C)
    project_back: Callable[[mx.array, list[mx.array]], mx.array]  # g (N, C), block -> g @ W_block (N, D)
    softcap: float | None = None  # logits = softcap * tanh(h @ W.T / softcap) (Gemma 2's final_logit_softcapping)
    max_chunk_rows: int = MAX_CHUNK_ROWS  # fewer where each chunk is dequantized (`weight_chunk_rows`)

    def logits(self, h: mx.array, block: list[mx.array]) -> mx.array:
        """(N, C) float32 logits of one block of rows, soft-capped where the model caps them."""
        raw = self.project(h, block).astype(mx.float32)
        return raw if self.softcap is None else self.softcap * mx.tanh(raw / self.softcap)

    def raw_gradient(self, grad: mx.array, logits: mx.array) -> mx.array:
        """The gradient of the uncapped product from the gradient of `logits` (tanh' = 1 - tanh^2)."""
        return grad if self.softcap is None else grad * (1.0 - mx.square(logits / self.softcap))


def _float_head(weight: mx.array) -> OutputHead:
    return OutputHead(weight.shape[0], (weight,),
                      lambda h, block: h @ block[0].T.astype(h.dtype),
                      lambda g, block: g @ block[0].astype(g.dtype))


def _affine_head(layer: nn.Module) -> OutputHead:
    if KEPT in layer.__dict__:  # a float32 copy kept on the CPU (frozen_matmul.keep_float_weights)
        return _float_head(layer.__dict__[KEPT])
    dequantize, arrays = affine_dequantizer(layer)
    if use_dequantize_path():
        hidden = layer.scales.shape[-1] * layer.group_size
        return OutputHead(layer.weight.shape[0], arrays,
                          lambda h, block: h.astype(mx.float32) @ dequantize(*block).T,
                          lambda g, block: g.astype(mx.float32) @ dequantize(*block),
                          max_chunk_rows=weight_chunk_rows(hidden))
    group_size, bits, mode = layer.group_size, layer.bits, getattr(layer, "mode", "affine")

    def product(x, block, transpose):
        biases = block[2] if len(block) > 2 else None
        return mx.quantized_matmul(x, block[0], block[1], biases, transpose=transpose,
                                   group_size=group_size, bits=bits, mode=mode)

    return OutputHead(layer.weight.shape[0], arrays,
                      lambda h, block: product(h.astype(block[1].dtype), block, True),
                      lambda g, block: product(g.astype(block[1].dtype), block, False))


def output_head(model: nn.Module) -> OutputHead | None:
    """The model's output projection as an OutputHead, or None when it is not a plain frozen one."""
    backbone = getattr(model, "model", None)
    if not isinstance(backbone, nn.Module):
        return None
    args = getattr(model, "args", None)
    tied = bool(getattr(args, "tie_word_embeddings", False)) or "lm_head" not in model
    head = getattr(backbone, "embed_tokens", None) if tied else model["lm_head"]
    if isinstance(head, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        found = _affine_head(head)
    elif type(head) in (nn.Linear, nn.Embedding) and "bias" not in head:
        found = _float_head(head.weight)
    else:
        return None  # LoRA-adapted, NF4 or biased heads keep the model's own path
    softcap = getattr(model, "final_logit_softcapping", None)  # mlx-lm's gemma2.Model; the probe checks it
    return dataclasses.replace(found, softcap=float(softcap)) if softcap else found


def _power_of_two_rows(rows: int) -> int:
    return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, 1 << max(rows, 1).bit_length() - 1))


def vocab_chunk_rows(num_tokens: int) -> int:
    """Rows of the head per chunk: ~CHUNK_LOGITS_BYTES of logits, a power of two within bounds."""
    return _power_of_two_rows(CHUNK_LOGITS_BYTES // (4 * max(num_tokens, 1)))


def weight_chunk_rows(hidden: int) -> int:
    """Rows of a dequantized head per chunk: ~CHUNK_WEIGHT_BYTES of float32 (rows, hidden), a power
    of two within bounds (1,024 for hidden 576, the 512 floor from hidden 2,048 up)."""
    return _power_of_two_rows(CHUNK_WEIGHT_BYTES // (4 * hidden))


def chunked_cross_entropy(hidden: mx.array, targets: mx.array, head: OutputHead) -> mx.array:
    """Per-token cross-entropy of (N, D) hidden states through `head` against (N,) targets, float32.

    Every chunk runs the same operations on arrays: its first and last row reach the graph as
    entries of one (chunks, 2) array, never as Python numbers. Compiled on the CPU, MLX turns
    each fused element-wise group into a C++ kernel named by its operations and by the values
    of its scalar constants, so an offset baked in as a number made one kernel per chunk (Qwen2.5's
    151,936-token vocabulary: hundreds of kernels, >25 minutes before the first step). Kernels
    do not depend on array shapes, so the narrower last chunk reuses them too.
    """
    size = min(vocab_chunk_rows(hidden.shape[0]), head.max_chunk_rows, head.rows)
    chunks = [(start, min(start + size, head.rows)) for start in range(0, head.rows, size)]
    bounds = mx.array(np.array(chunks, np.int32))  # (C, 2) first row, end row of each chunk

    def block(arrays, start, stop, after):
        # `after` (the previous chunk's results) orders the chunks: without it the scheduler may
        # dequantize every chunk up front, or keep each chunk's logits until its target is picked.
        sliced = [a[start:stop] for a in arrays]
        return mx.depends(sliced, after) if after else sliced

    def local_targets(targets, bounds):
        """(C, N) each target's row within each chunk (may be out of it), and its clamped index."""
        local = targets[None, :] - bounds[:, :1]
        inside = (targets[None, :] >= bounds[:, :1]) & (targets[None, :] < bounds[:, 1:])
        return local, inside, mx.where(inside, local, 0)

    @mx.custom_function
    def cross_entropy(h, targets, bounds, arrays):
        _, inside, index = local_targets(targets, bounds)
        log_normalizer, target_logit = None, mx.zeros(targets.shape, mx.float32)
        for i, (start, stop) in enumerate(chunks):
            logits = head.logits(h, block(arrays, start, stop, [log_normalizer, target_logit] if i else []))
            chunk_lse = mx.logsumexp(logits, axis=-1)
            log_normalizer = chunk_lse if log_normalizer is None else mx.logaddexp(log_normalizer, chunk_lse)
            picked = mx.take_along_axis(logits, index[i][:, None], axis=-1)[:, 0]
            target_logit = target_logit + mx.where(inside[i], picked, 0.0)
        return log_normalizer - target_logit, log_normalizer

    @cross_entropy.vjp
    def cross_entropy_vjp(primals, cotangents, outputs):
        h, targets, bounds, arrays = primals
        local, _, _ = local_targets(targets, bounds)
        weight = cotangents[0].astype(mx.float32)[:, None]  # d loss / d ce, per token
        log_normalizer = outputs[1][:, None]
        grad_h = None
        for i, (start, stop) in enumerate(chunks):
            sliced = block(arrays, start, stop, [grad_h] if i else [])
            logits = head.logits(h, sliced)
            one_hot = mx.arange(stop - start)[None, :] == local[i][:, None]  # a target outside matches no column
            grad_logits = head.raw_gradient((mx.exp(logits - log_normalizer) - one_hot) * weight, logits)
            part = head.project_back(grad_logits, sliced).astype(mx.float32)
            grad_h = part if grad_h is None else grad_h + part
        return (grad_h.astype(h.dtype), mx.zeros_like(targets), mx.zeros_like(bounds),
                tuple(mx.zeros_like(a) for a in arrays))

    return cross_entropy(hidden, targets, bounds, head.arrays)[0]


def token_losses(model: nn.Module, tokens: mx.array) -> mx.array:
    """(B, T-1) next-token cross-entropy of `tokens`, float32."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    head = output_head(model) if getattr(model, "chunked_loss", False) else None
    if head is None:
        return nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets)
    hidden = model.model(inputs)
    flat = chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), head)
    return flat.reshape(targets.shape)


def masked_loss(model: nn.Module, tokens: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy over target tokens; also returns the target count."""
    ce = token_losses(model, tokens) * mask
    count = mask.sum()
    return ce.sum() / mx.maximum(count, 1), count


def target_positions(mask: np.ndarray, multiple: int = POSITION_MULTIPLE) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices (K,) int32 and weights (K,) float32 of the targets of a (B, T-1) mask.

    K is the number of non-zero entries rounded up to `multiple`; the extra entries point at
    position 0 with weight 0 (they cost head work but add nothing to the loss or gradients).
    """
    flat = np.asarray(mask, np.float32).reshape(-1)
    found = np.flatnonzero(flat)
    size = max(multiple, -(-len(found) // multiple) * multiple)
    positions = np.zeros(size, np.int32)
    weights = np.zeros(size, np.float32)
    positions[: len(found)] = found
    weights[: len(found)] = flat[found]
    return positions, weights


def batch_loss(model: nn.Module, tokens: mx.array, mask: mx.array, positions: mx.array,
               weights: mx.array, segments: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """`masked_loss`, with the output head run only at `positions` when the chunked loss is on.

    tokens (B, T) int, mask (B, T-1) float; positions (K,) int32 and weights (K,) float32 from
    `target_positions(mask)`. Returns (mean loss, target count), equal to `masked_loss`'s.
    A model on the plain path (its head transforms the logits) ignores positions and weights.
    segments (B, T) int32: packed rows (`packing.pack_batch`), each example attending to itself.
    """
    from .packing import packed_hidden, packed_logits

    head = output_head(model) if getattr(model, "chunked_loss", False) else None
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if head is None:
        if segments is None:
            return masked_loss(model, tokens, mask)
        logits = packed_logits(model, inputs, segments[:, :-1]).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, targets) * mask
        return ce.sum() / mx.maximum(mask.sum(), 1), mask.sum()
    hidden = model.model(inputs) if segments is None else packed_hidden(model, inputs, segments[:, :-1])  # (B, T-1, D)
    picked = hidden.reshape(-1, hidden.shape[-1])[positions]  # (K, D)
    ce = chunked_cross_entropy(picked, targets.reshape(-1)[positions], head) * weights
    count = weights.sum()
    return ce.sum() / mx.maximum(count, 1), count


def enable_chunked_loss(model: nn.Module, probe_tokens: mx.array) -> bool:
    """Switch `model` to the chunked loss if it matches the model's own on `probe_tokens` (1, T)."""
    model.chunked_loss = False
    if output_head(model) is None:
        return False
    was_training = model.training
    model.eval()
    plain = token_losses(model, probe_tokens)
    model.chunked_loss = True
    try:
        chunked = token_losses(model, probe_tokens)
        difference = mx.abs(chunked - plain).max() / mx.maximum(mx.abs(plain).max(), 1e-6)
        model.chunked_loss = difference.item() <= PROBE_TOLERANCE
    except (TypeError, ValueError):  # a backbone that cannot be called on its own
        model.chunked_loss = False
    model.train(was_training)
    return model.chunked_loss
