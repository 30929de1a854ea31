"""GGML tensor types as MLX holds them: one registry entry per block type, keyed by type name.

Owns the byte layout of each block type (ggml's ggml-common.h, decoded as ggml-quants.c's
dequantize_row_* does) and the form the frozen base takes in MLX. Leaves the file (offsets,
names, models) to `gguf.py`. Layout per type and how it is held:

  type   block  bytes  held as                    why
  F32        1      4  float32                    as stored
  F16        1      2  float16                    as stored
  BF16       1      2  bfloat16, bit for bit      as stored (mx.load narrows it to float16)
  Q8_0      32     34  native 8-bit affine g32    d*q = d*(q+128) - 128d
  Q4_0      32     18  native 4-bit affine g32    d*(q-8)
  Q4_1      32     20  native 4-bit affine g32    d*q + m
  Q5_0      32     22  native 5-bit affine g32    d*(q-16)
  Q5_1      32     24  native 5-bit affine g32    d*q + m
  Q4_K     256    144  native 4-bit affine g32    sub-block of 32: (d*sc)*q - dmin*m
  Q5_K     256    176  native 5-bit affine g32    same, 5-bit codes
  Q6_K     256    210  re-quantized 8-bit g32     sub-blocks of 16 (d*sc*q, q in -32..31): MLX
                                                  has no group size 16, so no exact form
  Q3_K     256    110  re-quantized 8-bit g32     sub-blocks of 16, as Q6_K
  Q2_K     256     84  re-quantized 8-bit g32     sub-blocks of 16 with a min, as Q6_K

"native" forms are exact: scales and biases are float32, where d*sc (11 + 6 bits) and
(d*sc)*q (<= 24 bits) are exact, so `mx.dequantize` returns the same float32 values as
`gguf.quants.dequantize`, bit for bit (tested). Re-quantized forms start from the reference
decoder's float32 values and go through `mx.quantize(..., group_size=32, bits=8)`.

Measured relative weight error ||held - reference|| / ||reference|| (Frobenius) of the forms
MLX could use, and bits per weight (file; held, with a float32 scale and bias per 32 weights),
from `python bench/gguf_types_error.py` (seed 0, 256 x 4096 weights per type):

  type  held as     random blocks  gaussian  t(4)     type's own error  file bpw  held bpw
  Q6_K  8-bit g32      4.4e-03     4.7e-03  5.6e-03     1.9e-02          6.56      10  <- chosen
  Q6_K  6-bit g32      1.7e-02     1.9e-02  2.2e-02                                 8
  Q6_K  float16        2.1e-04     2.1e-04  2.1e-04                                16
  Q3_K  8-bit g32      4.4e-03     4.7e-03  5.0e-03     1.6e-01          3.44      10  <- chosen
  Q3_K  6-bit g32      1.3e-02     1.6e-02  1.9e-02                                 8
  Q3_K  4-bit g32      7.5e-02     7.5e-02  8.1e-02                                 6
  Q2_K  8-bit g32      1.9e-03     4.5e-03  5.3e-03     3.3e-01          2.62      10  <- chosen
  Q2_K  6-bit g32      7.7e-03     1.8e-02  2.2e-02                                 8
  Q2_K  4-bit g32      3.2e-02     7.6e-02  9.0e-02                                 6

"gaussian", "t(4)": weights drawn from a gaussian (std 0.02) or a heavy-tailed Student t (4
degrees of freedom, scaled by 0.02), quantized to the type by `tests/gguf_blocks.py`'s
round-to-nearest quantizers; "type's own error": that quantization against the gaussian weights.
Errors add in quadrature, so Q6_K at 8 bits makes the total error 3 % larger than Q6_K's own, at
10 instead of 16 bits per weight (Q4_K_M files hold output.weight and about half of ffn_down and
attn_v in Q6_K: about 1.5e9 weights, 1.1 GB less than float16 for Llama 3.1 8B); 6 bits would
make it 40 % larger. Q3_K / Q2_K: 6 bits would add under 1 % to their own (large) error and save
2 bits per weight, but the error is paid in every layer: a tiny Q3_K model's logits moved 3.5 %
(of their largest) from the exact decoding's, against 0.9 % at 8 bits (`... --logits`, the
q3_k-q2_k case); we keep the file's model, so 8 bits for every type without an exact form.
A re-quantized tensor is not bit-exact: its logits differ from an exact float32 decoding by about
its error (`typical_error` below).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

QK_K = 256  # weights per K-quant super-block
GROUP = 32  # MLX affine group size: ggml's 32-weight blocks and K-quant sub-blocks
CHUNK_WEIGHTS = 1 << 22  # decode this many weights at a time, to bound temporary memory


@dataclass
class HeldTensor:
    """One 2-D (rows, cols) GGUF tensor as MLX will hold it.

    weight: float (rows, cols), or packed uint32 (rows, cols * bits // 32) in MLX's affine layout
    scales, biases: (rows, cols // group_size) float32 for affine forms, else None
    how: said in the run summary: "native 4-bit g32", "re-quantized 8-bit g32", "float16", ...
    """

    weight: "mx.array"  # noqa: F821 (mlx is imported lazily)
    scales: "mx.array | None"  # noqa: F821
    biases: "mx.array | None"  # noqa: F821
    bits: int | None
    group_size: int | None
    how: str

    def dequantize(self):
        """The weights as a float32 mx.array (rows, cols)."""
        import mlx.core as mx

        if self.bits is None:
            return self.weight.astype(mx.float32)
        return mx.dequantize(self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits)


# A decoder of native blocks: (n, block_bytes) uint8 -> codes (n, block_size) uint8,
# scales and biases (n, block_size // GROUP) float32, with weight = scale * code + bias.
Codes = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class BlockType:
    """One GGML tensor type: its block, and how MLX holds it (see `hold`)."""

    name: str
    block_size: int  # weights per block
    block_bytes: int  # bytes per block
    how: str  # "native 4-bit g32", "re-quantized 8-bit g32", "float16", ...
    bits: int | None = None  # affine bits of the held form; None for float forms
    codes: Codes | None = None  # native affine forms: the block decoder
    float_dtype: str | None = None  # float forms: numpy dtype of the stored values
    mx_dtype: str | None = None  # float forms: the mx dtype they are viewed as, bit for bit
    typical_error: float = 0.0  # re-quantized forms: measured relative weight error (table above)

    def hold(self, blocks: np.ndarray, rows: int, cols: int) -> HeldTensor:
        """blocks: (rows * cols // block_size, block_bytes) uint8 -> the tensor as MLX holds it."""
        import mlx.core as mx

        if self.float_dtype is not None:
            values = mx.array(blocks.reshape(-1).view(self.float_dtype).reshape(rows, cols))
            return HeldTensor(values.view(getattr(mx, self.mx_dtype)), None, None, None, None, self.how)
        step = max(1, CHUNK_WEIGHTS // cols)  # rows per chunk
        parts = [self._affine(blocks.reshape(rows, -1)[r:r + step], cols) for r in range(0, rows, step)]
        weight, scales, biases = (mx.concatenate([p[i] for p in parts]) for i in range(3))
        return HeldTensor(weight, scales, biases, self.bits, GROUP, self.how)

    def _affine(self, row_bytes: np.ndarray, cols: int):
        """(rows, row_bytes) uint8 -> packed weight, scales, biases for rows of `cols` weights."""
        import mlx.core as mx

        rows = row_bytes.shape[0]
        if self.codes is None:  # re-quantized from the reference decoder's float32 values
            floats = reference_dequantize(self.name, row_bytes, (rows, cols))
            return mx.quantize(mx.array(floats), group_size=GROUP, bits=self.bits)
        q, scales, biases = self.codes(row_bytes.reshape(-1, self.block_bytes))
        return (mx.array(pack_codes(q.reshape(rows, cols), self.bits)),
                mx.array(scales.reshape(rows, -1)), mx.array(biases.reshape(rows, -1)))


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes (rows, cols) < 2**bits -> MLX's affine packing (rows, cols * bits // 32) uint32.

    MLX packs each row as one little-endian bit stream (code i in bits i*bits .. i*bits+bits-1),
    for every width 2..8 (checked against mx.quantize in tests). Eight codes fill `bits` whole
    bytes; we OR each code into the one or two bytes it lands in (uint8 shifts drop the bits
    that belong to the next byte).
    """
    rows, cols = q.shape
    runs = q.reshape(rows, cols // 8, 8)
    out = np.zeros((rows, cols // 8, bits), dtype=np.uint8)
    for i in range(8):
        byte, shift = divmod(i * bits, 8)
        out[..., byte] |= runs[..., i] << shift
        if shift + bits > 8:
            out[..., byte + 1] |= runs[..., i] >> (8 - shift)
    return out.reshape(rows, -1).view("<u4").astype(np.uint32)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `pack_codes`: (rows, words) uint32 -> codes (rows, words * 32 // bits) uint8."""
    stream = np.unpackbits(packed.astype("<u4").view(np.uint8), axis=-1, bitorder="little")
    fields = stream.reshape(packed.shape[0], -1, bits).astype(np.uint8)
    return (fields << np.arange(bits, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)


# ---- block decoders (layouts from ggml-common.h; formulas from ggml-quants.c) -------------

def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of each block, as float32 (n, 1)."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, span: int) -> np.ndarray:
    """Bytes (n, k) -> 4-bit codes (n, 2k): each run of `span` bytes holds `span` codes in its low
    nibbles, then the next `span` codes in its high nibbles."""
    runs = qs.reshape(qs.shape[0], -1, 1, span)
    return np.concatenate([runs & 0x0F, runs >> 4], axis=2).reshape(qs.shape[0], -1)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """Q5_0 / Q5_1: a little-endian uint32 whose bit j is bit 4 of code j -> (n, count) of 0 / 16."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")[:, :count]
    return bits << 4


def _q8_0(b):  # d (f16), 32 x int8
    d = _f16(b, 0)
    return b[:, 2:] ^ 0x80, d, -128 * d  # flipping the sign bit of an int8 x gives the uint8 x + 128


def _q4_0(b):  # d, 16 bytes of 4-bit codes
    d = _f16(b, 0)
    return _nibbles(b[:, 2:], 16), d, -8 * d


def _q4_1(b):  # d, m, 16 bytes of 4-bit codes
    return _nibbles(b[:, 4:], 16), _f16(b, 0), _f16(b, 2)


def _q5_0(b):  # d, 4 bytes of high bits, 16 bytes of low nibbles
    d = _f16(b, 0)
    return _nibbles(b[:, 6:], 16) | _high_bits(b[:, 2:6], 32), d, -16 * d


def _q5_1(b):  # d, m, 4 bytes of high bits, 16 bytes of low nibbles
    return _nibbles(b[:, 8:], 16) | _high_bits(b[:, 4:8], 32), _f16(b, 0), _f16(b, 2)


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: the 12 bytes after d and dmin -> 6-bit scales and mins (n, 8) float32.

    get_scale_min_k4: sub-blocks 0-3 take the low 6 bits of bytes 0-3 (scale) and 4-7 (min);
    sub-blocks 4-7 take the nibbles of bytes 8-11 plus the top 2 bits of bytes 0-3 / 4-7.
    """
    s = b[:, 4:16]
    lo_sc, lo_m, mixed = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = np.concatenate([lo_sc & 0x3F, (mixed & 0x0F) | ((lo_sc >> 6) << 4)], axis=1)
    mins = np.concatenate([lo_m & 0x3F, (mixed >> 4) | ((lo_m >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _q4_k(b):  # d, dmin, 12 bytes of scales, 128 bytes of codes (64 per pair of sub-blocks)
    scales, mins = _k_scales(b)
    return _nibbles(b[:, 16:], 32), _f16(b, 0) * scales, -(_f16(b, 2) * mins)


def _q5_k(b):  # as Q4_K, then 32 bytes of high bits (bit i of byte l: code l of sub-block i), 128 of nibbles
    scales, mins = _k_scales(b)
    high = (b[:, 16:48, None] >> np.arange(8, dtype=np.uint8)) & 1  # (n, 32 codes, 8 sub-blocks)
    high = high.transpose(0, 2, 1).reshape(b.shape[0], QK_K) << 4
    return _nibbles(b[:, 48:], 32) | high, _f16(b, 0) * scales, -(_f16(b, 2) * mins)


def _native(name: str, size: int, nbytes: int, bits: int, codes: Codes) -> BlockType:
    return BlockType(name, size, nbytes, f"native {bits}-bit g{GROUP}", bits=bits, codes=codes)


def _requantized(name: str, nbytes: int, bits: int, typical_error: float) -> BlockType:
    return BlockType(name, QK_K, nbytes, f"re-quantized {bits}-bit g{GROUP}", bits=bits, typical_error=typical_error)


TENSOR_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("F32", 1, 4, "float32", float_dtype="<f4", mx_dtype="float32"),
    BlockType("F16", 1, 2, "float16", float_dtype="<f2", mx_dtype="float16"),
    BlockType("BF16", 1, 2, "bfloat16", float_dtype="<u2", mx_dtype="bfloat16"),  # numpy has no bfloat16
    _native("Q8_0", 32, 2 + 32, 8, _q8_0),
    _native("Q4_0", 32, 2 + 16, 4, _q4_0),
    _native("Q4_1", 32, 2 + 2 + 16, 4, _q4_1),
    _native("Q5_0", 32, 2 + 4 + 16, 5, _q5_0),
    _native("Q5_1", 32, 2 + 2 + 4 + 16, 5, _q5_1),
    _native("Q4_K", QK_K, 2 + 2 + 12 + 128, 4, _q4_k),
    _native("Q5_K", QK_K, 2 + 2 + 12 + 32 + 128, 5, _q5_k),
    _requantized("Q6_K", 128 + 64 + 16 + 2, 8, 4.7e-3),  # low nibbles, high 2 bits, int8 scales, d
    _requantized("Q3_K", 32 + 64 + 12 + 2, 8, 4.7e-3),  # high-bit mask, 2-bit codes, 6-bit scales, d
    _requantized("Q2_K", 16 + 64 + 2 + 2, 8, 4.5e-3),  # 4-bit scales and mins, 2-bit codes, d, dmin
)}


def block_type(type_name: str) -> BlockType:
    """The registry entry for a GGML type name; ValueError naming the supported ones otherwise."""
    if type_name not in TENSOR_TYPES:
        raise ValueError(f"GGML tensor type {type_name} is not supported (supported: {', '.join(TENSOR_TYPES)})")
    return TENSOR_TYPES[type_name]


def _blocks(kind: BlockType, raw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The tensor's bytes as (blocks, block_bytes), after checking they fit `shape`."""
    rows, cols = shape
    if cols % kind.block_size:  # block sizes are 1, 32 or 256, so affine rows hold whole groups of 32
        raise ValueError(f"a {kind.name} tensor of shape {shape}: rows must hold whole blocks "
                         f"of {kind.block_size} weights")
    expected = rows * cols // kind.block_size * kind.block_bytes
    if raw.nbytes != expected:
        raise ValueError(f"a {kind.name} tensor of shape {shape} takes {expected} bytes, got {raw.nbytes}; "
                         "the file is truncated or corrupt")
    return np.ascontiguousarray(raw).view(np.uint8).reshape(-1, kind.block_bytes)


def decode_tensor(type_name: str, raw: np.ndarray, shape: tuple[int, int]) -> HeldTensor:
    """A 2-D GGUF tensor as MLX holds it (see the table above).

    raw: the tensor's bytes as stored (uint8, rows * row_bytes, any shape); shape: (rows, cols)
    in numpy order. Raises ValueError for an unknown type or bytes that do not fit the shape.
    """
    kind = block_type(type_name)
    return kind.hold(_blocks(kind, raw, shape), *shape)


def reference_dequantize(type_name: str, raw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The gguf package's decoding of the tensor (its quants.dequantize): float32 (rows, cols)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    kind = block_type(type_name)
    row_bytes = _blocks(kind, raw, shape).reshape(shape[0], -1)
    return dequantize(row_bytes, GGMLQuantizationType[type_name]).astype(np.float32).reshape(shape)


def relative_error(held: HeldTensor, reference: np.ndarray) -> float:
    """||held - reference|| / ||reference|| (Frobenius, float64); 0 when both are zero."""
    got = np.array(held.dequantize(), dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    norm = np.linalg.norm(ref)
    diff = np.linalg.norm(got - ref)
    return float(diff / norm) if norm else float(diff)
