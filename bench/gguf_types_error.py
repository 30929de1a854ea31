"""Relative weight error of the ways MLX could hold the GGML types it has no exact form for
(Q6_K, Q3_K, Q2_K: sub-blocks of 16, and MLX has no group size 16).

Run: `python bench/gguf_types_error.py [--rows 256] [--cols 4096] [--seed 0]`. For each type it
prints ||held - reference|| / ||reference|| (reference: gguf.quants.dequantize of the same bytes)
for MLX affine 8/6/4-bit with group size 32 (mx.quantize of the reference floats, float32 scales)
and for float16, on (a) random valid blocks, (b) "realistic" blocks: gaussian weights (std 0.02)
quantized to the type by tests/gguf_blocks.py, and (c) the same for heavy-tailed weights (Student
t, 4 degrees of freedom, as trained weights have outliers); "own" is the quantization's own error
against the gaussian weights. Held bits per weight: b + 2 for affine (a float32 scale and bias per
32 weights), 16 for float16. The row the registry uses is checked against `decode_tensor`.

`--logits` also loads tests/test_gguf.py's tiny llama GGUFs with Q3_K linears / Q2_K head and
with Q4_K linears / Q6_K head, holding the re-quantized types at 6 and 8 bits, and prints how far
the logits move from a float32 model built from the gguf package's exact decoding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gguf_blocks import quantize, random_blocks  # noqa: E402

from mlx_lora.models.gguf_types import TENSOR_TYPES, decode_tensor, reference_dequantize  # noqa: E402

FORMS = ("8-bit g32", "6-bit g32", "4-bit g32", "float16")


def held_floats(reference: np.ndarray, form: str) -> np.ndarray:
    """The reference floats after holding them in `form`, as float64."""
    import mlx.core as mx

    if form == "float16":
        return reference.astype(np.float16).astype(np.float64)
    bits = int(form.split("-")[0])
    packed, scales, biases = mx.quantize(mx.array(reference), group_size=32, bits=bits)
    return np.array(mx.dequantize(packed, scales, biases, group_size=32, bits=bits), dtype=np.float64)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def logits_shift() -> None:
    """max |logits - exact| / max |exact| and the Frobenius ratio, per case and bit width."""
    import dataclasses
    import tempfile

    import mlx.core as mx
    import test_gguf

    from mlx_lora.models import gguf_types
    from mlx_lora.models.gguf import load_gguf

    saved = dict(gguf_types.TENSOR_TYPES)
    try:
        for bits in (6, 8):
            for name in ("Q6_K", "Q3_K", "Q2_K"):
                gguf_types.TENSOR_TYPES[name] = dataclasses.replace(saved[name], bits=bits,
                                                                    how=f"re-quantized {bits}-bit g32")
            for case in ("q3_k-q2_k", "q4_k-q6_k"):
                types, tied = test_gguf.CASES[case]
                with tempfile.TemporaryDirectory() as folder:
                    path, config, weights = test_gguf.write_tiny_gguf(Path(folder), types, tied=tied)
                    model = load_gguf(path)[0]
                model.set_dtype(mx.float32)
                exact, got = test_gguf.reference_logits(config, weights), test_gguf.model_logits(model)
                print(f"{bits}-bit {case:10} max {np.abs(got - exact).max() / np.abs(exact).max():.2e}"
                      f"  frobenius {rel(got, exact):.2e}")
    finally:
        gguf_types.TENSOR_TYPES.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logits", action="store_true", help="also the tiny-model logits shift")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    shape = (args.rows, args.cols)
    weights = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    heavy = (0.02 * rng.standard_t(4, shape)).astype(np.float32)
    bpw = {name: 8 * kind.block_bytes / kind.block_size for name, kind in TENSOR_TYPES.items()}
    print(f"{'type':5} {'form':10} {'random':>9} {'realistic':>10} {'t(4)':>9} {'own':>8} {'file bpw':>9} {'held bpw':>9}")
    for name in ("Q6_K", "Q3_K", "Q2_K"):
        random_raw = random_blocks(name, shape, rng)
        real_raw = quantize(weights, name)
        random_ref = reference_dequantize(name, random_raw, shape)
        real_ref = reference_dequantize(name, real_raw, shape)
        heavy_ref = reference_dequantize(name, quantize(heavy, name), shape)
        own = rel(real_ref.astype(np.float64), weights.astype(np.float64))
        for form in FORMS:
            errors = [rel(held_floats(ref, form), ref.astype(np.float64)) for ref in (random_ref, real_ref, heavy_ref)]
            held_bpw = 16 if form == "float16" else int(form.split("-")[0]) + 2
            print(f"{name:5} {form:10} {errors[0]:9.2e} {errors[1]:10.2e} {errors[2]:9.2e} {own:8.2e} "
                  f"{bpw[name]:9.2f} {held_bpw:9}")
            if TENSOR_TYPES[name].how == f"re-quantized {form}":  # the registry's choice, through its own path
                from mlx_lora.models.gguf_types import relative_error

                chosen = relative_error(decode_tensor(name, real_raw, shape), real_ref)
                if not np.isclose(chosen, errors[1], rtol=1e-6):
                    raise SystemExit(f"{name}: decode_tensor's error {chosen:.3e} differs from {errors[1]:.3e}")
    if args.logits:
        logits_shift()


if __name__ == "__main__":
    main()

