"""The DPO demo end to end on the real model (marked slow): `configs/demo_dpo.yaml` as committed.

Minutes long on a loaded 2-core box (each DPO step is a reference forward plus a policy forward and
backward over 2 x 4 sequences), so it stays out of CI's short run; `tests/run.sh tests/test_demo_dpo_e2e.py`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dpo_demo_flips_the_held_out_preference(tmp_path, smollm2_gguf):
    out = tmp_path / "demo_dpo"
    env = dict(os.environ, MLX_LORA_PYTHON=os.environ.get("MLX_LORA_PYTHON", sys.executable))
    result = subprocess.run(
        [str(ROOT / "train_by_mlx.sh"), "configs/demo_dpo.yaml", f"output_dir={out}"],  # the recipe as committed
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=3600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((out / "eval.json").read_text())
    assert set(evaluation) == {"base", "tuned"}
    base, tuned = evaluation["base"], evaluation["tuned"]
    assert base["n"] == tuned["n"] > 0
    # The demo's premise: the untuned model prefers the echoed date (the wrong answer).
    assert base["preference_accuracy"] < 0.5
    assert tuned["preference_accuracy"] >= 0.9
    # Flipped without likelihood displacement: the chosen answer is no less likely than before
    # (1 nat of slack), the rejected one clearly less likely.
    assert tuned["chosen_logps"] > base["chosen_logps"] - 1.0
    assert tuned["rejected_logps"] < base["rejected_logps"] - 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_margin", "reward_accuracy", "chosen_logps", "rejected_logps"} <= set(rows[-1])
    assert any("val_preference_accuracy" in row for row in rows)
    assert (out / "loss.png").is_file() and (out / "peft" / "adapter_model.safetensors").is_file()
    assert "preference accuracy" in result.stdout
