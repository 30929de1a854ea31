"""The memory planner: it reads config.json only, sizes the frozen base exactly, predicts step
peaks on tiny models within +-10% of `mx.get_peak_memory()`, and says so in one line when it cannot."""

import dataclasses
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
    assert result.returncode in (0, 3), result.stderr
    plan = json.loads(result.stdout)
    assert result.returncode == (0 if plan["fits"] else 3)  # 3: does not fit (scripts can stop on it)
    assert set(plan) >= {"peak_gb", "fits", "components"}
    assert plan["peak_gb"] == pytest.approx(sum(plan["components"].values()), abs=0.01)
    # 8B at 4 bits: ~4.5 GB of packed weights and float32 scales; well below the 8B float size
    assert 4.0 < plan["components"]["frozen base"] < 6.0
    table = mlx_lora("plan", path, "--memory", "32GB")
    assert "predicted peak" in table.stdout and "frozen base" in table.stdout


def test_target_modules_that_match_no_layer_are_refused_and_a_partial_match_is_named(config_only_dir, tiny_data_dir,
                                                                                       tmp_path):
    path = write_config(tmp_path, config_only_dir, tiny_data_dir)
    none = mlx_lora("plan", path, "lora.target_modules=[qkv_proj,foo_proj]")
    assert none.returncode == 1 and "Traceback" not in none.stderr
    assert "foo_proj, qkv_proj match no layer of this model" in none.stderr and "q_proj" in none.stderr
    some = mlx_lora("plan", path, "lora.target_modules=[q_proj,foo_proj]", "--json")
    assert some.returncode == 0, some.stderr
    assert any("foo_proj not among this model's projections" in w for w in json.loads(some.stdout)["warnings"])


def test_a_macs_ram_is_planned_against_its_gpu_working_set(config_only_dir, tiny_data_dir, tmp_path):
    from mlx_lora.memory.plan import mac_ram, mac_working_set

    # Macs are sold in GiB called GB: 16GB and 16GiB are the same Mac, 128GB gets the large Macs' share
    assert mac_ram(16e9) == mac_ram(16 * 2**30) == 16 * 2**30 and mac_ram(0.5e9) == 0.5e9
    assert mac_working_set(16 * 2**30) == pytest.approx(10.67 * 2**30, rel=1e-3)  # as read on a 16 GB M4
    assert mac_working_set(mac_ram(128e9)) == pytest.approx(0.81 * 128 * 2**30)
    path = write_config(tmp_path, config_only_dir, tiny_data_dir)
    mac = json.loads(mlx_lora("plan", path, "--memory", "16GB", "--mac", "--json").stdout)
    same = json.loads(mlx_lora("plan", path, "--memory", "16GiB", "--mac", "--json").stdout)
    other = json.loads(mlx_lora("plan", path, "--memory", "16GB", "--json").stdout)
    assert mac["memory_gb"] == same["memory_gb"] == pytest.approx(10.67 * 2**30 / 1e9, abs=0.01)
    assert other["memory_gb"] == pytest.approx(16.0)
    assert "GPU working set of a 16 GB Mac" in mac["memory_source"]
    alone = mlx_lora("plan", path, "--mac")  # which Mac? (not on a Mac: --memory is needed)
    assert alone.returncode == 1 and "--memory" in alone.stderr and "Traceback" not in alone.stderr


def test_settings_the_plan_cannot_honour_are_warned(config_only_dir, tiny_data_dir, tmp_path):
    path = write_config(tmp_path, config_only_dir, tiny_data_dir)
    cfg = load_config(path, ["quantization.double_quant=true", "lora.num_layers=999", "training.memory_limit=8GB"])
    warnings = " | ".join(make_plan(cfg, parse_memory("32GB"), "test").warnings)
    assert "double_quant applies to mode nf4 only" in warnings and "num_layers 999 is above" in warnings
    assert "training.memory_limit 8GB" in warnings


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


def test_when_only_cutting_the_sequence_fits_alone_the_combined_change_is_offered_too(tmp_path, tiny_data_dir):
    gemma = ROOT / "configs" / "models" / "hf_config" / "gemma-2-9b-it.json"
    path = write_config(tmp_path, gemma, tiny_data_dir)
    overrides = ["data.max_seq_length=2048", "training.batch_size=2", "training.grad_checkpoint=false", "lora.rank=16"]
    plan = make_plan(load_config(path, overrides), parse_memory("16GB"), "test", dequantize_path=True)
    kinds = [o[0].split("=")[0] for o, _ in plan.suggestions]
    assert kinds[0] == "data.max_seq_length" and "training.grad_checkpoint" in kinds, plan.table()
    combined = next(o for o, _ in plan.suggestions if o[0].startswith("training.grad_checkpoint"))
    cut = {o.split("=")[0]: int(o.split("=")[1]) for o in combined if o.startswith("data.")}
    assert cut.get("data.max_seq_length", 2048) > int(plan.suggestions[0][0][0].split("=")[1])  # a smaller cut
    for overrides_more, peak in plan.suggestions:  # each, applied, fits
        again = make_plan(load_config(path, overrides + overrides_more), parse_memory("16GB"), "test", dequantize_path=True)
        assert again.fits and again.peak == pytest.approx(peak)


def test_combined_change_quantizes_a_float_base_and_repeats_nothing_already_set(config_only_dir, tiny_data_dir, tmp_path):
    from mlx_lora.memory.plan import SAFETY_MARGIN

    path = write_config(tmp_path, config_only_dir, tiny_data_dir)  # the 8B shape
    wide = ["data.max_seq_length=8192", "training.batch_size=4", "training.grad_checkpoint=false", "quantization.mode=none"]
    plan = make_plan(load_config(path, wide), parse_memory("16GB"), "test")
    assert not plan.fits and plan.suggestions, plan.table()
    combined = plan.suggestions[-1][0]
    assert "quantization.mode=affine" in combined and "quantization.bits=4" in combined, plan.table()
    for overrides, peak in plan.suggestions:  # as planned again (this machine's path), and under the margin
        again = make_plan(load_config(path, wide + overrides), parse_memory("16GB"), "test")
        assert again.peak == pytest.approx(peak) and peak <= SAFETY_MARGIN * 16e9, overrides
    # already checkpointed at batch 1: the combined change does not repeat those, and cuts to round lengths
    set_already = ["data.max_seq_length=100000", "training.batch_size=1", "training.grad_checkpoint=true"]
    plan = make_plan(load_config(path, set_already), parse_memory("8GB"), "test")
    assert plan.suggestions, plan.table()
    for overrides, _ in plan.suggestions:
        assert not any(o.startswith(("training.grad_checkpoint", "training.batch_size")) for o in overrides), overrides
    lengths = [int(o.split("=")[1]) for overrides, _ in plan.suggestions for o in overrides if o.startswith("data.max")]
    assert lengths and all(length & (length - 1) == 0 for length in lengths), lengths


def test_an_uncompiled_run_is_warned_that_the_plan_does_not_cover_it(config_only_dir, tiny_data_dir, tmp_path):
    path = write_config(tmp_path, config_only_dir, tiny_data_dir)
    assert make_plan(load_config(path, []), parse_memory("32GB"), "test").warnings == []
    plan = make_plan(load_config(path, ["training.compile=false", "training.grad_checkpoint=true"]), parse_memory("32GB"), "test")
    assert any("training.compile=false" in w for w in plan.warnings)
    assert "warning: training.compile=false" in plan.table() and plan.to_json()["warnings"] == plan.warnings


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


@pytest.mark.parametrize("config, problem", [
    ([1, 2], "holds a list, not an object"),
    ({"hidden_size": 8}, "has no 'model_type'"),
    ({"model_type": "llama", "intermediate_size": None}, "sets 'null' for 'intermediate_size'"),
    ({"model_type": "llama", "num_attention_heads": 0}, "'num_attention_heads' must be a positive integer, got 0"),
    ({"model_type": "llama", "hidden_size": -4096}, "'hidden_size' must be a positive integer, got -4096"),
    ({"model_type": "llama", "num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
])
def test_a_malformed_config_json_is_one_line_naming_the_field(tmp_path, tiny_data_dir, config, problem):
    good = json.loads((ROOT / "bench/model_configs/Llama-3.1-8B.json").read_text())
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**good, **config} if isinstance(config, dict) else config))
    if isinstance(config, dict) and "model_type" not in config:
        data = {**good, **config}
        data.pop("model_type")
        (folder / "config.json").write_text(json.dumps(data))
    result = mlx_lora("plan", write_config(tmp_path, folder, tiny_data_dir))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert problem in result.stderr and str(folder / "config.json") in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_newer_config_fields_and_family_defaults_are_read():
    llama = json.loads((ROOT / "bench/model_configs/Llama-3.1-8B.json").read_text())
    float32 = {**{k: v for k, v in llama.items() if k != "torch_dtype"}, "dtype": "float32"}  # transformers 4.56+ / 5
    assert shape_from_config(float32).dtype_bytes == 4 and shape_from_config(llama).dtype_bytes == 2
    # google/gemma-3-4b-it gives only a few text_config fields; the rest are Gemma3TextConfig's defaults
    gemma3 = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "torch_dtype": "bfloat16",
              "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                              "num_hidden_layers": 34, "sliding_window": 1024}}
    shape = shape_from_config(gemma3)
    assert (shape.heads, shape.kv_heads, shape.head_dim, shape.vocab) == (8, 4, 256, 262208)
    from transformers import Gemma3TextConfig

    reference = Gemma3TextConfig(**{k: v for k, v in gemma3["text_config"].items() if k != "model_type"})
    assert (shape.heads, shape.kv_heads, shape.head_dim, shape.vocab) == (
        reference.num_attention_heads, reference.num_key_value_heads, reference.head_dim, reference.vocab_size)


def test_plan_needs_no_data_and_warns_what_it_does_not_model(config_only_dir, tmp_path):
    path = tmp_path / "only-model.yaml"
    path.write_text(f"model: {config_only_dir}\n")  # no data: plan reads none
    result = mlx_lora("plan", path, "--memory", "32GB", "--json", "data.max_seq_length=200000", "backend=cuda")
    assert result.returncode == 3, result.stderr  # 200,000 tokens of an 8B model: does not fit
    warnings = " | ".join(json.loads(result.stdout)["warnings"])
    assert "past this model's context of 131072 tokens" in warnings and "backend: cuda" in warnings


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


# --- predicted against measured peaks (real training steps on small random models) --------

SMALL = tiny.tiny_config(vocab_size=8192, hidden_size=256, layers=4)
SEQ = 512
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def small_model():
    """A 4-block llama (hidden 256, vocab 8192), affine 4-bit as a run holds it, LoRA rank 16 on all."""
    import mlx.core as mx
    from mlx_lm.models import llama

    from mlx_lora.config import LoraConfig
    from mlx_lora.cpu_math import use_fast_cpu_math
    from mlx_lora.frozen_matmul import use_fast_frozen_layers
    from mlx_lora.lora import apply_lora
    from mlx_lora.quantize import quantize_model

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(SMALL))
    quantize_model(model, "affine", bits=4, group_size=64)
    use_fast_frozen_layers(model)
    use_fast_cpu_math(model)  # as `run.load_base` does (whatever earlier tests loaded)
    apply_lora(model, LoraConfig(rank=16, alpha=32, target_modules=ALL))
    mx.eval(model.parameters())
    return model


def examples(count, length=SEQ):
    import numpy as np

    from mlx_lora.data import Example

    rng = np.random.default_rng(0)
    return [Example(tokens=rng.integers(0, SMALL["vocab_size"], length).tolist(), mask=[True] * length) for _ in range(count)]


def pairs(count, length=SEQ):
    """Preference pairs: chosen and rejected `length` tokens each, the last three quarters the answer."""
    from mlx_lora.preference_data import PreferencePair

    answers = examples(2 * count, length)
    for answer in answers:
        answer.mask[: length // 4] = [False] * (length // 4)
    return [PreferencePair(chosen, rejected) for chosen, rejected in zip(answers[::2], answers[1::2])]


def run_steps(model, batch, out, steps=1, grad_checkpoint=False, memory_limit=None, resume=False, objective="sft"):
    import gc

    import mlx.core as mx

    from mlx_lora.config import TrainingConfig
    from mlx_lora.train import train

    config = TrainingConfig(iters=steps, batch_size=batch, grad_checkpoint=grad_checkpoint, steps_per_eval=0,
                            save_every=1, steps_per_report=1, learning_rate=1e-5, objective=objective)
    gc.collect()
    mx.clear_cache()
    data = examples(batch * 2) if objective == "sft" else pairs(batch * 2)
    return train(model, data, [], config, out, resume=resume, memory_limit=memory_limit)


def settings(batch, grad_checkpoint=False, objective="sft"):
    from mlx_lora.frozen_matmul import use_dequantize_path

    return StepSettings(rank=16, target_modules=ALL, batch_size=batch, seq_length=SEQ, grad_checkpoint=grad_checkpoint,
                        dequantize_path=use_dequantize_path(), objective=objective)


def predicted(batch, grad_checkpoint=False):
    return sum(components(shape_from_config(SMALL), settings(batch, grad_checkpoint)).values())


@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_predicted_peak_within_ten_percent_of_measured(tmp_path, grad_checkpoint):
    model = small_model()
    measured = run_steps(model, 4, tmp_path, grad_checkpoint=grad_checkpoint)["peak_memory_gb"] * 1e9
    parts = components(shape_from_config(SMALL), settings(4, grad_checkpoint))
    # the frozen base and adapters are exact (see test_frozen_base_bytes_match_the_loaded_model);
    # the rest is what the planner models: compare it with the overhead taken out of both
    prediction = sum(parts.values()) - FIXED_OVERHEAD_BYTES
    assert prediction == pytest.approx(measured - FIXED_OVERHEAD_BYTES, rel=0.10), parts
    assert prediction >= 0.95 * (measured - FIXED_OVERHEAD_BYTES)  # never under by more than 5%


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_step_peak_within_ten_percent_of_measured_and_auto_batch_fits(tmp_path, objective):
    # A step of B pairs is one (2B, T) forward and backward (chosen + rejected rows); DPO's reference
    # log-probabilities come from a pass of their own before it (train.py), freed before its peak.
    from mlx_lora.memory.plan import SAFETY_MARGIN, auto_batch

    shape = shape_from_config(SMALL)
    parts = components(shape, settings(2, objective=objective))
    limit = sum(parts.values()) / SAFETY_MARGIN * 1.02  # 2 pairs fit with the margin, 4 do not
    assert auto_batch(shape, settings(1, objective=objective), limit, effective=8) == (2, 4)
    assert auto_batch(shape, settings(1), limit, effective=8) == (4, 2)  # what planning it as SFT would pick
    # the guard (memory_limit) raises MemoryLimitExceeded if the step auto picked passes the limit
    measured = run_steps(small_model(), 2, tmp_path, objective=objective, memory_limit=limit)["peak_memory_gb"] * 1e9
    prediction = sum(parts.values()) - FIXED_OVERHEAD_BYTES
    assert prediction == pytest.approx(measured - FIXED_OVERHEAD_BYTES, rel=0.10), parts
    assert prediction >= 0.95 * (measured - FIXED_OVERHEAD_BYTES)  # never under by more than 5%


def test_plan_counts_both_answers_of_every_pair(config_only_dir, tiny_data_dir, tmp_path):
    path = write_config(tmp_path, config_only_dir, tiny_data_dir)  # the 8B shape, affine 4-bit

    def plan(*overrides, memory="16GB"):
        return make_plan(load_config(path, ["data.max_seq_length=1024", *overrides]), parse_memory(memory), "test",
                         dequantize_path=False)

    sft, sft_twice = plan("training.batch_size=2"), plan("training.batch_size=4")
    for objective in ("dpo", "orpo"):
        preference = plan("training.batch_size=2", f"training.objective={objective}")
        # 2 pairs hold what 4 SFT examples hold: every per-sequence component doubles
        for name, value in sft_twice.components.items():
            assert preference.components[name] == pytest.approx(value), name
        assert preference.peak > 1.5 * sft.peak - sft.components["frozen base"]
        assert preference.to_json()["sequences_per_batch"] == 4
        assert "2 pairs = 4 sequences (chosen + rejected)" in preference.table()
        # the reference pass leaves only its (2B,) float32 log-probabilities at the peak
        assert preference.components.get("dpo reference", 0.0) == (16.0 if objective == "dpo" else 0.0)
    # batch_size: auto picks half the micro-batch for pairs, with the same pairs per optimizer step
    auto = [plan("training.batch_size=auto", "training.effective_batch_size=16", f"training.objective={objective}",
                 memory="64GB") for objective in ("sft", "dpo")]
    assert (auto[0].settings.batch_size, auto[1].settings.batch_size) == (4, 2)
    assert auto[1].settings.grad_accumulation == 8 and auto[1].fits


def block_model(layers, num_layers=-1):
    """SMALL with `layers` blocks, affine 4-bit, LoRA rank 16 on all (or on the last `num_layers`):
    the per-block slope's models."""
    import mlx.core as mx
    from mlx_lm.models import llama

    from mlx_lora.config import LoraConfig
    from mlx_lora.cpu_math import use_fast_cpu_math
    from mlx_lora.frozen_matmul import use_fast_frozen_layers
    from mlx_lora.lora import apply_lora
    from mlx_lora.quantize import quantize_model

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict({**SMALL, "num_hidden_layers": layers}))
    quantize_model(model, "affine", bits=4, group_size=64)
    use_fast_frozen_layers(model)
    use_fast_cpu_math(model)  # as `run.load_base` does
    apply_lora(model, LoraConfig(rank=16, alpha=32, target_modules=ALL, num_layers=num_layers))
    mx.eval(model.parameters())
    return model


def test_frozen_blocks_below_the_adapted_ones_are_not_counted(tmp_path):
    # lora.num_layers adapts the last blocks only: the ones below run forward and keep nothing for
    # the backward pass, so cutting num_layers saves what those blocks' activations would hold
    # (the planner used to count every block's: 250 MB planned where 90 MB was measured)
    layers, few = 8, 2
    measured = [run_steps(block_model(layers, n), 2, tmp_path / str(n))["peak_memory_gb"] * 1e9 for n in (layers, few)]
    shape = shape_from_config({**SMALL, "num_hidden_layers": layers})
    planned = [sum(components(shape, dataclasses.replace(settings(2), num_layers=n)).values()) for n in (layers, few)]
    saved, planned_saving = measured[0] - measured[1], planned[0] - planned[1]
    assert planned_saving == pytest.approx(saved, rel=0.10)
    assert planned[1] - FIXED_OVERHEAD_BYTES >= 0.95 * (measured[1] - FIXED_OVERHEAD_BYTES)  # never under


@pytest.mark.parametrize("grad_checkpoint", [False, pytest.param(True, marks=pytest.mark.xfail(strict=False, reason=(
    "known gap (issue 10): a checkpointed block of this tiny shape adds 4.0 MB, the planner counts 5.2 MB "
    "(input + 1.3 intermediate-sized arrays, fit on the Qwen2.5-0.5B / 1.5B and Llama-3.2-3B shapes); over, not under")))])
def test_what_one_block_adds_matches_its_components(tmp_path, grad_checkpoint):
    # The slope over blocks isolates the per-block components (frozen base, LoRA + optimizer state,
    # saved activations and scores, or with checkpointing the kept input and intermediate array) from the fixed
    # working set and MLX's own overhead, which the same in both runs cancel.
    few, many = 2, 6
    measured = [run_steps(block_model(n), 2, tmp_path / str(n), grad_checkpoint=grad_checkpoint)["peak_memory_gb"] * 1e9
                for n in (few, many)]
    predicted_peaks = [sum(components(shape_from_config({**SMALL, "num_hidden_layers": n}),
                                      settings(2, grad_checkpoint)).values()) for n in (few, many)]
    measured_slope = (measured[1] - measured[0]) / (many - few)
    predicted_slope = (predicted_peaks[1] - predicted_peaks[0]) / (many - few)
    assert predicted_slope == pytest.approx(measured_slope, rel=0.10)
    assert predicted_slope >= 0.95 * measured_slope


def test_auto_batch_runs_under_the_limit_and_one_larger_would_not(tmp_path):
    from mlx_lora.memory.plan import SAFETY_MARGIN, auto_batch
    from mlx_lora.train import MemoryLimitExceeded

    limit = predicted(2) / SAFETY_MARGIN * 1.02  # batch 2 fits with the margin, batch 4 does not
    batch, accumulation = auto_batch(shape_from_config(SMALL), settings(1), limit, effective=8)
    assert (batch, accumulation) == (2, 4)
    summary = run_steps(small_model(), batch, tmp_path / "fits", memory_limit=limit)
    assert summary["peak_memory_gb"] * 1e9 < limit
    with pytest.raises(MemoryLimitExceeded):
        run_steps(small_model(), 4, tmp_path / "larger", memory_limit=limit)


def test_guard_stops_with_one_line_and_a_resumable_checkpoint(tmp_path):
    from mlx_lora.checkpoints import latest
    from mlx_lora.train import MemoryLimitExceeded

    model = small_model()
    with pytest.raises(MemoryLimitExceeded) as stopped:
        run_steps(model, 2, tmp_path, steps=3, memory_limit=30e6)
    message = str(stopped.value)
    assert "\n" not in message and "over the memory limit of 30.0 MB" in message and "--resume" in message
    checkpoint = latest(tmp_path)
    assert checkpoint is not None and json.loads((checkpoint / "state.json").read_text())["step"] == 1
    summary = run_steps(model, 2, tmp_path, steps=3, resume=True)  # no limit now: it finishes
    assert summary["steps"] == 3


def test_train_config_records_the_batch_auto_chose(tiny_model_dir, tiny_data_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "mlx_lora", "train", write_config(tmp_path, tiny_model_dir, tiny_data_dir,
                             batch_size="auto", effective_batch_size=4, iters=1)], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, MLX_LORA_NO_BLAS_PRELOAD="1"), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "memory plan:" in result.stdout and "predicted peak" in result.stdout
    recorded = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())["training"]
    assert recorded["batch_size"] == 4 and recorded["grad_accumulation"] == 1  # a tiny model: the whole batch fits
    # float_weights: auto is recorded as what ran; on the CPU a tiny quantized model keeps float copies
    from mlx_lora.frozen_matmul import use_dequantize_path

    assert recorded["float_weights"] == ("float" if use_dequantize_path() else "quantized")
    assert ("float weights: float32 copies of" in result.stdout) == use_dequantize_path()


@pytest.mark.parametrize("value, problem", [("auto", None), (3, None), ("big", "positive integer or auto"), (0, "positive integer or auto")])
def test_batch_size_takes_a_number_or_auto(value, problem):
    from mlx_lora.config import ConfigError, config_from_dict

    data = {"model": "x", "data": "d", "training": {"batch_size": value}}
    if problem is None:
        assert config_from_dict(data).training.batch_size == value
    else:
        with pytest.raises(ConfigError, match=problem):
            config_from_dict(data)


def test_memory_limit_setting_is_checked():
    from mlx_lora.config import ConfigError, config_from_dict
    from mlx_lora.memory.plan import guard_limit

    with pytest.raises(ConfigError, match="16GB, 32GB, 64GB"):
        config_from_dict({"model": "x", "data": "d", "training": {"memory_limit": "lots"}})
    assert guard_limit("none") is None and guard_limit("24GB") == 24e9 and guard_limit("auto") > 0


def test_the_planner_mirrors_the_loss_and_frozen_product_constants():
    # estimate.py is arithmetic only (no MLX import), so it repeats these; they must not drift apart
    from mlx_lora import frozen_matmul, loss
    from mlx_lora.memory import estimate

    assert estimate.HEAD_CHUNK_LOGITS_BYTES == loss.CHUNK_LOGITS_BYTES
    assert estimate.HEAD_CHUNK_WEIGHT_BYTES == loss.CHUNK_WEIGHT_BYTES
    assert estimate.ROW_CHUNK == frozen_matmul.ROW_CHUNK
    assert estimate._chunk_rows(10**9) == loss.MAX_CHUNK_ROWS and estimate._chunk_rows(1) == loss.MIN_CHUNK_ROWS


def test_the_head_counts_as_dequantized_only_where_it_is_held_quantized():
    import dataclasses

    from mlx_lora.memory.estimate import head_quantized

    shape = shape_from_config(SMALL)
    assert head_quantized(shape, StepSettings(mode="affine")) and not head_quantized(shape, StepSettings(mode="nf4"))
    assert not head_quantized(shape, StepSettings(mode="none"))
    assert head_quantized(dataclasses.replace(shape, source_bits=4), StepSettings(mode="none"))  # an MLX 4-bit checkpoint
    vocab_by_hidden = shape.vocab * shape.hidden
    for output_type, mode, expected in (("Q6_K", "none", True), ("F16", "nf4", False), ("F16", "affine", True)):
        gguf = dataclasses.replace(shape, gguf_tensors=(("token_embd.weight", "Q4_K", vocab_by_hidden, True),
                                                        ("output.weight", output_type, vocab_by_hidden, True)))
        assert head_quantized(gguf, StepSettings(mode=mode)) == expected, (output_type, mode)


@pytest.mark.parametrize("positions", [32, 128])
def test_a_dequantized_head_is_never_whole_and_the_planner_counts_it(positions):
    # The head runs at the positions with loss only; few positions once meant chunks of 8,192 rows, and
    # with MLX's CPU backend allocating outputs ahead, the whole head in float32 at once (the demo's
    # SFT peak was 11% over its plan at 4 x 72 tokens). Rows per dequantized chunk are now capped.
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_lora import loss
    from mlx_lora.frozen_matmul import use_dequantize_path
    from mlx_lora.memory.estimate import head_working_bytes

    if not use_dequantize_path():
        pytest.skip("the GPU multiplies the 4-bit head directly: nothing is dequantized")
    vocab, hidden = 16384, 1024
    mx.random.seed(0)
    embedding = nn.QuantizedEmbedding.from_embedding(nn.Embedding(vocab, hidden), group_size=64, bits=4)
    embedding.scales, embedding.biases = embedding.scales.astype(mx.float32), embedding.biases.astype(mx.float32)
    mx.eval(embedding.parameters())
    head = loss._affine_head(embedding)
    h, targets = mx.random.normal((positions, hidden)), mx.random.randint(0, vocab, (positions,))
    mx.eval(h, targets)
    step = mx.compile(mx.value_and_grad(lambda h: loss.chunked_cross_entropy(h, targets, head).sum()))
    mx.eval(step(h))
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(step(h))
    measured = mx.get_peak_memory() - before
    assert measured < vocab * hidden * 4 / 2  # measured 26-28 MB against 67 MB for the whole head (172 MB uncapped)
    shape = shape_from_config(tiny.tiny_config(vocab_size=vocab, hidden_size=hidden, layers=1))
    planned = head_working_bytes(shape, StepSettings(batch_size=1, seq_length=positions)) - 2 * positions * hidden * 4
    assert measured <= planned <= 1.6 * measured  # never under; the planner takes the worst number of positions


@pytest.mark.parametrize("types", [{"linear": "Q4_1", "embed": "Q8_0"}, {"linear": "Q4_K", "embed": "F16", "output": "Q6_K"}])
def test_gguf_base_bytes_match_the_loaded_model(tmp_path, types):
    from gguf import GGMLQuantizationType as T
    from test_gguf import write_tiny_gguf

    from mlx_lora.frozen_matmul import use_dequantize_path, use_fast_frozen_layers
    from mlx_lora.models import load_model
    from mlx_lora.quantize import model_nbytes, quantize_model
    from mlx_lora.memory.shape import shape_from_gguf

    path, _, _ = write_tiny_gguf(tmp_path, {key: T[name] for key, name in types.items()}, tied="output" not in types)
    model, _, _ = load_model(str(path))
    quantize_model(model, "affine", group_size=32)  # float tensors (an F16 embedding) are quantized by the run
    use_fast_frozen_layers(model)
    settings = StepSettings(mode="affine", group_size=32, dequantize_path=use_dequantize_path())
    assert base_bytes(shape_from_gguf(path), settings) == pytest.approx(model_nbytes(model), rel=0.02)


# --- training.float_weights: float32 copies of the quantized base on the CPU path ------------

def float_copy_run(tmp_path):
    """(model, its kept layers, summary) of 2 steps at batch 4 x 512, checkpointed, with float copies."""
    from mlx_lora.frozen_matmul import keep_float_weights, use_dequantize_path

    if not use_dequantize_path():
        pytest.skip("float copies are a CPU-path setting")
    model = small_model()
    kept = keep_float_weights(model)
    return model, kept, run_steps(model, 4, tmp_path / "copied", steps=2, grad_checkpoint=True)


def test_float_copies_are_sized_exactly_and_train_the_same(tmp_path):
    import dataclasses

    import numpy as np
    from mlx.utils import tree_flatten

    from mlx_lora.frozen_matmul import KEPT, kept_bytes

    reference = small_model()
    run_steps(reference, 4, tmp_path / "quantized", steps=2, grad_checkpoint=True)
    model, kept, _ = float_copy_run(tmp_path)
    parts = components(shape_from_config(SMALL), dataclasses.replace(settings(4, True), float_weights=True))
    # every quantized matrix (block linears, embedding / tied head) is copied, 4 bytes per weight
    assert kept_bytes(kept) == parts["float copies (CPU)"] and all(KEPT in layer.__dict__ for layer in kept)
    # same weights, same products: two AdamW steps give the same adapters to float32 rounding
    trained = [dict(tree_flatten(m.trainable_parameters())) for m in (reference, model)]
    for name, value in trained[0].items():
        np.testing.assert_allclose(np.array(trained[1][name]), np.array(value), rtol=1e-3, atol=1e-6, err_msg=name)


@pytest.mark.slow  # two real training steps with float copies (~1 min); the non-copy peak is checked in every run
def test_float_copies_peak_within_ten_percent_of_measured(tmp_path):
    import dataclasses

    _, _, summary = float_copy_run(tmp_path)
    parts = components(shape_from_config(SMALL), dataclasses.replace(settings(4, True), float_weights=True))
    prediction = sum(parts.values()) - FIXED_OVERHEAD_BYTES
    measured = summary["peak_memory_gb"] * 1e9 - FIXED_OVERHEAD_BYTES
    assert prediction == pytest.approx(measured, rel=0.10), parts
    assert prediction >= 0.95 * measured


def test_float_weights_auto_keeps_copies_only_when_they_fit_easily(config_only_dir, tiny_data_dir, tmp_path):
    from mlx_lora.memory.plan import AUTO_FLOAT_FRACTION, SAFETY_MARGIN, make_plan

    path = write_config(tmp_path, config_only_dir, tiny_data_dir)  # the 8B shape, affine 4-bit
    cfg = load_config(path)
    roomy = make_plan(cfg, memory=200e9, dequantize_path=True)
    assert roomy.settings.float_weights and roomy.components["float copies (CPU)"] > 0
    assert "float32 copies" in roomy.table()
    tight = make_plan(cfg, memory=roomy.peak / AUTO_FLOAT_FRACTION * 0.99, dequantize_path=True)
    assert not tight.settings.float_weights and tight.components["float copies (CPU)"] == 0
    gpu = make_plan(cfg, memory=64e9, dequantize_path=False)  # the GPU multiplies 4-bit weights directly
    assert gpu.components["float copies (CPU)"] == 0
    forced = load_config(path, ["training.float_weights=float"])
    too_small = make_plan(forced, memory=tight.peak / SAFETY_MARGIN * 1.01, dequantize_path=True)
    assert not too_small.fits and ["training.float_weights=quantized"] in [o for o, _ in too_small.suggestions]


def test_an_auto_batch_plans_as_the_same_batch_given(config_only_dir, tiny_data_dir, tmp_path):
    # the batch auto picks, planned as if given: same float-copy decision, same CPU streams, same peak
    path = write_config(tmp_path, ROOT / "configs" / "models" / "hf_config" / "Qwen2.5-0.5B-Instruct.json", tiny_data_dir)
    for memory in ("4GB", "8GB", "16GB"):
        auto = make_plan(load_config(path, ["training.batch_size=auto", "training.effective_batch_size=8"]),
                         parse_memory(memory), "test", dequantize_path=True)
        s = auto.settings
        given = make_plan(load_config(path, [f"training.batch_size={s.batch_size}",
                                             f"training.grad_accumulation={s.grad_accumulation}"]),
                          parse_memory(memory), "test", dequantize_path=True)
        assert given.settings == s and given.peak == pytest.approx(auto.peak), memory
