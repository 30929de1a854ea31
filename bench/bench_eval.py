"""Evaluation generation speed: our adapter model against mlx-lm on the same model fused to float32.

SmolLM2-135M (the demo's 4-bit GGUF) with rank-8 LoRA on all 7 projections of all 30 blocks
(`--adapter RUN_DIR` loads a trained one, e.g. runs/demo; otherwise B is random and small),
greedy answers to the demo's test prompts, `--batch` prompts at a time, `--max-tokens` each:

  mlx-lora         `generate_answers` through the 4-bit base + LoRA, as `evaluate_model` runs it
                   (frozen weights dequantized once for the evaluation, `float_weights_kept`, and
                   the adapters folded into those copies, `adapters_folded`)
  mlx-lora (old)   the same without kept weights (dequantized at every decoding step)
  mlx_lm fused     mlx-lm's `batch_generate` on the model with the adapters fused in and every
                   weight dequantized to float32

The runs alternate round by round in one process (OpenBLAS preloaded for all: MLX at its
best on Linux; the mlx_lm run with mlx-lm's own SwiGLU, `cpu_math.library_math`); tokens/s counts generated tokens (each answer re-tokenized) over wall time.

    python bench/bench_eval.py [--prompts 128] [--batch 64] [--max-tokens 14] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def adapted_model(cfg, adapter: str | None):
    import mlx.core as mx

    from mlx_lora.adapters import load_adapters
    from mlx_lora.lora import apply_lora, lora_layers
    from mlx_lora.run import load_base

    model, tokenizer, _, _ = load_base(cfg)
    if adapter:
        load_adapters(model, Path(adapter))
    else:
        mx.random.seed(0)
        apply_lora(model, cfg.lora)
        for _, layer in lora_layers(model):
            layer.lora_b = 0.01 * mx.random.normal(layer.lora_b.shape)
    model.eval()
    mx.eval(model.parameters())
    return model, tokenizer


def main() -> None:
    from mlx_lora.blas import preload_command_env

    env = preload_command_env()
    if env is not None:
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=14)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--adapter", help="a run folder with adapters.safetensors (default: random adapters)")
    parser.add_argument("--skip-old", action="store_true", help="leave out the per-step dequantize run")
    args = parser.parse_args()

    import mlx.core as mx
    from mlx_lm.generate import batch_generate
    from mlx_lm.utils import dequantize_model

    from mlx_lora import evaluate
    from mlx_lora.config import load_config
    from mlx_lora.cpu_math import library_math
    from mlx_lora.data import load_datasets
    from mlx_lora.frozen_matmul import float_weights_kept
    from mlx_lora.lora import adapters_folded, fuse_lora

    cfg = load_config(ROOT / "configs" / "demo.yaml", [])
    model, tokenizer = adapted_model(cfg, args.adapter)
    fused, _ = adapted_model(cfg, args.adapter)
    fuse_lora(fused)
    dequantize_model(fused)
    fused.set_dtype(mx.float32)
    mx.eval(fused.parameters())
    test = load_datasets(cfg.data, tokenizer, splits=("test",))[0]["test"]
    prompts = [evaluate.prompt_tokens(tokenizer, e) for e in test][: args.prompts]
    evaluate.EVAL_BATCH = args.batch

    def ours():
        with float_weights_kept(model), adapters_folded(model):
            return evaluate.generate_answers(model, tokenizer, prompts, args.max_tokens)

    def ours_old():
        return evaluate.generate_answers(model, tokenizer, prompts, args.max_tokens)

    def mlx_lm_fused():
        answers = []
        with library_math(fused):  # mlx-lm's own SwiGLU, not the one `load_base` gave this process
            for start in range(0, len(prompts), args.batch):
                answers += batch_generate(fused, tokenizer, prompts[start: start + args.batch], max_tokens=args.max_tokens).texts
        return answers

    runs = {"mlx-lora": ours, "mlx_lm fused f32": mlx_lm_fused}
    if not args.skip_old:
        runs["mlx-lora (old)"] = ours_old
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    answers = {}
    for round_index in range(args.rounds + 1):  # round 0 warms up (kernel compilation) and is not counted
        for name, run in runs.items():
            start = time.perf_counter()
            texts = run()
            seconds = time.perf_counter() - start
            tokens = sum(min(args.max_tokens, len(tokenizer.encode(t)) + 1) for t in texts)  # +1: the end token
            if round_index:
                speeds[name].append(tokens / seconds)
            answers[name] = texts
    same = sum(a == b for a, b in zip(answers["mlx-lora"], answers["mlx_lm fused f32"]))
    reference = statistics.median(speeds["mlx_lm fused f32"])
    print(f"{len(prompts)} demo test prompts, batch {args.batch}, up to {args.max_tokens} new tokens, "
          f"{args.rounds} rounds, adapters: {args.adapter or 'random (rank 8, all projections)'}")
    print(f"{'run':18s} {'tok/s':>7s} {'vs mlx_lm fused':>16s}   (min-max tok/s)")
    for name, values in speeds.items():
        median = statistics.median(values)
        print(f"{name:18s} {median:7.1f} {median / reference:15.2f}x   ({min(values):.1f}-{max(values):.1f})")
    print(f"identical answers, mlx-lora vs mlx_lm fused: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
