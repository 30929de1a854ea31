"""End to end through the command line on a tiny model: the documented files, mlx-lm compatibility,
and one-line errors (no traceback) for user mistakes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
METRIC_KEYS = {"step", "train_loss", "learning_rate", "tokens", "tokens_per_second", "peak_memory_gb", "elapsed_s"}


def mlx_lora(*args, cwd=ROOT, env_extra=None):
    env = dict(os.environ, MLX_LORA_NO_BLAS_PRELOAD="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "mlx_lora", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=600)


def write_config(tmp_path, model_dir, data_dir, **sections):
    config = {"model": str(model_dir), "output_dir": str(tmp_path / "run"), "data": {"path": str(data_dir), "max_seq_length": 64},
              "lora": {"rank": 4, "alpha": 8}, "quantization": {"mode": "affine", "group_size": 32},
              "training": {"iters": 6, "batch_size": 4, "learning_rate": 5e-3, "steps_per_report": 2,
                           "steps_per_eval": 3, "val_batches": 1, "save_every": 3},
              "eval": {"max_new_tokens": 4}}
    for key, value in sections.items():
        config.setdefault(key, {}).update(value) if isinstance(value, dict) else config.__setitem__(key, value)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cli")
    config = write_config(tmp_path, tiny_model_dir, tiny_data_dir)
    started = str(__import__("time").time() - 5)  # as train_by_mlx.sh exports it: 5 s of set-up before the CLI
    result = mlx_lora("train", config, "training.iters=8", env_extra={"MLX_LORA_STARTED_AT": started})
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "run", result


def test_train_writes_the_documented_output_folder(trained_run):
    out, result = trained_run
    names = {p.name for p in out.iterdir()}
    expected = {"adapters.safetensors", "adapter_config.json", "train_config.yaml", "metrics.jsonl", "loss.png",
                "checkpoints", "eval.json", "run_summary.json", "data_fingerprint.json"}
    assert expected <= names, f"missing {expected - names}"
    assert names - expected <= {"peft"}, f"unexpected files {names - expected}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4, 6, 8]  # every 2 steps, plus validation at 3, 6 and the end
    assert all(METRIC_KEYS <= r.keys() for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6, 8]
    assert yaml.safe_load((out / "train_config.yaml").read_text())["training"]["iters"] == 8
    evaluation = json.loads((out / "eval.json").read_text())
    for name in ("base", "tuned"):
        assert {"exact_match", "loss", "n", "perplexity"} <= evaluation[name].keys()
    assert "held-out test set:" in result.stdout and "exact match" in result.stdout
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000006", "step_000008"]
    summary = json.loads((out / "run_summary.json").read_text())
    assert list(summary["phases_s"]) == ["set-up", "load", "train", "eval"]
    assert summary["phases_s"]["set-up"] >= 5
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line.startswith("time: set-up ") and ", eval " in last_line and "(total " in last_line
    assert [row["step"] for row in summary["val_history"]] == [3, 6, 8]
    assert isinstance(summary["val_loss_still_falling"], bool) and summary["stopped_early"] is False


def test_adapters_load_in_mlx_lm_with_identical_outputs(trained_run, tiny_model_dir):
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters
    from mlx_lm.utils import load, load_model as mlx_lm_load_model

    from mlx_lora.adapters import load_adapters
    from mlx_lora.frozen_matmul import use_fast_frozen_layers
    from mlx_lora.models import load_model
    from mlx_lora.quantize import quantize_model

    out, _ = trained_run
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["scale"] == 2.0 and config["alpha"] == 8
    load(str(tiny_model_dir), adapter_path=str(out))  # what `mlx_lm.generate --adapter-path` does
    # Trained on the 4-bit base: put both on that base, then compare outputs.
    theirs, _ = mlx_lm_load_model(Path(tiny_model_dir))
    quantize_model(theirs, "affine", bits=4, group_size=32)
    mlx_lm_load_adapters(theirs, str(out))
    ours, _, _ = load_model(str(tiny_model_dir))
    quantize_model(ours, "affine", bits=4, group_size=32)
    use_fast_frozen_layers(ours)
    load_adapters(ours, out)
    tokens = mx.array([[5, 9, 13, 200, 7, 3]])
    np.testing.assert_allclose(np.array(ours(tokens)), np.array(theirs(tokens)), rtol=1e-4, atol=1e-4)
    b = np.array(ours.model.layers[1].self_attn.q_proj.lora_b)
    assert np.abs(b).max() > 0  # trained: the comparison is not between two base models


def test_eval_command_scores_the_run_as_training_did(trained_run):
    out, _ = trained_run
    before = json.loads((out / "eval.json").read_text())
    result = mlx_lora("eval", out / "train_config.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    after = json.loads((out / "eval.json").read_text())
    for name in ("base", "tuned"):  # same quantized base, same adapters: the same scores
        assert after[name]["loss"] == pytest.approx(before[name]["loss"], rel=1e-4)
        assert after[name]["exact_match"] == before[name]["exact_match"]


def test_eval_command_keeps_the_run_summary_in_step(trained_run, tmp_path):
    import shutil

    out, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints"))
    result = mlx_lora("eval", out / "train_config.yaml", "eval.limit=3", "--adapter", copy)
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads((copy / "eval.json").read_text())
    summary = json.loads((copy / "run_summary.json").read_text())
    assert scores["tuned"]["n"] == 3 and summary["eval"]["tuned"]["n"] == 3
    assert summary["eval"]["tuned"]["loss"] == scores["tuned"]["loss"]


def test_eval_on_other_data_than_the_run_trained_on_warns_and_keeps_the_runs_scores(trained_run, tmp_path,
                                                                                      tiny_data_dir):
    import shutil

    out, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints"))
    other = tmp_path / "other-data"
    shutil.copytree(tiny_data_dir, other)
    kept = {name: (copy / name).read_bytes() for name in ("eval.json", "run_summary.json")}
    result = mlx_lora("eval", out / "train_config.yaml", f"data.path={other}", "eval.limit=2", "--adapter", copy)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "were trained otherwise (data.path:" in result.stderr and "the run's eval.json is kept" in result.stderr
    assert {name: (copy / name).read_bytes() for name in kept} == kept
    assert json.loads((copy / "eval_train_config.json").read_text())["tuned"]["n"] == 2
    fused = mlx_lora("fuse", out / "train_config.yaml", f"data.path={other}", "--adapter", copy, "--out",
                     tmp_path / "fused", "--check-limit", "2")
    assert fused.returncode == 0 and "were trained otherwise (data.path:" in fused.stderr, fused.stderr[-2000:]


def test_resume_of_a_finished_run_says_so_and_keeps_its_files(trained_run, tmp_path):
    import shutil

    out, _ = trained_run
    copy = tmp_path / "finished"
    shutil.copytree(out, copy)
    kept = {name: (copy / name).read_bytes() for name in ("run_summary.json", "metrics.jsonl", "adapters.safetensors")}
    result = mlx_lora("train", copy / "train_config.yaml", f"output_dir={copy}", "--resume")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "already reached its 8 steps; nothing to resume" in result.stderr and "training.iters=N" in result.stderr
    assert {name: (copy / name).read_bytes() for name in kept} == kept


def test_a_run_stopped_early_leaves_adapters_that_eval_fuse_and_serve_take(tiny_model_dir, tiny_data_dir, tmp_path):
    # stopped by the memory guard at step 1 (Ctrl-C goes the same way): a checkpoint, and the adapters
    # as of that checkpoint where a finished run's go, so the user can try what they have so far
    config = write_config(tmp_path, tiny_model_dir, tiny_data_dir)
    stopped = mlx_lora("train", config, "training.memory_limit=1MB", "eval.enabled=false")
    assert stopped.returncode == 1 and "over the memory limit" in stopped.stderr, stopped.stderr[-2000:]
    out = tmp_path / "run"
    assert (out / "adapters.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert "adapters as of the last checkpoint written to" in stopped.stderr
    checkpoint = out / "checkpoints" / "step_000001"
    for adapter in (out, checkpoint):  # the run folder, or one of its checkpoints (the run's config is read)
        scored = mlx_lora("eval", config, "eval.limit=2", "--adapter", adapter)
        assert scored.returncode == 0 and "Traceback" not in scored.stderr, scored.stderr[-2000:]
    resumed = mlx_lora("train", config, "eval.enabled=false", "training.memory_limit=none", "--resume")  # it carries on
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 6


def test_resume_says_when_the_training_data_changed_since_the_run_started(tiny_model_dir, tiny_data_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    config = write_config(tmp_path, tiny_model_dir, data, training={"iters": 4}, eval={"enabled": False})
    stopped = mlx_lora("train", config, "training.memory_limit=1MB")
    assert stopped.returncode == 1 and (tmp_path / "run" / "data_fingerprint.json").is_file(), stopped.stderr[-2000:]
    same = mlx_lora("train", config, "training.memory_limit=1MB", "--resume")  # nothing changed: no word of it
    assert "changed since the run started" not in same.stderr + same.stdout
    rows = (data / "train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(rows[: len(rows) // 2]) + "\n")  # the user cut the data
    resumed = mlx_lora("train", config, "training.memory_limit=none", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "warning: --resume: train.jsonl in" in resumed.stdout + resumed.stderr
    assert "changed since the run started" in resumed.stdout + resumed.stderr


def test_resume_continues_to_the_requested_steps(trained_run, tmp_path):
    out, _ = trained_run
    config = out / "train_config.yaml"
    result = mlx_lora("train", config, "training.iters=10", "eval.enabled=false", "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 10 and [r["step"] for r in rows][:5] == [2, 3, 4, 6, 8]


@pytest.mark.parametrize("override, message", [
    ("lora.rank=0", "lora.rank (from the command line): must be a positive integer, got 0"),
    ("lora.rnak=4", "lora.rnak (from the command line): unknown key; did you mean 'lora.rank'?"),
    ("traning.iters=3", "traning (from the command line): unknown key; did you mean 'training'?"),
    ("lora.target_modules=[q_proj,qkv_proj]", "lora.target_modules: qkv_proj not found in this model"),
    ("model=/nonexistent/model", "neither an existing path nor a hub id"),
    ("data.path=/nonexistent", "data.path: /nonexistent is not a folder"),
])
def test_user_mistakes_give_one_line_errors(tiny_model_dir, tiny_data_dir, tmp_path, override, message):
    config = write_config(tmp_path, tiny_model_dir, tiny_data_dir)
    result = mlx_lora("train", config, override)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_model_folder_that_is_not_a_model(tmp_path, tiny_data_dir):
    (tmp_path / "empty").mkdir()
    config = write_config(tmp_path, tmp_path / "empty", tiny_data_dir)
    result = mlx_lora("train", config)
    assert result.returncode == 1 and "is not a model folder (no config.json)" in result.stderr


def test_training_and_eval_need_no_torch(tiny_model_dir, tiny_data_dir, tmp_path):
    """The main install has no PyTorch (only the test and cuda extras do): nothing on the MLX path may need it."""
    blocker = tmp_path / "no_torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None  # import torch fails\n")
    config = write_config(tmp_path, tiny_model_dir, tiny_data_dir)
    pythonpath = os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = mlx_lora("train", config, "training.iters=2", "training.save_every=0", env_extra={"PYTHONPATH": pythonpath})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "adapters.safetensors").is_file() and (tmp_path / "run" / "eval.json").is_file()
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=pythonpath))
    assert probe.returncode != 0  # the blocker works, so the run above really had no torch


def test_unsupported_models_give_one_line_errors(tmp_path, tiny_data_dir):
    """An architecture mlx-lm lacks (folder) and one the GGUF reader lacks: one line each, no traceback."""
    import gguf

    folder = tmp_path / "rwkv"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    writer = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for model, message in ((folder, "model_type 'no_such_arch', which mlx-lm cannot build"),
                           (tmp_path / "falcon.gguf", "general.architecture is 'falcon', which mlx-lora cannot load "
                                                      "from GGUF (supported: llama, mistral, qwen2, qwen3, gemma2, "
                                                      "gemma3, phi3); use the model's Hugging Face folder")):
        config = write_config(tmp_path, model, tiny_data_dir)
        result = mlx_lora("train", config)
        assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3


def test_an_adapter_on_another_base_than_it_was_trained_on_is_warned_about(trained_run, tiny_model_dir, tmp_path, capsys):
    import shutil

    from mlx_lora.adapters import load_adapters
    from mlx_lora.models import load_model

    out, _ = trained_run
    recorded = json.loads((out / "adapter_config.json").read_text())["base_model"]
    assert recorded["model_type"] == "llama" and recorded["num_hidden_layers"] == 2 and recorded["hidden_size"] > 0
    model, _, _ = load_model(str(tiny_model_dir))
    load_adapters(model, out)
    assert "warning" not in capsys.readouterr().err  # its own base: nothing to say
    other = tmp_path / "adapter"
    shutil.copytree(out, other, ignore=shutil.ignore_patterns("checkpoints", "fused"))
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model"] = {**recorded, "model_type": "qwen2", "num_hidden_layers": 3}
    (other / "adapter_config.json").write_text(json.dumps(config))
    model, _, _ = load_model(str(tiny_model_dir))
    load_adapters(model, other)  # the shapes fit: only the recorded base tells
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {other} was trained on ") and "model_type 'qwen2' (here 'llama')" in err
    assert "num_hidden_layers 3 (here 2)" in err and err.count("\n") == 1
    from mlx_lora.serve.multi_lora import read_checked_adapter

    read_checked_adapter(load_model(str(tiny_model_dir))[0], other)  # serve (at start and POST /v1/adapters)
    assert capsys.readouterr().err.startswith(f"warning: {other} was trained on ")


def test_resume_with_several_ranks_accepts_what_auto_chose_and_refuses_a_changed_file(
        tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    import dataclasses

    from mlx_lora import cli
    from mlx_lora.config import config_to_dict, load_config

    config = write_config(tmp_path, tiny_model_dir, tiny_data_dir)
    started = load_config(config)
    started = dataclasses.replace(started, training=dataclasses.replace(started.training, float_weights="float"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_config.yaml").write_text(yaml.safe_dump(config_to_dict(started)))
    launched = []
    monkeypatch.setattr(cli, "launch_ranks", lambda cfg, items, args: launched.append(items) or 0)
    args = cli.build_parser().parse_args(["train", str(config), "-n", "2", "--resume"])
    assert cli.cmd_train(args) == 0 and launched == [[str(config)]]  # 'auto' -> 'float' is the run's own choice
    args = cli.build_parser().parse_args(["train", str(config), "training.iters=9", "-n", "2", "--resume"])
    assert cli.cmd_train(args) == 0  # a key given on the command line reaches every rank
    config.write_text(config.read_text().replace("iters: 6", "iters: 12"))
    with pytest.raises(ValueError, match=r"--resume with several ranks: .*training.iters stays 6"):
        cli.cmd_train(cli.build_parser().parse_args(["train", str(config), "-n", "2", "--resume"]))


def test_plan_fits_the_run_into_its_memory_limit(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    from mlx_lora import cli

    config = write_config(tmp_path, tiny_model_dir, tiny_data_dir)
    # does not fit: its own exit status, so `mlx-lora plan my.yaml && ./train_by_mlx.sh my.yaml` stops there
    assert cli.cmd_plan(cli.build_parser().parse_args(["plan", str(config), "training.memory_limit=4MB"])) == 3
    table = capsys.readouterr().out
    assert "does NOT fit in" in table and "(training.memory_limit 4MB)" in table
    assert cli.cmd_plan(cli.build_parser().parse_args(["plan", str(config)])) == 0
    assert "training.memory_limit" not in capsys.readouterr().out  # auto: this machine's memory
