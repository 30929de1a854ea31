"""A whole training run from a Config: load, quantize, add adapters, train, save, evaluate.

Writes the documented output folder: adapters.safetensors, adapter_config.json,
train_config.yaml, metrics.jsonl, loss.png, checkpoints/, eval.json, run_summary.json.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import yaml

from . import __version__
from .checkpoints import write_json, write_text
from .config import Config, config_to_dict
from .report import MetricsWriter, ProgressBar, print_table


def log(message: str = "") -> None:
    print(message, flush=True)


def load_base(cfg: Config):
    """(model, tokenizer, info, quantization report): the frozen base as training and eval use it."""
    from .frozen_matmul import use_fast_frozen_layers
    from .models import load_model
    from .quantize import quantize_model

    model, tokenizer, info = load_model(cfg.model)
    q = cfg.quantization
    quant_report = quantize_model(model, q.mode, bits=q.bits, group_size=q.group_size,
                                  block_size=q.block_size, double_quant=q.double_quant)
    use_fast_frozen_layers(model)
    return model, tokenizer, info, quant_report


def prepare_model(cfg: Config):
    """(model, tokenizer, info, quantization report, adapted keys) ready for training."""
    import mlx.core as mx

    from .lora import apply_lora

    model, tokenizer, info, quant_report = load_base(cfg)
    mx.random.seed(cfg.seed)
    keys = apply_lora(model, cfg.lora)
    mx.eval(model.parameters())
    return model, tokenizer, info, quant_report, keys


def adapter_extra(cfg: Config, info, quant_report) -> dict:
    return {
        "model": cfg.model,
        "model_source": {"kind": info.kind, "path": info.path},
        "base_model_name_or_path": cfg.model,
        "quantization": {"mode": cfg.quantization.mode, "bits": cfg.quantization.bits,
                         "group_size": cfg.quantization.group_size, "block_size": cfg.quantization.block_size,
                         "double_quant": cfg.quantization.double_quant, "source_quantized": quant_report.source_quantized},
        "mlx_lora_version": __version__,
    }


def run_training(cfg: Config, resume: bool = False) -> dict:
    """Train per `cfg` and write the output folder; returns the run summary.

    Under `mlx.launch` this is one rank of a data-parallel run: every rank trains, rank 0 alone
    writes files, reports and evaluates.
    """
    import mlx.core as mx

    from . import distributed
    from .adapters import adapter_config, save_adapters
    from .data import load_datasets
    from .launch import check_same_inputs
    from .lora import count_trainable, transformer_blocks
    from .train import train

    world = distributed.init(cfg.distributed.backend, cfg.distributed.timeout_s,
                             tell=lambda message: print(message, file=sys.stderr, flush=True))
    distributed.check_batch_size(cfg.training.batch_size, world.size)
    say = log if world.is_main else (lambda message="": None)
    out = Path(cfg.output_dir)
    if out.exists() and not resume and (out / "checkpoints").exists():
        raise FileExistsError(f"output_dir {out} already holds a run; pass --resume to continue it, "
                              "or choose another output_dir (e.g. output_dir=runs/new)")
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "train_config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    ranks = f" | {world.size} ranks ({cfg.distributed.backend})" if world.size > 1 else ""
    say(f"mlx-lora {__version__} | device {mx.default_device()}{ranks} | model {cfg.model}")
    model, tokenizer, info, quant_report, keys = prepare_model(cfg)
    check_same_inputs(world, info.path, cfg.data.path)
    blocks = transformer_blocks(model)
    trainable = count_trainable(model)
    say(f"base: {info.kind} {info.path}")
    say(f"quantization: {quant_report.describe()}")
    if info.gguf_report is not None:
        say(f"GGUF tensors: {info.gguf_report.describe()}")
    say(f"LoRA: rank {cfg.lora.rank}, alpha {cfg.lora.alpha} (scaling {cfg.lora.scaling:g}), "
        f"{len(keys)} modules x {min(len(blocks), cfg.lora.num_layers) if cfg.lora.num_layers > 0 else len(blocks)} blocks, "
        f"{trainable:,} trainable parameters")

    datasets, data_stats = load_datasets(cfg.data, tokenizer)
    for split, stats in data_stats.items():
        changed = f", {stats['truncated']} truncated, {stats['dropped_overlong']} dropped as too long" \
            if stats["truncated"] or stats["dropped_overlong"] else ""
        say(f"data {split}: {stats['examples']} examples, {stats['tokens']:,} tokens "
            f"(longest {stats['max_length']}){changed}")

    extra = adapter_extra(cfg, info, quant_report)
    config = adapter_config(cfg.lora, keys, len(blocks), extra)
    start_step = None
    if resume and world.is_main:
        from .checkpoints import latest

        checkpoint = latest(out)
        start_step = int(json.loads((checkpoint / "state.json").read_text())["step"]) if checkpoint else None
    metrics = MetricsWriter(out / "metrics.jsonl", resume_from_step=start_step if resume else None)
    if not resume:
        metrics.rows = []
    summary = train(model, datasets["train"], datasets["valid"], cfg.training, out, seed=cfg.seed,
                    resume=resume, callbacks=[metrics, ProgressBar()] if world.is_main else [], world=world)
    if not world.is_main:
        return summary
    save_adapters(out, model, config)
    from .adapters.peft_format import export_peft

    export_peft(out, out / "peft")  # the same adapters for transformers / PEFT / vLLM users
    rows = metrics.rows
    tps = [r["tokens_per_second"] for r in rows[1:]] or [r["tokens_per_second"] for r in rows]
    summary.update({
        "trainable_parameters": trainable, "base_memory_gb": quant_report.bytes_after / 1e9,
        "quantization_relative_error": quant_report.relative_error,
        "tokens_per_second": sum(tps) / max(len(tps), 1), "data": data_stats,
        "final_train_loss": rows[-1]["train_loss"] if rows else None, "ranks": world.size,
    })
    log(f"trained {summary['steps']} steps in {summary['elapsed_s']:.0f}s, "
        f"{summary['tokens_per_second']:.0f} tok/s, peak memory {summary['peak_memory_gb']:.2f} GB; "
        f"adapters in {out}")

    if cfg.eval.enabled:
        summary["eval"] = run_eval(model, tokenizer, datasets["test"], cfg, out)
    write_json(out / "run_summary.json", {**summary, "platform": platform.platform(), "python": sys.version.split()[0]})
    return summary


def run_eval(model, tokenizer, test_set, cfg: Config, out: Path) -> dict:
    """Score base and tuned on the test split, print the table, write eval.json."""
    from .evaluate import evaluate_model, results_table

    examples = test_set[: cfg.eval.limit] if cfg.eval.limit else test_set
    log(f"evaluating on {len(examples)} test examples ...")
    results = evaluate_model(model, tokenizer, examples, cfg.training.batch_size, cfg.eval.max_new_tokens,
                             compare_base=cfg.eval.compare_base)
    write_json(out / "eval.json", results)
    print_table("held-out test set:", results_table(results))
    return {name: {k: v for k, v in r.items() if k != "samples"} for name, r in results.items()}
