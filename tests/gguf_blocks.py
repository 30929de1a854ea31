"""Raw GGML blocks for tests: simple quantizers (float32 weights -> raw Q4_K / Q5_K / Q6_K /
Q3_K / Q2_K bytes, written here; Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 via the gguf package), and
random valid blocks of every type.

The gguf package cannot quantize K-quants, so these follow ggml-common.h's layouts with a plain
round-to-nearest per sub-block (llama.cpp searches scales more carefully; these are coarser, not
wrong). Each is checked by decoding with `gguf.quants.dequantize` (tests/test_gguf_types.py).
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """(n,) float values -> (n, 2) uint8 of their float16."""
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), np.float32), where=b != 0)


def _two_level(per_block: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative sub-block values (n, k) -> (float16 super-scale (n, 1) as float32, integer
    sub-scales (n, k) in 0..levels) with super * sub ~ value."""
    super_ = (per_block.max(axis=1, keepdims=True) / levels).astype(np.float16).astype(np.float32)
    sub = np.clip(np.rint(_safe_div(per_block, super_)), 0, levels)
    return super_, sub


def _asymmetric(x: np.ndarray, sub: int, q_max: int, s_max: int):
    """Super-blocks (n, 256) -> codes (n, 256 // sub, sub) in 0..q_max with w ~ d*sc*q - dmin*m,
    plus d, dmin (n, 1) and sc, m (n, 256 // sub) integers in 0..s_max (Q2_K, Q4_K, Q5_K)."""
    blocks = x.reshape(x.shape[0], -1, sub)
    low = np.minimum(blocks.min(axis=2), 0)  # ggml's mins are subtracted, so a sub-block's min <= 0
    d, sc = _two_level((blocks.max(axis=2) - low) / q_max, s_max)
    dmin, m = _two_level(-low, s_max)
    scale, offset = (d * sc)[..., None], (dmin * m)[..., None]
    q = np.clip(np.rint(_safe_div(blocks + offset, scale)), 0, q_max).astype(np.uint8)
    return q, d, dmin, sc.astype(np.uint8), m.astype(np.uint8)


def _symmetric(x: np.ndarray, sub: int, q_min: int, q_max: int, s_max: int):
    """Super-blocks (n, 256) -> codes (n, 256 // sub, sub) in q_min..q_max with w ~ d*sc*q,
    d (n, 1) and signed sc (n, 256 // sub) in -s_max..s_max (Q3_K, Q6_K)."""
    blocks = x.reshape(x.shape[0], -1, sub)
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[..., None], axis=2)[..., 0]
    scale = peak / q_min  # the largest magnitude lands on q_min, the wider side (-32, -4)
    d, magnitude = _two_level(np.abs(scale), s_max)
    sc = magnitude * np.sign(scale)
    q = np.clip(np.rint(_safe_div(blocks, (d * sc)[..., None])), q_min, q_max).astype(np.int8)
    return q, d, sc.astype(np.int8)


def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: 8 6-bit scales and mins (n, 8) -> 12 bytes (inverse of get_scale_min_k4)."""
    first = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    second = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    mixed = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([first, second, mixed], axis=1).astype(np.uint8)


def _nibble_pairs(q: np.ndarray, span: int) -> np.ndarray:
    """Codes (n, k) < 16 -> bytes (n, k // 2): each 2*span codes become span bytes, the first
    span in the low nibbles, the next span in the high nibbles."""
    runs = q.reshape(q.shape[0], -1, 2, span)
    return (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(q.shape[0], -1).astype(np.uint8)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    q, d, dmin, sc, m = _asymmetric(x, 32, 15, 63)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, m),
                           _nibble_pairs(q.reshape(len(x), QK_K), 32)], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    q, d, dmin, sc, m = _asymmetric(x, 32, 31, 63)
    high = ((q >> 4) & 1).transpose(0, 2, 1)  # (n, 32 positions, 8 sub-blocks): bit i of byte l
    qh = (high << np.arange(8, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, m), qh,
                           _nibble_pairs((q & 0x0F).reshape(len(x), QK_K), 32)], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    q, d, sc = _symmetric(x, 16, -32, 31, 127)
    u = (q.astype(np.int16) + 32).astype(np.uint8).reshape(len(x), 2, 4, 32)  # (n, half, k, l)
    ql = np.concatenate([u[:, :, 0] & 0x0F | (u[:, :, 2] & 0x0F) << 4,
                         u[:, :, 1] & 0x0F | (u[:, :, 3] & 0x0F) << 4], axis=2).reshape(len(x), 128)
    qh = sum((u[:, :, k] >> 4) << (2 * k) for k in range(4)).astype(np.uint8).reshape(len(x), 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)


def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    q, d, sc = _symmetric(x, 16, -4, 3, 31)
    u = (q.astype(np.int16) + 4).astype(np.uint8).reshape(len(x), 2, 4, 32)  # q + 4 = low 2 bits + 4 * mask bit
    qs = sum((u[:, :, k] & 3) << (2 * k) for k in range(4)).astype(np.uint8).reshape(len(x), 64)
    mask_bits = (u >> 2).reshape(len(x), 8, 32)  # weight 32*j + l has its bit j in byte l
    hmask = (mask_bits << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=1, dtype=np.uint8)
    s = (sc.astype(np.int16) + 32).astype(np.uint8)  # 16 six-bit scales
    low = (s[:, :8] & 0x0F) | ((s[:, 8:] & 0x0F) << 4)
    high = sum(((s[:, 4 * k:4 * k + 4] >> 4) & 3) << (2 * k) for k in range(4)).astype(np.uint8)
    return np.concatenate([hmask, qs, low, high, _f16_bytes(d)], axis=1)


def quantize_q2_k(x: np.ndarray) -> np.ndarray:
    q, d, dmin, sc, m = _asymmetric(x, 16, 3, 15)
    u = q.reshape(len(x), 2, 4, 32)
    qs = sum(u[:, :, k] << (2 * k) for k in range(4)).astype(np.uint8).reshape(len(x), 64)
    return np.concatenate([sc | (m << 4), qs, _f16_bytes(d), _f16_bytes(dmin)], axis=1)


K_QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k,
                "Q3_K": quantize_q3_k, "Q2_K": quantize_q2_k}


def quantize(weights: np.ndarray, type_name: str) -> np.ndarray:
    """Float32 weights (rows, cols) -> the tensor's raw bytes (rows, row_bytes) uint8, for any type
    in the registry: `GGUFWriter.add_tensor(name, raw, raw_dtype=GGMLQuantizationType[type_name])`
    writes it (the writer takes the shape from the bytes)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    weights = np.asarray(weights, dtype=np.float32)
    if type_name not in K_QUANTIZERS:
        return gguf_quantize(weights, GGMLQuantizationType[type_name]).view(np.uint8).reshape(len(weights), -1)
    rows, cols = weights.shape
    if cols % QK_K:  # llama.cpp falls back to another type for such tensors (e.g. SmolLM2's 576-wide ones)
        raise ValueError(f"{type_name} needs rows of whole {QK_K}-weight super-blocks; shape {weights.shape}")
    raw = K_QUANTIZERS[type_name](weights.reshape(-1, QK_K))
    return raw.reshape(rows, -1)


# Byte offsets of each type's float16 fields (d, dmin, m), which random blocks must keep finite.
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q5_0": (0,), "Q4_1": (0, 2), "Q5_1": (0, 2),
              "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q3_K": (108,), "Q2_K": (80, 82)}


def random_blocks(type_name: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Random valid raw bytes (rows, row_bytes) for a tensor of `shape`: random codes and scales,
    float16 super-scales of either sign, small and finite (|d| in 2**-14 .. 2**-4, so no product
    overflows)."""
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES

    rows, cols = shape
    if type_name in ("F32", "F16"):
        return rng.standard_normal(shape).astype("<f4" if type_name == "F32" else "<f2").view(np.uint8)
    if type_name == "BF16":
        bits = rng.standard_normal(shape).astype("<f4").view("<u4") >> 16  # truncated float32
        return bits.astype("<u2").view(np.uint8)
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    blocks = rng.integers(0, 256, size=(rows * cols // block, nbytes), dtype=np.uint8)
    for start in F16_FIELDS[type_name]:
        d = rng.uniform(2.0 ** -14, 2.0 ** -4, size=len(blocks)) * rng.choice([-1, 1], size=len(blocks))
        blocks[:, start:start + 2] = _f16_bytes(d)
    return blocks.reshape(rows, -1)
