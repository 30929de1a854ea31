"""Serving a 4-bit base on the CPU: float copies and the per-shape product choice compute the same
logits as the training-time dequantize + BLAS path (the reference, in float32)."""

from __future__ import annotations

import pytest


def quantized_tiny(model_dir):
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_lora.frozen_matmul import use_fast_frozen_layers
    from mlx_lora.models import load_model

    model, _, _ = load_model(str(model_dir))
    nn.quantize(model, group_size=32, bits=4)
    use_fast_frozen_layers(model)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("mode", ["float", "quantized"])
@pytest.mark.parametrize("rows", [1, 3, 12])  # below and above QUANTIZED_ROWS_MAX
def test_decode_modes_match_the_dequantize_path(tiny_model_dir, mode, rows):
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from mlx_lora.serve.decode_weights import QUANTIZED_ROWS_MAX, prepare_for_decode

    reference_model, model = quantized_tiny(tiny_model_dir), quantized_tiny(tiny_model_dir)
    assert prepare_for_decode(model, mode) == mode
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert ("QuantizedLinear" not in "".join(kinds)) == (mode == "float")
    tokens = mx.array([[3, 17, 42, 5][: 1 if rows <= QUANTIZED_ROWS_MAX else 4]] * rows)
    expected = np.array(reference_model(tokens), dtype=np.float64)
    got = np.array(model(tokens), dtype=np.float64)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)
    assert isinstance(model.lm_head, nn.Linear if mode == "float" else nn.QuantizedLinear)


def test_auto_picks_float_when_memory_allows(tiny_model_dir, monkeypatch):
    from mlx_lora.serve import decode_weights

    model = quantized_tiny(tiny_model_dir)
    need = decode_weights.float_copy_bytes(model)
    monkeypatch.setattr(decode_weights, "available_memory_bytes", lambda: need * 3)
    assert decode_weights.choose_mode(model, "auto") == "float"
    monkeypatch.setattr(decode_weights, "available_memory_bytes", lambda: need)
    assert decode_weights.choose_mode(model, "auto") == "quantized"
    with pytest.raises(ValueError, match="float_weights"):
        decode_weights.choose_mode(model, "fast")
