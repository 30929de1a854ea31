#!/usr/bin/env bash
# GPU check of FSDP + QLoRA (CUDA backend) on a tiny random model; exits non-zero on failure.
#   bash bench/cuda_fsdp_check.sh              # one GPU: accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml --num_processes 1 ...
#   bash bench/cuda_fsdp_check.sh --processes 2
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${MLX_LORA_PYTHON:-python}"
echo "+ $PYTHON bench/cuda_fsdp_check.py $*"
exec "$PYTHON" bench/cuda_fsdp_check.py "$@"
