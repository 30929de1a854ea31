"""Training speed and peak memory: mlx-lora against mlx_lm.lora and the Hugging Face stack.

All runs use SmolLM2-135M-Instruct, the demo data, rank 8 on all 7 projections of all 30
blocks, batch 4, the same sequence length and number of steps, one after the other:

  mlx-lora        the demo config (4-bit GGUF base, Q4_1 blocks of 32)
  mlx_lm 4-bit    mlx_lm.lora on the same 4-bit weights (MLX folder, group 32)
  mlx_lm float32  mlx_lm.lora on the dequantized float32 weights
  torch float32   transformers + PEFT on the float32 weights (CPU)
  torch nf4       transformers + PEFT + bitsandbytes NF4 (double quant) (CPU)

    python bench/bench_train.py [--iters 30] [--skip torch-nf4,mlx_lm-4bit]

Tokens/s is over the steps after the first report (compilation excluded), counting the
non-padding tokens of each batch. Peak memory is MLX's `get_peak_memory` for MLX runs and
the peak RSS for torch runs (what each framework can report). Each run is a subprocess with
OpenBLAS preloaded when present (as the mlx-lora CLI does for itself).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "mlx_lora" / "demo" / "dates"
KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
RANK, ALPHA, BATCH, MAX_LEN, LR = 8, 16.0, 4, 256, 2e-4


def export_folders(workdir: Path) -> tuple[Path, Path]:
    """The demo GGUF as an MLX 4-bit HF folder (same blocks) and a dequantized float32 one."""
    from mlx_lm.utils import dequantize_model, save_config, save_model

    from mlx_lora.models import load_model

    q4, f32 = workdir / "smollm2-q4", workdir / "smollm2-f32"
    for folder, dequantize in ((q4, False), (f32, True)):
        model, tokenizer, info = load_model("demo")
        config = dict(info.hf_config)
        if dequantize:
            model = dequantize_model(model)
            config.pop("quantization", None)
            config.pop("quantization_config", None)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(folder, model, donate_model=True)
        save_config(config, folder / "config.json")
        tokenizer.save_pretrained(str(folder))
    return q4, f32


def worker_mlx_lm(model_dir: str, iters: int) -> dict:
    """mlx_lm.lora's own training entry with a callback that records its reports.

    mlx-lm counts only loss-masked tokens in its tokens/s, so prompt masking is left off here:
    then it counts every non-padding token, as the other runs do (the compute is the same).
    """
    from mlx_lm import lora
    from mlx_lm.tuner.callbacks import TrainingCallback

    class Recorder(TrainingCallback):
        rows: list = []

        def on_train_loss_report(self, info):
            self.rows.append(info)

    args = dict(lora.CONFIG_DEFAULTS)
    args.update(model=model_dir, train=True, data=str(DATA), num_layers=-1, batch_size=BATCH, iters=iters,
                learning_rate=LR, steps_per_report=min(5, max(1, iters // 3)), steps_per_eval=10**9, save_every=10**9, val_batches=1,
                max_seq_length=MAX_LEN, adapter_path=tempfile.mkdtemp(), mask_prompt=False,
                lora_parameters={"rank": RANK, "dropout": 0.0, "scale": ALPHA / RANK, "keys": KEYS})
    recorder = Recorder()
    args = SimpleNamespace(**args)
    # lora.run() drops the callback it is given (mlx-lm 0.32), so call its steps directly.
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.utils import load

    model, tokenizer = load(args.model)
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    lora.train_model(args, model, train_set, valid_set, recorder)
    steady = recorder.rows[1:] or recorder.rows
    return {"tokens_per_second": sum(r["tokens_per_second"] for r in steady) / len(steady),
            "peak_memory_gb": max(r["peak_memory"] for r in recorder.rows)}


def worker_torch(model_dir: str, iters: int, quant: str) -> dict:
    """transformers + PEFT (optionally bitsandbytes NF4) with a plain loop over the same batches."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from mlx_lora.config import DataConfig
    from mlx_lora.data import BatchPosition, iterate_train, load_split

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kwargs = {"torch_dtype": torch.float32}
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quant == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules=[k.split(".")[-1] for k in KEYS]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    train = load_split(DATA / "train.jsonl", tokenizer, DataConfig(path=str(DATA), max_seq_length=MAX_LEN))
    batches = iterate_train(train, BATCH, 0, BatchPosition())
    tokens_done, start = 0, None
    for step in range(iters):
        if step == 5:  # same warm-up exclusion as the MLX runs' first report
            tokens_done, start = 0, time.perf_counter()
        tokens, mask, count = next(batches)
        ids = torch.from_numpy(tokens).long()
        logits = model(input_ids=ids[:, :-1]).logits.float()
        loss_mask = torch.from_numpy(mask)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                               reduction="none").view_as(loss_mask)
        loss = (ce * loss_mask).sum() / loss_mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens_done += count
    seconds = time.perf_counter() - start
    return {"tokens_per_second": tokens_done / seconds,
            "peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "memory_kind": "peak RSS"}


def run_ours(iters: int, workdir: Path) -> dict:
    out = workdir / "ours"
    cmd = [sys.executable, "-m", "mlx_lora", "train", str(ROOT / "configs" / "demo.yaml"), f"training.iters={iters}",
           f"output_dir={out}", "eval.enabled=false", "training.steps_per_eval=0", "training.save_every=0",
           "training.steps_per_report=5", f"data.max_seq_length={MAX_LEN}"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    return {"tokens_per_second": sum(r["tokens_per_second"] for r in steady) / len(steady),
            "peak_memory_gb": max(r["peak_memory_gb"] for r in rows)}


def run_worker(kind: str, model_dir: Path, iters: int, quant: str = "none") -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model-dir", str(model_dir), "--iters", str(iters),
           "--quant", quant]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--slow-iters", type=int, default=4, help="iterations for the slow mlx_lm 4-bit run")
    parser.add_argument("--skip", default="", help="comma-separated runs to skip")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--quant", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "mlx_lm":
        print(json.dumps(worker_mlx_lm(args.model_dir, args.iters)))
        return
    if args.worker == "torch":
        print(json.dumps(worker_torch(args.model_dir, args.iters, args.quant)))
        return

    from mlx_lora.blas import preload_command_env

    env = preload_command_env()
    if env is not None:  # every run below inherits the fast BLAS
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    skip = set(filter(None, args.skip.split(",")))
    workdir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    q4, f32 = export_folders(workdir)
    runs = {
        "mlx-lora 4-bit": lambda: run_ours(args.iters, workdir),
        "mlx_lm 4-bit": lambda: run_worker("mlx_lm", q4, args.slow_iters),
        "mlx_lm float32": lambda: run_worker("mlx_lm", f32, args.iters),
        "torch float32": lambda: run_worker("torch", f32, args.iters),
        "torch nf4": lambda: run_worker("torch", f32, args.iters, "nf4"),
    }
    results = {}
    for name, run in runs.items():
        if name.replace(" ", "-") in skip:
            continue
        print(f"running {name} ...", flush=True)
        results[name] = run()
    ours = results.get("mlx-lora 4-bit")
    print(f"\nSmolLM2-135M, rank {RANK}, 7 projections x 30 blocks, batch {BATCH}, {args.iters} steps "
          f"({args.slow_iters} for mlx_lm 4-bit); BLAS: {os.environ.get('MLX_LORA_BLAS', 'bundled')}")
    print(f"{'run':16s} {'tok/s':>8s} {'peak GB':>8s} {'mlx-lora speed-up':>18s}")
    for name, r in results.items():
        ratio = f"{ours['tokens_per_second'] / r['tokens_per_second']:.2f}x" if ours else "-"
        kind = " (RSS)" if r.get("memory_kind") else ""
        print(f"{name:16s} {r['tokens_per_second']:8.1f} {r['peak_memory_gb']:8.2f} {ratio:>18s}{kind}")
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults: {workdir / 'results.json'}")


if __name__ == "__main__":
    main()
