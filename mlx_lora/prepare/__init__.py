"""Dataset conversion: raw files of many shapes into the train/valid/test JSONL that training reads.

`prepare(PrepareOptions(...))` is the library entry; `cli.main(argv)` the command line
(`data_transform.py`, `mlx-lora prepare`). Modules: readers (files), formats (records),
writer (spool, split, atomic writes), stats (token lengths), pipeline (the run and its report).
"""

from .pipeline import PrepareOptions, prepare
from .readers import TransformError

__all__ = ["PrepareOptions", "TransformError", "prepare"]
