"""MLX <-> PEFT adapters, proved by outputs: the same float base with the same adapter gives the
same logits in MLX and in torch + peft (max relative error 1e-4, float32 on CPU), both ways.

Relative error here is max |a - b| / max |b| over all logits of a short prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the PEFT interop tests need the cuda extra: pip install -e '.[cuda]'")
pytest.importorskip("peft", reason="the PEFT interop tests need the cuda extra: pip install -e '.[cuda]'")

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402

from mlx_lora.adapters import adapter_config, load_adapters, save_adapters  # noqa: E402
from mlx_lora.config import HF_TARGET_MODULES, LoraConfig  # noqa: E402
from mlx_lora.lora import apply_lora, lora_layers  # noqa: E402
from mlx_lora.models import load_model  # noqa: E402
from mlx_lora.adapters.peft_format import convert_adapter, export_peft, main, mlx_key_to_peft, peft_key_to_mlx  # noqa: E402
from tiny_torch import make_torch_model_dir  # noqa: E402

TOLERANCE = 1e-4
PROMPT = "hello world what is the capital of France? Paris."


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return make_torch_model_dir(tmp_path_factory.mktemp("torch-tiny"))


@pytest.fixture(scope="module")
def prompt_ids(base_dir) -> list[int]:
    _, tokenizer, _ = load_model(str(base_dir))
    return list(tokenizer.encode(PROMPT))


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def mlx_logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))[0]


def torch_base(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


def peft_logits(base_dir, peft_dir, ids) -> np.ndarray:
    from peft import PeftModel

    model = PeftModel.from_pretrained(torch_base(base_dir), str(peft_dir)).eval()
    return torch_logits(model, ids)


def make_mlx_adapter(base_dir, folder, num_layers=-1, rank=4, alpha=12.0, seed=1):
    """An MLX adapter with random nonzero A and B (as after training); returns the model using it."""
    model, _, _ = load_model(str(base_dir))
    mx.random.seed(seed)
    lora = LoraConfig(rank=rank, alpha=alpha, dropout=0.1, target_modules=HF_TARGET_MODULES, num_layers=num_layers)
    keys = apply_lora(model, lora)
    for _, layer in lora_layers(model):
        layer.lora_b = 0.2 * mx.random.normal(layer.lora_b.shape)
    mx.eval(model.parameters())
    model.eval()  # new LoRA layers start in training mode (dropout on)
    save_adapters(folder, model, adapter_config(lora, keys, len(model.layers), {"model": str(base_dir)}))
    return model


def test_key_tables_round_trip():
    key = "model.layers.3.self_attn.q_proj.lora_a"
    assert mlx_key_to_peft(key) == "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
    assert peft_key_to_mlx(mlx_key_to_peft(key)) == key
    assert peft_key_to_mlx("base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight") == "model.layers.0.mlp.up_proj.lora_b"
    with pytest.raises(ValueError, match="DoRA"):
        peft_key_to_mlx("base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector")


@pytest.mark.parametrize("num_layers", [-1, 1])
def test_mlx_adapter_exported_to_peft_gives_the_same_logits(base_dir, prompt_ids, tmp_path, num_layers):
    model = make_mlx_adapter(base_dir, tmp_path / "mlx", num_layers=num_layers)
    export_peft(tmp_path / "mlx", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["lora_alpha"] / config["r"] == pytest.approx(3.0)
    assert config["layers_to_transform"] == (None if num_layers == -1 else [1])

    expected = mlx_logits(model, prompt_ids)
    got = peft_logits(base_dir, tmp_path / "peft", prompt_ids)
    base = torch_logits(torch_base(base_dir), prompt_ids)
    assert relative_error(base, expected) > 1e-2, "the adapter must change the output, or the test proves nothing"
    assert relative_error(got, expected) < TOLERANCE


def test_a_missed_transpose_on_a_square_matrix_loads_but_is_caught(base_dir, prompt_ids, tmp_path):
    """Swap the roles of A and B on the square q_proj (delta transposed): PEFT loads it, the logits differ."""
    from safetensors.numpy import load_file, save_file

    model = make_mlx_adapter(base_dir, tmp_path / "mlx")
    export_peft(tmp_path / "mlx", tmp_path / "peft")
    weights = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    mlx_weights = {k: np.array(v) for k, v in mx.load(str(tmp_path / "mlx" / "adapters.safetensors")).items()}
    for layer in (0, 1):
        prefix = f"model.layers.{layer}.self_attn.q_proj"
        a, b = mlx_weights[f"{prefix}.lora_a"], mlx_weights[f"{prefix}.lora_b"]  # (64, r), (r, 64)
        weights[f"base_model.model.{prefix}.lora_A.weight"] = np.ascontiguousarray(b)  # (r, 64): fits (r, in)
        weights[f"base_model.model.{prefix}.lora_B.weight"] = np.ascontiguousarray(a)  # (64, r): fits (out, r)
    save_file(weights, str(tmp_path / "peft" / "adapter_model.safetensors"))
    got = peft_logits(base_dir, tmp_path / "peft", prompt_ids)
    assert relative_error(got, mlx_logits(model, prompt_ids)) > 100 * TOLERANCE


def make_peft_adapter(base_dir, folder, **options) -> np.ndarray:
    """Save a PEFT LoRA with random A and B; returns its logits on the prompt ids (set by caller)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(2)
    config = PeftLoraConfig(r=4, lora_alpha=6, target_modules=list(HF_TARGET_MODULES), init_lora_weights=False,
                            task_type="CAUSAL_LM", **options)
    model = get_peft_model(torch_base(base_dir), config).eval()
    model.save_pretrained(str(folder))
    return model


@pytest.mark.parametrize("options", [
    {},
    {"use_rslora": True, "layers_to_transform": [1], "alpha_pattern": {"v_proj": 10}},
], ids=["plain", "rslora-last-layer-alpha-pattern"])
def test_peft_adapter_converted_to_mlx_gives_the_same_logits(base_dir, prompt_ids, tmp_path, options):
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

    peft_model = make_peft_adapter(base_dir, tmp_path / "peft", **options)
    expected = torch_logits(peft_model, prompt_ids)
    assert relative_error(torch_logits(torch_base(base_dir), prompt_ids), expected) > 1e-2

    # Directly: our loader reads PEFT folders.
    model, _, _ = load_model(str(base_dir))
    load_adapters(model, tmp_path / "peft")
    assert relative_error(mlx_logits(model, prompt_ids), expected) < TOLERANCE

    # Converted to the MLX format, which mlx-lm itself loads.
    assert main([str(tmp_path / "peft"), str(tmp_path / "mlx"), "--to", "mlx"]) == 0
    model, _, _ = load_model(str(base_dir))
    mlx_lm_load_adapters(model, str(tmp_path / "mlx"))
    assert relative_error(mlx_logits(model, prompt_ids), expected) < TOLERANCE


def test_convert_adapter_cli_round_trip_is_exact(base_dir, tmp_path):
    make_mlx_adapter(base_dir, tmp_path / "mlx", num_layers=1)
    assert main([str(tmp_path / "mlx"), str(tmp_path / "peft"), "--to", "peft"]) == 0
    assert main([str(tmp_path / "peft"), str(tmp_path / "back"), "--to", "mlx"]) == 0
    before = mx.load(str(tmp_path / "mlx" / "adapters.safetensors"))
    after = mx.load(str(tmp_path / "back" / "adapters.safetensors"))
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].shape == after[key].shape and mx.array_equal(before[key], after[key]).item(), key
    old = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    new = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert new["lora_parameters"]["rank"] == old["lora_parameters"]["rank"]
    assert new["lora_parameters"]["scale"] == pytest.approx(old["lora_parameters"]["scale"])
    assert new["num_layers"] == old["num_layers"] == 1
    assert sorted(new["lora_parameters"]["keys"]) == sorted(old["lora_parameters"]["keys"])


def test_mlx_lm_adapter_with_scale_only_converts_with_the_right_alpha(base_dir, prompt_ids, tmp_path):
    """An adapter made by mlx-lm's own layers, with mlx_lm.lora's config (scale, no alpha, no keys)."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _, _ = load_model(str(base_dir))
    model.freeze()
    mx.random.seed(3)
    params = {"rank": 8, "dropout": 0.0, "scale": 20.0}  # mlx_lm.lora's defaults
    linear_to_lora_layers(model, 2, params)
    for name, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = 0.01 * mx.random.normal(module.lora_b.shape)
    folder = tmp_path / "mlx_lm"
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": params, "model": str(base_dir)}))

    assert main([str(folder), str(tmp_path / "peft"), "--to", "peft"]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 160)
    got = peft_logits(base_dir, tmp_path / "peft", prompt_ids)
    assert relative_error(got, mlx_logits(model, prompt_ids)) < TOLERANCE


def test_non_lora_peft_adapters_are_refused_by_name(tmp_path):
    for name, extra, message in (
        ("ia3", {"peft_type": "IA3"}, "'IA3' is not supported"),
        ("dora", {"peft_type": "LORA", "r": 4, "use_dora": True}, "DoRA"),
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(extra))
        (folder / "adapter_model.safetensors").write_bytes(b"")
        with pytest.raises(ValueError, match=message):
            convert_adapter(folder, tmp_path / f"{name}-out", to="mlx")
        assert main([str(folder), str(tmp_path / f"{name}-cli"), "--to", "mlx"]) == 1


def test_adapter_for_another_base_lists_each_mismatch(base_dir, tmp_path):
    make_peft_adapter(base_dir, tmp_path / "peft", layers_to_transform=[1])
    other = make_torch_model_dir(tmp_path / "narrow", hidden=32)
    model, _, _ = load_model(str(other))
    with pytest.raises(ValueError) as err:
        load_adapters(model, tmp_path / "peft")
    message = str(err.value)
    assert "model.layers.1.self_attn.q_proj.lora_a: adapter shape (64, 4) != model shape (32, 4)" in message
    assert "model.layers.1.mlp.down_proj.lora_b" in message


def test_adapter_targeting_missing_modules_is_refused(base_dir, tmp_path):
    make_mlx_adapter(base_dir, tmp_path / "mlx")
    export_peft(tmp_path / "mlx", tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_model.safetensors"
    from safetensors.numpy import load_file, save_file

    weights = {k.replace("q_proj", "c_attn"): v for k, v in load_file(str(config_path)).items()}
    save_file(weights, str(config_path))
    model, _, _ = load_model(str(base_dir))
    with pytest.raises(ValueError, match="c_attn not found in this model"):
        load_adapters(model, tmp_path / "peft")
