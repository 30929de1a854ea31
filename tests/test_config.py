"""Config loading: typed, unknown keys rejected with suggestions, overrides, every shipped YAML loads."""

from pathlib import Path

import pytest

from mlx_lora.config import ConfigError, config_from_dict, describe, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_unknown_keys_get_did_you_mean_and_all_problems_reported_together():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": "m", "data": {"path": "d"}, "lora": {"rnak": 4, "rank": 0},
                          "training": {"iters": "many", "learnig_rate": 1e-3}})
    problems = info.value.problems
    assert "lora.rnak: unknown key; did you mean 'lora.rank'?" in problems
    assert "training.learnig_rate: unknown key; did you mean 'training.learning_rate'?" in problems
    assert any(p.startswith("training.iters: expected an integer") for p in problems)
    assert any(p.startswith("lora.rank: must be a positive integer") for p in problems)
    assert len(problems) == 4


def test_a_value_no_member_of_a_union_takes_names_the_forms_the_field_takes():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": "m", "data": {"path": "d"}, "training": {"cpu_streams": True, "batch_size": [2]}})
    problems = info.value.problems
    assert "training.cpu_streams: must be auto or a positive integer, got True" in problems
    assert "training.batch_size: must be a positive integer or auto, got [2]" in problems
    assert len(problems) == 2


def test_a_section_key_given_at_the_top_level_gets_its_full_path_suggested():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": "m", "data": {"path": "d"}, "grad_checkpoint": True, "rank": 4})
    assert "grad_checkpoint: unknown key; did you mean 'training.grad_checkpoint'?" in info.value.problems
    assert "rank: unknown key; did you mean 'lora.rank'?" in info.value.problems


def test_required_keys_and_choices():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"quantization": {"mode": "int3"}})
    text = str(info.value)
    assert "model: required" in text and "data.path: required" in text
    assert "quantization.mode: 'int3' is not one of none, affine, nf4" in text


def test_overrides_and_yaml_number_forms(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: demo\ndata:\n  path: somewhere\ntraining:\n  learning_rate: 1e-4\n")
    cfg = load_config(path, ["training.iters=7", "lora.target_modules=[q_proj,v_proj]", "output_dir=/tmp/x",
                             "quantization.mode=nf4", "training.grad_clip=null"])
    assert cfg.training.learning_rate == pytest.approx(1e-4)  # YAML reads 1e-4 as a string
    assert cfg.training.iters == 7
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.output_dir == "/tmp/x" and cfg.quantization.mode == "nf4" and cfg.training.grad_clip is None
    assert cfg.lora.scaling == cfg.lora.alpha / cfg.lora.rank


def test_bad_override_and_bad_yaml_name_the_place(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: demo\ndata: {path: d\n")
    with pytest.raises(ConfigError, match=r"c.yaml: invalid YAML:\d+:\d+"):
        load_config(path)
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, ["training.iters"])
    path.write_text("model: demo\ntraining:\n  iters: 5\n  beta 0.1\n  objective: dpo\n")  # a key without its ':'
    with pytest.raises(ConfigError, match=r"c.yaml: invalid YAML:4:3: could not find expected ':'"):
        load_config(path)


# configs/accelerate/ holds accelerate's own config files (`accelerate launch --config_file`), tested in test_cuda_fsdp.
@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "configs").rglob("*.y*ml")
                                        if (ROOT / "configs" / "accelerate") not in p.parents), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model


def test_describe_covers_every_setting():
    keys = {row[0] for row in describe()}
    for key in ("model", "output_dir", "data.path", "data.max_seq_length", "training.iters", "training.batch_size",
                "training.learning_rate", "lora.rank", "lora.alpha", "lora.num_layers", "quantization.mode"):
        assert key in keys


def test_readme_settings_table_is_current():
    from mlx_lora.config import markdown_table

    assert markdown_table() in (ROOT / "README.md").read_text(), "regenerate with: python -m mlx_lora.config"


@pytest.mark.parametrize("limit", [0, -1])
def test_eval_limit_must_be_positive(limit):
    # 0 used to mean "all" and -1 dropped the last example (a Python slice), both silently
    with pytest.raises(ConfigError, match="eval.limit: must be a positive number"):
        config_from_dict({"model": "demo", "data": {"path": "d"}, "eval": {"limit": limit}})


def test_resume_keeps_the_runs_recorded_settings_and_the_command_lines_keys(tmp_path):
    """--resume continues the run as it started (train_config.yaml, `auto` resolved), not as the config
    file reads now; keys given on the command line change it, each difference in one line."""
    import dataclasses

    import yaml

    from mlx_lora.config import config_to_dict, resumed_config

    (tmp_path / "data").mkdir()
    out = tmp_path / "run"
    started = load_config(None, [f"model=m", f"data.path={tmp_path / 'data'}", f"output_dir={out}",
                                 "training.iters=300", "training.batch_size=4", "lora.rank=16"])
    out.mkdir()
    (out / "train_config.yaml").write_text(yaml.safe_dump(config_to_dict(started), sort_keys=False))
    yaml_file = tmp_path / "my.yaml"
    yaml_file.write_text(f"model: m\ndata: {{path: {tmp_path / 'data'}}}\noutput_dir: {out}\n"
                         "training: {iters: 60, batch_size: auto}\n")
    now = load_config(yaml_file)
    cfg, lines = resumed_config(now, [])
    assert cfg == started
    assert "resume: training.iters stays 300 as the run started (train_config.yaml; the config now says 60; " \
           "pass training.iters=... to change it)" in lines
    assert any(line.startswith("resume: lora.rank stays 16") for line in lines)
    assert "resume: training.batch_size stays 4, what 'auto' chose when the run started" in lines
    overrides = ["training.iters=400", "training.learning_rate=1e-4"]
    cfg, lines = resumed_config(load_config(yaml_file, overrides), overrides)
    assert cfg.training.iters == 400 and cfg.training.learning_rate == 1e-4 and cfg.lora.rank == 16
    assert "resume: training.iters 300 -> 400 (from the command line)" in lines
    assert resumed_config(started, []) == (started, [])  # nothing differs: nothing said
    fresh = dataclasses.replace(now, output_dir=str(tmp_path / "elsewhere"))
    assert resumed_config(fresh, []) == (fresh, [])  # no recorded settings: the config as given


def test_a_key_or_section_given_twice_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("model: m\ndata:\n  path: d\ntraining:\n  iters: 100\nlora:\n  rank: 4\ntraining:\n  batch_size: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == ["training: given twice (a mapping (line 5) and a mapping (line 9)); YAML would keep "
                                  "only the last"]
    path.write_text("model: m\ndata: {path: d}\nlora: {rank: 4, rank: 8}\n")
    with pytest.raises(ConfigError, match=r"lora.rank: given twice \(4 \(line 3\) and 8 \(line 3\)\)"):
        load_config(path)


def test_effective_batch_size_with_a_fixed_batch_must_agree_with_the_accumulation():
    base = {"model": "m", "data": {"path": "d"}}
    with pytest.raises(ConfigError) as err:
        config_from_dict({**base, "training": {"batch_size": 4, "effective_batch_size": 12}})
    assert err.value.problems == ["training.effective_batch_size: 12 examples per step, but batch_size 4 x "
                                  "grad_accumulation 1 is 4; set training.grad_accumulation=3, or "
                                  "training.batch_size=auto to derive both"]
    with pytest.raises(ConfigError, match="use a batch_size that divides 10"):
        config_from_dict({**base, "training": {"batch_size": 4, "effective_batch_size": 10}})
    ok = config_from_dict({**base, "training": {"batch_size": 4, "grad_accumulation": 3, "effective_batch_size": 12}})
    assert ok.training.grad_accumulation == 3  # as a run records it after batch_size: auto
    assert config_from_dict({**base, "training": {"batch_size": "auto", "effective_batch_size": 12}})


def test_a_bad_value_given_on_the_command_line_is_said_to_come_from_it(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("model: m\ndata: {path: d}\nlora: {rank: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["training.learning_rate=-1"])
    assert "training.learning_rate (from the command line): must be positive, got -1.0" in err.value.problems
    assert "lora.rank: must be a positive integer, got 0" in err.value.problems  # from the file: as before
    assert str(err.value).startswith(f"{path}: 2 problems")


@pytest.mark.parametrize("objective", ["orpo", "sft"])
def test_dpo_only_loss_type_is_refused_for_other_objectives(objective):
    with pytest.raises(ConfigError, match=rf"training.loss_type: 'ipo' applies only to training.objective: dpo \(this run: {objective}\)"):
        config_from_dict({"model": "m", "data": {"path": "d"}, "training": {"objective": objective, "loss_type": "ipo"}})
    assert config_from_dict({"model": "m", "data": {"path": "d"}, "training": {"objective": "dpo", "loss_type": "ipo"}})


def test_relative_model_and_data_paths_are_found_from_the_configs_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "models" / "mine").mkdir(parents=True)
    (project / "data").mkdir()
    config = project / "configs" / "my.yaml"
    config.write_text("model: ../models/mine\ndata: ../data\n")
    monkeypatch.chdir(tmp_path)  # run from elsewhere: the paths are the config's, as data's always were
    cfg = load_config(config)
    assert cfg.model == str((project / "models" / "mine").resolve()) and cfg.data.path == str((project / "data").resolve())
    config.write_text("model: Qwen/Qwen2.5-0.5B-Instruct\ndata: ../data\n")  # a hub id exists nowhere: kept
    assert load_config(config).model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert load_config(config, ["model=demo"]).model == "demo"


def test_packing_with_a_preference_objective_is_refused_when_the_config_loads(tmp_path):
    # refused before the model and data load (it was refused only when training started)
    with pytest.raises(ConfigError, match=r"data.pack .*packing is for objective sft \(this run: orpo\)"):
        load_config(ROOT / "configs" / "demo_dpo.yaml", ["data.pack=true", "training.objective=orpo"])
