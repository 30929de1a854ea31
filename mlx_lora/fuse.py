"""Fusing adapters into their base: a Hugging Face folder (and optionally a GGUF file) to ship.

`fuse_adapters` merges, optionally re-quantizes, and checks the result against base + adapters
on test prompts: re-quantizing a fused model can silently erase a fine-tune, so the check's
numbers (largest logit difference, greedy-token agreement) are returned and written to
`fuse_report.json`. The check reads the test split as the run's objective does (a DPO / ORPO
run's pairs compare on the prompt and its chosen answer). The GGUF export is
`models/gguf_export.py`; loading models is `models/`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

FUSED_DIRNAME = "fused"
REPORT_NAME = "fuse_report.json"
GGUF_NAME = "model-f16.gguf"
DTYPES = ("float16", "bfloat16", "float32")
# Below this greedy agreement with base + adapters the fused model is reported as degraded.
MIN_AGREEMENT = 0.95
# When fused agrees with base + adapters hardly more often than the bare base does, most of
# the fine-tune is gone: warn when it keeps less than this fraction of the adapters' effect.
MIN_KEPT_EFFECT = 0.75
CHECK_LIMIT = 8
FALLBACK_PROMPTS = ("Hello! Who are you?", "Write one sentence about the sea.", "What is 12 + 30?")

@dataclass
class FuseResult:
    """What `fuse_adapters` wrote and what its check found."""

    out_dir: Path
    report: dict
    gguf_path: Path | None = None
    warnings: list[str] = field(default_factory=list)


# --- the check ----------------------------------------------------------------------------------

def check_sequences(tokenizer, prompts_file: Path | None, limit: int = CHECK_LIMIT,
                    objective: str = "sft") -> list[tuple[list[int], list[bool]]]:
    """(tokens, positions to compare) for up to `limit` test rows, or generic prompts without a file.

    The test split is read as training reads it for `objective`: with a chat/completions split
    (sft) the compared positions are the answer tokens; with preference pairs (dpo, orpo) they
    are the chosen answer's tokens after the prompt (the sequence the run made more likely).
    Generic prompts compare every position.
    """
    if prompts_file is not None and Path(prompts_file).is_file():
        from .config import DataConfig

        config = DataConfig(path=str(Path(prompts_file).parent))
        if objective == "sft":
            from .data import load_split

            examples = load_split(Path(prompts_file), tokenizer, config)
        else:
            from .preference_data import load_preference_split

            examples = [pair.chosen for pair in load_preference_split(Path(prompts_file), tokenizer, config,
                                                                      objective=objective)]
        chosen = [(e.tokens, e.mask) for e in examples if any(e.mask)][:limit]
        if chosen:
            return chosen
    sequences = []
    for text in FALLBACK_PROMPTS[:limit]:
        if getattr(tokenizer, "chat_template", None):
            tokens = list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))
        else:
            tokens = list(tokenizer.encode(text))
        sequences.append((tokens, [True] * len(tokens)))
    return sequences


def recorded_objective(adapter_dir: Path) -> str:
    """`training.objective` of the run that wrote `adapter_dir` (its train_config.yaml), or sft
    when the folder does not say (adapters made elsewhere are checked as SFT ones)."""
    import yaml

    recorded = Path(adapter_dir) / "train_config.yaml"
    try:
        objective = yaml.safe_load(recorded.read_text(encoding="utf-8"))["training"]["objective"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):  # no record, or one without the key
        return "sft"
    return objective if isinstance(objective, str) else "sft"


def model_logits(model, sequences) -> list:
    """Float32 logits at the compared positions of each sequence: a list of (positions, vocab) arrays."""
    import mlx.core as mx
    import numpy as np

    out = []
    for tokens, positions in sequences:
        # The logits at position i predict token i + 1, so the target at i is scored by i - 1.
        index = np.array([i - 1 for i, keep in enumerate(positions) if keep and i > 0] or [len(tokens) - 1])
        logits = model(mx.array(tokens)[None])[0, mx.array(index)].astype(mx.float32)
        mx.eval(logits)
        out.append(logits)
    return out


def compare_logits(reference: list, candidate: list) -> dict:
    """Largest and mean absolute logit difference and greedy-token agreement of two runs."""
    import mlx.core as mx

    max_diff, total_diff, agree, count = 0.0, 0.0, 0, 0
    for ref, cand in zip(reference, candidate):
        diff = mx.abs(ref - cand)
        max_diff = max(max_diff, diff.max().item())
        total_diff += diff.mean().item() * ref.shape[0]
        agree += (mx.argmax(ref, axis=-1) == mx.argmax(cand, axis=-1)).sum().item()
        count += ref.shape[0]
    return {"max_logit_diff": max_diff, "mean_logit_diff": total_diff / max(count, 1),
            "greedy_agreement": agree / max(count, 1), "positions": count}


def verdict(fused: dict, base: dict | None) -> list[str]:
    """Warnings (possibly none) about a fused model that no longer behaves like base + adapters."""
    warnings = []
    if fused["greedy_agreement"] < MIN_AGREEMENT:
        warnings.append(f"the fused model picks the same next token as base + adapters at only "
                        f"{100 * fused['greedy_agreement']:.1f}% of the answer positions (largest logit "
                        f"difference {fused['max_logit_diff']:.3f}); below {100 * MIN_AGREEMENT:.0f}%")
    if base is not None and base["greedy_agreement"] < 1.0:
        # 0 = behaves like the bare base, 1 = behaves exactly like base + adapters.
        kept = (fused["greedy_agreement"] - base["greedy_agreement"]) / (1.0 - base["greedy_agreement"])
        fused["kept_effect"] = kept
        if kept < MIN_KEPT_EFFECT:
            warnings.append(f"only {100 * max(kept, 0):.0f}% of the adapters' effect on greedy tokens survives "
                            f"(base alone agrees {100 * base['greedy_agreement']:.1f}%, fused "
                            f"{100 * fused['greedy_agreement']:.1f}%): the fine-tune is being lost")
    if warnings:
        warnings.append("re-quantization has degraded the fine-tune: serve the float fused model, use "
                        "--quantize 8, or serve base + adapters (convert_and_serve.sh --no-fuse)")
    return warnings


# --- fusing ---------------------------------------------------------------------------------------

def _mx_dtype(name: str):
    import mlx.core as mx

    if name not in DTYPES:
        raise ValueError(f"dtype: {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(mx, name)


def cast_floats(model, dtype) -> None:
    """Cast every floating-point parameter of `model` to `dtype` in place."""
    import mlx.core as mx
    from mlx.utils import tree_map

    model.update(tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a,
                          model.parameters()))


def requantize(model, config: dict, bits: int, group_size: int) -> None:
    """Affine-quantize every linear and embedding whose width fits `group_size`; records it in config."""
    import mlx.nn as nn

    if bits not in (4, 8):
        raise ValueError(f"--quantize: bits must be 4 or 8, got {bits}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"--group-size must be 32, 64 or 128, got {group_size}")
    nn.quantize(model, group_size=group_size, bits=bits,
                class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0)
    config["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine"}


def save_hf_folder(out_dir: Path, model, tokenizer, config: dict) -> None:
    """config.json, model.safetensors (+ index) and tokenizer files, in the layout mlx-lm and transformers read."""
    from mlx_lm.utils import save_config, save_model

    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(out_dir, model)
    save_config(copy.deepcopy(config), out_dir / "config.json")
    tokenizer.save_pretrained(str(out_dir))


def fuse_adapters(model_source: str, adapter_dir: str | Path, out_dir: str | Path, *, dtype: str = "float16",
                  quantize_bits: int | None = None, group_size: int = 64, gguf: bool = False,
                  check_prompts: str | Path | None = None, check: bool = True,
                  check_limit: int = CHECK_LIMIT, objective: str | None = None) -> FuseResult:
    """Merge the adapters in `adapter_dir` into `model_source` and write a Hugging Face folder.

    Args:
        dtype: float type of the written weights (the base is dequantized first).
        quantize_bits: 4 or 8 to affine-quantize the fused weights again (then checked).
        gguf: also write `model-f16.gguf` (see `models/gguf_export.py` for the architectures and tokenizers).
        check_prompts: a JSONL test split whose answers the check compares on.
        objective: the run's `training.objective`, which says how to read `check_prompts`
            (default: as recorded in `adapter_dir/train_config.yaml`, else sft).
    Returns a FuseResult; its `warnings` are non-empty when the fused model lost the fine-tune.
    """
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model

    from .adapters import load_adapters
    from .checkpoints import atomic_folder
    from .evaluate import adapters_disabled
    from .frozen_matmul import use_fast_frozen_layers
    from .models.gguf_export import export_gguf, tokenizer_spec
    from .lora import fuse_lora
    from .models import load_model

    target_dtype = _mx_dtype(dtype)
    out_dir = Path(out_dir)
    model, tokenizer, info = load_model(model_source)
    if gguf and info.kind not in ("gguf", "demo"):
        tokenizer_spec(tokenizer)  # a tokenizer the GGUF cannot carry is refused before any work
    use_fast_frozen_layers(model)
    adapter_raw = load_adapters(model, adapter_dir)

    objective = objective or recorded_objective(Path(adapter_dir))
    sequences = check_sequences(tokenizer, Path(check_prompts) if check_prompts else None, check_limit,
                                objective) if check else []
    reference = model_logits(model, sequences)
    with adapters_disabled(model):
        bare = model_logits(model, sequences)

    fused_count = fuse_lora(model, mx.float32)
    dequantize_model(model)  # layers the adapters did not touch (embeddings, lm_head) may still be quantized
    cast_floats(model, target_dtype)
    mx.eval(model.parameters())

    config = {k: v for k, v in info.hf_config.items() if k not in ("quantization", "quantization_config")}
    config["torch_dtype"] = dtype
    report: dict = {"model": model_source, "adapter": str(adapter_dir), "fused_layers": fused_count,
                    "dtype": dtype, "adapter_config": adapter_raw}
    with atomic_folder(out_dir) as staging:  # a crash never leaves a half-written model folder
        if gguf:
            source_gguf = Path(info.path) if info.kind in ("gguf", "demo") else None
            export_gguf(staging / GGUF_NAME, model, config, tokenizer, source_gguf)
        if quantize_bits is not None:
            requantize(model, config, quantize_bits, group_size)
            use_fast_frozen_layers(model)  # same keys; only makes the check below fast on the CPU
        candidate = model_logits(model, sequences)
        report["quantization"] = config.get("quantization")
        warnings: list[str] = []
        if sequences:
            fused_vs_tuned = compare_logits(reference, candidate)
            base_vs_tuned = compare_logits(reference, bare)
            warnings = verdict(fused_vs_tuned, base_vs_tuned)
            report["check"] = {"fused_vs_base_plus_adapters": fused_vs_tuned, "base_vs_base_plus_adapters": base_vs_tuned,
                               "prompts": len(sequences), "source": str(check_prompts or "generic prompts"),
                               "objective": objective}
        report["warnings"] = warnings
        save_hf_folder(staging, model, tokenizer, config)
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    gguf_path = out_dir / GGUF_NAME if gguf else None
    return FuseResult(out_dir=out_dir, report=report, gguf_path=gguf_path, warnings=warnings)


# --- command line --------------------------------------------------------------------------------

def resolve_inputs(config_path: str | None, model: str | None, adapter: str | None, out: str | None,
                   prompts: str | None, overrides: list[str] = ()) -> tuple[str, Path, Path, Path | None, str | None]:
    """(model source, adapter folder, output folder, check prompts, training objective) from a
    training config (with `key.path=value` overrides, as `train` takes them) and/or flags; the
    objective is None without a config (`fuse_adapters` then reads the run's record)."""
    from .adapters import read_adapter_config

    cfg = None
    if config_path is not None or overrides:
        from .config import load_config

        cfg = load_config(config_path, list(overrides))
    if adapter is None and cfg is None:
        raise ValueError("no adapters given: pass a training CONFIG.yaml or --adapter DIR")
    adapter_dir = Path(adapter) if adapter is not None else Path(cfg.output_dir)
    if model is None:
        model = cfg.model if cfg else read_adapter_config(adapter_dir)[0].get("model")
        if not model:
            raise ValueError(f"{adapter_dir}/adapter_config.json does not name its base model; pass --model SOURCE")
    if cfg is not None:
        from .config import run_differences

        differences = run_differences(cfg, adapter_dir)
        if differences:  # the check then compares on other data, or the adapters go on another base
            print(f"warning: the adapters in {adapter_dir} were trained otherwise ({'; '.join(differences)}); fusing "
                  f"and checking as the config says (pass {adapter_dir / 'train_config.yaml'} to use the run's own)",
                  file=sys.stderr, flush=True)
    if prompts is None and cfg is not None:
        prompts = str(Path(cfg.data.path) / "test.jsonl")
    return (model, adapter_dir, Path(out) if out else adapter_dir / FUSED_DIRNAME, Path(prompts) if prompts else None,
            cfg.training.objective if cfg is not None else None)


def build_parser(prog: str = "mlx-lora fuse") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Merge LoRA adapters into the base model and write a "
                                     "Hugging Face folder (and optionally GGUF).")
    parser.add_argument("items", nargs="*", metavar="CONFIG [key=value ...]",
                        help="training config (model, output_dir and test split come from it), then any key.path=value "
                             "overrides as `train` takes them (e.g. output_dir=runs/other)")
    parser.add_argument("--model", help="base model source (default: the config's, or adapter_config.json's `model`)")
    parser.add_argument("--adapter", help="adapter folder (default: the config's output_dir)")
    parser.add_argument("--out", help="output folder (default: <adapter>/fused)")
    parser.add_argument("--dtype", default="float16", choices=DTYPES, help="float type of the fused weights")
    parser.add_argument("--quantize", type=int, choices=(4, 8), metavar="BITS", help="re-quantize (affine 4 or 8 bit) and check")
    parser.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    parser.add_argument("--gguf", action="store_true",
                        help=f"also write {GGUF_NAME} for llama.cpp / Ollama (llama, mistral, qwen2/3, gemma2/3, phi3; "
                             "byte-level BPE tokenizers, or any tokenizer of a GGUF source)")
    parser.add_argument("--prompts", help="JSONL test split for the check (default: the config's test split; a "
                        "dpo / orpo run's pairs are compared on the prompt and the chosen answer)")
    parser.add_argument("--check-limit", type=int, default=CHECK_LIMIT, help="test rows the check compares on")
    parser.add_argument("--no-check", action="store_true", help="skip comparing the fused model with base + adapters")
    return parser


def format_check(report: dict) -> list[str]:
    """Human-readable lines of a fuse report's check."""
    check = report.get("check")
    if not check:
        return ["check: skipped"]
    fused, base = check["fused_vs_base_plus_adapters"], check["base_vs_base_plus_adapters"]
    pairs = check.get("objective", "sft") != "sft" and check.get("source") != "generic prompts"
    answers = ", the pairs' chosen answers" if pairs else ""
    return [f"check on {check['prompts']} prompts ({fused['positions']} answer positions{answers}):",
            f"  fused vs base+adapters: greedy agreement {100 * fused['greedy_agreement']:.1f}%, "
            f"max logit diff {fused['max_logit_diff']:.4f}",
            f"  base  vs base+adapters: greedy agreement {100 * base['greedy_agreement']:.1f}% (what no fine-tune looks like)"]


def run_fuse(args) -> FuseResult:
    from .cli import _split_config_and_overrides

    config, overrides = _split_config_and_overrides(args.items)
    model, adapter_dir, out_dir, prompts, objective = resolve_inputs(config, args.model, args.adapter, args.out,
                                                                     args.prompts, overrides)
    return fuse_adapters(model, adapter_dir, out_dir, dtype=args.dtype, quantize_bits=args.quantize,
                         group_size=args.group_size, gguf=args.gguf, check_prompts=prompts,
                         check=not args.no_check, check_limit=args.check_limit, objective=objective)


def print_result(result: FuseResult) -> None:
    print(f"fused model: {result.out_dir}")
    if result.gguf_path:
        print(f"gguf: {result.gguf_path}")
    for line in format_check(result.report):
        print(line)
    for warning in result.warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    if result.warnings:
        print("!" * 72 + "\n!! the fused model does NOT behave like your fine-tune; see "
              f"{result.out_dir / REPORT_NAME}\n" + "!" * 72, file=sys.stderr)


def main(argv: list[str] | None = None, prog: str = "mlx-lora fuse") -> int:
    """`mlx-lora fuse [CONFIG] [--adapter DIR] [--model SRC] [--out DIR] [--quantize 4|8] [--gguf]`."""
    from .cli import run_command

    args = build_parser(prog).parse_args(argv)
    return run_command(lambda a: (print_result(run_fuse(a)), 0)[1], args)
