"""Model sources and formats: Hugging Face folders and hub ids (`sources.py`), GGUF files
(`gguf_file.py` container, `gguf.py` weights, `gguf_tokenizer.py` vocabulary) and GGUF export
(`gguf_export.py`). Importing this package imports neither mlx nor torch.
"""

from .sources import DEMO_MODEL, ModelInfo, cache_dir, demo_model_path, load_model, load_tokenizer, resolve_source

__all__ = ["DEMO_MODEL", "ModelInfo", "cache_dir", "demo_model_path", "load_model", "load_tokenizer", "resolve_source"]
