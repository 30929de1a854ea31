"""GGML tensor types as MLX holds them (mlx_lora/models/gguf_types.py), against the gguf
package's reference decoder (`gguf.quants.dequantize`), on random valid blocks of every type and
on blocks quantized from gaussian weights by tests/gguf_blocks.py."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
mx = pytest.importorskip("mlx.core")

from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf_blocks import quantize, random_blocks  # noqa: E402

from mlx_lora.models import gguf_types  # noqa: E402
from mlx_lora.models.gguf_types import (  # noqa: E402
    TENSOR_TYPES, decode_tensor, pack_codes, reference_dequantize, relative_error, unpack_codes,
)

NATIVE = [name for name, kind in TENSOR_TYPES.items() if kind.codes is not None]
FLOAT = [name for name, kind in TENSOR_TYPES.items() if kind.float_dtype is not None]
REQUANTIZED = [name for name, kind in TENSOR_TYPES.items() if kind.typical_error > 0]
SHAPE = (6, 768)  # three K-quant super-blocks per row


def held_floats(held) -> np.ndarray:
    return np.array(held.dequantize())


def test_registry_covers_the_issue_types_with_ggml_block_sizes():
    assert set(TENSOR_TYPES) == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                 "Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K"}
    assert set(NATIVE) | set(FLOAT) | set(REQUANTIZED) == set(TENSOR_TYPES)
    for name, kind in TENSOR_TYPES.items():
        assert (kind.block_size, kind.block_bytes) == GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]], name


@pytest.mark.parametrize("name", NATIVE + FLOAT)
@pytest.mark.parametrize("seed", [0, 1])
def test_native_and_float_forms_equal_the_reference_bit_for_bit(name, seed):
    raw = random_blocks(name, SHAPE, np.random.default_rng(seed))
    held = decode_tensor(name, raw, SHAPE)
    expected = reference_dequantize(name, raw, SHAPE)
    assert np.isfinite(expected).all()
    got = held_floats(held)
    assert got.dtype == np.float32 and got.shape == SHAPE
    assert np.array_equal(got, expected), f"{name}: max difference {np.abs(got - expected).max()}"
    assert relative_error(held, expected) == 0.0
    if name in NATIVE:
        bits = TENSOR_TYPES[name].bits
        assert held.weight.dtype == mx.uint32 and held.weight.shape == (SHAPE[0], SHAPE[1] * bits // 32)
        assert held.scales.dtype == mx.float32 and held.scales.shape == (SHAPE[0], SHAPE[1] // 32)
        assert held.biases.shape == held.scales.shape
        assert (held.bits, held.group_size, held.how) == (bits, 32, f"native {bits}-bit g32")
    else:
        assert held.scales is None and held.bits is None
        assert held.weight.dtype == getattr(mx, TENSOR_TYPES[name].mx_dtype)


@pytest.mark.parametrize("name", NATIVE)
def test_native_forms_of_quantized_gaussian_weights_are_exact(name):
    weights = 0.02 * np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    raw = quantize(weights, name)
    assert np.array_equal(held_floats(decode_tensor(name, raw, SHAPE)), reference_dequantize(name, raw, SHAPE))


def test_bf16_is_kept_bit_for_bit_beyond_float16_range():
    bits = np.array([[0x7F00, 0xFF00, 0x0001, 0x3F80] * 8], dtype="<u2")  # 1.7e38, -1.7e38, 9e-41, 1.0
    held = decode_tensor("BF16", bits.view(np.uint8), (1, 32))
    assert held.weight.dtype == mx.bfloat16
    assert np.array_equal(np.array(held.weight.view(mx.uint16)), bits)
    assert np.array_equal(held_floats(held), reference_dequantize("BF16", bits.view(np.uint8), (1, 32)))


@pytest.mark.parametrize("name", REQUANTIZED)
@pytest.mark.parametrize("source", ["random", "gaussian"])
def test_requantized_forms_stay_within_the_recorded_error(name, source):
    rng = np.random.default_rng(3)
    shape = (32, 1024)
    raw = (random_blocks(name, shape, rng) if source == "random"
           else quantize(0.02 * rng.standard_normal(shape).astype(np.float32), name))
    held = decode_tensor(name, raw, shape)
    kind = TENSOR_TYPES[name]
    assert held.how == f"re-quantized {kind.bits}-bit g32" and held.weight.dtype == mx.uint32
    error = relative_error(held, reference_dequantize(name, raw, shape))
    # the recorded figure comes from 256 x 4096 weights; a smaller sample varies a little
    assert 0 < error < 1.5 * kind.typical_error, f"{name}: {error:.3g} vs recorded {kind.typical_error:.3g}"


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_matches_mlx(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2 ** bits, size=(3, 128), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint32 and packed.shape == (3, 128 * bits // 32)
    assert np.array_equal(unpack_codes(packed, bits), codes)
    ones, zeros = mx.ones((3, 4)), mx.zeros((3, 4))
    assert np.array_equal(np.array(mx.dequantize(mx.array(packed), ones, zeros, group_size=32, bits=bits)), codes)
    # and the other way: whatever codes mx.quantize chose, we pack them as it did
    mlx_packed, _, _ = mx.quantize(mx.array(rng.standard_normal((3, 128)).astype(np.float32)), group_size=32, bits=bits)
    mlx_codes = np.array(mx.dequantize(mlx_packed, ones, zeros, group_size=32, bits=bits)).astype(np.uint8)
    assert np.array_equal(pack_codes(mlx_codes, bits), np.array(mlx_packed))


def test_tensors_larger_than_one_chunk_decode_the_same(monkeypatch):
    rng = np.random.default_rng(4)
    for name in ("Q4_K", "Q6_K"):
        raw = random_blocks(name, SHAPE, rng)
        whole = decode_tensor(name, raw, SHAPE)
        monkeypatch.setattr(gguf_types, "CHUNK_WEIGHTS", 2 * SHAPE[1])  # two rows at a time
        chunked = decode_tensor(name, raw, SHAPE)
        monkeypatch.undo()
        for a, b in ((whole.weight, chunked.weight), (whole.scales, chunked.scales), (whole.biases, chunked.biases)):
            assert np.array_equal(np.array(a), np.array(b))


def test_unknown_type_is_one_line_naming_the_supported_ones():
    with pytest.raises(ValueError) as err:
        decode_tensor("IQ2_XXS", np.zeros(66, dtype=np.uint8), (1, 256))
    message = str(err.value)
    assert "\n" not in message and "IQ2_XXS" in message
    assert all(name in message for name in TENSOR_TYPES)


@pytest.mark.parametrize("raw_size, shape, words", [(143, (1, 256), "takes 144 bytes, got 143"),
                                                    (144, (1, 128), "whole blocks of 256")])
def test_bytes_that_do_not_fit_the_shape_are_refused(raw_size, shape, words):
    with pytest.raises(ValueError, match=words):
        decode_tensor("Q4_K", np.zeros(raw_size, dtype=np.uint8), shape)


@pytest.mark.parametrize("name, bound", [("Q8_0", 0.01), ("Q4_0", 0.12), ("Q4_1", 0.12), ("Q4_K", 0.1),
                                         ("Q5_K", 0.05), ("Q6_K", 0.025), ("Q3_K", 0.2), ("Q2_K", 0.4)])
def test_test_quantizers_decode_close_to_their_weights(name, bound):
    """tests/gguf_blocks.py's quantizers, decoded by the gguf package. The bounds are a little above
    round-to-nearest's error on gaussian weights (step / sqrt(12) relative to the spread): a layout
    bug (a scale or nibble in the wrong place) gives errors of order 1."""
    weights = np.random.default_rng(5).standard_normal((8, 1024)).astype(np.float32)
    raw = quantize(weights, name)
    kind = TENSOR_TYPES[name]
    assert raw.dtype == np.uint8 and raw.shape == (8, 1024 // kind.block_size * kind.block_bytes)
    decoded = reference_dequantize(name, raw, weights.shape)
    error = np.linalg.norm(decoded - weights) / np.linalg.norm(weights)
    assert error < bound, f"{name}: {error:.3g}"
    # more bits, less error: the quantizers use their codes' whole range
    assert error > {"Q8_0": 1e-3, "Q6_K": 5e-3}.get(name, 1e-2)
    if kind.block_size == 256:  # 576 x 576 holds whole super-blocks in all, but not per row
        with pytest.raises(ValueError, match="super-blocks"):
            quantize(np.zeros((576, 576), np.float32), name)


@pytest.mark.slow
def test_every_tensor_of_the_demo_gguf_decodes_exactly(smollm2_gguf):
    """Blocks made by llama.cpp's own quantizer (SmolLM2's Q4_1 and Q8_0 tensors), not ours."""
    from mlx_lora.models.gguf_file import read_header

    header = read_header(smollm2_gguf)
    seen = set()
    for name, info in header.tensors.items():
        if len(info.shape) != 2:
            continue
        kind = TENSOR_TYPES[info.type_name]
        nbytes = info.shape[0] * info.shape[1] // kind.block_size * kind.block_bytes
        raw = np.memmap(smollm2_gguf, dtype=np.uint8, mode="r", offset=header.data_start + info.offset,
                        shape=(nbytes,))
        expected = reference_dequantize(info.type_name, raw, info.shape)
        got = held_floats(decode_tensor(info.type_name, raw, info.shape))
        assert np.array_equal(got, expected), name
        seen.add(info.type_name)
    assert seen == {"Q4_1", "Q8_0"}


def test_tensors_written_by_gguf_writer_read_back_through_the_header(tmp_path):
    """The path the loader takes: raw blocks from tests/gguf_blocks.py written with GGUFWriter,
    found through our header reader, decoded from the file's bytes."""
    from mlx_lora.models.gguf_file import read_header

    rng = np.random.default_rng(6)
    weights = {name: 0.02 * rng.standard_normal((64, 512)).astype(np.float32) for name in TENSOR_TYPES}
    path = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, w in weights.items():
        writer.add_tensor(f"{name}.weight", quantize(w, name), raw_dtype=gguf.GGMLQuantizationType[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header = read_header(path)
    for name, w in weights.items():
        info = header.tensors[f"{name}.weight"]
        assert (info.type_name, info.shape) == (name, w.shape)
        kind = TENSOR_TYPES[name]
        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=header.data_start + info.offset,
                        shape=(w.size // kind.block_size * kind.block_bytes,))
        held = decode_tensor(name, raw, info.shape)
        reference = reference_dequantize(name, raw, info.shape)
        assert relative_error(held, reference) <= kind.typical_error * 1.5, name
        assert np.linalg.norm(reference - w) / np.linalg.norm(w) < 0.4, name  # the weights written, decoded
