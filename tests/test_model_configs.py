"""The ready configs of configs/models/: each loads, and its model loads through the hub path with
the hub replaced by a tiny random model of the same config.json architecture (no network).

The tiny model keeps every architecture field of the published config.json (model type, tying,
rope scaling, soft-capping, biases, GQA ratio, explicit head_dim) and shrinks the sizes. It is
placed in a Hugging Face cache folder, so `model: org/name` resolves offline exactly as it does
for a user who downloaded it before. (Phi-3.5's rope factor lists in hf_config/ are placeholders
of the right length, not the published values.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the tiny models are built with transformers on torch: pip install -e '.[test]'")

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402

from mlx_lora.config import load_config  # noqa: E402
from mlx_lora.lora import apply_lora, lora_layers  # noqa: E402
from tiny import make_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs" / "models").glob("*.yaml"))
HIDDEN, HEADS, HEAD_DIM = 64, 4, 16


def shrink(config: dict, vocab_size: int) -> dict:
    """The same architecture at toy size: 2 blocks, 64 wide, 4 heads, same GQA ratio."""
    tiny = dict(config)
    kv = max(1, HEADS * config["num_key_value_heads"] // config["num_attention_heads"])
    tiny.update(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                num_key_value_heads=kv, vocab_size=vocab_size, bos_token_id=None, eos_token_id=0, pad_token_id=0,
                torch_dtype="float32", initializer_range=0.15)
    if "head_dim" in config:
        tiny["head_dim"] = HEAD_DIM
    if "query_pre_attn_scalar" in config:
        tiny["query_pre_attn_scalar"] = HEAD_DIM
    if "max_window_layers" in config:
        tiny["max_window_layers"] = 2
    scaling = config.get("rope_scaling") or {}
    if "long_factor" in scaling:  # one factor per rotary frequency
        rotary = (tiny.get("head_dim") or HIDDEN // HEADS) // 2
        tiny["rope_scaling"] = {**scaling, "long_factor": scaling["long_factor"][:rotary],
                                "short_factor": scaling["short_factor"][:rotary]}
    return tiny


def fake_hub_snapshot(cache: Path, repo_id: str, config: dict) -> Path:
    """A random model of `config` in the Hugging Face cache layout (refs/main -> snapshots/<commit>)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    tokenizer = make_tokenizer(snapshot)
    tiny = shrink(config, len(tokenizer))
    hf_config = AutoConfig.for_model(**tiny)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config).to(torch.float32)
    model.save_pretrained(str(snapshot))
    return snapshot


def test_every_model_config_is_here():
    names = {p.stem for p in CONFIGS}
    assert {"llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "qwen3-8b", "mistral-7b-instruct-v0.3", "gemma-2-9b-it",
            "phi-3.5-mini-instruct", "llama-3.2-3b-instruct", "qwen2.5-0.5b-instruct"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_model_config_loads_through_the_hub_path(path, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from mlx_lora.models import load_model

    cfg = load_config(str(path))
    repo_id = cfg.model
    assert repo_id.count("/") == 1
    published = json.loads((path.parent / "hf_config" / f"{repo_id.split('/')[1]}.json").read_text())
    cache = tmp_path / "hub"
    snapshot = fake_hub_snapshot(cache, repo_id, published)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)

    model, tokenizer, info = load_model(repo_id)
    assert info.kind == "hub" and Path(info.path) == snapshot
    ids = tokenizer.encode("say hello world what is the capital of France? Paris.")
    reference = AutoModelForCausalLM.from_pretrained(str(snapshot), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    got = np.array(model(mx.array([ids])).astype(mx.float32))[0]
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4
    keys = apply_lora(model, cfg.lora)
    assert len(lora_layers(model)) == len(keys) * 2 and keys
