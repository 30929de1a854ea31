"""Peak memory of DPO and ORPO training steps against the SFT step on the demo.

SmolLM2-135M-Instruct (the 4-bit GGUF), rank 8 on all 7 projections, batch 4, the DPO demo's
pairs (`mlx_lora/demo/date_pairs`). The SFT run trains on the same prompts with the chosen
answers only, so a preference step sees the same B prompts with two answers each (2B sequences)
and, for DPO, a reference forward (adapters off) before it. Each objective runs in its own
process; MLX's `get_peak_memory` after a few compiled steps, and the memory held before the
first step (model, adapters), are reported.

    python bench/bench_dpo_memory.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAIRS = ROOT / "mlx_lora" / "demo" / "date_pairs"


def sft_split(folder: Path) -> Path:
    """The pairs' prompts with their chosen answers, as SFT chat rows."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        rows = [json.loads(line) for line in (PAIRS / f"{split}.jsonl").read_text().splitlines()]
        (folder / f"{split}.jsonl").write_text("".join(
            json.dumps({"messages": r["messages"] + [{"role": "assistant", "content": r["chosen"]}]}) + "\n" for r in rows))
    return folder


def child(objective: str, data: str, steps: int, out: str) -> None:
    import mlx.core as mx

    from mlx_lora.config import load_config
    from mlx_lora.preference_data import load_datasets_for
    from mlx_lora.run import prepare_model
    from mlx_lora.train import train

    from mlx_lora.cpu_streams import prepare_process

    cfg = load_config(ROOT / "configs" / "demo_dpo.yaml", [
        f"data.path={data}", f"training.objective={objective}", f"training.iters={steps}", "training.save_every=0",
        "training.steps_per_eval=0", f"output_dir={out}", "training.warmup_steps=0"])
    prepare_process(cfg.training)  # as `mlx-lora train` does: SFT splits its rows over the CPU streams
    model, tokenizer, _, _, _ = prepare_model(cfg)
    datasets, _ = load_datasets_for(cfg.data, tokenizer, objective, splits=("train",))
    held = mx.get_active_memory()
    summary = train(model, datasets["train"], [], cfg.training, Path(out), seed=cfg.seed)
    print(json.dumps({"objective": objective, "peak_gb": summary["peak_memory_gb"], "held_before_gb": held / 1e9}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("OBJECTIVE", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.steps, args.child[2])
        return
    from mlx_lora.blas import preload_command_env

    env = preload_command_env() or dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        sft_data = sft_split(Path(tmp) / "sft")
        for objective, data in (("sft", sft_data), ("dpo", PAIRS), ("orpo", PAIRS)):
            done = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", objective, str(data),
                                   str(Path(tmp) / objective)], env=env, capture_output=True, text=True, check=True)
            results[objective] = json.loads(done.stdout.strip().splitlines()[-1])
    sft = results["sft"]
    for objective, r in results.items():
        ratio = r["peak_gb"] / sft["peak_gb"]
        extra = (r["peak_gb"] - r["held_before_gb"]) / max(sft["peak_gb"] - sft["held_before_gb"], 1e-9)
        print(f"{objective:5s} peak {r['peak_gb']:.3f} GB ({ratio:.2f}x sft), held before the first step "
              f"{r['held_before_gb']:.3f} GB, step memory above it {extra:.2f}x sft's")


if __name__ == "__main__":
    main()
