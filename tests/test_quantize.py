"""Base-model quantization: NF4 against a float64 numpy reference and bitsandbytes, NF4Linear, quantize_model."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import llama

from mlx_lora.quantize import (
    NF4_LEVELS,
    NF4Linear,
    dynamic_map,
    model_nbytes,
    nf4_dequantize,
    nf4_quantize,
    quantize_model,
)

LEVELS = np.array(NF4_LEVELS, np.float64)
# Largest distance from a value in [-1, 1] to its nearest NF4 level: half the widest gap (0.7230 .. 1.0).
NF4_HALF_GAP = float(np.max(np.diff(LEVELS)) / 2)


def gaussian(shape, seed=0, std=0.02) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * std).astype(np.float32)


def reference_nf4(w: np.ndarray, block_size: int):
    """Float64 numpy NF4: (codes, absmax, dequantized, scaled) of the flattened w, by argmin distance."""
    blocks = w.astype(np.float64).reshape(-1, block_size)
    absmax = np.abs(blocks).max(axis=1)
    scaled = blocks / np.where(absmax > 0, absmax, 1.0)[:, None]
    codes = np.abs(scaled[..., None] - LEVELS).argmin(axis=-1)  # ties: the lower level, as bitsandbytes
    return codes.reshape(-1), absmax, (LEVELS[codes] * absmax[:, None]).reshape(-1), scaled.reshape(-1)


def unpack(packed: mx.array) -> np.ndarray:
    packed = np.array(packed)
    return np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)  # first element in the high nibble


def tiny_llama(seed=0, **overrides):
    mx.random.seed(seed)
    args = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=100)
    model = llama.Model(llama.ModelArgs(**{**args, **overrides}))
    mx.eval(model.parameters())
    return model


def test_nf4_levels_are_the_qlora_levels():
    assert len(NF4_LEVELS) == 16
    assert list(NF4_LEVELS) == sorted(NF4_LEVELS)
    assert NF4_LEVELS[0] == -1.0 and NF4_LEVELS[-1] == 1.0 and 0.0 in NF4_LEVELS
    # 8 positive and 7 negative levels (QLoRA's asymmetric split keeping an exact zero), stored as float32
    assert sum(v > 0 for v in NF4_LEVELS) == 8 and sum(v < 0 for v in NF4_LEVELS) == 7
    assert np.array_equal(np.array(NF4_LEVELS, np.float32).astype(np.float64), LEVELS)


def test_dynamic_map_shape():
    values = np.array(dynamic_map())
    assert values.shape == (256,) and np.all(np.diff(values) > 0)
    assert values[-1] == 1.0 and 0.0 in values and -1.0 < values[0] < -0.99


def test_nf4_matches_float64_reference():
    w = gaussian((48, 256))
    params = nf4_quantize(mx.array(w), block_size=64)
    codes, absmax, deq, scaled = reference_nf4(w, 64)
    ours = unpack(params["weight"])
    # Codes may differ only where the scaled value sits on a midpoint between levels (float32 vs float64).
    differ = ours != codes
    midpoints = (LEVELS[:-1] + LEVELS[1:]) / 2
    assert np.all(np.abs(scaled[differ, None] - midpoints).min(axis=-1) < 1e-6)
    assert differ.sum() <= 2
    np.testing.assert_allclose(np.array(params["absmax"]), absmax, rtol=0, atol=0)  # absmax is exact
    restored = np.array(nf4_dequantize(params, w.shape, 64)).reshape(-1)
    assert restored.dtype == np.float32
    np.testing.assert_allclose(restored[~differ], deq[~differ], rtol=1e-6, atol=0)


def test_nf4_error_is_bounded_by_half_the_widest_gap():
    w = gaussian((64, 128), seed=1)
    restored = np.array(nf4_dequantize(nf4_quantize(mx.array(w), 32), w.shape, 32))
    absmax = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True)
    error = np.abs(w.reshape(-1, 32) - restored.reshape(-1, 32))
    assert np.all(error <= NF4_HALF_GAP * absmax * (1 + 1e-6))


def test_values_on_levels_round_trip_exactly():
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 16, size=(16, 64))
    codes[:, 5] = rng.choice([0, 15], size=16)  # each block reaches +-1, so absmax is its scale
    scales = 2.0 ** rng.integers(-8, 0, size=(16, 1))  # powers of two: the products are exact in float32
    w = (LEVELS[codes] * scales).astype(np.float32)
    params = nf4_quantize(mx.array(w), 64)
    assert np.array_equal(unpack(params["weight"]), codes.reshape(-1))
    assert np.array_equal(np.array(nf4_dequantize(params, w.shape, 64)), w)


def test_zero_block_and_partial_last_block():
    w = gaussian((5, 30), seed=3)  # 150 elements: two full blocks of 64 and one of 22
    w[0, :] = 0.0
    params = nf4_quantize(mx.array(w), 64)
    assert params["absmax"].shape == (3,) and params["weight"].shape == (96,)
    restored = np.array(nf4_dequantize(params, w.shape, 64))
    _, _, deq, _ = reference_nf4(np.concatenate([w.reshape(-1), np.zeros(42, np.float32)]), 64)
    np.testing.assert_allclose(restored.reshape(-1), deq[:150], rtol=1e-6, atol=0)
    assert np.all(restored[0] == 0.0)


def test_nf4_and_affine_4bit_errors_are_comparable_on_gaussian():
    # Measured on 1024x1024 N(0, 1), 3 seeds: NF4 block 64 0.0920, affine 4-bit group 64 0.0910
    # (float32 scale and bias: twice NF4's per-block storage). Neither is clearly better here.
    w = mx.random.normal((256, 1024), key=mx.random.key(0))
    nf4 = nf4_dequantize(nf4_quantize(w, 64), w.shape, 64)
    affine = mx.dequantize(*mx.quantize(w, 64, 4), group_size=64, bits=4)
    norm = mx.linalg.norm(w).item()
    nf4_error, affine_error = mx.linalg.norm(w - nf4).item() / norm, mx.linalg.norm(w - affine).item() / norm
    assert 0.085 < nf4_error < 0.10
    assert abs(nf4_error / affine_error - 1) < 0.03


def test_double_quant_is_close_and_smaller():
    w = gaussian((128, 512), seed=4)
    plain = nf4_quantize(mx.array(w), 64)
    dq = nf4_quantize(mx.array(w), 64, double_quant=True, double_quant_block_size=256)
    assert dq["absmax"].dtype == mx.uint8 and dq["nested_absmax"].shape == (4,) and dq["offset"].shape == (1,)
    assert np.array_equal(np.array(dq["weight"]), np.array(plain["weight"]))  # the 4-bit codes are unchanged
    # 4.5 bits per weight without, 4 + 8/64 + 32/(64*256) with double quantization.
    plain_bytes, dq_bytes = sum(v.nbytes for v in plain.values()), sum(v.nbytes for v in dq.values())
    assert dq_bytes < plain_bytes
    assert math.isclose(dq_bytes * 8 / w.size, 4 + 8 / 64 + 32 / (64 * 256) + 32 / w.size)
    # Each absmax moves by at most half the widest gap of the 8-bit map times its 256-block's scale,
    # and every weight by at most that (|level| <= 1).
    gaps = np.diff(np.array(dynamic_map()))
    bound = gaps.max() / 2 * np.repeat(np.array(dq["nested_absmax"]), 256)  # (nblocks,)
    absmax = np.array(plain["absmax"])
    restored_plain = np.array(nf4_dequantize(plain, w.shape, 64)).reshape(-1, 64)
    restored_dq = np.array(nf4_dequantize(dq, w.shape, 64)).reshape(-1, 64)
    assert np.all(np.abs(restored_dq - restored_plain) <= bound[:, None] * (1 + 1e-5) + 1e-8)
    relative = np.linalg.norm(restored_dq - restored_plain) / np.linalg.norm(restored_plain)
    assert relative < 0.01 and np.abs(absmax).max() > 0


def test_nf4_linear_matches_numpy_and_passes_gradients():
    mx.random.seed(5)
    linear = nn.Linear(128, 96, bias=True)
    layer = NF4Linear.from_linear(linear, block_size=64, double_quant=True)
    assert (layer.input_dims, layer.output_dims) == (128, 96)
    assert layer.trainable_parameters() == {}
    w = np.array(layer.dequantize(*layer.weight_arrays()), np.float64)
    assert w.shape == (96, 128)
    b = np.array(linear.bias, np.float64)
    x = mx.random.normal((3, 7, 128))
    cotangent = mx.random.normal((3, 7, 96))
    np.testing.assert_allclose(np.array(layer(x)), np.array(x, np.float64) @ w.T + b, rtol=1e-5, atol=1e-5)
    grad = mx.grad(lambda x: mx.sum(layer(x) * cotangent))(x)
    np.testing.assert_allclose(np.array(grad), np.array(cotangent, np.float64) @ w, rtol=1e-5, atol=1e-5)
    assert layer(x.astype(mx.bfloat16)).dtype == mx.bfloat16


def test_dequantize_uses_only_the_given_arrays():
    layer = NF4Linear.from_linear(nn.Linear(64, 32, bias=False), block_size=32)
    weight, absmax = layer.weight_arrays()
    doubled = layer.dequantize(weight, absmax * 2)
    assert np.array_equal(np.array(doubled), 2 * np.array(layer.dequantize(weight, absmax)))


@pytest.mark.parametrize("mode, kwargs, bound", [
    ("none", {}, 0.0),
    # Bounds on ||logits - float logits|| / ||float logits|| for this random 2-block model (which amplifies
    # weight error), about 2-3x the values measured over seeds 0-2: affine 4-bit 0.18-0.25, affine 8-bit
    # 0.010-0.011, nf4 (with or without double quant) 0.19-0.23.
    ("affine", {"bits": 4, "group_size": 64}, 0.5),
    ("affine", {"bits": 8, "group_size": 32}, 0.03),
    ("nf4", {"block_size": 64}, 0.5),
    ("nf4", {"block_size": 64, "double_quant": True}, 0.5),
])
def test_quantize_model_modes(mode, kwargs, bound):
    model = tiny_llama(tie_word_embeddings=False)
    tokens = mx.array([[1, 5, 9, 42, 7, 3, 99, 0]])
    reference = model(tokens)
    before = model_nbytes(model)
    report = quantize_model(model, mode, **kwargs)
    logits = model(tokens)
    error = (mx.linalg.norm(logits - reference) / mx.linalg.norm(reference)).item()
    assert error <= bound
    assert report.mode == mode and report.bytes_before == before and report.bytes_after == model_nbytes(model)
    assert report.source_quantized == 0 and report.describe().startswith(mode)
    if mode == "none":
        assert report.layers_quantized == 0 and report.bytes_after == before and report.relative_error is None
        return
    assert report.bytes_after < before
    # Measured: affine 4-bit 0.073 (llama's uniform init suits affine), nf4 0.091, affine 8-bit 0.004.
    assert 0 < report.relative_error < (0.12 if report.bits == 4 else 0.01)
    kinds = (NF4Linear, nn.QuantizedLinear, nn.QuantizedEmbedding)
    quantized = [p for p, m in model.named_modules() if isinstance(m, kinds)]
    assert report.layers_quantized == len(quantized)
    if mode == "affine":
        assert len(quantized) == 2 * 7 + 2  # every projection, the embedding and lm_head, as mlx-lm
    else:
        assert len(quantized) == 2 * 7  # embedding and lm_head stay float
        assert isinstance(model.model.embed_tokens, nn.Embedding) and isinstance(model.lm_head, nn.Linear)
        assert report.skipped == ["lm_head: the output head stays float in nf4 mode (QLoRA convention)"]


def test_relative_error_aggregates_the_layers():
    model = tiny_llama()
    originals = {p: np.array(m.weight) for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = quantize_model(model, "nf4", block_size=32)
    modules = dict(model.named_modules())
    error_sq = norm_sq = 0.0
    for path, w in originals.items():
        restored = np.array(modules[path].dequantize(*modules[path].weight_arrays()), np.float64)
        error_sq += np.sum((w - restored) ** 2)
        norm_sq += np.sum(w.astype(np.float64) ** 2)
    assert math.isclose(report.relative_error, math.sqrt(error_sq / norm_sq), rel_tol=1e-4)


def test_already_quantized_layers_stay_and_odd_dims_are_skipped():
    model = tiny_llama()
    nn.quantize(model.model.layers[0], group_size=32, bits=4)  # as if the source were an MLX 4-bit model
    model.model.layers[1].mlp.down_proj = nn.Linear(100, 64, bias=False)  # 100 % 64 != 0
    source_layer = model.model.layers[0].self_attn.q_proj
    report = quantize_model(model, "nf4", skip=("v_proj",))
    assert model.model.layers[0].self_attn.q_proj is source_layer
    assert report.source_quantized == 7
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.Linear)
    assert isinstance(model.model.layers[1].self_attn.v_proj, nn.Linear)
    assert sorted(report.skipped) == ["model.layers.1.mlp.down_proj: input dims 100 not a multiple of block_size 64",
                                      "model.layers.1.self_attn.v_proj: in skip list"]
    assert report.layers_quantized == 5


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "int4"}, "quantization.mode"),
    ({"mode": "affine", "bits": 7}, "quantization.bits"),
    ({"mode": "affine", "group_size": 48}, "quantization.group_size"),
    ({"mode": "nf4", "block_size": 63}, "quantization.block_size"),
])
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize_model(tiny_llama(), **kwargs)


def test_non_finite_weights_raise():
    model = tiny_llama()
    model.model.layers[0].mlp.up_proj.weight = mx.full((128, 64), mx.nan)
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj"):
        quantize_model(model, "nf4")


@pytest.mark.parametrize("shape", [(96, 320), (5, 30)])
def test_matches_bitsandbytes(shape):
    torch = pytest.importorskip("torch", reason="torch not installed: cannot compare with bitsandbytes")
    bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    w = gaussian(shape, seed=6)
    n = w.size
    packed, state = bnb_functional.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
    params = nf4_quantize(mx.array(w), 64)
    assert np.array_equal(np.array(params["weight"])[: (n + 1) // 2], packed.numpy().reshape(-1))
    assert np.array_equal(np.array(params["absmax"]), state.absmax.numpy())
    expected = bnb_functional.dequantize_4bit(packed, state).numpy()
    assert np.array_equal(np.array(nf4_dequantize(params, shape, 64)), expected)  # bit for bit

    assert np.array_equal(np.array(dynamic_map(), np.float32), bnb_functional.create_dynamic_map().numpy())
    packed, state = bnb_functional.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                                                 compress_statistics=True)
    params = nf4_quantize(mx.array(w), 64, double_quant=True)
    expected = bnb_functional.dequantize_4bit(packed, state).numpy()
    # bitsandbytes' CPU 8-bit kernel sometimes picks the second-nearest code near a midpoint (we take the
    # nearest), and its float32 mean may differ by an ulp: a few absmax codes differ by one step.
    codes = np.array(params["absmax"]).astype(int)
    assert np.abs(codes - state.absmax.numpy().astype(int)).max() <= 1
    assert np.mean(codes != state.absmax.numpy()) < 0.02
    np.testing.assert_allclose(np.array(params["offset"]), state.offset.numpy().reshape(1), rtol=1e-6)
    scale = np.abs(w).max()
    np.testing.assert_allclose(np.array(nf4_dequantize(params, shape, 64)), expected, rtol=0, atol=2e-3 * scale)


def test_nf4_linear_through_the_frozen_matmul_path():
    from mlx_lora.frozen_matmul import dequantized_matmul

    mx.random.seed(7)
    layer = NF4Linear.from_linear(nn.Linear(128, 64, bias=False), block_size=64, double_quant=True)
    x = mx.random.normal((4, 128))
    cotangent = mx.random.normal((4, 64))

    def loss(x):
        return mx.sum(dequantized_matmul(x, layer.dequantize, layer.weight_arrays()) * cotangent)

    w = np.array(layer.dequantize(*layer.weight_arrays()), np.float64)
    for fn in (mx.grad(loss), mx.compile(mx.grad(loss))):
        np.testing.assert_allclose(np.array(fn(x)), np.array(cotangent, np.float64) @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(dequantized_matmul(x, layer.dequantize, layer.weight_arrays())),
                               np.array(layer(x)), rtol=1e-6, atol=1e-6)


def test_source_quantized_layers_are_kept_and_described():
    model = tiny_llama(tie_word_embeddings=False)
    nn.quantize(model, group_size=32, bits=4)
    expected = sum(1 for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)))
    report = quantize_model(model, "affine", bits=4, group_size=64)
    assert report.layers_quantized == 0 and report.source_quantized == expected
    assert report.source_formats == {"4-bit group 32": expected}
    assert report.describe().startswith("affine: nothing left in float to quantize")
    assert f"{expected} layers kept as the source quantized them (4-bit group 32: {expected})" in report.describe()
