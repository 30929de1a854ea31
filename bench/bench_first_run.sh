#!/usr/bin/env bash
# First run as a new user meets it: a fresh clone, no .venv, an empty MLX kernel cache.
#   bench/bench_first_run.sh [key.path=value ...]      # overrides go to ./train_by_mlx.sh
# The clone gets its own temp folder (TMPDIR), so MLX's kernel cache ($TMPDIR/mlx) starts empty
# without touching the one other programs on this machine use; uv's cache starts empty too. pip's
# download cache and the model cache (~/.cache/mlx-lora) are left as they are; the base's kept scores are not. The run ends with its per-phase line
# (set-up, load, train, eval); the total wall time is printed after it.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
echo "==> fresh clone of $src into $work/clone"
git clone --quiet "$src" "$work/clone"
mkdir -p "$work/tmp"
export TMPDIR="$work/tmp"
echo "==> MLX kernel cache: $TMPDIR/mlx (empty)"
export UV_CACHE_DIR="$work/uv-cache"  # uv (fetched into .venv when not on PATH) starts with nothing downloaded
echo "==> uv cache: $UV_CACHE_DIR (empty)"
export MLX_LORA_CACHE_DIR="$work/mlx-lora-cache"  # no base scores kept from earlier runs (eval_cache.py)
echo "==> base-eval cache: $MLX_LORA_CACHE_DIR/base-eval (empty)"
unset MLX_LORA_PYTHON MLX_LORA_BLAS VIRTUAL_ENV
start=$(date +%s.%N)
cd "$work/clone"
./train_by_mlx.sh configs/demo.yaml "output_dir=$work/run" "$@"
end=$(date +%s.%N)
echo "==> wall time from the clone's first command: $(python3 -c "print(f'{$end - $start:.0f}')") s (clone and run in $work)"
