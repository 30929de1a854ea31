"""FSDP + QLoRA in the CUDA backend, on CPU: the accelerate config, the FSDP settings, and real runs.

The `slow` runs start `accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml` over
gloo through tests/fsdp_cpu_driver.py (accelerate prepares FSDP only on GPUs; the driver makes
it do so on CPU, where torch's FSDP1 runs as well) and compare with a plain single process.
The same checks on a GPU: `bash bench/cuda_fsdp_check.sh`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the CUDA backend tests need the cuda extra: pip install -e '.[cuda]'")
pytest.importorskip("peft", reason="the CUDA backend tests need the cuda extra: pip install -e '.[cuda]'")
pytest.importorskip("bitsandbytes", reason="the CUDA backend tests need the cuda extra: pip install -e '.[cuda]'")
pytest.importorskip("accelerate", reason="the CUDA backend tests need the cuda extra: pip install -e '.[cuda]'")

from accelerate.utils import DistributedType  # noqa: E402
from tiny import write_chat_split  # noqa: E402
from tiny_torch import make_torch_model_dir  # noqa: E402

from mlx_lora.backends import cuda, cuda_fsdp  # noqa: E402
from mlx_lora.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp_qlora.yaml"
# As test_distributed's TORCH_TOLERANCE: NF4 matmuls of 2-row shares round unlike 4-row batches.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_torch_model_dir(tmp_path_factory.mktemp("torch-tiny"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_chat_split(tmp_path_factory.mktemp("chat-data"))


def nf4_config(model_dir, data_dir, output_dir, *overrides):
    return load_config(None, [f"model={model_dir}", f"data.path={data_dir}", f"output_dir={output_dir}", "backend=cuda",
                              "quantization.mode=nf4", "quantization.double_quant=true", *overrides])


# --- fast ------------------------------------------------------------------------------------------

def test_the_fsdp_config_file_is_accelerates_fsdp1_with_full_state_dicts():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(FSDP_CONFIG))
    assert config.distributed_type == DistributedType.FSDP
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 1 and fsdp["fsdp_use_orig_params"] is False
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT" and fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert config.mixed_precision == "no" and config.use_cpu is False


def params4bit_dtypes(model) -> set:
    return {p.dtype for p in model.parameters() if type(p).__name__ == "Params4bit"}


def test_under_fsdp_the_4bit_weights_are_stored_in_the_compute_dtype(model_dir, data_dir, tmp_path):
    cfg = nf4_config(model_dir, data_dir, tmp_path)
    plain, _, _ = cuda.load_base(cfg, "cpu", torch.float32)
    sharded, _, _ = cuda.load_base(cfg, "cpu", torch.float32, fsdp=True)
    assert params4bit_dtypes(plain) == {torch.uint8}
    assert params4bit_dtypes(sharded) == {torch.float32}  # FSDP shards only floating-point tensors
    assert {p.dtype for p in sharded.parameters()} == {torch.float32}  # one dtype per FSDP unit
    x = torch.tensor([[3, 5, 7, 11]])
    torch.testing.assert_close(sharded(input_ids=x).logits, plain(input_ids=x).logits, rtol=0, atol=0)
    assert cuda_fsdp.quant_storage(False, torch.bfloat16) == torch.uint8
    assert cuda_fsdp.quant_storage(True, torch.bfloat16) == torch.bfloat16


def fake_accelerator(version: int = 1, orig_params: bool = False, kind=DistributedType.FSDP):
    plugin = SimpleNamespace(fsdp_version=version, use_orig_params=orig_params)
    return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(fsdp_plugin=plugin))


def test_fsdp_setups_that_cannot_train_correctly_are_refused_in_one_line(model_dir, data_dir, tmp_path):
    cfg = nf4_config(model_dir, data_dir, tmp_path)
    cuda_fsdp.check_fsdp(fake_accelerator(), cfg)
    cuda_fsdp.check_fsdp(fake_accelerator(version=2, kind=DistributedType.MULTI_GPU), cfg)  # not FSDP: nothing to check
    with pytest.raises(ValueError, match=r"FSDP version 2: .* use fsdp_version: 1, as in configs/accelerate/fsdp_qlora.yaml"):
        cuda_fsdp.check_fsdp(fake_accelerator(version=2), cfg)
    with pytest.raises(ValueError, match="fsdp_use_orig_params: true is not supported"):
        cuda_fsdp.check_fsdp(fake_accelerator(orig_params=True), cfg)
    dpo = nf4_config(model_dir, data_dir, tmp_path, "training.objective=dpo")
    with pytest.raises(ValueError, match="training.objective dpo does not run under FSDP"):
        cuda_fsdp.check_fsdp(fake_accelerator(), dpo)


# --- slow: real FSDP processes on CPU --------------------------------------------------------------

def launch_fsdp(processes: int, config: Path, out: Path, *items: str) -> subprocess.CompletedProcess:
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
                  "--num_processes", str(processes), str(ROOT / "tests" / "fsdp_cpu_driver.py")]
    return subprocess.run([*accelerate, str(config), f"output_dir={out}", *items], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1"})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_adapters(run: Path, reference: Path) -> None:
    from safetensors.numpy import load_file

    for name in ("adapters.safetensors", "peft/adapter_model.safetensors"):
        got, want = load_file(str(run / name)), load_file(str(reference / name))
        assert sorted(got) == sorted(want) and want, name
        for key in want:
            difference = np.linalg.norm(got[key].astype(np.float64) - want[key])
            assert difference <= TOLERANCE * np.linalg.norm(want[key]), (name, key)


@pytest.mark.slow
def test_fsdp_qlora_on_two_processes_equals_one_plain_process(model_dir, data_dir, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({
        "model": str(model_dir), "seed": 0, "backend": "cuda", "data": {"path": str(data_dir)},
        "quantization": {"mode": "nf4", "double_quant": True}, "lora": {"rank": 4, "alpha": 8},
        "training": {"iters": 4, "batch_size": 4, "learning_rate": 1e-2, "steps_per_report": 1, "steps_per_eval": 4,
                     "val_batches": 2, "save_every": 0, "grad_clip": 1.0},
        "eval": {"enabled": False}}))
    plain = tmp_path / "plain"
    cuda.run_training(load_config(config, [f"output_dir={plain}"]), device="cpu")
    done = launch_fsdp(2, config, tmp_path / "fsdp")
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((tmp_path / "fsdp" / "run_summary.json").read_text())
    assert summary["fsdp"] is True and summary["processes"] == 2
    got, want = metrics(tmp_path / "fsdp"), metrics(plain)
    for key in ("train_loss", "val_loss", "tokens"):
        np.testing.assert_allclose([r.get(key, np.nan) for r in got], [r.get(key, np.nan) for r in want],
                                   rtol=TOLERANCE, equal_nan=True, err_msg=key)
    assert_same_adapters(tmp_path / "fsdp", plain)


@pytest.mark.slow
def test_the_gpu_check_script_passes_on_cpu_processes():
    """bench/cuda_fsdp_check.py --cpu: FSDP run, the non-FSDP comparison, and resume from a gathered checkpoint."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "cuda_fsdp_check.py"), "--cpu", "--processes", "2"],
                          capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    assert done.stdout.strip().splitlines()[-1].startswith("OK: ")
    assert "resume under FSDP: adapters within" in done.stdout
