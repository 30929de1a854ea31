"""Adapter files: the MLX format mlx-lm reads (`mlx_format.py`), the PEFT format
(`peft_format.py`, with `convert-adapter`), and loading either into a model (`load.py`).
"""

from .load import check_adapter_weights, load_adapters, read_adapter
from .mlx_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, is_peft_adapter, read_adapter_config, save_adapters

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "adapter_config", "check_adapter_weights", "is_peft_adapter",
           "load_adapters", "read_adapter", "read_adapter_config", "save_adapters"]
