"""A truncated or corrupt safetensors file, wherever a user's run reads one (model weights, an
adapter in either format, a checkpoint to resume): one line naming the file and the fix, no traceback."""

from __future__ import annotations

import shutil

import mlx.core as mx
import mlx.optimizers as optim
import pytest

from mlx_lora.adapters import adapter_config, save_adapters
from mlx_lora.config import LoraConfig
from mlx_lora.lora import apply_lora, lora_layers
from mlx_lora.models import load_model


def truncate(path, size: int = 300) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:size])


@pytest.fixture(scope="module")
def adapted(tiny_model_dir):
    model, tokenizer, _ = load_model(str(tiny_model_dir))
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    return model


def test_a_damaged_model_weights_file_is_named(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    truncate(folder / "model.safetensors", 5000)
    with pytest.raises(ValueError) as err:
        load_model(str(folder))
    message = str(err.value)
    assert "model.safetensors" in message and "download the model again" in message and "\n" not in message


@pytest.mark.parametrize("to", ["peft", "mlx"])
def test_convert_adapter_names_a_damaged_adapter_file(adapted, tmp_path, capsys, to):
    from mlx_lora.adapters.peft_format import convert_adapter, main

    mlx_dir = tmp_path / "mlx"
    save_adapters(mlx_dir, adapted, adapter_config(LoraConfig(rank=4, alpha=8), ["self_attn.q_proj"], 2))
    source = mlx_dir
    if to == "mlx":
        source = convert_adapter(mlx_dir, tmp_path / "peft", "peft")
    damaged = next(source.glob("*.safetensors"))
    truncate(damaged)
    assert main([str(source), str(tmp_path / "out"), "--to", to]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(damaged) in err
    assert "not a readable safetensors file" in err and "again" in err


def test_resume_from_a_damaged_checkpoint_names_it_and_the_one_before(adapted, tmp_path):
    from mlx_lora import checkpoints
    from mlx_lora.data import BatchPosition

    optimizer = optim.AdamW(learning_rate=1e-4)
    optimizer.init(adapted.trainable_parameters())
    for step in (10, 20):
        checkpoints.save(tmp_path, adapted, optimizer, step, BatchPosition(), 1.0, keep=2)
    newest = checkpoints.latest(tmp_path)
    truncate(newest / "adapters.safetensors", 100)
    with pytest.raises(ValueError) as err:
        checkpoints.load_latest(tmp_path, adapted, optimizer)
    message = str(err.value)
    assert str(newest / "adapters.safetensors") in message and "step_" in message and "to resume from" in message
    shutil.rmtree(newest)  # as the message says: the one before is then resumed
    state = checkpoints.load_latest(tmp_path, adapted, optimizer)
    assert state["step"] == 10 and lora_layers(adapted)
    mx.eval(adapted.parameters())
