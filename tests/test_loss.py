"""The chunked output-head cross-entropy: equal to the plain loss (values and gradients), leaner in memory."""

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from mlx_lora import loss
from mlx_lora.config import LoraConfig
from mlx_lora.frozen_matmul import force_path, use_fast_frozen_layers
from mlx_lora.lora import LoRALinear, apply_lora
from tiny import tiny_config


@pytest.fixture
def small_chunks(monkeypatch):
    # 97 does not divide the tiny vocabularies: several chunks and a partial last one.
    monkeypatch.setattr(loss, "vocab_chunk_rows", lambda num_tokens: 97)


def reference_cross_entropy(hidden, weight, targets):
    """Per-token CE and its gradient w.r.t. hidden, dense float64."""
    h, w = np.asarray(hidden, np.float64), np.asarray(weight, np.float64)
    logits = h @ w.T
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    ce = -np.log(probs[np.arange(len(targets)), targets])
    one_hot = np.zeros_like(probs)
    one_hot[np.arange(len(targets)), targets] = 1
    return ce, (probs - one_hot) @ w


@pytest.mark.parametrize("compiled", [False, True])
def test_chunked_cross_entropy_matches_float64_reference(small_chunks, compiled):
    """500 rows in chunks of 97: five full chunks and a last one of 15 rows."""
    mx.random.seed(0)
    hidden, weight = mx.random.normal((37, 24)), mx.random.normal((500, 24)) * 0.5
    targets = mx.array(np.random.default_rng(0).integers(0, 500, 37).astype(np.int32))
    targets[:3] = mx.array([0, 499, 485])  # first row, last row, first row of the last chunk
    head = loss._float_head(weight)
    ce_fn = lambda h: loss.chunked_cross_entropy(h, targets, head)  # noqa: E731
    grad_fn = mx.grad(lambda h: loss.chunked_cross_entropy(h, targets, head).sum())
    if compiled:
        ce_fn, grad_fn = mx.compile(ce_fn), mx.compile(grad_fn)
    ce, grad = ce_fn(hidden), grad_fn(hidden)
    ce_ref, grad_ref = reference_cross_entropy(hidden, weight, np.array(targets))
    np.testing.assert_allclose(np.array(ce), ce_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(grad), grad_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_soft_capped_chunked_cross_entropy_matches_float64_reference(small_chunks, compiled):
    """Gemma 2's head: logits = cap * tanh(h @ W.T / cap), cap small enough (2) that the cap bites."""
    mx.random.seed(0)
    hidden, weight = mx.random.normal((37, 24)), mx.random.normal((500, 24)) * 0.5
    targets = mx.array(np.random.default_rng(0).integers(0, 500, 37).astype(np.int32))
    head = dataclasses.replace(loss._float_head(weight), softcap=2.0)
    ce_fn = lambda h: loss.chunked_cross_entropy(h, targets, head)  # noqa: E731
    grad_fn = mx.grad(lambda h: loss.chunked_cross_entropy(h, targets, head).sum())
    if compiled:
        ce_fn, grad_fn = mx.compile(ce_fn), mx.compile(grad_fn)
    ce, grad = ce_fn(hidden), grad_fn(hidden)
    h, w, t = np.asarray(hidden, np.float64), np.asarray(weight, np.float64), np.array(targets)
    capped = 2.0 * np.tanh(h @ w.T / 2.0)
    probs = np.exp(capped - capped.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    one_hot = np.zeros_like(probs)
    one_hot[np.arange(len(t)), t] = 1
    np.testing.assert_allclose(np.array(ce), -np.log(probs[np.arange(len(t)), t]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(grad), ((probs - one_hot) * (1 - (capped / 2.0) ** 2)) @ w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["dequantize", "fused"])
def test_gemma2_takes_the_chunked_loss_with_its_soft_cap(path, small_chunks):
    """mlx-lm's gemma2 model (final_logit_softcapping, tied 4-bit head): the probe accepts the chunked
    loss, which equals the model's own loss and gradients."""
    from mlx_lm.models import gemma2

    with force_path(path):
        mx.random.seed(1)
        model = gemma2.Model(gemma2.ModelArgs(
            model_type="gemma2", hidden_size=64, num_hidden_layers=1, intermediate_size=128, num_attention_heads=4,
            head_dim=16, rms_norm_eps=1e-6, vocab_size=300, num_key_value_heads=2, final_logit_softcapping=3.0))
        model["model"]["embed_tokens"].weight = model["model"]["embed_tokens"].weight * 4  # logits past the cap
        nn.quantize(model, group_size=32, bits=4)
        use_fast_frozen_layers(model)
        with_adapter(model)
        rng = np.random.default_rng(3)
        tokens = mx.array(rng.integers(0, 300, (3, 11)).astype(np.int32))
        mask = mx.array((rng.random((3, 10)) < 0.7).astype(np.float32))
        assert loss.output_head(model).softcap == 3.0
        assert loss.enable_chunked_loss(model, tokens[:1])
        plain, plain_grads = loss_and_grads(model, tokens, mask, chunked=False)
        chunked, chunked_grads = loss_and_grads(model, tokens, mask, chunked=True)
    assert chunked == pytest.approx(plain, rel=1e-5)
    for key in plain_grads:
        np.testing.assert_allclose(np.array(chunked_grads[key]), np.array(plain_grads[key]), rtol=1e-3, atol=1e-6,
                                   err_msg=key)


def tiny_llama(tied: bool, quantized: bool, vocab_size: int = 300):
    config = tiny_config(vocab_size, hidden_size=32, layers=1)
    config["tie_word_embeddings"] = tied
    mx.random.seed(1)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
        use_fast_frozen_layers(model)
    return with_adapter(model)


def with_adapter(model):
    """`model` frozen, with a non-zero rank-4 adapter on q_proj, v_proj and down_proj (seeded)."""
    model.freeze()
    mx.random.seed(2)
    apply_lora(model, LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for layer in (m for _, m in model.named_modules() if hasattr(m, "lora_b")):
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1  # a non-zero adapter
    return model


def loss_and_grads(model, tokens, mask, chunked: bool):
    model.chunked_loss = chunked
    value, grads = nn.value_and_grad(model, lambda m, t, k: loss.masked_loss(m, t, k)[0])(model, tokens, mask)
    return value.item(), dict(tree_flatten(grads))


@pytest.mark.parametrize("path", ["dequantize", "fused"])
@pytest.mark.parametrize("tied,quantized", [(False, False), (True, False), (False, True), (True, True)])
def test_chunked_loss_equals_plain_loss_and_gradients(tied, quantized, path, small_chunks):
    with force_path(path):
        model = tiny_llama(tied, quantized)
        rng = np.random.default_rng(3)
        tokens = mx.array(rng.integers(0, 300, (3, 11)).astype(np.int32))
        mask = mx.array((rng.random((3, 10)) < 0.7).astype(np.float32))
        assert loss.enable_chunked_loss(model, tokens[:1])
        plain, plain_grads = loss_and_grads(model, tokens, mask, chunked=False)
        chunked, chunked_grads = loss_and_grads(model, tokens, mask, chunked=True)
    assert chunked == pytest.approx(plain, rel=1e-5)
    assert plain_grads.keys() == chunked_grads.keys() and plain_grads
    for key in plain_grads:
        np.testing.assert_allclose(np.array(chunked_grads[key]), np.array(plain_grads[key]), rtol=1e-3, atol=1e-6,
                                   err_msg=key)


def test_heads_the_chunked_loss_cannot_reproduce_keep_the_plain_path():
    model = tiny_llama(tied=False, quantized=False)
    tokens = mx.array([[1, 2, 3, 4, 5]])

    class SoftCapped(type(model)):  # a head that transforms its logits (as gemma 2 does)
        def __call__(self, inputs, cache=None):
            return 5 * mx.tanh(super().__call__(inputs, cache) / 5)

    model.__class__ = SoftCapped
    assert not loss.enable_chunked_loss(model, tokens)
    assert model.chunked_loss is False

    adapted = tiny_llama(tied=False, quantized=False)
    adapted.lm_head = LoRALinear.from_base(adapted.lm_head, rank=2, alpha=4)
    assert loss.output_head(adapted) is None
    assert not loss.enable_chunked_loss(adapted, tokens)


def test_chunked_loss_never_holds_the_whole_logits():
    mx.random.seed(0)
    hidden, weight = mx.random.normal((256, 64)), mx.random.normal((65536, 64)) * 0.1
    targets = mx.random.randint(0, 65536, (256,))
    mx.eval(hidden, weight, targets)
    logits_bytes = 256 * 65536 * 4  # 67 MB; a chunk's are 2 MB

    def peak_of(fn):
        mx.synchronize()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(mx.grad(fn)(hidden))
        return mx.get_peak_memory() - before

    plain = peak_of(lambda h: nn.losses.cross_entropy(h @ weight.T, targets).sum())
    chunked = peak_of(lambda h: loss.chunked_cross_entropy(h, targets, loss._float_head(weight)).sum())
    assert plain > 2 * logits_bytes  # logits and their gradient at least
    assert chunked < logits_bytes / 2


def test_chunk_rows_bound_the_logits_of_a_chunk():
    assert loss.vocab_chunk_rows(256) == 2048  # 2 MB of float32 logits
    assert loss.vocab_chunk_rows(1) == loss.MAX_CHUNK_ROWS
    assert loss.vocab_chunk_rows(10**6) == loss.MIN_CHUNK_ROWS


def test_target_positions_pad_with_zero_weight():
    mask = np.array([[0, 1, 1, 0], [0, 0, 1, 1]], np.float32)
    positions, weights = loss.target_positions(mask, multiple=8)
    assert positions.tolist() == [1, 2, 6, 7, 0, 0, 0, 0]
    assert weights.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert len(loss.target_positions(np.ones((3, 11)), multiple=8)[0]) == 40


@pytest.mark.parametrize("tied,quantized", [(False, False), (True, True)])
def test_head_at_target_positions_equals_full_head_loss_and_gradients(tied, quantized, small_chunks):
    """The head run only where the mask is set gives the full-head loss and gradients."""
    model = tiny_llama(tied, quantized)
    rng = np.random.default_rng(4)
    tokens = mx.array(rng.integers(0, 300, (3, 13)).astype(np.int32))
    mask_np = np.zeros((3, 12), np.float32)
    mask_np[:, 7:] = 1  # answers at the end, as in chat data
    mask_np[1, 10:] = 0  # a shorter (padded) row
    mask = mx.array(mask_np)
    positions, weights = map(mx.array, loss.target_positions(mask_np, multiple=8))
    assert loss.enable_chunked_loss(model, tokens[:1])
    full, full_grads = loss_and_grads(model, tokens, mask, chunked=False)

    def selected(m, t, k):
        return loss.batch_loss(m, t, k, positions, weights)[0]

    model.chunked_loss = True
    value, grads = nn.value_and_grad(model, selected)(model, tokens, mask)
    count = loss.batch_loss(model, tokens, mask, positions, weights)[1]
    assert count.item() == mask_np.sum()
    assert value.item() == pytest.approx(full, rel=1e-5)
    grads = dict(tree_flatten(grads))
    assert grads.keys() == full_grads.keys() and grads
    for key in grads:
        np.testing.assert_allclose(np.array(grads[key]), np.array(full_grads[key]), rtol=1e-3, atol=1e-6, err_msg=key)


KERNEL_COUNT_SCRIPT = """
import sys
from pathlib import Path
import mlx.core as mx
from mlx_lora import loss
loss.vocab_chunk_rows = lambda num_tokens: 64  # many chunks from a small vocabulary
cache = Path(sys.argv[1])
hidden, targets = mx.random.normal((16, 8)), mx.random.randint(0, 200, (16,))
for rows in (200, 1000):  # 4 chunks (the last partial), then 16 (the last partial, of another width)
    head = loss._float_head(mx.random.normal((rows, 8)))
    step = mx.compile(mx.value_and_grad(lambda h, t: loss.chunked_cross_entropy(h, t, head).sum()))
    mx.eval(step(hidden, targets))
    print(len(list(cache.rglob("*.so"))))
"""


def test_chunked_loss_compiles_the_same_kernels_whatever_the_vocabulary(tmp_path):
    """MLX's CPU backend turns each fused element-wise group of a compiled graph into a C++
    kernel, named by its operations and the values of its scalar constants. A chunk offset baked
    in as a constant makes one kernel per chunk (on Qwen2.5's 151,936-token vocabulary the first
    step compiled for >25 minutes); the count must not grow with the vocabulary."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(root)}  # a fresh kernel cache
    done = subprocess.run([sys.executable, "-c", KERNEL_COUNT_SCRIPT, str(tmp_path / "mlx")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    small_vocab, large_vocab = map(int, done.stdout.split())
    assert small_vocab > 0  # the cache is where we look: kernels were compiled
    assert large_vocab == small_vocab  # 4x the chunks, not one new kernel
