"""Training speed, useful FLOPs and peak memory: mlx-lora against mlx_lm.lora and the Hugging Face stack.

Every run uses SmolLM2-135M-Instruct, the demo data, rank 8 (alpha 16) on all 7 projections of
all 30 blocks, batch 4, max 128 tokens, AdamW at 2e-4, one after the other in this process tree:

  mlx-lora 4-bit   the demo config through the CLI (4-bit GGUF base, Q4_1 blocks of 32); on the
                   CPU `training.float_weights: auto` keeps float32 copies of the 4-bit weights
  mlx-lora 4-bit 1 stream    the same with training.cpu_streams=1: the batch on one MLX CPU
                   stream, the BLAS on all cores (the default splits the rows over one stream a core)
  mlx-lora 4-bit quantized   the same with training.float_weights=quantized: every product
                   dequantizes its layer (the 4-bit base alone in memory)
  mlx_lm 4-bit     mlx_lm.lora on the same 4-bit weights (MLX folder, group 32)
  mlx_lm float32   mlx_lm.lora on the dequantized float32 weights
  torch float32    transformers + PEFT on the float32 weights (CPU)
  torch nf4        transformers + PEFT + bitsandbytes NF4 (double quant) (CPU)

    python bench/bench_train.py [--iters 30] [--rounds 1] [--skip torch-nf4,mlx_lm-4bit]

Peers run at their best. The torch runs are the loop a Hugging Face user writes
(`model(**batch, labels=labels).loss`, `loss.backward()`, AdamW) in a process whose
environment is the caller's minus everything this project sets for MLX (LD_PRELOAD of
OpenBLAS, MLX_LORA_*): torch keeps its own MKL and its own thread count. While each torch worker
runs, this script reads its /proc/PID/environ and /proc/PID/maps and prints what it saw. The
MLX runs (ours and mlx_lm's) get OpenBLAS preloaded when present, with its kernels fit to this
CPU (`blas.blas_env`): MLX's bundled BLAS is ~30x slower, so that is MLX at its best on Linux.

Tokens/s counts every non-padding token of each batch, over the steps after the first report
(compilation excluded). The useful-FLOP count comes from the model's shapes and the data
(`useful_flops_per_token`); the matmul peak is a large float32 `mx.matmul` measured in this
run, before and after the training runs (the larger is printed). Peak memory is MLX's
`get_peak_memory` for MLX runs and the peak RSS for torch runs (what each can report).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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
RANK, ALPHA, BATCH, MAX_LEN, LR = 8, 16.0, 4, 128, 2e-4
OUR_ENV_KEYS = ("LD_PRELOAD", "OPENBLAS_CORETYPE")  # and every MLX_LORA_* variable


# --- environments -----------------------------------------------------------------------------

def peer_env() -> dict:
    """The caller's environment without anything this project sets for MLX."""
    return {k: v for k, v in os.environ.items() if k not in OUR_ENV_KEYS and not k.startswith("MLX_LORA_")}


def mlx_env() -> dict:
    """The environment MLX runs at its best in: OpenBLAS preloaded when present."""
    from mlx_lora.blas import preload_command_env

    return preload_command_env() or dict(os.environ)


# --- useful work ------------------------------------------------------------------------------

def linear_shapes(config: dict) -> list[tuple[int, int]]:
    """(in, out) of the 7 projections of one llama-style block."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    return [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]


def useful_flops_per_token(config: dict, examples, rank: int = RANK) -> float:
    """Useful training FLOPs per non-padding token, averaged over `examples`.

    Per example, only input positions up to the last target feed a loss; those are useful:
      frozen linears: forward + input gradient, 4 * in * out per position (no weight gradient);
      LoRA: forward, input gradient and A/B gradients, 6 * rank * (in + out) per position;
      attention: QK^T and AV forward (4 * heads * head_dim per query-key pair) and their four
        backward products (8 * ...), over the causal pairs, per block;
      output head (tied, frozen): forward + input gradient, 4 * hidden * vocab, at target
        positions only.
    Padding, positions after the last target and the head at non-target positions are not
    counted. Norms, RoPE, softmax and the optimizer are left out (not matmul work).
    """
    blocks, hidden, vocab = config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    per_position = blocks * sum(4 * i * o + 6 * rank * (i + o) for i, o in linear_shapes(config))
    per_pair = blocks * 12 * config["num_attention_heads"] * head_dim
    total, tokens = 0.0, 0
    for example in examples:
        targets = [i for i, m in enumerate(example.mask) if m and i > 0]
        used = targets[-1]  # input positions 0 .. used-1 predict tokens 1 .. used
        total += per_position * used + per_pair * used * (used + 1) / 2 + 4 * hidden * vocab * len(targets)
        tokens += len(example.tokens)
    return total / tokens


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    """Float32 GFLOP/s of a large mx.matmul (best of `repeats`)."""
    import mlx.core as mx

    a, b = mx.random.normal((size, size)), mx.random.normal((size, size))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# --- workers (each runs in its own process) -----------------------------------------------------

def worker_mlx_lm(model_dir: str, iters: int) -> dict:
    """mlx_lm.lora's own training entry with a callback that records its reports.

    mlx-lm counts only loss-masked tokens in its tokens/s, so prompt masking is left off here:
    then it counts every non-padding token, as the other runs do (the compute is the same).
    """
    from mlx_lm import lora
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.utils import load

    class Recorder(TrainingCallback):
        rows: list = []

        def on_train_loss_report(self, info):
            self.rows.append(info)

    args = dict(lora.CONFIG_DEFAULTS)
    args.update(model=model_dir, train=True, data=str(DATA), num_layers=-1, batch_size=BATCH, iters=iters,
                learning_rate=LR, steps_per_report=min(5, max(1, iters // 3)), steps_per_eval=10**9,
                save_every=10**9, val_batches=1, max_seq_length=MAX_LEN, adapter_path=tempfile.mkdtemp(),
                mask_prompt=False, lora_parameters={"rank": RANK, "dropout": 0.0, "scale": ALPHA / RANK, "keys": KEYS})
    args = SimpleNamespace(**args)
    recorder = Recorder()
    # lora.run() drops the callback it is given (mlx-lm 0.32), so call its steps directly.
    model, tokenizer = load(args.model)
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    lora.train_model(args, model, train_set, valid_set, recorder)
    steady = recorder.rows[1:] or recorder.rows
    return {"tokens_per_second": sum(r["tokens_per_second"] for r in steady) / len(steady),
            "peak_memory_gb": max(r["peak_memory"] for r in recorder.rows)}


def worker_torch(model_dir: str, iters: int, quant: str) -> dict:
    """transformers + PEFT (optionally bitsandbytes NF4), the loop of the Hugging Face docs."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from mlx_lora.config import DataConfig
    from mlx_lora.data import collate, epoch_order, load_split, make_batches

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kwargs = {"dtype": torch.float32}
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quant == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules=[k.split(".")[-1] for k in KEYS]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    train = load_split(DATA / "train.jsonl", tokenizer, DataConfig(path=str(DATA), max_seq_length=MAX_LEN))
    batches = make_batches(train, BATCH)
    order = epoch_order(len(batches), 0, 0)  # the same batches in the same order as mlx-lora's run (seed 0)
    tokens_done, start = 0, None
    for step in range(iters):
        if step == 5:  # same warm-up exclusion as the MLX runs' first report
            tokens_done, start = 0, time.perf_counter()
        indices = batches[order[step % len(order)]]
        tokens, mask, count = collate(train, indices)
        input_ids = torch.from_numpy(tokens).long()
        attention_mask = torch.zeros_like(input_ids)
        for row, index in enumerate(indices):
            attention_mask[row, : len(train[index].tokens)] = 1
        labels = input_ids.clone()
        labels[:, 0] = -100
        labels[:, 1:][torch.from_numpy(mask) == 0] = -100  # prompt and padding carry no loss
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens_done += count
    seconds = time.perf_counter() - start
    return {"tokens_per_second": tokens_done / seconds, "torch_threads": torch.get_num_threads(),
            "peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "memory_kind": "peak RSS"}


def worker_peak() -> dict:
    return {"matmul_gflops": matmul_peak_gflops()}


# --- the parent -------------------------------------------------------------------------------

def inspect_process(pid: int, seen: dict) -> None:
    """Record the preload and BLAS libraries of a running process from /proc (Linux)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return
    seen["ld_preload"] = seen.get("ld_preload") or any(e.startswith(b"LD_PRELOAD=") for e in environ)
    seen["ours_env"] = seen.get("ours_env") or any(e.startswith(b"MLX_LORA_") for e in environ)
    from mlx_lora.blas import find_fast_blas

    libs = {line.split()[-1] for line in maps.splitlines() if "/" in line}
    ours = find_fast_blas()
    seen["ours_mapped"] = seen.get("ours_mapped") or (ours is not None and os.path.realpath(ours) in
                                                      {os.path.realpath(p) for p in libs})
    seen.setdefault("blas", set()).update(os.path.basename(p) for p in libs if "blas" in p.lower() or "mkl" in p.lower())
    seen["torch_mapped"] = seen.get("torch_mapped") or any("libtorch_cpu" in p for p in libs)


def run_worker(kind: str, env: dict, *extra: str) -> tuple[dict, dict]:
    cmd = [sys.executable, __file__, "--worker", kind, *extra]
    seen: dict = {}
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        while process.poll() is None:
            inspect_process(process.pid, seen)
            time.sleep(2)
        stderr = process.stderr.read()
        if process.returncode:
            raise SystemExit(f"{kind} worker failed ({process.returncode}):\n{stderr[-3000:]}")
        out.seek(0)
        return json.loads(out.read().strip().splitlines()[-1]), seen


def run_ours(iters: int, workdir: Path, *overrides: str) -> dict:
    out = workdir / f"ours-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "mlx_lora", "train", str(ROOT / "configs" / "demo.yaml"), f"training.iters={iters}",
           "training.epochs=null", "training.early_stop_patience=null", f"output_dir={out}", "eval.enabled=false", "training.steps_per_eval=0",
           "training.save_every=0", "training.steps_per_report=5", f"data.max_seq_length={MAX_LEN}", *overrides]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=peer_env())  # the CLI preloads itself
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    return {"tokens_per_second": sum(r["tokens_per_second"] for r in steady) / len(steady),
            "peak_memory_gb": max(r["peak_memory_gb"] for r in rows)}


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


def work_per_token(f32: Path) -> float:
    from transformers import AutoTokenizer

    from mlx_lora.config import DataConfig
    from mlx_lora.data import load_split

    config = json.loads((f32 / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(f32))
    examples = load_split(DATA / "train.jsonl", tokenizer, DataConfig(path=str(DATA), max_seq_length=MAX_LEN))
    return useful_flops_per_token(config, examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--slow-iters", type=int, default=4, help="iterations for the slow mlx_lm 4-bit run")
    parser.add_argument("--rounds", type=int, default=1, help="run every configuration this many times, interleaved")
    parser.add_argument("--skip", default="", help="comma-separated runs to skip: mlx-lora-4bit, mlx-lora-4bit-1-stream, mlx-lora-4bit-quantized, mlx_lm-4bit, "
                        "mlx_lm-float32, torch-float32, torch-nf4")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--quant", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        workers = {"mlx_lm": lambda: worker_mlx_lm(args.model_dir, args.iters),
                   "torch": lambda: worker_torch(args.model_dir, args.iters, args.quant), "peak": worker_peak}
        print(json.dumps(workers[args.worker]()))
        return

    skip = set(filter(None, args.skip.split(",")))
    workdir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    q4, f32 = export_folders(workdir)
    flops_per_token = work_per_token(f32)
    fast = mlx_env()
    torch_args = ("--model-dir", str(f32), "--iters", str(args.iters))
    runs = {  # the Hugging Face peers right after ours: the ratios that matter most, least apart in time
        "mlx-lora 4-bit": lambda: (run_ours(args.iters, workdir), {}),
        "mlx-lora 4-bit 1 stream": lambda: (run_ours(args.iters, workdir, "training.cpu_streams=1"), {}),
        "mlx-lora 4-bit quantized": lambda: (run_ours(args.iters, workdir, "training.float_weights=quantized"), {}),
        "torch float32": lambda: run_worker("torch", peer_env(), *torch_args),
        "torch nf4": lambda: run_worker("torch", peer_env(), *torch_args, "--quant", "nf4"),
        "mlx_lm float32": lambda: run_worker("mlx_lm", fast, "--model-dir", str(f32), "--iters", str(args.iters)),
        "mlx_lm 4-bit": lambda: run_worker("mlx_lm", fast, "--model-dir", str(q4), "--iters", str(args.slow_iters)),
    }
    runs = {name: run for name, run in runs.items() if name.replace(" ", "-").replace("-bit", "bit") not in skip}
    peaks = [run_worker("peak", fast)[0]["matmul_gflops"]]
    results: dict[str, list] = {name: [] for name in runs}
    checks: dict[str, dict] = {}
    for round_index in range(args.rounds):
        for name, run in runs.items():
            print(f"round {round_index + 1}: {name} ...", flush=True)
            result, seen = run()
            results[name].append(result)
            if seen:
                checks.setdefault(name, {}).update(seen)
    peaks.append(run_worker("peak", fast)[0]["matmul_gflops"])
    peak = max(peaks)

    def speed(name):
        return statistics.median(r["tokens_per_second"] for r in results[name])

    ours = speed("mlx-lora 4-bit") if "mlx-lora 4-bit" in results else None
    print(f"\nSmolLM2-135M, rank {RANK} on 7 projections x 30 blocks, batch {BATCH}, max {MAX_LEN} tokens, "
          f"{args.iters} steps ({args.slow_iters} for mlx_lm 4-bit), {args.rounds} round(s), median tok/s")
    print(f"float32 matmul peak (mx.matmul 2048^3, before/after): {peaks[0]:.0f} / {peaks[1]:.0f} GFLOP/s; "
          f"useful work {flops_per_token / 1e6:.0f} MFLOP per token")
    print(f"{'run':26s} {'tok/s':>7s} {'peak GB':>8s} {'useful GFLOP/s':>15s} {'MFU':>5s} {'mlx-lora is':>12s}")
    for name in results:
        tps = speed(name)
        gflops = tps * flops_per_token / 1e9
        ratio = f"{ours / tps:.2f}x" if ours else "-"
        memory = max(r["peak_memory_gb"] for r in results[name])
        kind = " (RSS)" if results[name][0].get("memory_kind") else ""
        print(f"{name:26s} {tps:7.1f} {memory:8.2f} {gflops:15.1f} {gflops / peak:5.0%} {ratio:>12s}{kind}")
    print("\npeer processes, read from /proc/PID while they ran:")
    for name, seen in checks.items():
        threads = results[name][0].get("torch_threads")
        blas = ", ".join(sorted(seen.get("blas", []))) or "none"
        print(f"  {name:16s} LD_PRELOAD: {'set' if seen.get('ld_preload') else 'unset'}; MLX_LORA_* env: "
              f"{'present' if seen.get('ours_env') else 'absent'}; the OpenBLAS we preload for MLX mapped: "
              f"{'YES' if seen.get('ours_mapped') else 'no'}; BLAS-named libraries mapped: {blas}"
              + (f"; torch threads: {threads}" if threads else ""))
    print("  (numpy's own bundled libscipy_openblas64_ is mapped in any process that imports transformers)")
    (workdir / "results.json").write_text(json.dumps({"results": results, "peaks": peaks,
                                                      "useful_flops_per_token": flops_per_token}, indent=2))
    print(f"\nresults: {workdir / 'results.json'}")


if __name__ == "__main__":
    main()
