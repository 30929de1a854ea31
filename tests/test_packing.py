"""Sequence packing: a packed example sees only itself, and the batch keeps its loss and gradients."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen2

from mlx_lora import loss
from mlx_lora.config import LoraConfig
from mlx_lora.data import Example, collate
from mlx_lora.lora import apply_lora
from mlx_lora.packing import pack_batch, packed_logits, packing_matches
from tiny import tiny_config


def tiny_model(family):
    config = tiny_config(300, hidden_size=32, layers=2)
    module = {"llama": llama, "qwen2": qwen2}[family]
    mx.random.seed(1)
    model = module.Model(module.ModelArgs.from_dict({**config, "model_type": family}))
    model.freeze()
    apply_lora(model, LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for layer in (m for _, m in model.named_modules() if hasattr(m, "lora_b")):
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    return model


def examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        mask = [False] * (n // 2) + [True] * (n - n // 2)
        out.append(Example(rng.integers(1, 300, n).tolist(), mask))
    out[-1].mask = [True] * lengths[-1]  # a first token marked as target: never one when packed
    return out


def test_pack_batch_lays_examples_end_to_end():
    batch = examples([5, 9, 3, 7])
    tokens, mask, segments, count = pack_batch(batch, [0, 1, 2, 3], capacity=16)
    assert count == 24 and tokens.shape[0] == 2  # 24 tokens in rows of 16: two rows
    for example in batch:  # every example appears once, whole, under one segment id
        hits = [(r, s) for r in range(tokens.shape[0]) for s in range(1, 5)
                if (segments[r] == s).sum() == example.length and tokens[r][segments[r] == s].tolist() == example.tokens]
        assert len(hits) == 1
    assert mask.sum() == sum(sum(e.mask[1:]) for e in batch)  # the same targets as unpacked
    starts = (segments[:, 1:] != segments[:, :-1]) & (segments[:, 1:] > 0)
    assert not mask[starts].any()  # no example's first token is predicted from the one before


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_logits_equal_each_example_alone(family):
    model = tiny_model(family)
    batch = examples([6, 11, 4])
    tokens, _, segments, _ = pack_batch(batch, [0, 1, 2], capacity=32)
    assert tokens.shape[0] == 1  # all three in one row
    packed = np.array(packed_logits(model, mx.array(tokens), mx.array(segments))[0])
    for example in batch:  # packed longest first: find each example's segment by its tokens
        s = next(s for s in range(1, 4) if tokens[0][segments[0] == s].tolist() == example.tokens)
        alone = np.array(model(mx.array([example.tokens]))[0])
        np.testing.assert_allclose(packed[segments[0] == s], alone, rtol=1e-4, atol=1e-5)
    assert packing_matches(model, batch)


def test_a_model_whose_positions_are_absolute_fails_the_probe():
    model = tiny_model("llama")

    class Absolute(type(model.model)):  # positions added to the embeddings: packing would change them
        def __call__(self, inputs, cache=None, input_embeddings=None):
            h = self.embed_tokens(inputs) + mx.arange(inputs.shape[1])[None, :, None] * 0.1
            return super().__call__(inputs, cache, input_embeddings=h)

    model.model.__class__ = Absolute
    assert not packing_matches(model, examples([6, 11]))


@pytest.mark.parametrize("chunked", [False, True])
def test_packed_batch_loss_and_gradients_equal_unpacked(chunked):
    model = tiny_model("llama")
    batch = examples([6, 11, 4, 9], seed=3)
    tokens, mask, _ = collate(batch, [0, 1, 2, 3])
    p_tokens, p_mask, segments, _ = pack_batch(batch, [0, 1, 2, 3], capacity=20)
    assert p_tokens.shape[0] < 4
    model.chunked_loss = chunked

    def value_and_grads(t, m, seg):
        positions, weights = map(mx.array, loss.target_positions(m, multiple=8))
        fn = lambda mod: loss.batch_loss(mod, mx.array(t), mx.array(m), positions, weights,  # noqa: E731
                                         None if seg is None else mx.array(seg))[0]
        value, grads = nn.value_and_grad(model, fn)(model)
        return value.item(), dict(tree_flatten(grads))

    plain, plain_grads = value_and_grads(tokens, mask, None)
    packed, packed_grads = value_and_grads(p_tokens, p_mask, segments)
    assert packed == pytest.approx(plain, rel=1e-5)
    assert plain_grads.keys() == packed_grads.keys() and plain_grads
    for key in plain_grads:
        np.testing.assert_allclose(np.array(packed_grads[key]), np.array(plain_grads[key]), rtol=1e-3, atol=1e-6,
                                   err_msg=key)
