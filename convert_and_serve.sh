#!/usr/bin/env bash
# Fuse a training run's adapters into its base model and serve it with an OpenAI-compatible API.
#   ./convert_and_serve.sh                              # the demo run (configs/demo.yaml -> runs/demo)
#   ./convert_and_serve.sh configs/my.yaml --port 9000
#   ./convert_and_serve.sh configs/my.yaml --no-fuse    # serve base + adapters instead
# Then, in another terminal: python test_mlx.py   (Ctrl-C stops the server)
set -euo pipefail
cd "$(dirname "$0")"
echo "==> checking the environment"
PYTHON="$(python3 -m mlx_lora.bootstrap)"
echo "==> mlx-lora serve --from-run $*"
exec "$PYTHON" -m mlx_lora serve --from-run "$@"
