"""The memory planner: it reads config.json only, sizes the frozen base exactly, predicts step
peaks on tiny models within +-10% of `mx.get_peak_memory()`, and says so in one line when it cannot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tiny
from mlx_lora.config import load_config
from mlx_lora.memory import shape as shape_module
from mlx_lora.memory.estimate import FIXED_OVERHEAD_BYTES, StepSettings, base_bytes, components, lora_parameters
from mlx_lora.memory.plan import make_plan, parse_memory
from mlx_lora.memory.shape import read_shape, shape_from_config

ROOT = Path(__file__).resolve().parent.parent


def mlx_lora(*args):
    env = dict(os.environ, MLX_LORA_NO_BLAS_PRELOAD="1")
    return subprocess.run([sys.executable, "-m", "mlx_lora", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=600)


def write_config(tmp_path, model, data_dir, **training):
    config = {"model": str(model), "output_dir": str(tmp_path / "run"), "data": {"path": str(data_dir), "max_seq_length": 64},
              "lora": {"rank": 4, "alpha": 8}, "quantization": {"mode": "affine", "group_size": 32},
              "training": {"iters": 4, "batch_size": 2, "steps_per_report": 1, "steps_per_eval": 0, "save_every": 0,
                           **training},
              "eval": {"enabled": False}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def config_only_dir(tmp_path_factory):
    """config.json and tokenizer files of an 8B-shaped llama, and no weights at all."""
    folder = tmp_path_factory.mktemp("config-only")
    tiny.make_tokenizer(folder)
    (folder / "config.json").write_text((ROOT / "bench/model_configs/Llama-3.1-8B.json").read_text())
    return folder


def test_plan_reads_config_json_only(config_only_dir, tiny_data_dir, tmp_path):
    assert not list(config_only_dir.glob("*.safetensors"))
    path = write_config(tmp_path, config_only_dir, tiny_data_dir)
    result = mlx_lora("plan", path, "data.max_seq_length=2048", "training.batch_size=1", "lora.rank=16",
                      "quantization.group_size=64", "--memory", "32GB", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert set(plan) >= {"peak_gb", "fits", "components"}
    assert plan["peak_gb"] == pytest.approx(sum(plan["components"].values()), abs=0.01)
    # 8B at 4 bits: ~4.5 GB of packed weights and float32 scales; well below the 8B float size
    assert 4.0 < plan["components"]["frozen base"] < 6.0
    table = mlx_lora("plan", path, "--memory", "32GB")
    assert "predicted peak" in table.stdout and "frozen base" in table.stdout


def test_plan_that_does_not_fit_lists_changes_that_do(config_only_dir, tiny_data_dir, tmp_path):
    path = write_config(tmp_path, config_only_dir, tiny_data_dir)
    cfg = load_config(path, ["data.max_seq_length=4096", "training.batch_size=8", "lora.rank=16"])
    plan = make_plan(cfg, parse_memory("16GB"), "test", dequantize_path=True)
    assert not plan.fits
    assert plan.suggestions, plan.table()
    for overrides, peak in plan.suggestions:  # each suggestion, applied, is predicted to fit
        again = make_plan(load_config(path, ["data.max_seq_length=4096", "training.batch_size=8", "lora.rank=16", *overrides]),
                          parse_memory("16GB"), "test", dequantize_path=True)
        assert again.fits and again.peak == pytest.approx(peak)
    assert "does NOT fit" in plan.table()


@pytest.mark.parametrize("text, size", [("16GB", 16e9), ("32 gb", 32e9), ("24GiB", 24 * 2**30), ("512MB", 512e6), ("64", 64e9)])
def test_memory_sizes(text, size):
    assert parse_memory(text) == pytest.approx(size)


def test_unparseable_memory_is_one_line_with_the_accepted_forms(tiny_model_dir, tiny_data_dir, tmp_path):
    result = mlx_lora("plan", write_config(tmp_path, tiny_model_dir, tiny_data_dir), "--memory", "lots")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "16GB, 32GB, 64GB" in result.stderr and "'lots'" in result.stderr


def test_missing_config_json_is_named(tmp_path, tiny_data_dir):
    folder = tmp_path / "no-config"
    folder.mkdir()
    tiny.make_tokenizer(folder)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_shape(str(folder))
    result = mlx_lora("plan", write_config(tmp_path, folder, tiny_data_dir))
    assert result.returncode == 1 and "no config.json" in result.stderr and "Traceback" not in result.stderr


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="model_type 'mamba'"):
        shape_from_config({"model_type": "mamba", "hidden_size": 8})


def test_training_runs_with_a_warning_when_no_prediction_is_made(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    from mlx_lora.run import run_training

    monkeypatch.setattr(shape_module, "KNOWN_TYPES", {"gemma2"})  # the planner does not know llama now
    cfg = load_config(write_config(tmp_path, tiny_model_dir, tiny_data_dir, iters=2))
    summary = run_training(cfg)
    assert summary["steps"] == 2
    out = capsys.readouterr().out
    assert "warning: no memory prediction was made" in out and "model_type 'llama'" in out


def test_architecture_traits_come_from_config_fields():
    qwen = shape_from_config(json.loads((ROOT / "bench/model_configs/Qwen2.5-7B.json").read_text()))
    gemma = shape_from_config(json.loads((ROOT / "bench/model_configs/gemma-2-9b.json").read_text()))
    llama = shape_from_config(json.loads((ROOT / "bench/model_configs/Llama-3.2-3B.json").read_text()))
    assert qwen.qkv_bias and not qwen.tied and not llama.qkv_bias and llama.tied
    assert gemma.head_dim == 256 and gemma.q_dim == 4096 != gemma.hidden and gemma.logit_softcap and gemma.tied
    phi3 = shape_from_config({"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
                              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064})
    assert [p.name for p in phi3.projections()] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    # published sizes: Qwen2.5-7B 7.62B, Llama-3.2-3B 3.21B, gemma-2-9b 9.24B parameters (norms excluded here)
    assert qwen.parameters() + qwen.layers * 3 * 512 == pytest.approx(7.62e9, rel=0.01)
    assert llama.parameters() == pytest.approx(3.21e9, rel=0.01)
    assert gemma.parameters() == pytest.approx(9.24e9, rel=0.01)


@pytest.mark.parametrize("mode, extra", [("none", {}), ("affine", {"bits": 4, "group_size": 32}),
                                         ("affine", {"bits": 8, "group_size": 64}), ("nf4", {"block_size": 64}),
                                         ("nf4", {"block_size": 64, "double_quant": True})])
def test_frozen_base_bytes_match_the_loaded_model(tiny_model_dir, mode, extra):
    from mlx_lora.frozen_matmul import use_dequantize_path
    from mlx_lora.models import load_model
    from mlx_lora.quantize import model_nbytes, quantize_model
    from mlx_lora.frozen_matmul import use_fast_frozen_layers

    model, _, info = load_model(str(tiny_model_dir))
    quantize_model(model, mode, **extra)
    use_fast_frozen_layers(model)
    settings = StepSettings(mode=mode, **extra, dequantize_path=use_dequantize_path())
    assert base_bytes(shape_from_config(info.hf_config), settings) == pytest.approx(model_nbytes(model), rel=0.01)


def test_lora_parameters_match_apply_lora(tiny_model_dir):
    from mlx_lora.config import LoraConfig
    from mlx_lora.lora import apply_lora, count_trainable
    from mlx_lora.models import load_model

    model, _, info = load_model(str(tiny_model_dir))
    apply_lora(model, LoraConfig(rank=4, target_modules=("q_proj", "v_proj", "down_proj"), num_layers=1))
    settings = StepSettings(rank=4, target_modules=("q_proj", "v_proj", "down_proj"), num_layers=1)
    assert lora_parameters(shape_from_config(info.hf_config), settings) == count_trainable(model)
