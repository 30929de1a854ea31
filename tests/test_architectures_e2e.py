"""Each architecture family through the command line, as a user runs it: `mlx-lora train` (with
eval) on a 4-bit base, `mlx-lora fuse --gguf`, the GGUF read back, and `mlx-lora serve` with the
adapter answering over HTTP exactly what the adapter model generates in process.

Two families run in the fast suite (the most different layouts: Phi-3's fused projections,
Gemma 2's soft-capped tied head); the rest are `slow`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the tiny models are built with transformers on torch: pip install -e '.[test]'")

from test_cli import mlx_lora, write_config  # noqa: E402
from tiny_torch import FAMILIES, make_family_dir  # noqa: E402

FAST = ("phi3", "gemma2")
CASES = [pytest.param(f, marks=() if f in FAST else pytest.mark.slow) for f in FAMILIES]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_ask(model_dir: Path, adapter: Path, prompt: list[dict], max_tokens: int) -> str:
    import httpx

    port = free_port()
    env = dict(os.environ, MLX_LORA_NO_BLAS_PRELOAD="1")
    server = subprocess.Popen([sys.executable, "-m", "mlx_lora", "serve", "--model", str(model_dir),
                               "--adapter", f"tuned={adapter}", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            if server.poll() is not None:
                raise AssertionError(f"server exited: {server.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                           json={"model": "tuned", "messages": prompt, "max_tokens": max_tokens, "temperature": 0})
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["message"]["content"]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("family", CASES)
def test_train_eval_fuse_gguf_serve(family, tiny_data_dir, tmp_path):
    import mlx.core as mx
    from mlx_lm.generate import generate

    from mlx_lora.adapters import load_adapters
    from mlx_lora.models import load_model
    from mlx_lora.models.gguf import load_gguf

    model_dir = make_family_dir(tmp_path / "model", family)
    config = write_config(tmp_path, model_dir, tiny_data_dir)
    result = mlx_lora("train", config)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run"
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["tuned"]["loss"] < evaluation["base"]["loss"]
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert "all-linear" not in adapter_config["target_modules"]  # recorded as the names adapted

    fused_dir = tmp_path / "fused"
    result = mlx_lora("fuse", config, "--out", fused_dir, "--dtype", "float32", "--gguf")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((fused_dir / "fuse_report.json").read_text())
    assert report["check"]["fused_vs_base_plus_adapters"]["greedy_agreement"] == 1.0

    fused, tokenizer, _ = load_model(str(fused_dir))
    from_gguf, _, _, _ = load_gguf(next(fused_dir.glob("*.gguf")))
    ids = mx.array([tokenizer.encode("say hello world")])
    expected = np.array(fused(ids).astype(mx.float32))
    got = np.array(from_gguf(ids).astype(mx.float32))  # GGUF export holds f16 matrices
    assert np.abs(got - expected).max() < 2e-2 * np.abs(expected).max()

    prompt = [{"role": "user", "content": "say hello"}]
    model, tokenizer, _ = load_model(str(model_dir))
    load_adapters(model, out)
    reference = generate(model, tokenizer, tokenizer.apply_chat_template(prompt, add_generation_prompt=True),
                         max_tokens=6)
    assert serve_and_ask(model_dir, out, prompt, max_tokens=6) == reference
