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


def _examples_from_own_answers(model, tokenizer, count=24, max_new_tokens=8):
    """Chat examples whose references are the model's own greedy answers (even rows) or text it
    does not write (odd rows), tokenized as the training data would be."""
    from mlx_lm.generate import batch_generate

    from mlx_lora.data import Example

    rng = np.random.default_rng(0)
    words = ["date", "fox", "Paris", "hello", "capital", "2021", "world", "lazy", "March", "ISO"]
    messages = [[{"role": "user", "content": " ".join(rng.choice(words, size=4))}] for _ in range(count)]
    prompts = [list(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True)) for m in messages]
    own = batch_generate(model, tokenizer, prompts, max_tokens=max_new_tokens, return_token_ids=True).token_ids
    eos = tokenizer.eos_token_ids[0] if hasattr(tokenizer.eos_token_ids, "__getitem__") else next(iter(tokenizer.eos_token_ids))
    examples = []
    for i, (m, p, ids) in enumerate(zip(messages, prompts, own)):
        answer = list(ids) if i % 2 == 0 else tokenizer.encode("The quick brown fox")
        tail = answer + [eos] + tokenizer.encode("\n")
        examples.append(Example(tokens=p + tail, mask=[False] * len(p) + [True] * len(tail),
                                prompt_messages=m, reference=tokenizer.decode(answer)))
    return examples


@pytest.mark.parametrize("chunked", [True, False])
def test_settled_answers_score_as_full_generation(adapted, chunked):
    from mlx_lora.evaluate import score
    from mlx_lora.loss import enable_chunked_loss
    from mlx_lora.train import evaluate_loss

    model, tokenizer = adapted
    examples = _examples_from_own_answers(model, tokenizer)
    enable_chunked_loss(model, mx.array([examples[0].tokens]))
    assert model.chunked_loss  # the tiny llama's head is a plain one
    model.chunked_loss = chunked
    try:
        settled = score(model, tokenizer, examples, 4, max_new_tokens=8)
        full = score(model, tokenizer, examples, 4, max_new_tokens=8, settle=False)
        loss = evaluate_loss(model, examples, 4)
    finally:
        model.chunked_loss = True
    assert full["n_generated"] == len(examples)
    # settling engaged: hits (own answers) and misses beyond the shown samples were not generated
    assert settled["n_generated"] <= len(examples) // 2
    assert settled["exact_match"] == full["exact_match"] and 0.3 <= full["exact_match"] <= 0.7
    assert settled["samples"] == full["samples"]
    assert settled["loss"] == pytest.approx(full["loss"], rel=1e-6) and settled["loss"] == pytest.approx(loss, rel=1e-5)


def test_settled_answer_rules():
    """Hits end at the end token or at max_new_tokens; a greedy token that leaves the reference is a
    miss only when no later text could repair it; a thin margin or a different prompt: generate."""
    from mlx_lora.data import Example
    from mlx_lora.evaluate import MISS, settled_answer

    class Tok:
        eos_token_ids = {0}
        text = {1: "20", 2: "21", 3: "-0", 4: "3", 5: " ", 6: "x", 0: "<end>"}

        def decode(self, ids):
            return "".join(self.text[i] for i in ids)

    tok, prompt = Tok(), [9, 9]
    ex = Example(tokens=prompt + [1, 2, 3, 0], mask=[], reference="2021-0")
    confident = np.full(4, 5.0)
    assert settled_answer(tok, ex, prompt, (np.array([1, 2, 3, 0]), confident), 8) == "2021-0"
    assert settled_answer(tok, ex, prompt, (np.array([1, 2, 3, 0]), confident), 2) == "2021"  # cut by max_new_tokens
    assert settled_answer(tok, ex, prompt, (np.array([1, 0, 3, 0]), confident), 8) == "20"  # ends early
    assert settled_answer(tok, ex, prompt, (np.array([1, 6, 3, 0]), confident), 8) is MISS
    assert settled_answer(tok, ex, prompt, (np.array([1, 5, 3, 0]), confident), 8) is None  # " " may still match
    thin = confident.copy()
    thin[2] = 1e-3
    assert settled_answer(tok, ex, prompt, (np.array([1, 2, 3, 0]), thin), 8) is None
    assert settled_answer(tok, ex, [9, 8], (np.array([1, 2, 3, 0]), confident), 8) is None
    no_end = Example(tokens=prompt + [1, 2], mask=[], reference="2021")
    assert settled_answer(tok, no_end, prompt, (np.array([1, 2]), confident[:2]), 8) is None


def test_base_scores_are_reused_only_for_the_same_base_data_and_settings(adapted, tmp_path, monkeypatch):
    """eval.cache_base: a second run of the same base, test split and settings reads the base's scores
    back; another frozen weight, reference or max_new_tokens scores it again; adapters do not matter."""
    import dataclasses
    import json

    import mlx_lora.evaluate as evaluate
    from mlx_lora.config import Config, DataConfig
    from mlx_lora.loss import enable_chunked_loss
    from mlx_lora.run import run_eval

    monkeypatch.setenv("MLX_LORA_CACHE_DIR", str(tmp_path / "cache"))
    model, tokenizer = adapted
    examples = _examples_from_own_answers(model, tokenizer)
    enable_chunked_loss(model, mx.array([examples[0].tokens]))
    calls = []
    real_score = evaluate.score
    monkeypatch.setattr(evaluate, "score", lambda *a, **k: calls.append(1) or real_score(*a, **k))
    cfg = Config(model="tiny", data=DataConfig(path=str(tmp_path)))
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_new_tokens=8))

    def run(config=cfg, data=examples):
        calls.clear()
        out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
        out.mkdir()
        scores = run_eval(model, tokenizer, data, config, out)
        return scores, len(calls), json.loads((out / "eval.json").read_text())

    first, n_first, written = run()
    assert n_first == 2 and len(list((tmp_path / "cache" / "base-eval").glob("*.json"))) == 1
    again, n_again, written_again = run()
    assert n_again == 1 and again == first and written_again == written  # the base read back, samples too
    layer = next(layer for _, layer in model.named_modules() if hasattr(layer, "lora_b"))
    kept_b = layer.lora_b
    layer.lora_b = kept_b + 0.5  # other adapters: the base is still the same
    try:
        _, n, _ = run()
        assert n == 1
    finally:
        layer.lora_b = kept_b
    assert run(config=dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_new_tokens=7)))[1] == 2
    changed = [dataclasses.replace(examples[0], reference="another answer"), *examples[1:]]
    assert run(data=changed)[1] == 2
    norm = model.model.norm
    kept_norm = norm.weight
    norm.weight = kept_norm * 1.5  # another frozen weight: another base
    try:
        assert run()[1] == 2
    finally:
        norm.weight = kept_norm
    assert run(config=dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, cache_base=False)))[1] == 2
    for entry in (tmp_path / "cache" / "base-eval").glob("*.json"):
        entry.write_text("{not json")  # an unreadable entry is scored again, not an error
    assert run()[1] == 2 and run()[1] == 1
