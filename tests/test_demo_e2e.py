"""The real model end to end (marked slow): a short demo run through the shell script."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_short_demo_run_learns_the_task(tmp_path, smollm2_gguf):
    out = tmp_path / "demo"
    env = dict(os.environ, MLX_LORA_PYTHON=os.environ.get("MLX_LORA_PYTHON", __import__("sys").executable))
    result = subprocess.run(
        [str(ROOT / "train_by_mlx.sh"), "configs/demo.yaml", "training.epochs=null", "training.iters=24", "training.steps_per_eval=12",
         "training.save_every=12", "eval.limit=16", f"output_dir={out}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < 0.5 * rows[0]["train_loss"]
    assert rows[-1]["peak_memory_gb"] < 2.0
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["tuned"]["n_scored"] == 16
    assert evaluation["tuned"]["exact_match"] > evaluation["base"]["exact_match"]
    assert evaluation["tuned"]["loss"] < evaluation["base"]["loss"]
    assert (out / "peft" / "adapter_model.safetensors").is_file()
    assert "held-out test set:" in result.stdout
    held = json.loads((out / "run_summary.json").read_text())["gguf_tensor_types"]
    assert held["Q4_1"]["held_as"].startswith("native") and held["Q4_1"]["relative_error"] == 0
    assert "GGUF tensors: " in result.stdout + result.stderr
