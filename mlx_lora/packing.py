"""Sequence packing: a batch's examples laid end to end in fewer rows, each attending only to itself.

`pack_batch` places the examples of one batch (the same examples, so the same loss at the same
targets as `data.collate`) into as few rows as fit `capacity` tokens, and numbers each token's
example (its segment). `packed_hidden` runs an mlx-lm backbone on such rows with a
block-diagonal causal mask: a token sees the earlier tokens of its own example only.

Positions are not restarted per example, and need not be: rotary embeddings make the attention
score of a query and a key depend on their distance only (Su et al. 2021, RoFormer, eq. 16), so
with the block-diagonal mask every example computes what it would alone. `packing_matches`
checks exactly that on a model (an architecture with absolute positions, or a mask built
without the cache's help, would fail it and keep unpacked batches).

The mask reaches mlx-lm's attention through the per-layer cache argument: mlx-lm asks the cache
for the mask (`create_attention_mask` -> `cache.make_mask`) and rotates by `cache.offset`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .data import PAD_MULTIPLE, Example

PROBE_TOLERANCE = 1e-4  # largest relative difference of a packed probe's logits from the examples alone


def pack_batch(examples: list[Example], indices: list[int], capacity: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(tokens (R, T) int32, target mask (R, T-1) float32, segments (R, T) int32, token count).

    Examples go longest first into the row with the fewest tokens, among ceil(total / capacity)
    rows (one more while some row would pass `capacity`; never past one example per row).
    Segment s > 0 marks the tokens of a row's s-th example, 0 the padding. An example's first
    token is never a target (nothing of its own precedes it), as in an unpacked row.
    """
    rows_of = [examples[i] for i in indices]
    total = sum(e.length for e in rows_of)
    order = sorted(range(len(rows_of)), key=lambda j: -rows_of[j].length)
    for count in range(max(1, -(-total // capacity)), len(rows_of) + 1):
        rows: list[list[int]] = [[] for _ in range(count)]
        fill = [0] * count
        for j in order:
            r = fill.index(min(fill))
            rows[r].append(j)
            fill[r] += rows_of[j].length
        if max(fill) <= capacity:
            break
    width = -(-max(fill) // PAD_MULTIPLE) * PAD_MULTIPLE
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    segments = np.zeros((len(rows), width), np.int32)
    for r, members in enumerate(rows):
        at = 0
        for s, j in enumerate(members, 1):
            example = rows_of[j]
            tokens[r, at: at + example.length] = example.tokens
            mask[r, at + 1: at + example.length] = example.mask[1:]
            segments[r, at: at + example.length] = s
            at += example.length
    return tokens, mask[:, 1:], segments, total


class PackedAttention:
    """Stands in for mlx-lm's per-layer KV cache in one forward pass over packed rows.

    It stores nothing (`update_and_fetch` returns the keys and values it gets), rotates from
    position 0, and answers mlx-lm's mask request with the block-diagonal causal mask of
    `segments` (B, T): (B, 1, T, T) bool, True where a query may see a key.
    """

    offset = 0

    def __init__(self, segments: mx.array):
        self.segments = segments

    def update_and_fetch(self, keys, values):
        return keys, values

    def make_mask(self, length: int, return_array: bool = False, window_size: int | None = None):
        segments = self.segments[:, :length]
        query, key = mx.arange(length)[:, None], mx.arange(length)[None, :]
        allowed = (segments[:, :, None] == segments[:, None, :]) & (query >= key)
        if window_size is not None:
            allowed = allowed & (query < key + window_size)
        return allowed[:, None]


def packed_hidden(model: nn.Module, inputs: mx.array, segments: mx.array) -> mx.array:
    """(B, T, D) final hidden states of `model.model` on packed `inputs` (B, T) with `segments` (B, T)."""
    caches = [PackedAttention(segments)] * len(model.model.layers)
    return model.model(inputs, cache=caches)


def packed_logits(model: nn.Module, inputs: mx.array, segments: mx.array) -> mx.array:
    """(B, T, V) logits of packed `inputs`, through the model's own head."""
    caches = [PackedAttention(segments)] * len(model.model.layers)
    return model(inputs, cache=caches)


def packing_matches(model: nn.Module, probe: list[Example]) -> bool:
    """True when the logits of `probe` (two or more examples) packed in one row equal each alone."""
    row_tokens = [t for example in probe for t in example.tokens]  # in the probe's order
    segments = [s for s, example in enumerate(probe, 1) for _ in example.tokens]
    try:
        packed = packed_logits(model, mx.array([row_tokens]), mx.array([segments]))[0].astype(mx.float32)
    except (TypeError, ValueError, AttributeError):  # a backbone that takes no cache list
        return False
    at, worst = 0, 0.0
    for example in probe:
        alone = model(mx.array([example.tokens]))[0].astype(mx.float32)
        part = packed[at: at + example.length]
        scale = max(mx.abs(alone).max().item(), 1e-6)
        worst = max(worst, mx.abs(part - alone).max().item() / scale)
        at += example.length
    return worst <= PROBE_TOLERANCE
