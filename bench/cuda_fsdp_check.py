"""GPU check of FSDP + QLoRA in the CUDA backend, on a tiny random llama (no download): exits non-zero on failure.

    bash bench/cuda_fsdp_check.sh            # or: python bench/cuda_fsdp_check.py [--processes N]

Runs, with `accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml --num_processes N`
(N = 1 by default, so one GPU is enough):
  1. 8 steps of NF4 QLoRA (double quant, bfloat16 compute) under FSDP: the run must say FSDP,
     write the documented files, and its training loss must fall;
  2. the same config without FSDP (plain `mlx-lora train`, the DDP/single path): the final losses
     of both must agree within 5% (they differ by design: under FSDP the norms stay bfloat16
     and the optimizer is torch's AdamW instead of bitsandbytes' paged AdamW);
  3. a copy of run 1 cut back to its step-4 checkpoint, then `--resume` to 8: the adapters must
     equal the uninterrupted FSDP run's within 1e-2 relative (bfloat16 kernels on a GPU are
     not bitwise reproducible, so the bound is loose; a broken resume is off by far more).
Each run takes seconds on a GPU; the whole check well under 2 minutes (most of it start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp_qlora.yaml"
FILES = {"adapters.safetensors", "adapter_config.json", "peft", "metrics.jsonl", "run_summary.json", "checkpoints",
         "train_config.yaml", "loss.png"}


def fail(message: str) -> None:
    print(f"FAIL: {message}", file=sys.stderr)
    raise SystemExit(1)


def run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-6000:], sep="\n", file=sys.stderr)
        fail(f"exit status {done.returncode}")
    print(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "", flush=True)


def launch(processes: int, config: Path, *items: str) -> list[str]:
    # On CPU (--cpu) accelerate would not prepare FSDP; tests/fsdp_cpu_driver.py makes it, over gloo.
    target = ([str(ROOT / "tests" / "fsdp_cpu_driver.py")] if os.environ.get("ACCELERATE_USE_CPU")
              else ["-m", "mlx_lora", "train"])
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
            "--num_processes", str(processes), *target, str(config), *items]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adapters(run_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "adapters.safetensors"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=1, help="GPUs to shard over (default 1)")
    parser.add_argument("--cpu", action="store_true", help="check the script itself on CPU processes (float32, gloo)")
    args = parser.parse_args()
    import numpy as np
    import torch

    if args.cpu:
        os.environ["ACCELERATE_USE_CPU"] = "1"
    elif not torch.cuda.is_available():
        fail("no CUDA GPU visible (torch.cuda.is_available() is False); --cpu checks the script on CPU")
    from tiny import write_chat_split
    from tiny_torch import make_torch_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, data = make_torch_model_dir(tmp / "model", hidden=128), write_chat_split(tmp / "data", rows=32)
        config = tmp / "config.yaml"
        config.write_text(json.dumps({
            "model": str(model), "seed": 0, "backend": "cuda", "data": {"path": str(data)},
            "quantization": {"mode": "nf4", "block_size": 64, "double_quant": True},
            "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
            "training": {"iters": 8, "batch_size": 4 * args.processes, "learning_rate": 1e-2, "steps_per_report": 2,
                         "steps_per_eval": 4, "val_batches": 2, "save_every": 4, "grad_checkpoint": True},
            "eval": {"enabled": False}}))
        fsdp, plain, resumed = tmp / "fsdp", tmp / "plain", tmp / "resumed"
        run(launch(args.processes, config, f"output_dir={fsdp}"))
        summary = json.loads((fsdp / "run_summary.json").read_text())
        if not summary.get("fsdp") or summary.get("processes") != args.processes:
            fail(f"the run did not train under FSDP with {args.processes} process(es): {summary}")
        missing = FILES - {p.name for p in fsdp.iterdir()}
        if missing:
            fail(f"missing output files: {sorted(missing)}")
        curve = losses(fsdp)
        if not all(np.isfinite(curve)) or not curve[-1] < curve[0]:
            fail(f"the FSDP training loss did not fall: {curve}")
        print(f"FSDP run: loss {curve[0]:.4f} -> {curve[-1]:.4f}, {summary['tokens_per_second']:.0f} tok/s, "
              f"peak {summary['peak_memory_gb']:.2f} GB")

        run([sys.executable, "-m", "mlx_lora", "train", str(config), f"output_dir={plain}",
             f"training.batch_size={4 * args.processes}"])
        reference = losses(plain)[-1]
        if abs(curve[-1] - reference) > 0.05 * abs(reference):
            fail(f"final loss under FSDP {curve[-1]:.4f} vs without {reference:.4f}: more than 5% apart")
        print(f"without FSDP: final loss {reference:.4f} (FSDP {curve[-1]:.4f})")

        # The FSDP run kept checkpoints at steps 4 and 8: drop step 8 from a copy and resume it from step 4.
        shutil.copytree(fsdp, resumed)
        root = resumed / "checkpoints"
        steps = sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))
        if len(steps) != 2:
            fail(f"expected the checkpoints of steps 4 and 8 under FSDP, found {steps}")
        shutil.rmtree(root / steps[-1])
        (root / "latest").write_text(steps[0] + "\n")
        (resumed / "adapters.safetensors").unlink()  # so the comparison sees what the resumed run wrote
        shutil.rmtree(resumed / "peft")
        run(launch(args.processes, config, f"output_dir={resumed}", "--resume"))
        got, want = adapters(resumed), adapters(fsdp)
        worst = max(np.linalg.norm(got[k] - want[k]) / max(np.linalg.norm(want[k]), 1e-12) for k in want)
        if sorted(got) != sorted(want) or worst > 1e-2:
            fail(f"resumed FSDP adapters differ from the uninterrupted run (worst relative difference {worst:.2e})")
        print(f"resume under FSDP: adapters within {worst:.1e} of the uninterrupted run")
    print("OK: FSDP + QLoRA trains, matches the non-FSDP run, checkpoints and resumes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
