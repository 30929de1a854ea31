#!/usr/bin/env python3
"""Send test prompts to the server started by ./convert_and_serve.sh and score the answers.

    python test_mlx.py                                  # the demo test split, default server
    python test_mlx.py --prompts my.jsonl --stream --concurrency 4 --json results.json

The logic lives in mlx_lora/serve/client.py.
"""

from mlx_lora.serve.client import main

if __name__ == "__main__":
    raise SystemExit(main())
