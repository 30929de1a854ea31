"""Every architecture family a Mac user brings, from a Hugging Face folder, against transformers.

For each family of tiny_torch.FAMILIES (a random transformers model with the family's real
config.json quirks): our load gives transformers' logits; LoRA on the default targets
(all-linear) trains on a 4-bit base and lowers the loss; the fused model equals the adapter
model; our PEFT export, loaded by peft on the torch base, gives our adapter model's logits, and
the PEFT adapter converted back loads into ours with the same logits. Relative error is
max |a - b| / max |b| over the logits of a short prompt (float32 on CPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the architecture tests compare with transformers on torch: pip install -e '.[test]'")

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402

from mlx_lora.adapters import adapter_config, load_adapters, save_adapters  # noqa: E402
from mlx_lora.adapters.peft_format import convert_adapter, export_peft  # noqa: E402
from mlx_lora.config import DataConfig, LoraConfig, TrainingConfig  # noqa: E402
from mlx_lora.data import load_datasets  # noqa: E402
from mlx_lora.frozen_matmul import use_fast_frozen_layers  # noqa: E402
from mlx_lora.lora import apply_lora, fuse_lora, lora_layers  # noqa: E402
from mlx_lora.models import load_model  # noqa: E402
from mlx_lora.quantize import quantize_model  # noqa: E402
from mlx_lora.train import train  # noqa: E402
from tiny_torch import FAMILIES, make_family_dir  # noqa: E402

PROMPT = "say hello world what is the capital of France? Paris."
TOLERANCE = 1e-4
# The block-level linear layers all-linear must find, per family.
EXPECTED_TARGETS = {"phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}}
DEFAULT_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = make_family_dir(tmp_path_factory.mktemp(family), family)
        return cache[family]

    return get


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def mlx_logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))[0]


def torch_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


def random_adapter(model, seed: int = 1) -> list[str]:
    """All-linear LoRA with nonzero B (as after training); returns the adapted keys."""
    mx.random.seed(seed)
    keys = apply_lora(model, LoraConfig(rank=4, alpha=12.0))
    for _, layer in lora_layers(model):
        layer.lora_b = 0.2 * mx.random.normal(layer.lora_b.shape)
    mx.eval(model.parameters())
    model.eval()
    return keys


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family_dirs, family):
    folder = family_dirs(family)
    model, tokenizer, info = load_model(str(folder))
    ids = tokenizer.encode(PROMPT)
    assert relative_error(mlx_logits(model, ids), torch_logits(torch_model(folder), ids)) < TOLERANCE
    assert info.hf_config["model_type"] == family


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_training_lowers_the_loss(family_dirs, family, tiny_data_dir, tmp_path):
    model, tokenizer, _ = load_model(str(family_dirs(family)))
    quantize_model(model, "affine", bits=4, group_size=32)
    use_fast_frozen_layers(model)
    mx.random.seed(0)
    keys = apply_lora(model, LoraConfig(rank=8, alpha=16))
    assert {k.rsplit(".", 1)[-1] for k in keys} == EXPECTED_TARGETS.get(family, DEFAULT_TARGETS)
    data, _ = load_datasets(DataConfig(path=str(tiny_data_dir)), tokenizer)
    losses = []

    class Recorder:
        on_start = on_checkpoint = on_interrupt = on_end = staticmethod(lambda *args: None)

        def on_report(self, report):
            losses.append(report.train_loss)

    config = TrainingConfig(iters=12, batch_size=4, learning_rate=5e-3, steps_per_report=1, steps_per_eval=0,
                            save_every=0, grad_checkpoint=family == "phi3")
    train(model, data["train"], data["valid"], config, tmp_path, callbacks=[Recorder()])
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    # every family takes the chunked output head (Gemma 2 with its soft cap applied per chunk)
    assert model.chunked_loss is True


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_model_equals_adapter_model(family_dirs, family):
    model, tokenizer, _ = load_model(str(family_dirs(family)))
    random_adapter(model)
    ids = tokenizer.encode(PROMPT)
    with_adapter = mlx_logits(model, ids)
    assert fuse_lora(model) > 0 and not lora_layers(model)
    assert relative_error(mlx_logits(model, ids), with_adapter) < TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_export_and_import_give_the_same_logits(family_dirs, family, tmp_path):
    from peft import PeftModel

    folder = family_dirs(family)
    model, tokenizer, _ = load_model(str(folder))
    keys = random_adapter(model)
    save_adapters(tmp_path / "mlx", model, adapter_config(LoraConfig(rank=4, alpha=12.0), keys, len(model.layers),
                                                          {"model": str(folder)}))
    ids = tokenizer.encode(PROMPT)
    expected = mlx_logits(model, ids)
    export_peft(tmp_path / "mlx", tmp_path / "peft")
    base = torch_model(folder)
    assert relative_error(torch_logits(base, ids), expected) > 1e-2, "the adapter must change the output"
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    assert relative_error(torch_logits(peft_model, ids), expected) < TOLERANCE

    convert_adapter(tmp_path / "peft", tmp_path / "back", to="mlx")
    reloaded, _, _ = load_model(str(folder))
    load_adapters(reloaded, tmp_path / "back")
    assert relative_error(mlx_logits(reloaded, ids), expected) < TOLERANCE


def test_unknown_target_lists_the_family_names(family_dirs):
    model, _, _ = load_model(str(family_dirs("phi3")))
    with pytest.raises(ValueError, match=r"lora.target_modules: q_proj not found.*down_proj, gate_up_proj, o_proj, "
                                         r"qkv_proj \(or use all-linear\)"):
        apply_lora(model, LoraConfig(target_modules=("q_proj",)))


def test_unknown_architecture_is_one_line(tmp_path):
    import json

    from mlx_lora.models.sources import load_model as load

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    with pytest.raises(ValueError, match=r"model_type 'no_such_arch', which mlx-lm cannot build; upgrade mlx-lm") as err:
        load(str(tmp_path))
    assert "\n" not in str(err.value)


def test_hub_id_without_network_or_cache_names_the_cache(monkeypatch, tmp_path):
    from mlx_lora.models.sources import resolve_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"'nobody/no-such-model' is not in the Hugging Face cache \(.*hub\)") as err:
        resolve_source("nobody/no-such-model")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("what", ["model", "plan"])
def test_hub_id_with_an_unreachable_hub_fails_at_once_naming_the_cache(monkeypatch, tmp_path, what):
    """No network (a name that does not resolve): one line at once, no download attempted (and so
    none of huggingface_hub's five logged retries), for the model and for the planner's config.json."""
    import socket

    import huggingface_hub

    from mlx_lora.memory.shape import read_shape
    from mlx_lora.models.sources import resolve_source

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    def no_download(*args, **kwargs):
        if not kwargs.get("local_files_only"):
            raise AssertionError("a download was attempted")
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    with pytest.raises(FileNotFoundError) as err:
        (resolve_source if what == "model" else read_shape)("nobody/no-such-model")
    message = str(err.value)
    assert "'nobody/no-such-model' is not in the Hugging Face cache" in message
    assert str(tmp_path / "hub") in message and "hub.invalid: Name or service not known" in message
    assert "\n" not in message


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_generation_equals_one_by_one(family_dirs, family):
    """Evaluation generates in padded batches; prompts of different lengths must not change the answers
    (mlx-lm's Gemma 2 mask broadcast fault is fixed by models/compat.py)."""
    from mlx_lm.generate import stream_generate

    from mlx_lora.evaluate import generate_answers

    model, tokenizer, _ = load_model(str(family_dirs(family)))
    random_adapter(model)
    prompts = [tokenizer.encode(p) for p in ("say hello", "say hello world what is the capital", "hi")]
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=5)
    alone = [tokenizer.decode([r.token for r in stream_generate(model, tokenizer, p, max_tokens=5)]) for p in prompts]
    assert batched == alone


@pytest.mark.parametrize("bits, group_size", [(4, 64), (8, 32)])
@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_quantized_folder_keeps_its_layers(family_dirs, family, bits, group_size, tmp_path):
    """An mlx-community style folder (mlx_lm.convert -q): its quantized layers are the frozen base as they
    are, whatever the run's own quantization settings say."""
    import mlx.nn as nn
    from mlx_lm.utils import quantize_model as mlx_lm_quantize, save_config, save_model

    folder = family_dirs(family)
    model, tokenizer, info = load_model(str(folder))
    model, config = mlx_lm_quantize(model, dict(info.hf_config), group_size=group_size, bits=bits)
    out = tmp_path / "mlx-community"
    save_model(out, model)
    save_config(config, out / "config.json")
    tokenizer.save_pretrained(str(out))

    ours, _, _ = load_model(str(out))
    report = quantize_model(ours, "affine", bits=4, group_size=32)  # the run's settings do not re-quantize
    layers = [m for _, m in ours.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert layers and all((m.bits, m.group_size) == (bits, group_size) for m in layers)
    assert report.source_quantized
    ids = tokenizer.encode(PROMPT)
    assert relative_error(mlx_logits(ours, ids), mlx_logits(model, ids)) < 1e-5


def test_gemma3_layer_types_of_transformers_5_set_the_sliding_pattern(tmp_path):
    # transformers 5 spells the layers out (`layer_types`); mlx-lm reads `sliding_window_pattern`, default 6
    import json

    from mlx_lora.models.gguf_export import export_architecture

    pattern = ["sliding_attention", "full_attention"] * 2
    folder = make_family_dir(tmp_path / "alternating", "gemma3_text", overrides={"num_hidden_layers": 4,
                                                                                 "layer_types": pattern})
    config = json.loads((folder / "config.json").read_text())
    assert config["layer_types"] == pattern and "sliding_window_pattern" not in config
    model, tokenizer, info = load_model(str(folder))
    ids = tokenizer.encode(PROMPT)
    assert relative_error(mlx_logits(model, ids), torch_logits(torch_model(folder), ids)) < TOLERANCE
    assert info.hf_config["sliding_window_pattern"] == 2
    with pytest.raises(ValueError, match="pattern of 6 only"):  # llama.cpp would compute it differently
        export_architecture(info.hf_config)
    # layers with no full-attention one: one line, not mlx-lm's IndexError
    folder = make_family_dir(tmp_path / "sliding-only", "gemma3_text", overrides={
        "num_hidden_layers": 2, "layer_types": ["sliding_attention"] * 2})
    with pytest.raises(ValueError, match="config.json: Gemma 3 layer_types .* follow no repeating pattern"):
        load_model(str(folder))
