"""The CUDA backend trains DPO / ORPO from the same YAML and data (run for real on CPU, tiny llama)."""

from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("torch", reason="the CUDA backend tests need the cuda extra: pip install -e '.[cuda]'")
pytest.importorskip("peft", reason="the CUDA backend tests need the cuda extra: pip install -e '.[cuda]'")
pytest.importorskip("bitsandbytes", reason="the CUDA backend tests need the cuda extra: pip install -e '.[cuda]'")

from mlx_lora.backends import cuda  # noqa: E402
from mlx_lora.config import load_config  # noqa: E402
from test_objectives import write_pairs  # noqa: E402
from tiny_torch import make_torch_model_dir  # noqa: E402


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_cuda_backend_preference_run_writes_the_mlx_backends_files(tmp_path, objective):
    model_dir = make_torch_model_dir(tmp_path / "model")
    data_dir = write_pairs(tmp_path / "pairs")
    cfg = load_config(None, [f"model={model_dir}", f"data.path={data_dir}", f"output_dir={tmp_path / 'run'}",
                             "backend=cuda", "quantization.mode=none", "lora.rank=4", "lora.alpha=8",
                             "training.iters=4", "training.batch_size=4", "training.steps_per_report=2",
                             "training.steps_per_eval=4", "training.val_batches=1", "training.save_every=2",
                             f"training.objective={objective}", "training.learning_rate=5e-3"])
    summary = cuda.run_training(cfg, device=os.environ.get("MLX_LORA_TEST_DEVICE", "cpu"))
    out = tmp_path / "run"
    assert summary["steps"] == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all({"reward_margin", "reward_accuracy", "chosen_logps", "rejected_logps"} <= r.keys() for r in rows)
    assert "val_preference_accuracy" in rows[-1]
    evaluation = json.loads((out / "eval.json").read_text())
    assert set(evaluation) == {"base", "tuned"} and evaluation["tuned"]["n"] == 8
    if objective == "dpo":
        assert evaluation["base"]["loss"] == pytest.approx(math.log(2), rel=1e-5)
        assert evaluation["base"]["reward_margin"] == 0.0
    assert (out / "adapters.safetensors").is_file() and (out / "peft" / "adapter_model.safetensors").is_file()
