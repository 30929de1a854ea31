"""DPO / ORPO on MLX: the pure losses against float64 formulas, the reference model (adapters off),
preference data (masks, drops, errors), exact resume and the command line's output folder.
(The comparison with TRL's trainers is in test_objectives_trl.py.)"""

from __future__ import annotations

import json
import math
import random

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_lora.config import DataConfig, LoraConfig, TrainingConfig
from mlx_lora.data import DataError, DataStats
from mlx_lora.frozen_matmul import use_fast_frozen_layers
from mlx_lora.lora import adapters_disabled, apply_lora, lora_layers
from mlx_lora.models import load_model
from mlx_lora.objectives import METRICS, dpo_loss, orpo_loss, preference_loss, reference_logps
from mlx_lora.preference_data import collate_pairs, load_datasets_for, load_preference_split
from mlx_lora.train import train
from test_cli import mlx_lora, write_config
from test_train import Recorder

WORDS = ["fox", "dog", "Paris", "date", "hello", "world"]


def write_pairs(folder, rows=24, seed=0):
    """train/valid/test.jsonl preference splits: say a word (chosen) rather than another (rejected)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", rows), ("valid", 8), ("test", 8)):
        lines = []
        for _ in range(n):
            word = rng.choice(WORDS)
            other = rng.choice([w for w in WORDS if w != word])
            lines.append(json.dumps({"prompt": f"say {word}", "chosen": word, "rejected": other}) + "\n")
        (folder / f"{split}.jsonl").write_text("".join(lines))
    return folder


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"))


def setup(model_dir, data_dir, objective="dpo", seed=0, nonzero_b=False):
    model, tokenizer, _ = load_model(str(model_dir))
    use_fast_frozen_layers(model)
    mx.random.seed(seed)
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    if nonzero_b:
        for _, layer in lora_layers(model):
            layer.lora_b = 0.3 * mx.random.normal(layer.lora_b.shape)
    mx.eval(model.parameters())
    datasets, stats = load_datasets_for(DataConfig(path=str(data_dir)), tokenizer, objective)
    return model, tokenizer, datasets, stats


# --- the pure losses against float64 formulas ------------------------------------------------------

def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_dpo_loss_matches_the_papers_formulas_in_float64(loss_type, smoothing):
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-20, 5, 16) for _ in range(4))
    nc, nr = rng.integers(1, 30, 16).astype(float), rng.integers(1, 30, 16).astype(float)
    beta = 0.3
    delta = (pc - rc) - (pr - rr)
    expected = {
        "sigmoid": -(1 - smoothing) * log_sigmoid(beta * delta) - smoothing * log_sigmoid(-beta * delta),
        "hinge": np.maximum(0.0, 1 - beta * delta),
        "ipo": ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2,
    }[loss_type]
    losses, chosen, rejected = dpo_loss(*(mx.array(a.astype(np.float32)) for a in (pc, pr, rc, rr)), beta, loss_type,
                                        smoothing, mx.array(nc), mx.array(nr))
    np.testing.assert_allclose(np.array(losses), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(chosen), beta * (pc - rc), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(rejected), beta * (pr - rr), rtol=1e-4, atol=1e-5)


def test_orpo_penalty_matches_the_odds_ratio_in_float64():
    rng = np.random.default_rng(1)
    chosen, rejected = -rng.uniform(1e-4, 6, 32), -rng.uniform(1e-4, 6, 32)  # mean token log-probabilities
    odds = lambda lp: lp - np.log(-np.expm1(lp))  # noqa: E731  log(p / (1 - p))
    expected = -0.5 * log_sigmoid(odds(chosen) - odds(rejected))
    penalties, _, _ = orpo_loss(mx.array(chosen.astype(np.float32)), mx.array(rejected.astype(np.float32)), 0.5)
    np.testing.assert_allclose(np.array(penalties), expected, rtol=1e-4, atol=1e-6)


# --- the reference model -----------------------------------------------------------------------------

def test_with_adapters_off_dpo_rewards_are_zero_and_the_loss_is_log_2(tiny_model_dir, pairs_dir):
    model, _, data, _ = setup(tiny_model_dir, pairs_dir, nonzero_b=True)
    tokens, masks, _ = (mx.array(a) if i < 2 else a for i, a in enumerate(collate_pairs(data["train"], list(range(8)))))
    config = TrainingConfig(objective="dpo", beta=0.1)
    reference = reference_logps(model, tokens, masks[0])
    loss, metrics = preference_loss(model, tokens, masks, reference, config)
    values = dict(zip(METRICS, metrics.tolist()))
    assert abs(values["reward_margin"]) > 1e-3, "with the adapter on, the policy differs from the reference"
    with adapters_disabled(model):
        loss, metrics = preference_loss(model, tokens, masks, reference, config)
    values = dict(zip(METRICS, metrics.tolist()))
    assert values["chosen_rewards"] == 0.0 and values["rejected_rewards"] == 0.0 and values["reward_margin"] == 0.0
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert all(layer.scale == 2.0 for _, layer in lora_layers(model)), "the scales come back after the block"


# --- data --------------------------------------------------------------------------------------------

def test_only_answer_tokens_are_targets_and_the_pair_shares_its_prompt(tiny_model_dir, tmp_path):
    _, tokenizer, _ = load_model(str(tiny_model_dir))
    row = {"messages": [{"role": "user", "content": "say fox"}, {"role": "assistant", "content": "dog"},
                        {"role": "user", "content": "again"}],
           "chosen": {"role": "assistant", "content": "fox"}, "rejected": "hello world"}
    (tmp_path / "t.jsonl").write_text(json.dumps(row) + "\n")
    (pair,) = load_preference_split(tmp_path / "t.jsonl", tokenizer, DataConfig(path=str(tmp_path)))
    for example, answer in ((pair.chosen, "fox"), (pair.rejected, "hello world")):
        targets = [t for t, m in zip(example.tokens, example.mask) if m]
        assert tokenizer.decode(targets) == answer + "<|im_end|>\n"  # the earlier assistant turn is context
    first = pair.chosen.mask.index(True)
    assert pair.chosen.tokens[:first] == pair.rejected.tokens[:first]
    tokens, masks, n = collate_pairs([pair], [0])
    assert tokens.shape[0] == 2 and masks.shape == (2, 2, tokens.shape[1] - 1)
    assert masks[0, 0].sum() == sum(pair.chosen.mask[1:]) and n == len(pair.chosen.tokens) + len(pair.rejected.tokens)


def test_identical_answers_are_counted_and_dropped(tiny_model_dir, tmp_path):
    _, tokenizer, _ = load_model(str(tiny_model_dir))
    rows = [{"prompt": "say fox", "chosen": "fox", "rejected": "fox"},
            {"prompt": "say dog", "chosen": "dog", "rejected": "fox"},
            {"prompt": "say a", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "a"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = DataStats()
    pairs = load_preference_split(tmp_path / "t.jsonl", tokenizer, DataConfig(path=str(tmp_path)), stats)
    assert len(pairs) == 1 and stats.rows == 3 and stats.dropped_identical == 2
    assert stats.summary()["dropped_identical"] == 2


@pytest.mark.parametrize("row,message", [
    ({"prompt": "say fox", "chosen": "fox"}, "t.jsonl:2: missing 'rejected'"),
    ({"prompt": "say fox", "rejected": "fox"}, "t.jsonl:2: missing 'chosen'"),
    ({"chosen": "a", "rejected": "b"}, "t.jsonl:2: missing 'prompt' (a string) or 'messages'"),
    ({"prompt": "x", "chosen": 3, "rejected": "b"}, "t.jsonl:2: 'chosen' must be a string, an assistant message"),
    ({"messages": [{"role": "user", "content": "x"}], "completion": "y"}, "t.jsonl:2: training.objective: dpo needs preference data"),
    ({"prompt": "x", "chosen": "a", "rejcted": "b"},
     "t.jsonl:2: missing 'rejected' (the row has 'rejcted'; did you mean 'rejected'?)"),
    ({"prompt": "x", "chosn": "a", "rejected": "b"}, "t.jsonl:2: missing 'chosen' (the row has 'chosn'; did you mean"),
    ({"promt": "x", "chosen": "a", "rejected": "b"}, "(the row has 'promt'; did you mean 'prompt'?)"),
    ({"mesages": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b"},
     "(the row has 'mesages'; did you mean 'messages'?)"),
    ({"prompt": "x", "chosn": "a", "rejcted": "b"}, "(the row has 'chosn'; did you mean 'chosen'?)"),
])
def test_bad_preference_rows_name_file_and_line(tiny_model_dir, tmp_path, row, message):
    _, tokenizer, _ = load_model(str(tiny_model_dir))
    good = {"prompt": "say dog", "chosen": "dog", "rejected": "fox"}
    (tmp_path / "t.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        load_preference_split(tmp_path / "t.jsonl", tokenizer, DataConfig(path=str(tmp_path)), objective="dpo")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_fields_a_preference_row_does_not_read_are_counted_and_named(tiny_model_dir, tmp_path):
    # Before: `id`, `score_chosen` ... were dropped without a word (SFT rows had them counted).
    _, tokenizer, _ = load_model(str(tiny_model_dir))
    rows = [{"prompt": "say fox", "chosen": "fox", "rejected": "dog", "id": 1, "score_chosen": 3},
            {"prompt": "say dog", "chosen": "dog", "rejected": "dog", "id": 2},  # dropped as identical, still read
            {"messages": [{"role": "user", "content": "say a"}], "prompt": "ignored", "chosen": "a", "rejected": "b",
             "tools": []}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = DataStats()
    load_preference_split(tmp_path / "t.jsonl", tokenizer, DataConfig(path=str(tmp_path)), stats)
    # a messages row reads 'messages', not 'prompt'; 'tools' is read by both shapes
    assert stats.summary()["unused_fields"] == {"id": 2, "prompt": 1, "score_chosen": 1}
    from mlx_lora.run import describe_data

    (line,) = [x for x in describe_data({"train": {**stats.summary(), "source": "train.jsonl"}}, "dpo")
               if "fields not used by training" in x]
    assert "id (2 rows), prompt (1 row), score_chosen (1 row)" in line


def test_tools_of_a_preference_row_reach_the_chat_template(tiny_model_dir, tmp_path):
    from test_chat_templates import TOOL_TEMPLATE

    _, tokenizer, _ = load_model(str(tiny_model_dir))
    tokenizer.chat_template = TOOL_TEMPLATE
    spec = {"type": "function", "function": {"name": "get_w", "description": "weather by city", "parameters": {}}}
    call = {"type": "function", "function": {"name": "get_w", "arguments": {"city": "Lyon"}}}
    rows = [{"messages": [{"role": "user", "content": "weather?"}], "tools": [spec],
             "chosen": [{"role": "assistant", "content": None, "tool_calls": [call]}], "rejected": "no idea"},
            {"prompt": "weather?", "tools": json.dumps([spec]), "chosen": "sunny", "rejected": "no idea"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_preference_split(tmp_path / "t.jsonl", tokenizer, DataConfig(path=str(tmp_path)))
    for pair in pairs:
        for example in (pair.chosen, pair.rejected):
            assert '"description": "weather by city"' in tokenizer.decode(example.tokens)
            assert example.tools == [spec]  # evaluation prompts carry them too
    targets = [t for t, m in zip(pairs[0].chosen.tokens, pairs[0].chosen.mask) if m]
    assert tokenizer.decode(targets) == f"<tool_call>{json.dumps(call['function'])}</tool_call><|im_end|>\n"
    from mlx_lora.prepare.stats import token_length  # data_transform's length report counts the tools too

    assert [token_length(tokenizer, {**row, "tools": [spec]}) for row in rows] == [pair.length for pair in pairs]
    # A template that shows nothing of the tools would teach calls to unseen tools: refused, as for SFT rows.
    _, tokenizer, _ = load_model(str(tiny_model_dir))
    with pytest.raises(DataError, match=r"t.jsonl:1: the row has 'tools' but the chat template renders nothing"):
        load_preference_split(tmp_path / "t.jsonl", tokenizer, DataConfig(path=str(tmp_path)))


def test_dpo_with_an_sft_dataset_and_sft_with_pairs_say_which_format_is_needed(tiny_model_dir, tiny_data_dir,
                                                                                  pairs_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, tiny_data_dir, training={"objective": "dpo"})
    result = mlx_lora("train", config)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.jsonl:1: training.objective: dpo needs preference data" in lines[0]
    assert '"chosen" and "rejected"' in lines[0]
    config = write_config(tmp_path, tiny_model_dir, pairs_dir)
    result = mlx_lora("train", config)
    assert result.returncode == 1 and "a preference row (chosen/rejected) in an SFT run; set training.objective: dpo" \
        in result.stderr and "Traceback" not in result.stderr


# --- training ----------------------------------------------------------------------------------------

DPO = TrainingConfig(iters=8, batch_size=4, learning_rate=5e-3, steps_per_report=1, steps_per_eval=4, val_batches=1,
                     save_every=3, grad_accumulation=2, objective="dpo", beta=0.2, lr_schedule="cosine")


def adapters_of(model):
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_interrupted_and_resumed_preference_run_equals_uninterrupted(tiny_model_dir, pairs_dir, tmp_path, objective):
    import dataclasses

    config = dataclasses.replace(DPO, objective=objective)
    model, _, data, _ = setup(tiny_model_dir, pairs_dir, objective)
    straight = Recorder()
    train(model, data["train"], data["valid"], config, tmp_path / "straight", callbacks=[straight])
    expected = adapters_of(model)
    assert all(r.reward_accuracy is not None and r.chosen_logps < 0 for r in straight.reports)

    model, _, data, _ = setup(tiny_model_dir, pairs_dir, objective)
    first = Recorder(interrupt_at=5)
    with pytest.raises(KeyboardInterrupt):
        train(model, data["train"], data["valid"], config, tmp_path / "resumed", callbacks=[first])
    model, _, data, _ = setup(tiny_model_dir, pairs_dir, objective, seed=99)
    second = Recorder()
    train(model, data["train"], data["valid"], config, tmp_path / "resumed", resume=True, callbacks=[second])
    got = adapters_of(model)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    resumed = first.reports + second.reports
    for name in ("train_loss", "reward_margin", "chosen_logps"):
        np.testing.assert_allclose([getattr(r, name) for r in resumed], [getattr(r, name) for r in straight.reports],
                                   rtol=1e-5, atol=1e-6, err_msg=name)


def test_dpo_run_writes_preference_metrics_and_base_vs_tuned_accuracy(tiny_model_dir, pairs_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, pairs_dir, training={"objective": "dpo", "iters": 4})
    result = mlx_lora("train", config)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"reward_margin", "reward_accuracy", "chosen_logps", "rejected_logps"} <= r.keys() for r in rows)
    assert "val_preference_accuracy" in rows[-1]
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["base"]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # the base is its own reference
    assert evaluation["base"]["reward_margin"] == 0.0
    for name in ("base", "tuned"):
        assert 0 <= evaluation[name]["preference_accuracy"] <= 1 and evaluation[name]["n"] == 8
    assert "preference accuracy" in result.stdout and (out / "loss.png").is_file()
    assert "data train: 24 pairs" in result.stdout
