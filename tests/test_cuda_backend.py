"""The CUDA backend (transformers + PEFT + bitsandbytes), run for real on CPU with a tiny llama.

bitsandbytes 0.50 runs NF4 (double quantization included) on CPU, so everything but speed is
tested here: QLoRA training end to end, the output folder, resume, the masks, and the adapters.
On an NVIDIA machine the same tests train on the GPU with `MLX_LORA_TEST_DEVICE=cuda`
(bench/cuda_check.sh).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_lora.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def test_importing_the_backend_imports_neither_torch_nor_mlx():
    code = ("import sys, mlx_lora, mlx_lora.backends.cuda, mlx_lora.backends.cuda_loop, mlx_lora.adapters.peft_format; "
            "print(sorted(m for m in ('torch', 'mlx', 'peft', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


pytest.importorskip("torch", reason="the CUDA backend tests need the cuda extra: pip install -e '.[cuda]'")
pytest.importorskip("peft", reason="the CUDA backend tests need the cuda extra: pip install -e '.[cuda]'")
pytest.importorskip("bitsandbytes", reason="the CUDA backend tests need the cuda extra: pip install -e '.[cuda]'")

import torch  # noqa: E402

from mlx_lora.backends import cuda  # noqa: E402
from mlx_lora.backends.cuda_loop import learning_rate_at  # noqa: E402
from tiny import write_chat_split  # noqa: E402
from tiny_torch import make_torch_model_dir  # noqa: E402

TOLERANCE = 1e-4
DEVICE = os.environ.get("MLX_LORA_TEST_DEVICE", "cpu")  # "cuda": the GPU, bfloat16 compute
ITERS = 10
RUN_FILES = {"adapters.safetensors", "adapter_config.json", "peft", "checkpoints", "metrics.jsonl", "loss.png",
             "eval.json", "train_config.yaml", "run_summary.json"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_torch_model_dir(tmp_path_factory.mktemp("torch-tiny"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_chat_split(tmp_path_factory.mktemp("chat-data"))


def make_config(model_dir, data_dir, output_dir, *overrides):
    return load_config(None, [
        f"model={model_dir}", f"data.path={data_dir}", f"output_dir={output_dir}", "backend=cuda",
        "quantization.mode=nf4", "quantization.double_quant=true", "lora.rank=8", "lora.alpha=16",
        f"training.iters={ITERS}", "training.learning_rate=1e-2", "training.batch_size=4",
        # Validation only at the end: on CPUs with AVX512-BF16, bitsandbytes repacks NF4 weights for a
        # faster kernel on the first no-grad forward, after which training steps round differently,
        # and the resume test compares an uninterrupted run with a resumed one to 1e-5.
        "training.steps_per_report=1", f"training.steps_per_eval={ITERS}", "training.save_every=5",
        "training.grad_checkpoint=true", "eval.max_new_tokens=4", *overrides,
    ])


@pytest.fixture(scope="module")
def trained_run(model_dir, data_dir, tmp_path_factory) -> Path:
    """One 10-step QLoRA run (NF4 + double quantization) on CPU."""
    out = tmp_path_factory.mktemp("cuda-run") / "run"
    cuda.run_training(make_config(model_dir, data_dir, out), device=DEVICE)
    return out


def test_run_writes_the_documented_files(trained_run):
    assert RUN_FILES <= {p.name for p in trained_run.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (trained_run / "peft").iterdir()}
    assert (trained_run / "checkpoints" / "latest").read_text().strip() == f"step_{ITERS:06d}"
    saved = load_config(trained_run / "train_config.yaml")
    assert saved.backend == "cuda" and saved.quantization.double_quant
    results = json.loads((trained_run / "eval.json").read_text())
    assert set(results) == {"base", "tuned"}
    for scores in results.values():
        assert {"exact_match", "loss", "perplexity", "n"} <= set(scores)
    assert results["tuned"]["loss"] < results["base"]["loss"]
    mlx_config = json.loads((trained_run / "adapter_config.json").read_text())
    assert mlx_config["lora_parameters"]["rank"] == 8 and mlx_config["lora_parameters"]["scale"] == 2.0
    peft_config = json.loads((trained_run / "peft" / "adapter_config.json").read_text())
    assert (peft_config["r"], peft_config["lora_alpha"]) == (8, 16)


def test_loss_goes_down(trained_run):
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, ITERS + 1))
    losses = [r["train_loss"] for r in rows]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    assert all(r["learning_rate"] == pytest.approx(1e-2) for r in rows)


def test_written_adapters_load_in_peft_and_mlx_with_the_same_logits(trained_run, model_dir):
    """The PEFT adapter on the float base in torch equals the MLX adapter on the same base in MLX."""
    import mlx.core as mx
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlx_lora.adapters import load_adapters
    from mlx_lora.models import load_model

    model, tokenizer, _ = load_model(str(model_dir))
    load_adapters(model, trained_run)
    model.eval()
    ids = list(tokenizer.encode("say hello world"))
    expected = np.array(model(mx.array([ids])))[0].astype(np.float64)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(trained_run / "peft")).eval()
    with torch.no_grad():
        got = peft_model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    assert np.abs(got - expected).max() / np.abs(expected).max() < TOLERANCE


def test_resume_continues_to_the_same_adapters(trained_run, model_dir, data_dir, tmp_path):
    """5 steps, then --resume to 10, ends where the uninterrupted 10-step run ended."""
    from safetensors.numpy import load_file

    out = tmp_path / "run"
    half = make_config(model_dir, data_dir, out, "eval.enabled=false")
    cuda.run_training(dataclasses.replace(half, training=dataclasses.replace(half.training, iters=5)), device=DEVICE)
    with pytest.raises(FileExistsError, match="--resume"):
        cuda.run_training(half, device=DEVICE)
    cuda.run_training(half, resume=True, device=DEVICE)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, ITERS + 1))
    resumed, straight = load_file(str(out / "adapters.safetensors")), load_file(str(trained_run / "adapters.safetensors"))
    assert sorted(resumed) == sorted(straight)
    for key in straight:
        np.testing.assert_allclose(resumed[key], straight[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_masks_equal_the_mlx_backends(model_dir, tmp_path):
    """The CUDA backend's tokenizer through data.py gives the MLX backend's tokens and masks."""
    from transformers import AutoTokenizer

    from mlx_lora.data import load_datasets
    from mlx_lora.models import load_tokenizer

    chat = write_chat_split(tmp_path / "chat")
    completions = tmp_path / "completions"
    completions.mkdir()
    for split in ("train", "valid", "test"):
        rows = [{"prompt": f"What is {i} + {i}?", "completion": f" {2 * i}"} for i in range(4)]
        (completions / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch_tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    mlx_tokenizer = load_tokenizer(str(model_dir))
    for folder, train_on_prompt in ((chat, False), (completions, False), (chat, True)):
        cfg = load_config(None, [f"model={model_dir}", f"data.path={folder}", f"data.train_on_prompt={train_on_prompt}"])
        ours, _ = load_datasets(cfg.data, torch_tokenizer)
        theirs, _ = load_datasets(cfg.data, mlx_tokenizer)
        for split in ours:
            assert [(e.tokens, e.mask) for e in ours[split]] == [(e.tokens, e.mask) for e in theirs[split]]
            assert any(not all(e.mask) for e in ours[split]) != train_on_prompt


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_schedule_matches_the_mlx_backend(schedule):
    from mlx_lora.config import TrainingConfig
    from mlx_lora.train import learning_rate_schedule

    config = TrainingConfig(learning_rate=3e-4, lr_schedule=schedule, warmup_steps=4, min_lr_ratio=0.1)
    mlx_schedule = learning_rate_schedule(config, 20)
    for step in range(22):
        assert learning_rate_at(config, 20, step) == pytest.approx(mlx_schedule(step).item(), rel=1e-5), step


def test_settings_the_backend_cannot_honour_are_listed_together(tmp_path):
    cfg = load_config(None, ["model=nowhere", "data.path=nowhere", "backend=cuda", "quantization.mode=affine", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        cuda.run_training(cfg, device="cpu")
    assert "quantization.mode: 'affine'" in str(err.value)
    cfg = dataclasses.replace(cfg, quantization=dataclasses.replace(cfg.quantization, mode="nf4", block_size=128))
    with pytest.raises(ConfigError, match="quantization.block_size"):
        cuda.run_training(cfg, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_no_gpu_is_a_clear_error_before_loading_anything(tmp_path):
    cfg = load_config(None, ["model=does/not/exist", "data.path=nowhere", "backend=cuda", "quantization.mode=nf4", f"output_dir={tmp_path}"])
    with pytest.raises(cuda.BackendUnavailable, match="needs an NVIDIA GPU.*backend: mlx"):
        cuda.run_training(cfg)
    assert not (tmp_path / "train_config.yaml").exists()


def test_missing_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(cuda.BackendUnavailable, match=r"peft is not installed.*pip install -e '\.\[cuda\]'"):
        cuda.require_extra()


def test_nf4_dequantizes_like_bitsandbytes():
    """Our MLX NF4 and bitsandbytes' NF4 (block size 64, with and without double quantization) agree.

    bitsandbytes 0.50's CPU `dequantize_4bit` kernel reads blocks row by row, which disagrees with
    its own `quantize_4bit` when the last dimension is not a multiple of the block size; so the
    references here are a (rows, 192) matrix and a flat vector with a partial last block.
    """
    import mlx.core as mx
    from bitsandbytes import functional as bnb_functional

    from mlx_lora.quantize import nf4_dequantize, nf4_quantize

    rng = np.random.default_rng(0)
    matrix = (rng.standard_normal((96, 192)) * rng.uniform(0.01, 2.0, (96, 1))).astype(np.float32)
    matrix[3, :64] = 0.0  # an all-zero block
    vector = rng.standard_normal(1000).astype(np.float32)  # 15 blocks and a partial one of 40
    for weight in (matrix, vector):
        for double_quant in (False, True):
            packed, state = bnb_functional.quantize_4bit(torch.from_numpy(weight), blocksize=64, quant_type="nf4",
                                                         compress_statistics=double_quant)
            reference = bnb_functional.dequantize_4bit(packed, state, quant_type="nf4").numpy().reshape(weight.shape)
            ours = nf4_quantize(mx.array(weight), block_size=64, double_quant=double_quant)
            got = np.array(nf4_dequantize(ours, weight.shape, block_size=64))
            codes = packed.numpy().reshape(-1)  # ceil(n / 2) bytes; ours pad the last block with zeros
            np.testing.assert_array_equal(np.array(ours["weight"])[: codes.size], codes)
            if double_quant:
                # The absmax offset is a float32 mean, summed in another order than torch's: its last
                # bit may differ, which moves the dequantized values by a few float32 ulps of absmax.
                np.testing.assert_allclose(got, reference, rtol=0, atol=4e-7 * np.abs(weight).max())
            else:
                np.testing.assert_array_equal(got, reference)
            assert np.abs(got - weight).max() > 1e-3  # lossy: the two agree on the rounding, not trivially


def test_example_config_loads_and_uses_the_cuda_backend():
    cfg = load_config(REPO / "configs" / "cuda" / "qlora.yaml")
    assert cfg.backend == "cuda" and cfg.quantization.mode == "nf4" and cfg.quantization.double_quant
    assert not cuda.check_config(cfg)



@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
def test_qlora_of_smollm2_on_gpu_and_its_adapter_on_mlx(smollm2_gguf, tmp_path):
    """QLoRA of SmolLM2-135M for 100 steps on CUDA; the PEFT adapter, converted to MLX, answers the same.

    Run with: pytest -m gpu tests/test_cuda_backend.py -s   (prints the figures for the README)
    """
    import mlx.core as mx

    from mlx_lora.adapters import load_adapters
    from mlx_lora.data import load_datasets
    from mlx_lora.evaluate import generate_answers, normalize, prompt_tokens
    from mlx_lora.models import load_model
    from mlx_lora.adapters.peft_format import convert_adapter

    cfg = load_config(REPO / "configs" / "cuda" / "qlora.yaml",
                      [f"model={smollm2_gguf}", f"output_dir={tmp_path / 'run'}", "eval.limit=40"])
    summary = cuda.run_training(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    print(f"\nGPU QLoRA: {summary['steps']} steps, loss {rows[0]['train_loss']:.3f} -> {rows[-1]['train_loss']:.3f}, "
          f"{summary['tokens_per_second']:.0f} tok/s, peak {summary['peak_memory_gb']:.2f} GB, eval {summary['eval']}")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]

    # The same float base on both sides: the folder the CUDA backend made from the GGUF.
    convert_adapter(tmp_path / "run" / "peft", tmp_path / "mlx", to="mlx")
    model, tokenizer, _ = load_model(str(cuda.float_folder_from_gguf(Path(smollm2_gguf))))
    load_adapters(model, tmp_path / "mlx")
    model.eval()
    mx.eval(model.parameters())
    test = load_datasets(cfg.data, tokenizer, splits=("test",))[0]["test"][:40]
    mlx_answers = generate_answers(model, tokenizer, [prompt_tokens(tokenizer, e) for e in test], cfg.eval.max_new_tokens)
    cuda_answers = [s["answer"] for s in json.loads((tmp_path / "run" / "eval.json").read_text())["tuned"]["samples"]]
    same = [normalize(a) == normalize(b) for a, b in zip(mlx_answers, cuda_answers)]
    print(f"MLX vs CUDA greedy answers identical on {sum(same)}/{len(same)} prompts")
    # The CUDA side generated on its NF4 base in bfloat16; rare near-ties may flip a token.
    assert sum(same) >= 0.9 * len(same)
