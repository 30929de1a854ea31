"""Convert raw datasets into train/valid/test JSONL: `python data_transform.py INPUT... -o DIR` (see --help)."""

from mlx_lora.prepare.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
