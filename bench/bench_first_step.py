"""The first compiled training step on a large vocabulary: seconds, and kernels MLX compiled for it.

MLX's CPU backend compiles each fused element-wise group of a compiled graph into a C++ kernel
the first time it runs (cached as shared libraries under $TMPDIR/mlx/<version>/cpu). This runs
the real training loop (`mlx_lora.train.train`, compiled step) for a few steps on a random-weight
model of a real shape (bench/model_configs/<model>.json, 4-bit, LoRA on all linear layers) with
an empty kernel cache (a fresh TMPDIR), and prints the seconds of each step and the number of
kernels compiled. The kernel count does not depend on the machine's load; the seconds do.

    python bench/bench_first_step.py --model Qwen2.5-0.5B --seq 32 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


class StepTimes:
    """Training callback: wall seconds of each optimizer step (steps_per_report=1)."""

    def __init__(self):
        self.seconds, self.last = [], None

    def on_start(self, info):
        self.last = time.perf_counter()

    def on_report(self, report):
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        self.last = now

    def on_checkpoint(self, path):
        pass

    def on_interrupt(self, step, path):
        pass

    def on_end(self, summary):
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen2.5-0.5B", help="a bench/model_configs/<name>.json shape")
    parser.add_argument("--layers", type=int, help="keep only this many blocks (the loss is unchanged)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=32, help="tokens per example, every one a target")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)

    from mlx_lora.blas import preload_command_env

    env = preload_command_env()
    if env is not None:  # OpenBLAS, as the mlx-lora CLI does for itself
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    kernel_dir = Path(tempfile.mkdtemp(prefix="first-step-"))
    os.environ["TMPDIR"] = str(kernel_dir)  # MLX reads it when it writes its first kernel: an empty cache
    tempfile.tempdir = None

    import mlx.core as mx

    from bench_memory import random_model, synthetic_examples
    from mlx_lora.config import LoraConfig, TrainingConfig
    from mlx_lora.lora import apply_lora
    from mlx_lora.train import train

    config = json.loads((ROOT / "bench" / "model_configs" / f"{args.model}.json").read_text())
    if args.layers:
        config["num_hidden_layers"] = min(args.layers, config["num_hidden_layers"])
    model = random_model(config)
    mx.random.seed(0)
    apply_lora(model, LoraConfig(rank=args.rank, alpha=2.0 * args.rank,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    mx.eval(model.parameters())
    examples = synthetic_examples(args.batch * args.steps, args.seq, config["vocab_size"])
    training = TrainingConfig(iters=args.steps, batch_size=args.batch, steps_per_eval=0, save_every=0,
                              steps_per_report=1, learning_rate=1e-5)
    times = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        train(model, examples, [], training, Path(out), callbacks=[times])
    kernels = len(list(kernel_dir.rglob("*.so")))
    shutil.rmtree(kernel_dir, ignore_errors=True)
    print(json.dumps({"model": args.model, "layers": config["num_hidden_layers"], "vocab": config["vocab_size"],
                      "batch": args.batch, "seq": args.seq, "step_seconds": [round(s, 1) for s in times.seconds],
                      "kernels_compiled": kernels, "chunked_loss": bool(getattr(model, "chunked_loss", False))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
