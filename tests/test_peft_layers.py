"""PEFT adapters of any layer selection (layers_to_transform, layers_pattern, rank_pattern,
alpha_pattern, use_rslora, regex target_modules) give the same logits as peft on torch through
our loader (eval, serve), fuse, mlx-lm's own loader of the converted adapter, and back to PEFT.

Float32 on CPU; relative error max|a - b| / max|b| over the logits of a short prompt under 1e-4.
One input is the shared case `tests/cases/peft_first_layers/adapter_config.json` (blocks 0 and 1
of a 4-block model).
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

from mlx_lora.adapters import load_adapters  # noqa: E402
from mlx_lora.adapters.peft_format import main  # noqa: E402
from mlx_lora.lora import fuse_lora, lora_layers  # noqa: E402
from mlx_lora.models import load_model  # noqa: E402
from mlx_lora.serve.multi_lora import RowAdapters, install_adapter, read_checked_adapter  # noqa: E402
from test_peft_interop import PROMPT, TOLERANCE, mlx_logits, relative_error, torch_base, torch_logits  # noqa: E402
from tiny_torch import make_torch_model_dir  # noqa: E402

CASE = Path(__file__).parent / "cases" / "peft_first_layers" / "adapter_config.json"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return make_torch_model_dir(tmp_path_factory.mktemp("torch-4-blocks"), layers=4)


@pytest.fixture(scope="module")
def prompt_ids(base_dir) -> list[int]:
    _, tokenizer, _ = load_model(str(base_dir))
    return list(tokenizer.encode(PROMPT))


def save_peft(base_dir, folder, seed=2, **options):
    """A PEFT LoRA with random A and B on the 4-block model; returns the live peft model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(torch_base(base_dir), LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **options))
    model.eval().save_pretrained(str(folder))
    return model


def adapted_blocks(peft_model) -> list[int]:
    return sorted({int(n.split(".layers.")[1].split(".")[0]) for n, _ in peft_model.named_parameters() if "lora_A" in n})


def check_everywhere(base_dir, prompt_ids, peft_dir, mlx_dir, expected, tmp_path):
    """Our loader on both folders, fuse, and mlx-lm's loader on the MLX one all give `expected`."""
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

    for folder in (peft_dir, mlx_dir):
        model, _, _ = load_model(str(base_dir))
        load_adapters(model, folder)  # what eval, fuse and serve call
        assert relative_error(mlx_logits(model, prompt_ids), expected) < TOLERANCE, folder
    assert fuse_lora(model) > 0
    assert relative_error(mlx_logits(model, prompt_ids), expected) < TOLERANCE
    theirs, _, _ = load_model(str(base_dir))
    mlx_lm_load_adapters(theirs, str(mlx_dir))
    assert relative_error(mlx_logits(theirs, prompt_ids), expected) < TOLERANCE
    # The server's adapter bank, both folders side by side on one base.
    served, _, _ = load_model(str(base_dir))
    rows = RowAdapters()
    slots = {"peft": 1, "mlx": 2}
    for name, folder in (("peft", peft_dir), ("mlx", mlx_dir)):
        install_adapter(served, slots[name], *read_checked_adapter(served, folder), rows)
    for name in ("peft", "mlx"):
        rows.set([slots[name]])
        assert relative_error(mlx_logits(served, prompt_ids), expected) < TOLERANCE, name


def check_back_to_peft(base_dir, prompt_ids, peft_dir, mlx_dir, back_dir, expected):
    """MLX -> PEFT gives the original config and tensors, and peft's logits."""
    from peft import PeftModel

    assert main([str(mlx_dir), str(back_dir), "--to", "peft"]) == 0
    assert json.loads((back_dir / "adapter_config.json").read_text()) == json.loads((peft_dir / "adapter_config.json").read_text())
    before = mx.load(str(peft_dir / "adapter_model.safetensors"))
    after = mx.load(str(back_dir / "adapter_model.safetensors"))
    assert sorted(before) == sorted(after)
    for key in before:
        np.testing.assert_allclose(np.array(after[key]), np.array(before[key]), rtol=1e-6, atol=1e-7, err_msg=key)
    model = PeftModel.from_pretrained(torch_base(base_dir), str(back_dir)).eval()
    assert relative_error(torch_logits(model, prompt_ids), expected) < TOLERANCE


def test_shared_case_first_two_blocks(base_dir, prompt_ids, tmp_path):
    case = json.loads(CASE.read_text())
    peft_dir = tmp_path / "peft"
    options = {k: case[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "layers_to_transform", "bias")}
    peft_model = save_peft(base_dir, peft_dir, **options)
    assert adapted_blocks(peft_model) == [0, 1]
    expected = torch_logits(peft_model, prompt_ids)
    assert relative_error(torch_logits(torch_base(base_dir), prompt_ids), expected) > 1e-2
    # The user's config as given: its base model is a name, not a folder, so the block count is unknown.
    (peft_dir / "adapter_config.json").write_text(CASE.read_text())
    code = main([str(peft_dir), str(tmp_path / "refused"), "--to", "mlx"])
    assert code == 1 and not (tmp_path / "refused" / "adapters.safetensors").exists()
    assert main([str(peft_dir), str(tmp_path / "mlx"), "--to", "mlx", "--num-blocks", "4"]) == 0
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    # mlx-lm adapts the last num_layers blocks: all four, with zero adapters on blocks 2 and 3.
    assert config["num_layers"] == 4 and config["lora_parameters"]["rank"] == 4
    assert config["lora_parameters"]["scale"] == 2.0
    weights = mx.load(str(tmp_path / "mlx" / "adapters.safetensors"))
    zero = [k for k, v in weights.items() if not mx.any(v).item()]
    assert sorted(zero) == sorted(f"model.layers.{b}.self_attn.{m}_proj.lora_{p}" for b in (2, 3) for m in "qv" for p in "ab")
    check_everywhere(base_dir, prompt_ids, peft_dir, tmp_path / "mlx", expected, tmp_path)
    check_back_to_peft(base_dir, prompt_ids, peft_dir, tmp_path / "mlx", tmp_path / "back", expected)


def test_refusal_says_why(base_dir, tmp_path, capsys):
    save_peft(base_dir, tmp_path / "peft", r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[0])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/some-model"
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    assert main([str(tmp_path / "peft"), str(tmp_path / "mlx"), "--to", "mlx"]) == 1
    err = capsys.readouterr().err
    assert "adapts blocks [0] only, and mlx-lm's format counts adapted blocks from the model's last block" in err
    assert "pass --num-blocks N" in err
    assert main([str(tmp_path / "peft"), str(tmp_path / "mlx"), "--to", "mlx", "--num-blocks", "0"]) == 1
    assert "adapts block 0, but the model has 0 blocks" in capsys.readouterr().err


@pytest.mark.parametrize("options", [
    # A regex target_modules picking two blocks and three modules, per-module ranks and alphas, rsLoRA.
    {"r": 4, "lora_alpha": 8, "use_rslora": True,
     "target_modules": r".*\.layers\.(1|3)\.(self_attn\.(q|k)_proj|mlp\.down_proj)",
     "rank_pattern": {"k_proj": 2, "down_proj": 6}, "alpha_pattern": {"down_proj": 3}},
    # layers_to_transform with layers_pattern, a middle block only, a rank_pattern by full path.
    {"r": 2, "lora_alpha": 5, "target_modules": ["q_proj", "v_proj", "up_proj"], "layers_to_transform": [2],
     "layers_pattern": "layers", "rank_pattern": {"model.layers.2.mlp.up_proj": 8}},
], ids=["regex-rank-alpha-rslora", "middle-block-layers-pattern"])
def test_any_layer_selection(base_dir, prompt_ids, tmp_path, options):
    peft_dir = tmp_path / "peft"
    peft_model = save_peft(base_dir, peft_dir, **options)
    expected = torch_logits(peft_model, prompt_ids)
    assert relative_error(torch_logits(torch_base(base_dir), prompt_ids), expected) > 1e-3
    # base_model_name_or_path is the local model folder here, so the block count comes from it.
    assert main([str(peft_dir), str(tmp_path / "mlx"), "--to", "mlx"]) == 0
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    first = min(adapted_blocks(peft_model))
    assert config["num_layers"] == 4 - first
    assert config["lora_parameters"]["rank"] == max([options["r"], *options["rank_pattern"].values()])
    model, _, _ = load_model(str(base_dir))
    load_adapters(model, tmp_path / "mlx")
    assert len(lora_layers(model)) == (4 - first) * len(config["lora_parameters"]["keys"])
    check_everywhere(base_dir, prompt_ids, peft_dir, tmp_path / "mlx", expected, tmp_path)
    check_back_to_peft(base_dir, prompt_ids, peft_dir, tmp_path / "mlx", tmp_path / "back", expected)
