"""GGUF files of every architecture family, against transformers.

A tiny random transformers model of each family (tiny_torch.FAMILIES) is written as GGUF the way
llama.cpp's converter writes it (our exporter: TensorNameMap names, llama's Q/K permutation,
Gemma's norms +1, the family's metadata), then:
- as F32, our load equals the transformers model it came from (the exporter and the loader undo
  each other exactly; a wrong permutation or norm offset shows);
- as Q8_0, our load (native 8-bit blocks) equals `AutoModelForCausalLM.from_pretrained(folder,
  gguf_file=...)`, transformers' own GGUF reader, on the same file (< 1e-3 relative).
Qwen3 here uses head_dim 128: transformers' GGUF reader ignores `key_length` for it and assumes 128.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the GGUF architecture tests compare with transformers: pip install -e '.[test]'")

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

import gguf_blocks  # noqa: E402
from mlx_lora.models import load_model  # noqa: E402
from mlx_lora.models.gguf import load_gguf  # noqa: E402
from mlx_lora.models.gguf_export import export_gguf  # noqa: E402
from tiny_torch import FAMILIES, make_family_dir  # noqa: E402

PROMPT = "say hello world what is the capital of France? Paris."
# GGUF architecture each family is written as (Mistral files say llama)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
             "gemma3_text": "gemma3", "phi3": "phi3"}


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


def write_gguf(folder: Path, kind: str) -> tuple[Path, list[int]]:
    model, tokenizer, info = load_model(str(folder))

    def encode(name, array):
        if kind == "F32":
            return array, T.F32
        return gguf_blocks.quantize(array, kind), T[kind]

    path = export_gguf(folder / f"model-{kind}.gguf", model, dict(info.hf_config), tokenizer, encode=encode)
    return path, tokenizer.encode(PROMPT)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            overrides = {"head_dim": 128} if family == "qwen3" else {}
            cache[family] = make_family_dir(tmp_path_factory.mktemp(f"gguf-{family}"), family, overrides=overrides)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_gguf_equals_the_transformers_model(folders, family):
    from transformers import AutoModelForCausalLM

    folder = folders(family)
    path, ids = write_gguf(folder, "F32")
    model, _, config, report = load_gguf(path)
    assert config["model_type"] == ("llama" if family == "mistral" else family)
    assert set(report.tensor_types) == {"F32"}
    reference = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    got = np.array(model(mx.array([ids])).astype(mx.float32))[0]
    assert relative_error(got, torch_logits(reference, ids)) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_gguf_equals_transformers_gguf_reader(folders, family):
    import mlx.nn as nn
    from transformers import AutoModelForCausalLM

    folder = folders(family)
    path, ids = write_gguf(folder, "Q8_0")
    model, _, _, report = load_gguf(path)
    assert report.tensor_types["Q8_0"].held_as.startswith("native")
    assert isinstance(model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    reference = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=path.name, dtype=torch.float32).eval()
    got = np.array(model(mx.array([ids])).astype(mx.float32))[0]
    assert relative_error(got, torch_logits(reference, ids)) < 1e-3


def test_llama3_rope_scaling_round_trips_through_rope_freqs(tmp_path):
    """Llama 3.1 files carry their long-context rope as a rope_freqs tensor; the loader recovers the
    rope_scaling that produces it, so the model equals transformers' with the original config."""
    from transformers import AutoModelForCausalLM

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # short, so the tiny head's frequencies span all regimes
    folder = make_family_dir(tmp_path, "llama", overrides={"rope_scaling": dict(scaling), "rope_theta": 500000.0})
    path, ids = write_gguf(folder, "F32")
    model, _, config, _ = load_gguf(path)
    assert config["rope_scaling"] == scaling
    reference = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    got = np.array(model(mx.array([ids])).astype(mx.float32))[0]
    assert relative_error(got, torch_logits(reference, ids)) < 1e-5


TENSOR_TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"]
REQUANTIZED = {"Q6_K", "Q3_K", "Q2_K"}  # held as 8-bit groups of 32 (MLX has no group of 16)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A tiny llama whose rows hold whole 256-weight K-quant super-blocks (hidden 256, ffn 512)."""
    return make_family_dir(tmp_path_factory.mktemp("gguf-wide"), "llama",
                           overrides={"hidden_size": 256, "intermediate_size": 512, "initializer_range": 0.05})


@pytest.mark.parametrize("kind", TENSOR_TYPES)
def test_every_tensor_type_equals_transformers_gguf_reader(wide_llama, kind):
    from transformers import AutoModelForCausalLM

    model, tokenizer, info = load_model(str(wide_llama))

    def encode(name, array):
        if kind in ("F16", "BF16"):
            from gguf.quants import quantize

            return quantize(array, T[kind]), T[kind]
        return gguf_blocks.quantize(array, kind), T[kind]

    path = export_gguf(wide_llama / f"model-{kind}.gguf", model, dict(info.hf_config), tokenizer, encode=encode)
    ours, _, _, report = load_gguf(path)
    ours.set_dtype(mx.float32)  # compute in float32, as the reference does
    ids = tokenizer.encode(PROMPT)
    reference = AutoModelForCausalLM.from_pretrained(str(wide_llama), gguf_file=path.name, dtype=torch.float32).eval()
    got = np.array(ours(mx.array([ids])).astype(mx.float32))[0]
    error = relative_error(got, torch_logits(reference, ids))
    # re-quantized types carry their ~0.5 % weight error (README table) into the logits: a few percent
    assert error < (5e-2 if kind in REQUANTIZED else 1e-3), error
    assert report.tensor_types[kind].count == 7 * 2 + 2  # every block projection, the embedding and the head
