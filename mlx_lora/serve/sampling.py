"""Per-sequence sampling: logit adjustments (bias, penalties, grammar mask), the sampler, log-probabilities.

Every function works on one sequence's row of logits, so a sequence's tokens do not depend on
which other sequences share its batch (a seeded sequence draws from its own key). The scheduler
calls `next_token` once per row and step.

Formulas:
- repetition_penalty (CTRL, Keskar et al. 2019, as in Hugging Face `RepetitionPenaltyLogitsProcessor`):
  for every token already in the prompt or the answer, logit / p when positive, logit * p otherwise.
- frequency / presence penalties (OpenAI's definition): logit - count * frequency - (count > 0) * presence,
  counting the tokens of the answer so far.
- temperature, then top_k, min_p (Nguyen et al. 2024: keep p >= min_p * p_max) and top_p (nucleus)
  filters, then a categorical draw.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings (defaults: greedy, no filters, no penalties)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: Optional[int] = None
    logprobs: bool = False
    top_logprobs: int = 0

    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 \
            or self.presence_penalty != 0.0


class RowSampler:
    """The sampling state of one sequence: its random key and the token counts its penalties need."""

    def __init__(self, params: SamplingParams, prompt: list[int]):
        self.params = params
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.key = mx.random.key(seed % 2**64)  # OpenAI's seeds are signed 64-bit; MLX's keys take unsigned
        self.prompt = prompt

    def adjust(self, logits: mx.array, generated: list[int]) -> mx.array:
        """logits (V,) float32 after logit_bias and the penalties."""
        p = self.params
        if p.logit_bias:
            ids = mx.array(list(p.logit_bias), dtype=mx.int32)
            logits = logits.at[ids].add(mx.array(list(p.logit_bias.values()), dtype=logits.dtype))
        if p.repetition_penalty != 1.0:
            seen = mx.array(sorted(set(self.prompt) | set(generated)), dtype=mx.int32)
            picked = logits[seen]
            logits[seen] = mx.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if generated and (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0):
            counts = mx.zeros(logits.shape, dtype=logits.dtype).at[mx.array(generated, dtype=mx.int32)].add(1.0)
            logits = logits - counts * p.frequency_penalty - (counts > 0) * p.presence_penalty
        return logits

    def draw(self, logits: mx.array) -> mx.array:
        """A token id (scalar uint32) from logits (V,) float32 per the sampling settings."""
        p = self.params
        if p.temperature == 0.0:
            return mx.argmax(logits)
        self.key, subkey = mx.random.split(self.key)
        x = logits / p.temperature
        vocab = x.shape[-1]
        if 0 < p.top_k < vocab:
            kth = mx.topk(x, p.top_k).min()
            x = mx.where(x < kth, -mx.inf, x)
        if p.min_p > 0.0 or p.top_p < 1.0:
            probs = mx.softmax(x)
            if p.min_p > 0.0:
                x = mx.where(probs < p.min_p * probs.max(), -mx.inf, x)
            if p.top_p < 1.0:
                ordered = mx.sort(probs)[::-1]
                before = mx.cumsum(ordered) - ordered  # mass of the more likely tokens
                # the most likely token is always kept (before == 0), so top_p 0 keeps it alone
                smallest_kept = mx.where((before < p.top_p) | (before <= 0), ordered, mx.inf).min()
                x = mx.where(probs < smallest_kept, -mx.inf, x)
        return mx.random.categorical(x, key=subkey)


def token_logprobs(logprobs: mx.array, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """(log p(token), the `top` most likely (id, log p)) from a row of log-probabilities (V,)."""
    chosen = logprobs[token].item()
    if top <= 0:
        return chosen, []
    ids = mx.argsort(-logprobs)[:top]
    values = logprobs[ids]
    return chosen, list(zip(ids.tolist(), values.tolist()))
