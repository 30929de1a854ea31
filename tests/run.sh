#!/usr/bin/env bash
# Run the test suite (creates .venv with the test extras on first use).
#   tests/run.sh                 # everything, including the real-model end-to-end tests
#   tests/run.sh -m "not slow"   # only the fast tiny-model tests
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="$(python3 -m mlx_lora.bootstrap --extras test)"
echo "==> pytest $*"
exec "$PYTHON" -m pytest "$@"
