"""LoRA layers and the frozen-weight fast path, checked against dense references."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from mlx_lora.config import LoraConfig
from mlx_lora.frozen_matmul import FastQuantizedLinear, force_path, use_fast_frozen_layers
from mlx_lora.lora import LoRALinear, apply_lora, count_trainable, dense_weight, fuse_lora

ARGS = dict(model_type="llama", hidden_size=64, num_hidden_layers=3, intermediate_size=96, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=120, tie_word_embeddings=True)


def tiny_llama(quantized: bool, seed: int = 0):
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs(**ARGS))
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
    use_fast_frozen_layers(model)
    mx.eval(model.parameters())
    return model


def randomize_b(model, seed=1):
    mx.random.seed(seed)
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            layer.lora_b = 0.05 * mx.random.normal(layer.lora_b.shape)


TOKENS = mx.array([[3, 17, 42, 99, 5, 8, 61, 7]])


@pytest.mark.parametrize("quantized", [False, True])
def test_zero_b_equals_base_and_parameter_count(quantized):
    model = tiny_llama(quantized)
    base = model(TOKENS)
    cfg = LoraConfig(rank=4, alpha=8, num_layers=2)
    keys = apply_lora(model, cfg)
    assert mx.array_equal(model(TOKENS), base)  # B = 0: step 0 is exactly the base model
    d, f, kv = ARGS["hidden_size"], ARGS["intermediate_size"], ARGS["hidden_size"] // 2
    shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, kv), "self_attn.v_proj": (d, kv),
              "self_attn.o_proj": (d, d), "mlp.gate_proj": (d, f), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d)}
    assert sorted(keys) == sorted(shapes)
    expected = 2 * sum(cfg.rank * (i + o) for i, o in shapes.values())  # 2 of 3 blocks adapted
    assert count_trainable(model) == expected
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert all(k.startswith(("model.layers.1.", "model.layers.2.")) for k in names)
    assert all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in names)


def test_unknown_target_module_is_named():
    model = tiny_llama(False)
    with pytest.raises(ValueError, match="lora.target_modules: qkv_proj not found.*q_proj"):
        apply_lora(model, LoraConfig(target_modules=("q_proj", "qkv_proj")))


def test_adapting_an_adapted_model_is_refused():
    model = tiny_llama(False)
    apply_lora(model, LoraConfig(rank=2))
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model, LoraConfig(rank=2))


def test_lora_matches_dense_float64_reference():
    mx.random.seed(0)
    base = nn.Linear(48, 24, bias=True)
    layer = LoRALinear.from_base(base, rank=3, alpha=6)
    layer.lora_b = mx.random.normal(layer.lora_b.shape)
    x = mx.random.normal((5, 48))
    W, b = np.array(base.weight, np.float64), np.array(base.bias, np.float64)
    A, B = np.array(layer.lora_a, np.float64), np.array(layer.lora_b, np.float64)
    xn = np.array(x, np.float64)
    reference = xn @ W.T + b + (6 / 3) * xn @ A @ B
    np.testing.assert_allclose(np.array(layer(x)), reference, rtol=1e-4, atol=1e-4)


def _loss_and_grads(model, tokens):
    def loss(model, tokens):
        logits = model(tokens[:, :-1])
        return nn.losses.cross_entropy(logits, tokens[:, 1:]).mean()

    value, grads = nn.value_and_grad(model, loss)(model, tokens)
    embedded = model.model.embed_tokens(tokens)
    input_grad = mx.grad(lambda h: (model.model.layers[0](h, mask="causal", cache=None) ** 2).sum())(embedded)
    return value, dict(tree_flatten(grads)), input_grad


@pytest.mark.parametrize("compiled", [False, True])
def test_cpu_dequantize_path_equals_fused_quantized_matmul(compiled):
    """The CPU path (dequantize + BLAS, custom VJP) against MLX's quantized_matmul: outputs and gradients."""
    model = tiny_llama(True)
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    randomize_b(model)
    tokens = mx.array([[1, 5, 9, 33, 2, 7, 100, 4, 11, 3], [2, 8, 1, 77, 3, 5, 6, 90, 12, 4]])
    results = {}
    for path in ("dequantize", "fused"):
        with force_path(path):
            fn = mx.compile(lambda t: _loss_and_grads(model, t)) if compiled else (lambda t: _loss_and_grads(model, t))
            value, grads, input_grad = fn(tokens)
            logits = model(tokens)
            mx.eval(value, grads, input_grad, logits)
            results[path] = (value, grads, input_grad, logits)
    (v1, g1, i1, l1), (v2, g2, i2, l2) = results["dequantize"], results["fused"]
    np.testing.assert_allclose(np.array(l1), np.array(l2), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(v1.item(), v2.item(), rtol=1e-5)
    np.testing.assert_allclose(np.array(i1), np.array(i2), rtol=1e-4, atol=1e-4)
    assert g1.keys() == g2.keys() and len(g1) == 3 * 7 * 2
    for key in g1:
        np.testing.assert_allclose(np.array(g1[key]), np.array(g2[key]), rtol=1e-3, atol=1e-5, err_msg=key)


def _training_peak_bytes(num_layers: int, compiled: bool) -> int:
    mx.random.seed(0)
    layers = [FastQuantizedLinear.from_quantized(nn.QuantizedLinear.from_linear(nn.Linear(512, 512), 32, 4))
              for _ in range(num_layers)]
    stack = nn.Sequential(*[LoRALinear.from_base(layer, rank=4, alpha=4) for layer in layers])
    x = mx.random.normal((4, 16, 512))
    mx.eval(stack.parameters(), x)

    def loss(model, x):
        return (model(x) ** 2).sum()

    step = lambda x: nn.value_and_grad(stack, loss)(stack, x)  # noqa: E731
    step = mx.compile(step) if compiled else step
    with force_path("dequantize"):
        mx.eval(step(x))
        mx.synchronize()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(step(x))
        return mx.get_peak_memory() - before


@pytest.mark.parametrize("compiled", [False, True])
def test_dequantize_path_keeps_one_float_weight_alive(compiled):
    """Each extra 4-bit layer adds its activations to the peak, not a float copy of its weight.

    A 512x512 float32 weight is 1.05 MB; a layer's saved activations are ~0.15 MB. Keeping the
    dequantized weights alive from forward to backward (the naive autodiff graph, or mx.compile
    merging the two dequantize calls) costs >= 1.05 MB per layer.
    """
    float_weight_bytes = 512 * 512 * 4
    per_layer = (_training_peak_bytes(24, compiled) - _training_peak_bytes(4, compiled)) / 20
    assert per_layer < 0.5 * float_weight_bytes, f"peak grows {per_layer / 1e6:.2f} MB per layer"


@pytest.mark.parametrize("compiled", [False, True])
def test_wide_tied_head_dequantizes_one_block_at_a_time(compiled, monkeypatch):
    """A tied output head wider than ROW_CHUNK (Gemma 2: 256k rows) is dequantized block by block,
    in order, forward and backward: same logits and input gradient as one dequantize + matmul
    (float32, rtol 1e-5), and a peak under the float weight (measured: 0.6x eager, 0.8x compiled;
    2.8-3.0x before the blocks were ordered, when every block was dequantized at once)."""
    from mlx_lora import frozen_matmul
    from mlx_lora.frozen_matmul import FastQuantizedEmbedding

    monkeypatch.setattr(frozen_matmul, "ROW_CHUNK", 1024)
    rows, dims = 10 * 1024 + 300, 512  # 11 blocks, the last one partial
    mx.random.seed(0)
    head = FastQuantizedEmbedding.from_quantized(
        nn.QuantizedEmbedding.from_embedding(nn.Embedding(rows, dims), group_size=64, bits=4))
    x = mx.random.normal((16, dims))
    mx.eval(head.parameters(), x)
    weight = mx.dequantize(head.weight, head.scales, head.biases, group_size=64, bits=4)
    cotangent = mx.random.normal((16, rows))

    def reference(x):
        return ((x @ weight.T) * cotangent).sum()

    def chunked(x):
        return (head.as_linear(x) * cotangent).sum()

    with force_path("dequantize"):
        step = mx.compile(mx.value_and_grad(chunked)) if compiled else mx.value_and_grad(chunked)
        mx.eval(step(x), cotangent)
        mx.synchronize()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        value, grad = step(x)
        mx.eval(value, grad)
        peak = mx.get_peak_memory() - before
    expected_value, expected_grad = mx.value_and_grad(reference)(x)
    np.testing.assert_allclose(value.item(), expected_value.item(), rtol=1e-5)
    np.testing.assert_allclose(np.array(grad), np.array(expected_grad), rtol=1e-4, atol=1e-4)
    float_weight = rows * dims * 4  # 21.6 MB; a block is 2.1 MB, the logits 0.7 MB
    assert peak < float_weight, f"peak {peak / 1e6:.1f} MB for a {float_weight / 1e6:.1f} MB float weight"


@pytest.mark.parametrize("quantized", [False, True])
def test_fused_equals_unfused(quantized):
    model = tiny_llama(quantized)
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    randomize_b(model)
    with force_path("dequantize"):
        before = model(TOKENS)
        assert fuse_lora(model) == 3 * 7
        after = model(TOKENS)
    np.testing.assert_allclose(np.array(before), np.array(after), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())


def test_dense_weight_of_quantized_layer_matches_dequantize():
    q = nn.QuantizedLinear.from_linear(nn.Linear(64, 32), group_size=32, bits=4)
    expected = mx.dequantize(q.weight, q.scales, q.biases, group_size=32, bits=4)
    assert mx.allclose(dense_weight(q), expected.astype(mx.float32))
