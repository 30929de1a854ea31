"""A whole training run from a Config: load, quantize, add adapters, train, save, evaluate.

Writes the documented output folder: adapters.safetensors, adapter_config.json,
train_config.yaml, data_fingerprint.json, metrics.jsonl, loss.png, checkpoints/, eval.json,
run_summary.json, peft/.
"""

from __future__ import annotations

import json
import platform
import sys
import time
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
    from .cpu_math import use_fast_cpu_math
    from .frozen_matmul import use_fast_frozen_layers
    from .models import load_model
    from .quantize import quantize_model

    model, tokenizer, info = load_model(cfg.model)
    if cfg.data.chat_template:
        from .chat import use_template_file

        use_template_file(tokenizer, cfg.data.chat_template)
    q = cfg.quantization
    quant_report = quantize_model(model, q.mode, bits=q.bits, group_size=q.group_size,
                                  block_size=q.block_size, double_quant=q.double_quant)
    use_fast_frozen_layers(model)
    use_fast_cpu_math(model)
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


def data_splits(cfg: Config) -> tuple[str, ...]:
    """The splits a training run reads: test.jsonl only when evaluation follows."""
    return ("train", "valid", "test") if cfg.eval.enabled else ("train", "valid")


DATA_RECORD = "data_fingerprint.json"


def data_fingerprint(data_path: str) -> dict[str, str]:
    """sha256 of each split file in `data_path` (train/valid/test .jsonl), for `--resume` to tell a
    changed dataset (the batch order continues by position, so new rows change what follows)."""
    import hashlib

    found = {}
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl"):
        path = Path(data_path) / name
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            found[name] = digest.hexdigest()
    return found


def changed_data(out: Path, data_path: str) -> list[str]:
    """The split files whose content differs from when the run in `out` started (none when unrecorded)."""
    record = out / DATA_RECORD
    if not record.is_file():
        return []
    then, now = json.loads(record.read_text()), data_fingerprint(data_path)
    return sorted(name for name in set(then) | set(now) if then.get(name) != now.get(name))


def describe_data(data_stats: dict, objective: str = "sft") -> list[str]:
    """One log line per split: where it came from, its size (pairs for dpo / orpo), and what was changed."""
    lines = []
    for split, stats in data_stats.items():
        if not stats["examples"]:
            lines.append(f"data {split}: {stats['source']}")
            continue
        changes = [f"{stats[key]} {what}" for key, what in (
            ("truncated", "truncated"), ("dropped_overlong", "dropped as too long"),
            ("dropped_no_target", "dropped with no target tokens"),
            ("dropped_identical", "dropped with identical chosen and rejected")) if stats.get(key)]
        if stats.get("targets_cut_off"):
            changes.append(f"{stats['targets_cut_off']} of them because truncation to data.max_seq_length "
                           "cut off every target token")
        changed = f"; {', '.join(changes)}" if changes else ""
        unit = "pairs" if objective != "sft" else "examples"
        source = "" if stats["source"] == f"{split}.jsonl" else f" ({stats['source']})"
        lines.append(f"data {split}: {stats['examples']} {unit}, {stats['tokens']:,} tokens "
                     f"(longest {stats['max_length']}){changed}{source}")
        if stats.get("rewritten_turns"):
            lines.append(f"data {split}: the chat template rewrites {stats['rewritten_turns']} earlier assistant "
                         f"turn(s) in {stats['rewritten_rows']} row(s) once later turns follow (e.g. "
                         f"{'; '.join(stats['rewritten_examples'])}); each is trained as its own example, "
                         "as the template renders it when generating that turn")
        if stats.get("unused_fields"):
            named = ", ".join(f"{key} ({count} row{'s' * (count != 1)})" for key, count in stats["unused_fields"].items())
            read = ("'prompt' or 'messages', 'chosen' and 'rejected' [+ 'tools']" if objective != "sft" else
                    "'messages' [+ 'tools'], 'prompt' + 'completion', or 'text'")
            lines.append(f"data {split}: fields not used by training: {named} (a row is read as {read}; nothing "
                         "else in it is applied)")
        if stats.get("templated_completions"):
            lines.append(f"data {split}: {stats['templated_completions']} prompt/completion row(s) formatted with the "
                         "chat template as one user turn and one assistant reply (query the tuned model through "
                         "/v1/chat/completions; data.completions_as_chat=false trains the raw text that "
                         "/v1/completions sends)")
    return lines


def adapter_extra(cfg: Config, info, quant_report) -> dict:
    from .adapters.load import base_model_shape

    return {
        "model": cfg.model,
        "model_source": {"kind": info.kind, "path": info.path},
        "base_model_name_or_path": cfg.model,
        "base_model": base_model_shape(info.hf_config),
        "quantization": {"mode": cfg.quantization.mode, "bits": cfg.quantization.bits,
                         "group_size": cfg.quantization.group_size, "block_size": cfg.quantization.block_size,
                         "double_quant": cfg.quantization.double_quant, "source_quantized": quant_report.source_quantized},
        "mlx_lora_version": __version__,
    }


def phases_line(phases: dict) -> str:
    """One line with the seconds of each phase of a run and their total."""
    parts = [f"{name} {seconds:.0f}s" for name, seconds in phases.items()]
    return f"time: {', '.join(parts)} (total {sum(phases.values()):.0f}s)"


def planned_memory(cfg: Config) -> tuple[float | None, str | None]:
    """(bytes, source) the plan fits a run into: `training.memory_limit` when it is a size below this
    machine's memory (the guard stops the run there), else (None, None) for the machine's own."""
    from .memory.plan import machine_memory, parse_memory

    limit = cfg.training.memory_limit
    if limit in ("auto", "none"):
        return None, None
    size = parse_memory(limit)
    return (size, f"training.memory_limit {limit}") if size < machine_memory()[0] else (None, None)


def memory_plan(cfg: Config, say=log):
    """The memory plan of `cfg`, printed with `say`; None (with a warning) when the model cannot be sized."""
    from .memory.plan import make_plan

    try:
        plan = make_plan(cfg, *planned_memory(cfg))
    except (FileNotFoundError, ValueError) as err:
        say(f"warning: no memory prediction was made ({err}); training runs without one")
        return None
    say(plan.table())
    return plan


def resolve_float_weights(cfg: Config, plan) -> Config:
    """`cfg` with `training.float_weights: auto` replaced by the plan's choice (float or quantized);
    without a plan, auto means quantized (no prediction says the copies would fit)."""
    import dataclasses

    t = cfg.training
    if t.float_weights != "auto":
        return cfg
    chosen = "float" if plan is not None and plan.settings.float_weights else "quantized"
    return dataclasses.replace(cfg, training=dataclasses.replace(t, float_weights=chosen))


def resolve_auto_batch(cfg: Config, plan, train_examples: int) -> Config:
    """`cfg` with `batch_size: auto` replaced by the planned micro-batch and accumulation
    (capped by the training split's size); unchanged when the batch size is a number."""
    import dataclasses

    from .memory.plan import auto_batch

    t = cfg.training
    if t.batch_size != "auto":
        return cfg
    if plan is None:
        batch, accumulation = 1, (t.effective_batch_size or t.grad_accumulation)
        log(f"batch_size auto: no prediction, so micro-batch 1 x {accumulation} accumulated")
    else:
        batch, accumulation = auto_batch(plan.shape, plan.settings, plan.memory, t.effective_batch_size,
                                         largest=train_examples)
        log(f"batch_size auto: micro-batch {batch} x {accumulation} accumulated "
            f"(predicted peak {plan.peak / 1e9:.2f} GB at the planned batch, limit {plan.memory / 1e9:.1f} GB)")
    return dataclasses.replace(cfg, training=dataclasses.replace(t, batch_size=batch, grad_accumulation=accumulation))


def run_training(cfg: Config, resume: bool = False, setup_s: float | None = None,
                 memory_limit: float | None = None, world=None) -> dict:
    """Train per `cfg` and write the output folder; returns the run summary.

    `setup_s`: seconds spent before this call (environment set-up by the shell scripts), shown
    in the closing per-phase timing line when given. `memory_limit` (bytes) is the memory guard
    handed to `train` (see `memory.plan.guard_limit`).

    Under `mlx.launch` this is one rank of a data-parallel run: every rank trains, rank 0 alone
    writes files, reports and evaluates. `world`: an already joined `distributed.World` (a
    benchmark's, with `time_all_reduce`); by default this call joins the ranks itself.
    """
    import mlx.core as mx

    from . import distributed
    from .adapters import ADAPTER_CONFIG, adapter_config, save_adapters
    from .preference_data import load_datasets_for
    from .launch import check_same_inputs
    from .cpu_streams import stream_count
    from .frozen_matmul import keep_float_weights, kept_bytes
    from .kernel_cache import start_preamble_pch
    from .lora import count_trainable, transformer_blocks
    from .train import still_improving, train

    phases = {"set-up": setup_s} if setup_s is not None else {}
    clock = time.perf_counter()

    world = world or distributed.init(cfg.distributed.backend, cfg.distributed.timeout_s,
                                      tell=lambda message: print(message, file=sys.stderr, flush=True))
    if world.size > 1 and cfg.training.batch_size == "auto":
        raise ValueError("training.batch_size: auto is planned per machine; with several ranks set the global "
                         f"batch as a number divisible by {world.size}")
    distributed.check_batch_size(cfg.training.batch_size, world.size)
    say = log if world.is_main else (lambda message="": None)
    out = Path(cfg.output_dir)
    if out.exists() and not resume and (out / "checkpoints").exists():
        raise FileExistsError(f"output_dir {out} already holds a run; pass --resume to continue it, "
                              "or choose another output_dir (e.g. output_dir=runs/new)")
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "train_config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        if resume and (changed := changed_data(out, cfg.data.path)):
            log(f"warning: --resume: {', '.join(changed)} in {cfg.data.path} changed since the run started; it goes on "
                "from its batch position over the data as it is now, so it will not equal an uninterrupted run")
        elif not resume or not (out / DATA_RECORD).is_file():
            write_json(out / DATA_RECORD, data_fingerprint(cfg.data.path))

    ranks = f" | {world.size} ranks ({cfg.distributed.backend})" if world.size > 1 else ""
    say(f"mlx-lora {__version__} | device {mx.default_device()}{ranks} | model {cfg.model}")
    kernel_preamble = start_preamble_pch()  # builds while the model loads; see kernel_cache.py
    plan = memory_plan(cfg, say)  # every rank plans (the float_weights choice must agree); rank 0 prints
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

    datasets, data_stats = load_datasets_for(cfg.data, tokenizer, cfg.training.objective, data_splits(cfg), seed=cfg.seed)
    for line in describe_data(data_stats, cfg.training.objective):
        say(line)
    if cfg.training.batch_size == "auto" or cfg.training.float_weights == "auto":
        cfg = resolve_float_weights(resolve_auto_batch(cfg, plan, len(datasets["train"])), plan)
        if world.is_main:
            write_text(out / "train_config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    if cfg.training.float_weights == "float" and (kept := keep_float_weights(model)):
        say(f"float weights: float32 copies of {len(kept)} quantized layers kept for the run "
            f"({kept_bytes(kept) / 1e9:.2f} GB; training.float_weights=quantized turns this off)")
    rows = cfg.training.batch_size // world.size
    if (streams := stream_count(cfg.training, rows, mx.default_device() == mx.cpu)) > 1:
        unit = "rows" if cfg.training.objective == "sft" else "pairs"
        say(f"cpu streams: each micro-batch's {rows} {unit} in {streams} groups side by side, one CPU stream a core "
            "(training.cpu_streams=1 turns this off)")

    extra = adapter_extra(cfg, info, quant_report)
    config = adapter_config(cfg.lora, keys, len(blocks), extra)
    start_step = None
    if resume and world.is_main:
        from .checkpoints import latest

        checkpoint = latest(out)
        start_step = int(json.loads((checkpoint / "state.json").read_text())["step"]) if checkpoint else None
        from .train import total_steps

        if start_step is not None and start_step >= (planned := total_steps(cfg.training, len(datasets["train"]))):
            raise ValueError(f"--resume: the run in {out} already reached its {planned} steps; nothing to resume (its "
                             f"files are kept as they are). To train longer pass training.iters=N (N > "
                             f"{planned}) with --resume, or start a new output_dir")
    metrics = MetricsWriter(out / "metrics.jsonl", resume_from_step=start_step if resume else None)
    if not resume:
        metrics.rows = []
    if kernel_preamble is not None:  # wait for it (~2.5 s, mostly done by now): each kernel then builds ~5x faster
        say(kernel_preamble.finish(timeout=30))
    phases["load"] = time.perf_counter() - clock
    clock = time.perf_counter()
    from .train import MemoryLimitExceeded

    if world.is_main:  # a checkpoint folder reads its adapters' config from here (eval, fuse, serve)
        write_json(out / ADAPTER_CONFIG, config)
    try:
        summary = train(model, datasets["train"], datasets["valid"], cfg.training, out, seed=cfg.seed,
                        resume=resume, callbacks=[metrics, ProgressBar()] if world.is_main else [],
                        memory_limit=memory_limit, world=world,
                        pack_capacity=cfg.data.max_seq_length if cfg.data.pack else None)
    except (KeyboardInterrupt, MemoryLimitExceeded):
        # Stopped at a step boundary with a checkpoint: the adapters as they are now (that checkpoint's)
        # go where a finished run's go, so eval, fuse and serve take them; --resume carries on.
        from .checkpoints import latest

        if world.is_main and latest(out) is not None:
            save_adapters(out, model, config)
            print(f"adapters as of the last checkpoint written to {out} (eval, fuse and serve take them; "
                  "--resume continues the run)", file=sys.stderr, flush=True)
        raise
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
    if summary["stopped_early"]:
        log(f"stopped early at step {summary['steps']} of {summary['planned_steps']}: the validation loss had not "
            f"improved for {cfg.training.early_stop_patience} evaluations")
    falling = still_improving(summary["val_history"])
    summary["val_loss_still_falling"] = falling is not None
    if falling:
        log(f"note: the validation loss was still falling when training stopped ({falling[0]:.3f} -> {falling[1]:.3f} "
            "over the last evaluations); more training may help: raise training.epochs (or training.iters)")
    phases["train"] = time.perf_counter() - clock
    clock = time.perf_counter()
    if info.gguf_report is not None:  # how each GGUF tensor type is held, with its measured weight error
        summary["gguf_tensor_types"] = info.gguf_report.as_dict()

    def write_summary() -> None:
        summary["phases_s"] = phases
        write_json(out / "run_summary.json", {**summary, "platform": platform.platform(), "python": sys.version.split()[0]})

    write_summary()  # the training's summary stands even if the evaluation is interrupted
    if summary.pop("interrupted", False):  # Ctrl-C came during the last step: trained, but no evaluation
        log(f"interrupted during the last step: training is complete, evaluation skipped (mlx-lora eval "
            f"{cfg.output_dir}/train_config.yaml scores it)")
        raise KeyboardInterrupt
    if cfg.eval.enabled:
        summary["eval"] = run_eval(model, tokenizer, datasets["test"], cfg, out)
        phases["eval"] = time.perf_counter() - clock
    log(phases_line(phases))
    write_summary()
    return summary


def base_scores_cached(model, tokenizer, examples, cfg: Config) -> tuple[str | None, dict | None]:
    """(cache key, the base's stored scores or None) when `eval.cache_base` applies (see `eval_cache`)."""
    from .evaluate import prompt_tokens
    from .lora import lora_layers

    if not (cfg.eval.cache_base and cfg.eval.compare_base and lora_layers(model)):
        return None, None
    from .eval_cache import base_eval_key, cache_dir, load_base_scores

    start = time.perf_counter()
    prompts = [prompt_tokens(tokenizer, e) if e.reference is not None else None for e in examples]
    key = base_eval_key(model, tokenizer, examples, prompts, cfg.training.batch_size, cfg.eval.max_new_tokens)
    cached = load_base_scores(key)
    if cached is not None:
        log(f"base scores: reused from an earlier run with the same base weights, test data and eval settings "
            f"({cache_dir() / key}.json, checked in {time.perf_counter() - start:.1f}s); eval.cache_base=false "
            "scores the base again")
    return key, cached


def run_eval(model, tokenizer, test_set, cfg: Config, out: Path, name: str = "eval.json") -> dict:
    """Score base and tuned on the test split, print the table, write `out / name`."""
    from .evaluate import evaluate_model, evaluate_preference_model, results_table

    examples = test_set if cfg.eval.limit is None else test_set[: cfg.eval.limit]
    if cfg.training.objective != "sft":
        log(f"evaluating on {len(examples)} test pairs ...")
        results = evaluate_preference_model(model, examples, cfg.training, compare_base=cfg.eval.compare_base)
    else:
        log(f"evaluating on {len(examples)} test examples ...")
        key, cached = base_scores_cached(model, tokenizer, examples, cfg)
        results = evaluate_model(model, tokenizer, examples, cfg.training.batch_size, cfg.eval.max_new_tokens,
                                 compare_base=cfg.eval.compare_base, cached_base=cached)
        if key and cached is None and "base" in results:
            from .eval_cache import store_base_scores

            store_base_scores(key, results["base"])
    write_json(out / name, results)
    print_table("held-out test set:", results_table(results))
    return {name: {k: v for k, v in r.items() if k != "samples"} for name, r in results.items()}
