"""Evaluation generation: the kept-float-weights path answers exactly as the per-call path."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_lora.config import LoraConfig
from mlx_lora.evaluate import adapters_disabled, generate_answers
from mlx_lora.frozen_matmul import KEPT, float_weights_kept
from mlx_lora.lora import apply_lora
from mlx_lora.models import load_model
from tiny import make_model_dir


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A tiny 4-bit llama with a non-zero LoRA on every projection, and its tokenizer."""
    from mlx_lora.frozen_matmul import use_fast_frozen_layers
    from mlx_lora.quantize import quantize_model

    folder = make_model_dir(tmp_path_factory.mktemp("tiny"), layers=2, hidden_size=64)
    model, tokenizer, _ = load_model(str(folder))
    quantize_model(model, "affine", bits=4, group_size=32)
    use_fast_frozen_layers(model)
    mx.random.seed(0)
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    for _, layer in model.named_modules():
        if hasattr(layer, "lora_b"):
            layer.lora_b = 0.2 * mx.random.normal(layer.lora_b.shape)
    model.eval()
    mx.eval(model.parameters())
    return model, tokenizer


PROMPTS = [[5, 17, 42, 99, 8], [61, 7, 3], [12, 13, 14, 15, 16, 17, 18, 19], [200, 201]]


def test_kept_float_weights_give_the_same_logits_and_answers(adapted):
    model, tokenizer = adapted
    tokens = mx.array([PROMPTS[2]])
    slow_logits = model(tokens)
    slow = generate_answers(model, tokenizer, PROMPTS, max_new_tokens=12)
    with adapters_disabled(model):
        slow_base = generate_answers(model, tokenizer, PROMPTS, max_new_tokens=12)
    parameters = sorted(k for k, _ in tree_flatten(model.parameters()))
    with float_weights_kept(model) as kept:
        assert kept.layers  # every quantized projection and the head
        assert sorted(k for k, _ in tree_flatten(model.parameters())) == parameters  # nothing new to save
        np.testing.assert_allclose(np.array(model(tokens)), np.array(slow_logits), rtol=1e-4, atol=1e-4)
        fast = generate_answers(model, tokenizer, PROMPTS, max_new_tokens=12)
        with adapters_disabled(model):
            fast_base = generate_answers(model, tokenizer, PROMPTS, max_new_tokens=12)
    assert fast == slow and fast_base == slow_base
    assert slow != slow_base  # the adapter changes the answers, so the check above means something
    assert not any(KEPT in layer.__dict__ for _, layer in model.named_modules())  # dropped on exit


def test_kept_float_weights_respect_the_memory_budget(adapted):
    model, _ = adapted
    with float_weights_kept(model, budget_bytes=0) as kept:
        assert not kept.layers
    with float_weights_kept(model, budget_bytes=4 * 64 * 64) as kept:
        assert 1 <= len(kept.layers) < 10


def test_folded_adapters_give_the_same_answers_and_restore_the_model(adapted):
    from mlx_lora.frozen_matmul import KEPT, float_weights_kept, use_dequantize_path
    from mlx_lora.lora import adapters_folded, lora_layers

    model, tokenizer = adapted
    tokens = mx.array([PROMPTS[2]])
    with float_weights_kept(model):
        two_products = model(tokens)
        answers = generate_answers(model, tokenizer, PROMPTS, max_new_tokens=12)
        kept = {name: np.array(layer.linear.__dict__[KEPT]) for name, layer in lora_layers(model) if KEPT in layer.linear.__dict__}
        with adapters_folded(model):
            if use_dequantize_path():
                assert all(layer.scale == 0 for _, layer in lora_layers(model))  # one product per layer
            np.testing.assert_allclose(np.array(model(tokens)), np.array(two_products), rtol=1e-4, atol=1e-4)
            assert generate_answers(model, tokenizer, PROMPTS, max_new_tokens=12) == answers
        # on exit: the adapters are back and each kept copy is the base's own again
        assert all(layer.scale == layer.alpha / layer.rank for _, layer in lora_layers(model))
        for name, layer in lora_layers(model):
            if name in kept:
                np.testing.assert_array_equal(np.array(layer.linear.__dict__[KEPT]), kept[name])
        np.testing.assert_allclose(np.array(model(tokens)), np.array(two_products), rtol=1e-5, atol=1e-5)
