"""The CPU's fast exp and SwiGLU against float64 and mlx-lm's own."""

import numpy as np
import pytest

import mlx.core as mx
from mlx_lm.models import activations

from mlx_lora import cpu_math


def test_exp_matches_float64_to_float32_precision():
    x = np.concatenate([np.linspace(-87, 88, 20001), np.random.default_rng(0).normal(0, 5, 10000)]).astype(np.float32)
    got = np.array(cpu_math.exp(mx.array(x)))
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 1e-6
    assert np.all(np.isfinite(np.array(cpu_math.exp(mx.array([-1e4, -100.0, 100.0, 1e4])))))


def test_exp_flushes_to_zero_below_the_normal_range():
    # A ~1e-38 floor instead of 0 made softmax-weighted matrix products run ~70x slower (subnormal
    # products); exp(-inf) must be exactly 0 for masked attention scores.
    got = np.array(cpu_math.exp(mx.array([-np.inf, -1e4, -100.0, -87.4, -87.2])))
    assert np.all(got[:4] == 0.0)
    assert got[4] >= np.finfo(np.float32).tiny


def test_exp_gradient_is_its_value():
    x = mx.array([-3.0, 0.0, 0.5, 4.0])
    grad = mx.grad(lambda v: (cpu_math.exp(v) * mx.array([1.0, 2.0, 3.0, 4.0])).sum())(x)
    assert np.allclose(np.array(grad), np.array(cpu_math.exp(x)) * [1, 2, 3, 4], rtol=1e-6)


def test_swiglu_values_and_gradients_match_mlx_lm():
    mx.random.seed(0)
    gate, x = mx.random.normal((3, 7, 48)) * 4, mx.random.normal((3, 7, 48))
    cot = mx.random.normal((3, 7, 48))

    def loss(f):
        return lambda g, v: (f(g, v) * cot).sum()

    assert np.allclose(np.array(cpu_math.swiglu(gate, x)), np.array(activations.swiglu(gate, x)), rtol=1e-5, atol=1e-6)
    ours = mx.grad(loss(cpu_math.swiglu), argnums=(0, 1))(gate, x)
    theirs = mx.grad(loss(activations.swiglu), argnums=(0, 1))(gate, x)
    for a, b in zip(ours, theirs):
        assert np.allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-5)


def test_gpu_and_half_precision_go_to_mlx_lm(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_math, "_fast_swiglu", lambda g, x: calls.append("fast"))
    cpu_math.swiglu(mx.ones((2, 4), dtype=mx.float16), mx.ones((2, 4), dtype=mx.float16))
    monkeypatch.setattr(cpu_math, "_cpu", lambda: False)
    cpu_math.swiglu(mx.ones((2, 4)), mx.ones((2, 4)))
    assert calls == []


def test_a_patched_model_gives_the_same_logits_and_gradients(tmp_path):
    from mlx_lm.models import llama

    from tests.tiny import tiny_config

    llama.swiglu = activations.swiglu  # as imported, whatever an earlier test in this process loaded
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(tiny_config(97)))
    tokens = mx.random.randint(0, 97, (2, 12))

    def loss(m):
        return lambda params: (m.update(params) or m)(tokens).astype(mx.float32).square().mean()

    params = model.trainable_parameters()
    before_logits = model(tokens)
    before_grad = mx.grad(loss(model))(params)
    replaced = cpu_math.use_fast_cpu_math(model)
    try:
        assert replaced == ["llama.swiglu"]
        assert np.allclose(np.array(model(tokens)), np.array(before_logits), rtol=1e-4, atol=1e-5)
        after_grad = mx.grad(loss(model))(params)
        from mlx.utils import tree_flatten

        for (name, a), (_, b) in zip(tree_flatten(after_grad), tree_flatten(before_grad)):
            assert np.allclose(np.array(a), np.array(b), rtol=1e-3, atol=1e-5), name
    finally:
        llama.swiglu = activations.swiglu


def test_library_math_gives_the_model_mlx_lms_own_functions_for_a_while():
    from mlx_lm.models import llama

    from tests.tiny import tiny_config

    llama.swiglu = activations.swiglu
    model = llama.Model(llama.ModelArgs.from_dict(tiny_config(97)))
    try:
        cpu_math.use_fast_cpu_math(model)
        assert llama.swiglu is cpu_math.swiglu
        with cpu_math.library_math(model):
            assert llama.swiglu is activations.swiglu
        assert llama.swiglu is cpu_math.swiglu
    finally:
        llama.swiglu = activations.swiglu


def test_per_thread_compiled_functions_are_freed_by_their_thread():
    """Each thread gets its own compiled object; `release()` in a thread drops that thread's only
    (MLX's compile cache is thread-local: a worker must empty its own before it ends)."""
    import threading

    import mlx.core as mx

    from mlx_lora.thread_compile import per_thread, release

    calls = []

    @per_thread(shapeless=True)
    def twice(x):
        calls.append(1)  # runs only when traced
        return x * 2

    assert twice(mx.array([1.0, 2.0])).tolist() == [2.0, 4.0]
    assert twice(mx.array([1.0, 2.0, 3.0])).tolist() == [2.0, 4.0, 6.0]
    traced_here = len(calls)
    released = []

    def worker():
        twice(mx.array([5.0]))
        released.append(release())
        released.append(release())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert released == [1, 0] and len(calls) > traced_here  # the worker traced its own
    traced = len(calls)
    assert twice(mx.array([3.0])).tolist() == [6.0] and len(calls) == traced  # this thread's is still there
    assert release() >= 1 and release() == 0  # (with any others this thread compiled before)
