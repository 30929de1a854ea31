#!/usr/bin/env bash
# The CUDA backend's checks on an NVIDIA GPU (CI has none, so these run by hand on a GPU machine):
#   1. the CUDA backend's tests (QLoRA end to end, resume, PEFT/MLX adapter logits, DPO/ORPO)
#      trained on the GPU in bfloat16 instead of on the CPU;
#   2. configs/cuda/qlora.yaml through the CLI on a random model with Qwen2.5-1.5B's real shape
#      (bench/random_hf_model.py; nothing is downloaded) and the demo data: tok/s and peak memory.
#   bash bench/cuda_check.sh [WORK_DIR]        # needs the cuda extra: pip install -e '.[cuda]'
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${1:-${TMPDIR:-/tmp}/mlx-lora-cuda-check}
mkdir -p "$WORK"
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU visible"; exit 1; }
$PY -c "import torch, transformers, peft, bitsandbytes, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__, '| bitsandbytes', bitsandbytes.__version__, '| accelerate', accelerate.__version__)"

echo "== 1. CUDA backend tests on the GPU"
MLX_LORA_TEST_DEVICE=cuda $PY -m pytest tests/test_cuda_backend.py tests/test_cuda_preference.py -q -p no:cacheprovider -rs || status=1

echo "== 2. configs/cuda/qlora.yaml on a random Qwen2.5-1.5B-shaped model"
$PY bench/random_hf_model.py bench/model_configs/Qwen2.5-1.5B.json "$WORK/qwen2.5-1.5b" --device cuda || status=1
rm -rf "$WORK/run"
$PY -m mlx_lora train configs/cuda/qlora.yaml model="$WORK/qwen2.5-1.5b" output_dir="$WORK/run" \
    training.iters=60 training.steps_per_eval=60 training.save_every=30 2>&1 | grep -v "Loading weights" || status=1
$PY - "$WORK/run" <<'PY' || status=1
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
summary = json.loads((run / "run_summary.json").read_text())
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
print("summary:", json.dumps({k: summary[k] for k in summary if not isinstance(summary[k], (dict, list))}))
print("train loss by report:", [round(r["train_loss"], 3) for r in rows if "train_loss" in r])
assert rows[-1]["train_loss"] < rows[0]["train_loss"], "the loss did not go down"
assert (run / "peft" / "adapter_model.safetensors").is_file() and (run / "adapters.safetensors").is_file()
PY
echo "cuda_check: $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
