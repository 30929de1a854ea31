"""Predicted against measured peak memory of real training steps, on random-weight models.

The models have the real config.json shapes of Qwen2.5-0.5B/1.5B/7B, Llama-3.2-3B, Llama-3.1-8B
and gemma-2-9b (bench/model_configs/*.json, committed; nothing is downloaded). Weights are random
and held as the run holds them (MLX affine 4-bit, group 64, embeddings and head included, LoRA
rank 16 on all linear layers unless told otherwise). Each case runs a few steps of the real
training loop (`mlx_lora.train.train`) and compares `mx.get_peak_memory()` with the planner.

    python bench/bench_memory.py                          # every case that fits this machine
    python bench/bench_memory.py --models Qwen2.5-0.5B --batch 1 --seq 512 --no-checkpoint
    python bench/bench_memory.py --model llama-3.1-8b --batch 1 --seq 2048 --grad-checkpoint --steps 2 --json
    python bench/bench_memory.py --json results.json      # the rows also written to a file

`--json` without a file prints the rows as one JSON list on stdout (the table goes to stderr):
each row has the predicted components (GB), the predicted and measured peak, the device and
whether the planner used the CPU path (dequantize + BLAS) or the fused one (Metal, CUDA).
Model names match bench/model_configs/*.json without regard to case. Cases predicted above
--max-gb (default: this machine's memory as the planner counts it) are skipped and listed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_lora.memory.estimate import GB, StepSettings, components  # noqa: E402
from mlx_lora.memory.plan import machine_memory, uses_dequantize_path  # noqa: E402
from mlx_lora.memory.shape import shape_from_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "model_configs"
ORDER = ["Qwen2.5-0.5B", "Qwen2.5-1.5B", "Llama-3.2-3B", "Qwen2.5-7B", "Llama-3.1-8B", "gemma-2-9b"]


def random_model(config: dict, bits: int = 4, group_size: int = 64):
    """An mlx-lm model of `config`'s shape with random weights, affine-quantized block by block.

    Building the float model whole would need 4 bytes per parameter (32 GB for 8B); each block
    is quantized and evaluated on its own, so only one block is ever in float.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import _get_classes

    from mlx_lora.cpu_math import use_fast_cpu_math
    from mlx_lora.frozen_matmul import use_fast_frozen_layers

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))  # lazy: nothing allocated yet
    model.set_dtype(mx.bfloat16 if config.get("torch_dtype") != "float32" else mx.float32)

    def quantizable(_, module):
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0

    for block in model.layers:
        nn.quantize(block, group_size=group_size, bits=bits, class_predicate=quantizable)
        mx.eval(block.parameters())
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=quantizable)
    mx.eval(model.parameters())
    use_fast_frozen_layers(model)
    use_fast_cpu_math(model)  # as run.load_base does: on the CPU, SwiGLU keeps fewer arrays for the backward
    model.eval()
    return model


def synthetic_examples(count: int, length: int, vocab: int, seed: int = 0):
    """`count` examples of exactly `length` tokens, every token a target."""
    import numpy as np

    from mlx_lora.data import Example

    rng = np.random.default_rng(seed)
    return [Example(tokens=rng.integers(0, vocab, length).tolist(), mask=[True] * length) for _ in range(count)]


def measure(config: dict, settings: StepSettings, steps: int = 2, rank: int = 16, model=None,
            compile_step: bool = True) -> tuple[float, object]:
    """Peak bytes (mx.get_peak_memory) over `steps` real training steps at `settings`; also the model."""
    import mlx.core as mx

    from mlx_lora.config import LoraConfig, TrainingConfig
    from mlx_lora.lora import apply_lora
    from mlx_lora.train import train

    if model is None:
        model = random_model(config, settings.bits, settings.group_size)
        mx.random.seed(0)
        apply_lora(model, LoraConfig(rank=rank, alpha=2.0 * rank, target_modules=settings.target_modules))
        mx.eval(model.parameters())
    examples = synthetic_examples(settings.batch_size * settings.grad_accumulation * steps, settings.seq_length,
                                  config["vocab_size"])
    training = TrainingConfig(iters=steps, batch_size=settings.batch_size, grad_accumulation=settings.grad_accumulation,
                              grad_checkpoint=settings.grad_checkpoint, steps_per_eval=0, save_every=0,
                              steps_per_report=1, learning_rate=1e-5, compile=compile_step)
    gc.collect()
    mx.clear_cache()
    with tempfile.TemporaryDirectory() as out:
        summary = train(model, examples, [], training, Path(out))
    return summary["peak_memory_gb"] * GB, model


def config_file(folder: Path, name: str) -> Path:
    """folder/<name>.json, the name matched without regard to case. ValueError naming the choices."""
    for path in sorted(folder.glob("*.json")):
        if path.stem.lower() == name.lower():
            return path
    choices = ", ".join(p.stem for p in sorted(folder.glob("*.json")))
    raise ValueError(f"--model {name}: no {name}.json in {folder}; choose from {choices}")


def predicted(config: dict, settings: StepSettings) -> tuple[float, dict]:
    parts = components(shape_from_config(config), settings)
    return sum(parts.values()), parts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", "--model", nargs="*", default=ORDER, help="names of bench/model_configs/*.json (any case)")
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--seq", type=int, nargs="*", default=[512, 2048])
    parser.add_argument("--checkpoint", "--grad-checkpoint", dest="checkpoint", action="store_true", default=None,
                        help="only with grad checkpointing")
    parser.add_argument("--no-checkpoint", dest="checkpoint", action="store_false", help="only without")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-gb", type=float, help="skip cases predicted above this (default: this machine's memory)")
    parser.add_argument("--config-dir", type=Path, default=CONFIGS, help="folder of <model>.json shapes")
    parser.add_argument("--layers", type=int, help="keep only this many blocks of each model (real block shapes, "
                        "fewer of them; the prediction uses the same truncated config)")
    parser.add_argument("--no-compile", action="store_true",
                        help="training.compile=false (uncompiled steps: no kernels for MLX's CPU backend to compile first)")
    parser.add_argument("--json", nargs="?", const="-", help="print the rows as JSON on stdout, or write them to this file")
    args = parser.parse_args(argv)
    from mlx_lora.blas import preload_command_env

    env = preload_command_env()
    if env is not None:  # OpenBLAS, as the mlx-lora CLI does for itself (the wheel's BLAS is ~40x slower)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    import mlx.core as mx

    checkpoints = [False, True] if args.checkpoint is None else [args.checkpoint]
    all_linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    max_gb = args.max_gb if args.max_gb is not None else machine_memory()[0] / GB
    dequantize_path = uses_dequantize_path()  # the CPU path on MLX's CPU backend; fused on Metal and CUDA
    device = f"{mx.default_device()} ({mx.device_info().get('device_name', '?')})"
    table = sys.stderr if args.json == "-" else sys.stdout
    rows = []
    print(f"device: {device}; planner path: {'CPU (dequantize + BLAS)' if dequantize_path else 'fused'}", file=table)
    print("| model | blocks | batch | seq | grad ckpt | predicted GB | measured GB | error | s/step |", file=table)
    print("|---|---|---|---|---|---|---|---|---|", file=table, flush=True)
    for name in args.models:
        config = json.loads(config_file(args.config_dir, name).read_text())
        name = config_file(args.config_dir, name).stem
        if args.layers:
            config["num_hidden_layers"] = min(args.layers, config["num_hidden_layers"])
        model = None
        for checkpoint in checkpoints:
            for batch in args.batch:
                for seq in args.seq:
                    settings = StepSettings(rank=args.rank, target_modules=all_linear, batch_size=batch, seq_length=seq,
                                            grad_checkpoint=checkpoint, dequantize_path=dequantize_path)
                    peak, parts = predicted(config, settings)
                    row = {"model": name, "layers": config["num_hidden_layers"], "device": device,
                           "dequantize_path": dequantize_path, "compiled": not args.no_compile, "batch": batch,
                           "seq": seq, "grad_checkpoint": checkpoint, "rank": args.rank, "steps": args.steps,
                           "predicted_gb": round(peak / GB, 3), "components_gb": {k: round(v / GB, 3) for k, v in parts.items()}}
                    cells = f"| {name} | {config['num_hidden_layers']} | {batch} | {seq} | {checkpoint} | {peak / GB:.2f} |"
                    if peak / GB > max_gb:
                        row["skipped"] = f"predicted {peak / GB:.1f} GB > {max_gb:g} GB"
                        print(f"{cells} skipped: over {max_gb:g} GB | | |", file=table, flush=True)
                    else:
                        start = time.perf_counter()
                        measured, model = measure(config, settings, args.steps, args.rank, model, not args.no_compile)
                        seconds = (time.perf_counter() - start) / args.steps
                        row.update(measured_gb=round(measured / GB, 3), error=round(peak / measured - 1, 4),
                                   s_per_step=round(seconds, 1))
                        print(f"{cells} {measured / GB:.2f} | {100 * (peak / measured - 1):+.1f}% | {seconds:.1f} |",
                              file=table, flush=True)
                    rows.append(row)
        del model
        gc.collect()
    if args.json == "-":
        print(json.dumps(rows, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"bench_memory: {error}") from None
