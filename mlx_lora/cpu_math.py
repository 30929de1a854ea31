"""A faster exp, and SwiGLU built on it, for MLX's CPU backend.

MLX's CPU `exp` / `sigmoid` / `tanh` run at ~35 M elements/s on this project's x86 machines
(one thread; a float32 multiply runs at ~1,500 M/s), which made SwiGLU cost more than the
MLP's three matrix products in a SmolLM2-135M forward pass once OpenBLAS ran at its best
(14 ms of 23 for a (4, 64) batch; 3.7 ms with this exp). MLX's CPU attention
(`mx.fast.scaled_dot_product_attention`) was measured against a softmax built on this exp
(custom vjp recomputing the probabilities): faster at 64 tokens (forward 3.0 vs 5.2 ms,
forward + backward 5.4 vs 6.5 ms, 4 x 9 heads) but slower from 512 tokens on (fwd + bwd 115 vs
80 ms), so attention is left to MLX.

`exp` here is the usual range reduction (the scheme of Cephes' `expf`): exp(x) = 2^n * e^r with
n = round(x / ln 2) and r = x - n ln 2 computed in two parts (Cody-Waite), so |r| <= ln(2) / 2;
e^r by its degree-6 Taylor polynomial (relative error < 2e-7: (ln 2 / 2)^7 / 7!); 2^n by
writing n + 127 into a float's exponent bits. Built from MLX's multiply/add/shift ops, compiled
(two kernels and a bit-cast between them; one int32 temporary), it took 3.0 ms where `mx.exp` took 9.9-11.6 ms on a
(4, 64, 1536) float32 array. Its gradient is defined exactly (d exp = exp), so training sees
the derivative of what the forward pass computed.

`use_fast_cpu_math(model)` points the model's module (an mlx-lm architecture) at `swiglu`
below, which checks the device at call time: on a GPU (Metal, CUDA) it calls mlx-lm's own,
whose kernel is fast there, so the same model object runs both. Tests check it against
mlx-lm's on the CPU (values and gradients).
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager

import mlx.core as mx

from .thread_compile import per_thread

LN2 = math.log(2.0)
LOG2E = 1.0 / LN2
TAYLOR = [1.0 / math.factorial(k) for k in range(7)]  # e^r = sum_k r^k / k!, |r| <= ln(2) / 2
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4  # Cody-Waite split of ln 2 (Cephes expf): n * LN2_HI is exact
EXP_MIN = -87.3  # below: 0 (the true exp is subnormal, or 0; a ~1e-38 floor turned BLAS products slow)


@per_thread(shapeless=True)
def _exp_bits(x: mx.array) -> mx.array:
    """n + 127 in a float's exponent bits (int32), n = round(x / ln 2): read as float32, 2^n."""
    n = mx.floor(mx.clip(x, EXP_MIN, 88.0) * LOG2E + 0.5)  # 2^n stays a normal float: n in [-126, 127]
    return (n.astype(mx.int32) + 127) << 23


def _exp_from(x: mx.array, bits: mx.array, scale: mx.array) -> mx.array:
    """exp(x) from `_exp_bits(x)` and the same bits read as float32; traced inside callers' kernels."""
    n = ((bits >> 23) - 127).astype(mx.float32)
    r = mx.clip(x, EXP_MIN, 88.0) - n * LN2_HI - n * LN2_LO  # x - n ln 2 without the rounding error of x / ln 2
    p = TAYLOR[6]
    for c in reversed(TAYLOR[:6]):
        p = p * r + c
    return mx.where(x < EXP_MIN, 0.0, p * scale)  # flush to zero, as exp's float32 result would


_exp_from_compiled = per_thread(_exp_from, shapeless=True)


def _exp_factors(x: mx.array) -> tuple[mx.array, mx.array]:
    """(bits, 2^n) for `_exp_from`: one int32 buffer, also read as float32. The bit-cast stays
    outside compiled code (MLX cannot compile it shapeless), so the caller's kernel gets both."""
    bits = _exp_bits(x)
    return bits, bits.view(mx.float32)


def _exp(x: mx.array) -> mx.array:
    return _exp_from_compiled(x, *_exp_factors(x))


@mx.custom_function
def exp(x: mx.array) -> mx.array:
    """exp(x) for float32 `x` (any shape) on the CPU: relative error < 1e-6 for x in [-87.3, 88];
    0 below that (subnormal results flushed, so products with them stay fast), ~3e38 instead of
    inf above it."""
    return _exp(x)


@exp.vjp
def _exp_vjp(primals, cotangent, output):
    return (cotangent * output,)


def _cpu() -> bool:
    return mx.default_device() == mx.cpu


# --- SwiGLU -----------------------------------------------------------------------------------

# Each kernel takes exp(-gate)'s exponent bits (one int32 buffer) and computes sigmoid(gate)
# inside, so the only full-size temporary is that buffer (the step's peak memory).

@per_thread(shapeless=True)
def _swiglu_from(gate: mx.array, x: mx.array, bits: mx.array, scale: mx.array) -> mx.array:
    return gate * x / (1.0 + _exp_from(-gate, bits, scale))  # silu(gate) * x = gate * x * sigmoid(gate)


@per_thread(shapeless=True)
def _swiglu_grads_from(gate, x, bits, scale, cotangent):
    s = 1.0 / (1.0 + _exp_from(-gate, bits, scale))
    return cotangent * x * s * (1.0 + gate * (1.0 - s)), cotangent * gate * s


@mx.custom_function
def _fast_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    return _swiglu_from(gate, x, *_exp_factors(-gate))


@_fast_swiglu.vjp
def _fast_swiglu_vjp(primals, cotangent, output):
    gate, x = primals
    return _swiglu_grads_from(gate, x, *_exp_factors(-gate), cotangent)


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x (mlx-lm's `activations.swiglu`), (..., hidden) each; the fast exp on the CPU."""
    if _cpu() and gate.dtype == mx.float32 and x.dtype == mx.float32:
        return _fast_swiglu(gate, x)
    from mlx_lm.models.activations import swiglu as library_swiglu

    return library_swiglu(gate, x)


def _library_functions() -> dict:
    from mlx_lm.models import activations

    return {"swiglu": (activations.swiglu, swiglu)}  # name -> (mlx-lm's, ours)


def _architecture_modules(model):
    for module_name in sorted({type(model).__module__, *(type(m).__module__ for _, m in model.named_modules())}):
        module = sys.modules.get(module_name)
        if module is not None and module_name.startswith("mlx_lm.models."):
            yield module_name, module


@contextmanager
def library_math(model):
    """For the duration, the model's architecture modules call mlx-lm's own functions again (a
    peer in a benchmark runs as mlx-lm ships it, even in a process that loaded ours)."""
    swapped = []
    for _, module in _architecture_modules(model):
        for name, (library, fast) in _library_functions().items():
            if getattr(module, name, None) is fast:
                setattr(module, name, library)
                swapped.append((module, name, fast))
    try:
        yield
    finally:
        for module, name, fast in swapped:
            setattr(module, name, fast)


def use_fast_cpu_math(model) -> list[str]:
    """Point the model's architecture module at this module's `swiglu` (where it uses mlx-lm's);
    returns the names replaced. The function picks the device at call time, so nothing changes
    on a GPU."""
    replaced = []
    for module_name, module in _architecture_modules(model):
        for name, (library, fast) in _library_functions().items():
            if getattr(module, name, None) is library:
                setattr(module, name, fast)
                replaced.append(f"{module_name.rsplit('.', 1)[-1]}.{name}")
    return sorted(replaced)
