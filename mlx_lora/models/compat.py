"""Fixes for known faults of mlx-lm's model classes, applied per loaded model (never to the classes).

Each fix swaps the class of the affected module instances for a subclass that corrects the
fault, so parameter names, adapters and every other model are untouched.

- gemma2 (mlx-lm 0.32): with grouped-query attention the scores are (B, kv_heads, repeats, L, S)
  but a batch's padding mask is (B, 1, L, S), which cannot broadcast: batched generation with
  prompts of different lengths (evaluation, the server) fails. The mask gets its repeats axis.
"""

from __future__ import annotations


def _gemma2_attention(cls):
    import mlx.core as mx

    class Gemma2AttentionMaskFix(cls):
        def __call__(self, x, mask=None, cache=None):
            if isinstance(mask, mx.array) and mask.ndim == 4 and getattr(self, "repeats", 1) > 1:
                mask = mask[:, :, None]  # (B, 1, L, S) -> (B, 1, 1, L, S) against (B, kv, repeats, L, S)
            return super().__call__(x, mask, cache)

    return Gemma2AttentionMaskFix


FIXES = {"gemma2": ("self_attn", _gemma2_attention)}
_fixed_classes: dict = {}


def apply_fixes(model, model_type: str) -> None:
    """Apply the fixes for `model_type` to `model`'s blocks in place (no-op for other types)."""
    if model_type not in FIXES:
        return
    attribute, make = FIXES[model_type]
    for block in getattr(model, "layers", []):
        module = getattr(block, attribute, None)
        if module is None:
            continue
        original = type(module)
        if original not in _fixed_classes.values():
            module.__class__ = _fixed_classes.setdefault(original, make(original))
