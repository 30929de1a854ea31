"""What a data folder may hold: train.jsonl alone trains (no validation loss, said once),
data.valid_fraction holds out part of train.jsonl, and test.jsonl is needed only for evaluation.

One input is the shared case `tests/cases/no_valid_split/` converted with no valid/test split.
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import mlx_lora, write_config  # noqa: E402

from mlx_lora.config import DataConfig  # noqa: E402
from mlx_lora.data import DataError, load_datasets  # noqa: E402
from mlx_lora.models import load_model  # noqa: E402

CASE = Path(__file__).parent / "cases" / "no_valid_split" / "raw.jsonl"


@pytest.fixture(scope="module")
def train_only(tmp_path_factory) -> Path:
    """The shared case converted as its user did: --valid-fraction 0 --test-fraction 0."""
    out = tmp_path_factory.mktemp("data") / "data"
    result = mlx_lora("prepare", CASE, "-o", out, "--valid-fraction", "0", "--test-fraction", "0")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl", "transform_report.json"]
    return out


def test_train_only_folder_trains_without_validation_and_says_so_once(tiny_model_dir, train_only, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, train_only, training={"batch_size": 2}, eval={"enabled": False})
    result = mlx_lora("train", config)
    assert result.returncode == 0, result.stderr[-2000:]
    said = [line for line in result.stdout.splitlines() if "no validation loss" in line]
    assert said == ["data valid: none (no valid.jsonl and data.valid_fraction is 0: no validation loss)"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(row.get("val_loss") is None for row in rows)
    assert (tmp_path / "run" / "adapters.safetensors").is_file()


def test_evaluation_without_test_split_names_the_two_fixes(tiny_model_dir, train_only, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, train_only, training={"batch_size": 2})
    result = mlx_lora("train", config)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "test.jsonl: file not found; evaluation needs a test split" in result.stderr
    assert "eval.enabled: false" in result.stderr


def test_valid_fraction_holds_out_train_rows(tiny_model_dir, train_only, tmp_path):
    _, tokenizer, _ = load_model(str(tiny_model_dir))
    config = DataConfig(path=str(train_only), max_seq_length=64, valid_fraction=0.34)
    datasets, stats = load_datasets(config, tokenizer, ("train", "valid"), seed=3)
    assert (stats["train"]["examples"], stats["valid"]["examples"]) == (4, 2)
    assert stats["valid"]["source"] == "2 row(s) held out of train.jsonl (data.valid_fraction 0.34)"
    train_tokens = {tuple(e.tokens) for e in datasets["train"]}
    assert not train_tokens & {tuple(e.tokens) for e in datasets["valid"]}
    again, _ = load_datasets(config, tokenizer, ("train", "valid"), seed=3)
    assert [e.tokens for e in again["valid"]] == [e.tokens for e in datasets["valid"]]
    # A folder that has valid.jsonl too is ambiguous: refused, naming both.
    (tmp_path / "train.jsonl").write_text((train_only / "train.jsonl").read_text())
    (tmp_path / "valid.jsonl").write_text((train_only / "train.jsonl").read_text())
    with pytest.raises(DataError, match=r"data.valid_fraction 0.34 .*valid.jsonl exists"):
        load_datasets(DataConfig(path=str(tmp_path), valid_fraction=0.34), tokenizer, ("train", "valid"))
    with pytest.raises(DataError, match="too few to hold out"):
        load_datasets(DataConfig(path=str(train_only), valid_fraction=0.95), tokenizer, ("train", "valid"))
