"""The CUDA backend: the same YAML, data and output folder, trained with transformers + PEFT + bitsandbytes.

`run_training(cfg)` loads the base with `BitsAndBytesConfig` (NF4, double quantization, bf16
compute) from the `quantization:` section, adds PEFT LoRA from the `lora:` section and trains
with the plain loop in `cuda_loop.py`: the tokenization and loss masks come from `data.py`, so
they are the MLX backend's by construction. Under `accelerate launch` it trains data-parallel
unchanged (DDP), or sharded with FSDP + QLoRA under an FSDP accelerate config (`cuda_fsdp.py`,
configs/accelerate/fsdp_qlora.yaml). Writes metrics.jsonl, loss.png, eval.json, checkpoints/, train_config.yaml, the
MLX adapter (adapters.safetensors + adapter_config.json) and the PEFT adapter (peft/).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import yaml

from .. import __version__
from ..checkpoints import write_json, write_text
from ..config import Config, ConfigError, config_to_dict

INSTALL_HINT = "pip install -e '.[cuda]'"
EXTRA_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
BNB_BLOCK_SIZE = 64  # transformers' BitsAndBytesConfig has no block size: bitsandbytes' 4-bit default
PEFT_SUBDIR = "peft"  # both formats name their config adapter_config.json, so PEFT's gets a folder


class BackendUnavailable(RuntimeError):
    """The CUDA backend cannot run here (missing packages or no GPU); the message says what to do."""


def require_extra() -> None:
    """Import the `cuda` extra's packages, or raise naming the one missing and the install command."""
    import importlib

    for name in EXTRA_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise BackendUnavailable(f"backend: cuda needs {', '.join(EXTRA_PACKAGES)}; {name} is not installed "
                                     f"({err}). Install them with: {INSTALL_HINT}") from err


def check_config(cfg: Config) -> list[str]:
    """Settings the CUDA backend cannot honour, one problem per line."""
    q = cfg.quantization
    problems = []
    if q.mode == "affine":
        problems.append("quantization.mode: 'affine' is MLX's format; with backend: cuda use nf4 (QLoRA with "
                        "bitsandbytes) or none (float base)")
    if q.mode == "nf4" and q.block_size != BNB_BLOCK_SIZE:
        problems.append(f"quantization.block_size: transformers' bitsandbytes NF4 uses blocks of {BNB_BLOCK_SIZE}, "
                        f"got {q.block_size}; set quantization.block_size={BNB_BLOCK_SIZE}")
    return problems


def resolve_device(device: str | None) -> str:
    """"cuda" when a GPU is visible; "cpu" only when asked for explicitly (tests, smoke runs)."""
    import torch

    if device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return "cpu"  # asked for: a test, or `accelerate launch --cpu`
    if device not in (None, "cuda"):
        raise ValueError(f"device must be None, 'cuda' or 'cpu', got {device!r}")
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            f"backend: cuda needs an NVIDIA GPU, and torch {torch.__version__} sees none "
            "(torch.cuda.is_available() is False). Train here with backend: mlx, or install a CUDA build of torch.")
    return "cuda"


def compute_dtype(device: str):
    """bfloat16 where the GPU supports it (as QLoRA), float32 otherwise (CPU, older GPUs)."""
    import torch

    if device != "cpu" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_base(cfg: Config, device, dtype, fsdp: bool = False):
    """(model, tokenizer, ModelInfo-like dict) with the base quantized per `cfg.quantization`.

    `fsdp`: pack the 4-bit weights in `dtype` instead of uint8, so that FSDP can shard them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from ..models import resolve_source
    from .cuda_fsdp import quant_storage

    kind, path = resolve_source(cfg.model)
    folder = float_folder_from_gguf(path) if kind in ("gguf", "demo") else path
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if cfg.data.chat_template:
        from ..chat import use_template_file

        use_template_file(tokenizer, cfg.data.chat_template)
    quantization = None
    if cfg.quantization.mode == "nf4":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=cfg.quantization.double_quant,
                                          bnb_4bit_compute_dtype=dtype,
                                          bnb_4bit_quant_storage=quant_storage(fsdp, dtype))
    model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=quantization, dtype=dtype,
                                                 device_map={"": device})
    model.config.use_cache = False  # no KV cache while training; generation turns it back on
    return model, tokenizer, {"kind": kind, "path": str(path)}


def float_folder_from_gguf(path: Path) -> Path:
    """A Hugging Face folder with the GGUF's weights dequantized to float32, made once in the cache.

    transformers refuses to combine a GGUF file with a BitsAndBytesConfig, so QLoRA of a GGUF
    model starts from its float form (SmolLM2-135M: about 0.5 GB).
    """
    import os
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import cache_dir

    target = cache_dir() / "hf-from-gguf" / path.stem
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
        # The dequantized model still carries transformers' GGUF quantizer, which refuses to save.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is the user's, like the rest of it
        try:
            os.replace(tmp, target)  # atomic; another process may have won the race, which is fine
        except OSError:
            if not (target / "config.json").is_file():
                raise
        os.makedirs(tmp, exist_ok=True)  # TemporaryDirectory cleans up what is there
    return target


def linear_module_names(model) -> list[str]:
    """Last names of the linear layers inside transformer blocks (bitsandbytes layers included)."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if ".layers." in f".{name}" and isinstance(module, torch.nn.Linear)})


def add_lora(model, cfg: Config, fsdp: bool = False):
    """Prepare for k-bit training, enable gradient checkpointing, wrap with PEFT LoRA from `cfg.lora`.

    Under FSDP the k-bit preparation is left out: it casts norms and the head to float32, and an
    FSDP unit must hold one dtype (TRL's SFTTrainer does the same for sharded QLoRA).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    targets = cfg.lora.resolve_targets(linear_module_names(model))
    checkpointing = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if cfg.quantization.mode == "nf4" and not fsdp:
        # Casts norms and the head to float32 and makes the input embeddings require grad,
        # which gradient checkpointing needs when every base weight is frozen.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.training.grad_checkpoint,
                                                **checkpointing)
    elif cfg.training.grad_checkpoint:
        model.gradient_checkpointing_enable(**checkpointing)
        model.enable_input_require_grads()
    total = model.config.num_hidden_layers
    count = total if cfg.lora.num_layers == -1 else min(cfg.lora.num_layers, total)
    config = PeftLoraConfig(
        r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=list(targets), bias="none", task_type="CAUSAL_LM",
        # MLX adapts the last `num_layers` blocks; PEFT names them.
        layers_to_transform=None if count == total else list(range(total - count, total)),
    )
    return get_peft_model(model, config)


def run_training(cfg: Config, resume: bool = False, device: str | None = None) -> dict:
    """Train per `cfg` on CUDA (or on CPU when `device="cpu"`) and write the output folder.

    Raises BackendUnavailable before loading anything when the extra or the GPU is missing,
    and ConfigError listing every setting this backend cannot honour. Returns the run summary.
    """
    if cfg.backend != "cuda":
        raise ValueError(f"backend: {cfg.backend!r}; this is the cuda backend (use mlx_lora.run for mlx)")
    problems = check_config(cfg)
    if problems:
        raise ConfigError(problems, "backend: cuda")
    require_extra()
    device = resolve_device(device)

    import torch
    from accelerate import Accelerator

    from ..preference_data import load_datasets_for
    from ..distributed import check_batch_size
    from ..report import MetricsWriter, ProgressBar
    from ..run import data_splits, describe_data, log
    from . import cuda_fsdp, cuda_loop

    accelerator = Accelerator(cpu=device == "cpu")
    fsdp = cuda_fsdp.fsdp_enabled(accelerator)
    cuda_fsdp.check_fsdp(accelerator, cfg)
    check_batch_size(cfg.training.batch_size, accelerator.num_processes)  # the global batch, as on MLX
    main = accelerator.is_main_process
    say = log if main else (lambda message="": None)
    out = Path(cfg.output_dir)
    if not resume and (out / "checkpoints").exists():
        raise FileExistsError(f"output_dir {out} already holds a run; pass --resume to continue it, "
                              "or choose another output_dir (e.g. output_dir=runs/new)")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "train_config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    dtype = compute_dtype(device)
    say(f"mlx-lora {__version__} | backend cuda | device {accelerator.device} x{accelerator.num_processes}"
        f"{' (FSDP)' if fsdp else ''} "
        f"| torch {torch.__version__} | compute {str(dtype).replace('torch.', '')} | model {cfg.model}")
    torch.manual_seed(cfg.seed)  # PEFT's A initialisation
    model, tokenizer, info = load_base(cfg, accelerator.device, dtype, fsdp)
    model = add_lora(model, cfg, fsdp)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"quantization: {cfg.quantization.mode}" + (" + double quant" if cfg.quantization.double_quant else ""))
    say(f"LoRA: rank {cfg.lora.rank}, alpha {cfg.lora.alpha} (scaling {cfg.lora.scaling:g}), "
        f"{trainable:,} trainable parameters")

    datasets, data_stats = load_datasets_for(cfg.data, tokenizer, cfg.training.objective, data_splits(cfg), seed=cfg.seed)
    for line in describe_data(data_stats, cfg.training.objective):
        say(line)

    start_step = None
    if resume:
        from ..checkpoints import latest

        checkpoint = latest(out)
        start_step = cuda_loop.checkpoint_step(checkpoint) if checkpoint else None
    metrics = MetricsWriter(out / "metrics.jsonl", resume_from_step=start_step if resume else None)
    callbacks = [metrics, ProgressBar()] if main else []
    summary, prepared = cuda_loop.train(model, accelerator, datasets["train"], datasets["valid"], cfg.training, out,
                                        seed=cfg.seed, resume=resume, callbacks=callbacks)
    model = accelerator.unwrap_model(prepared)
    adapter = cuda_fsdp.trainable_state(accelerator, prepared) if fsdp else None  # a collective: every process
    if main:
        save_adapters(model, cfg, info, out, adapter)
    rows = metrics.rows
    tps = [r["tokens_per_second"] for r in rows[1:]] or [r["tokens_per_second"] for r in rows]
    summary.update({"backend": "cuda", "device": str(accelerator.device), "processes": accelerator.num_processes,
                    "fsdp": fsdp,
                    "trainable_parameters": trainable, "tokens_per_second": sum(tps) / max(len(tps), 1),
                    "data": data_stats, "final_train_loss": rows[-1]["train_loss"] if rows else None})
    say(f"trained {summary['steps']} steps in {summary['elapsed_s']:.0f}s, {summary['tokens_per_second']:.0f} tok/s, "
        f"peak memory {summary['peak_memory_gb']:.2f} GB; adapters in {out} (PEFT in {out / PEFT_SUBDIR})")
    if cfg.eval.enabled and fsdp:
        say(f"eval skipped: under FSDP no process holds the whole model; the adapters in {out} (PEFT in "
            f"{out / PEFT_SUBDIR}) load on one GPU for scoring")
    elif cfg.eval.enabled and main:
        summary["eval"] = run_eval(model, tokenizer, datasets["test"], cfg, out)
    if main:
        write_json(out / "run_summary.json", {**summary, "platform": platform.platform(),
                                              "python": sys.version.split()[0]})
    accelerator.wait_for_everyone()
    return summary


def save_adapters(model, cfg: Config, info: dict, out: Path, state_dict: dict | None = None) -> None:
    """Write the PEFT adapter to out/peft/ and the same weights in the MLX format to out/.

    `state_dict`: the gathered LoRA weights of an FSDP run (the model's own are shards).
    """
    from peft import get_peft_model_state_dict
    from safetensors.numpy import save_file

    from ..adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config
    from ..adapters.load import base_model_shape
    from ..checkpoints import atomic_path
    from ..adapters.peft_format import block_relative_keys, peft_to_mlx_weights

    if state_dict is None:
        model.save_pretrained(str(out / PEFT_SUBDIR))
        state_dict = get_peft_model_state_dict(model)
    else:
        from .cuda_fsdp import save_peft_adapter

        state_dict = save_peft_adapter(model, out / PEFT_SUBDIR, state_dict)
    peft_weights = {k: v.detach().float().cpu().numpy() for k, v in state_dict.items()}
    weights = {k: v.copy(order="C") for k, v in peft_to_mlx_weights(peft_weights).items()}  # (in, r), (r, out)
    with atomic_path(out / ADAPTER_WEIGHTS, suffix=".safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": "mlx"})
    q = cfg.quantization
    extra = {
        "model": cfg.model, "model_source": info, "base_model_name_or_path": cfg.model,
        "base_model": base_model_shape(model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else {}),
        "quantization": {"mode": q.mode, "bits": 4, "block_size": BNB_BLOCK_SIZE, "double_quant": q.double_quant,
                         "backend": "bitsandbytes"},
        "trained_with": "cuda", "mlx_lora_version": __version__,
    }
    keys = block_relative_keys({k.rpartition(".")[0] for k in weights})
    config = adapter_config(cfg.lora, keys, model.config.num_hidden_layers, extra)
    write_json(out / ADAPTER_CONFIG, config)


def run_eval(model, tokenizer, test_set, cfg: Config, out: Path) -> dict:
    """Score base (adapters off) and tuned on the test split; writes eval.json like the MLX backend."""
    from ..evaluate import results_table
    from ..report import print_table
    from ..run import log
    from .cuda_loop import score

    examples = test_set if cfg.eval.limit is None else test_set[: cfg.eval.limit]
    results = {}
    if cfg.training.objective != "sft":
        from .cuda_objectives import evaluate_preferences

        log(f"evaluating on {len(examples)} test pairs ...")
        model.eval()
        device = next(model.parameters()).device
        if cfg.eval.compare_base:
            with model.disable_adapter():  # nested reference passes see the adapters off already
                results["base"] = evaluate_preferences(model, examples, cfg.training.batch_size, cfg.training, device)
        results["tuned"] = evaluate_preferences(model, examples, cfg.training.batch_size, cfg.training, device)
        write_json(out / "eval.json", results)
        print_table("held-out test set:", results_table(results))
        return results
    log(f"evaluating on {len(examples)} test examples ...")
    if cfg.eval.compare_base:
        with model.disable_adapter():
            results["base"] = score(model, tokenizer, examples, cfg.training.batch_size, cfg.eval.max_new_tokens)
    results["tuned"] = score(model, tokenizer, examples, cfg.training.batch_size, cfg.eval.max_new_tokens)
    write_json(out / "eval.json", results)
    print_table("held-out test set:", results_table(results))
    return {name: {k: v for k, v in r.items() if k != "samples"} for name, r in results.items()}
