#!/usr/bin/env bash
# Train LoRA / QLoRA adapters on MLX.
#   ./train_by_mlx.sh                                   # the built-in demo (configs/demo.yaml -> runs/demo/)
#   ./train_by_mlx.sh configs/my.yaml training.iters=50 output_dir=runs/try
#   ./train_by_mlx.sh configs/my.yaml --resume          # continue after Ctrl-C or a crash
#   ./train_by_mlx.sh configs/my.yaml -n 2              # data parallel: 2 local processes (mlx.launch)
#   ./train_by_mlx.sh configs/my.yaml --hosts hosts.json   # data parallel: one process per Mac (README)
set -euo pipefail
cd "$(dirname "$0")"
export MLX_LORA_STARTED_AT="${MLX_LORA_STARTED_AT:-$(date +%s.%N)}"  # for the per-phase timing line
echo "==> checking the environment"
PYTHON="$(python3 -m mlx_lora.bootstrap)"
echo "==> mlx-lora train $*"
exec "$PYTHON" -m mlx_lora train "$@"
