"""The typed run configuration: dataclasses, YAML loading, `key.path=value` overrides, validation.

Defaults live here and nowhere else. Loading collects every problem (unknown keys with a
did-you-mean, wrong types, out-of-range values) and raises one `ConfigError` listing them all.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

HF_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"  # PEFT's spelling: every linear layer inside the transformer blocks


class ConfigError(ValueError):
    """One or more problems in a configuration; `problems` lists them one per line."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems) if len(problems) == 1 else
                         f"{source}: {len(problems)} problems:\n  " + "\n  ".join(problems))


def _help(text: str, forms: str | None = None, **kwargs) -> dict:
    """Field metadata: its help line, and for a Union field the forms it takes, as an error names them."""
    return {"metadata": {"help": text, **({"forms": forms} if forms else {})}, **kwargs}


@dataclass(frozen=True)
class DataConfig:
    path: str = field(**_help("Folder holding train.jsonl (required), valid.jsonl (optional: no validation loss without it, unless `valid_fraction` carves one) and test.jsonl (needed only when `eval.enabled`). Relative paths resolve against the config file's folder first, then the working directory."))
    max_seq_length: int = field(default=512, **_help("Longest sequence in tokens; longer examples are truncated or dropped (see `overlong`)."))
    overlong: str = field(default="truncate", **_help("What to do with examples longer than max_seq_length: truncate | drop. Always counted in the summary."))
    train_on_prompt: bool = field(default=False, **_help("Compute the loss on every token, not only on assistant/completion tokens."))
    chat_template: Optional[str] = field(default=None, **_help("A Jinja chat template file to use instead of the model's own, for training and eval (resolved like `path`)."))
    completions_as_chat: bool = field(default=True, **_help("prompt/completion rows on a model with a chat template: true wraps each as one user turn and one assistant reply (as mlx-lm does; what the server's /v1/chat/completions sends); false trains the raw prompt text followed by the completion (what /v1/completions sends). Counted in the data summary."))
    valid_fraction: float = field(default=0.0, **_help("When the folder has no valid.jsonl: hold out this fraction of train.jsonl's rows (seeded by `seed`) for the validation loss. 0 trains without validation loss."))
    pack: bool = field(default=False, **_help("Sequence packing (SFT, one process): lay each batch's examples end to end in as few rows of up to max_seq_length tokens as hold them, each example attending only to itself, so less padding is computed. Same examples, targets and loss per step. Off by default: on the demo (5% padding) it measured no faster (README, issue 11)."))


@dataclass(frozen=True)
class QuantizationConfig:
    mode: str = field(default="affine", **_help("Frozen base precision: none (float) | affine (MLX affine, `bits`, `group_size`) | nf4 (QLoRA NormalFloat4, `block_size`). Layers already quantized in the source (GGUF, mlx-community 4-bit) stay as they are."))
    bits: int = field(default=4, **_help("Affine mode: 4 or 8 bits per weight."))
    group_size: int = field(default=64, **_help("Affine mode: weights sharing one scale and bias (32, 64 or 128)."))
    block_size: int = field(default=64, **_help("NF4 mode: weights sharing one absmax (64 in the QLoRA paper)."))
    double_quant: bool = field(default=False, **_help("NF4 mode: quantize the block absmax values too (8-bit, blocks of 256)."))


@dataclass(frozen=True)
class LoraConfig:
    rank: int = field(default=8, **_help("Rank of the low-rank update (PEFT `r`)."))
    alpha: float = field(default=16.0, **_help("Scaling numerator: the update is multiplied by alpha / rank (PEFT `lora_alpha`)."))
    dropout: float = field(default=0.0, **_help("Dropout on the adapter input during training."))
    target_modules: tuple[str, ...] = field(default=(ALL_LINEAR,), **_help(
        "Hugging Face names of the projections to adapt (each family's own: q_proj... for Llama / Qwen / "
        "Mistral / Gemma, qkv_proj and gate_up_proj for Phi-3), or all-linear for every linear layer of a block."))
    num_layers: int = field(default=-1, **_help("Adapt the last N transformer blocks; -1 for all."))

    @property
    def scaling(self) -> float:
        """alpha / rank: the PEFT convention (mlx-lm calls this value `scale`)."""
        return self.alpha / self.rank

    def resolve_targets(self, present: list[str]) -> tuple[str, ...]:
        """The module names to adapt among `present` (a model's block-level linear layer names).

        `all-linear` stands for all of them. Raises ValueError naming each target the model
        lacks and listing what it has.
        """
        if ALL_LINEAR in self.target_modules:
            return tuple(sorted(present))
        missing = [name for name in self.target_modules if name not in present]
        if missing:
            raise ValueError(f"lora.target_modules: {', '.join(missing)} not found in this model; its linear layers "
                             f"are: {', '.join(sorted(present))} (or use {ALL_LINEAR})")
        return tuple(self.target_modules)


@dataclass(frozen=True)
class TrainingConfig:
    iters: int = field(default=200, **_help("Optimizer steps to run (ignored when `epochs` is set)."))
    epochs: Optional[float] = field(default=None, **_help("Train for this many passes over the training set instead of `iters`."))
    batch_size: Union[int, str] = field(default=4, **_help(forms="a positive integer or auto", text="Examples per micro-batch (across all ranks when data-parallel: each of N ranks takes batch_size / N; must divide), or auto: the largest the memory planner predicts to fit (see effective_batch_size)."))
    grad_accumulation: int = field(default=1, **_help("Micro-batches per optimizer step (with batch_size: auto and effective_batch_size set, derived)."))
    effective_batch_size: Optional[int] = field(default=None, **_help("With batch_size: auto: examples per optimizer step; the micro-batch is its largest divisor that fits and grad_accumulation = this / micro-batch. null: grad_accumulation stays, micro-batch up to 32."))
    memory_limit: str = field(default="auto", **_help("Stop with a resumable checkpoint when a step's peak memory passes this: auto (this machine's memory as the planner sees it), a size such as 24GB, or none."))
    learning_rate: float = field(default=1e-4, **_help("Peak learning rate of AdamW."))
    lr_schedule: str = field(default="constant", **_help("constant | linear | cosine decay after warmup."))
    warmup_steps: int = field(default=0, **_help("Steps of linear warmup from 0 to learning_rate."))
    min_lr_ratio: float = field(default=0.0, **_help("linear/cosine: final learning rate as a fraction of the peak."))
    weight_decay: float = field(default=0.0, **_help("AdamW weight decay."))
    grad_clip: Optional[float] = field(default=1.0, **_help("Clip the global gradient norm to this value; null to disable."))
    float_weights: str = field(default="auto", **_help("CPU only (MLX's CPU quantized product is slow): float keeps a float32 copy of every quantized frozen weight for the run (no dequantize per product: 1.8x faster demo steps measured; costs 4 bytes per weight), quantized dequantizes one layer at a time, auto picks float when the memory planner predicts the step with copies under half the memory limit. The GPU always multiplies the 4-bit weights directly."))
    cpu_streams: Union[int, str] = field(default="auto", **_help(forms="auto or a positive integer", text="CPU only: split each micro-batch's rows (dpo / orpo: its pairs) over this many MLX CPU streams, each on its own core with the BLAS single-threaded (MLX's CPU element-wise work is single-threaded per stream: demo steps measured ~1.1x faster for sft, ~1.2x dpo, ~1.3x orpo on 2 cores); auto: one per usable core (at most 8, at most the rows); 1: off. Not with grad_checkpoint. Same loss and gradients as one stream."))
    grad_checkpoint: bool = field(default=False, **_help("Recompute each block's activations in the backward pass (less memory, ~30% slower)."))
    compile: bool = field(default=True, **_help("Compile the training step with mx.compile."))
    steps_per_report: int = field(default=10, **_help("Write a metrics line every N steps."))
    steps_per_eval: int = field(default=50, **_help("Compute validation loss every N steps (0 disables; always at the end)."))
    val_batches: int = field(default=8, **_help("Validation batches per evaluation (-1 for the whole split)."))
    save_every: int = field(default=100, **_help("Write a resumable checkpoint every N steps (0: only at the end or on interruption)."))
    keep_checkpoints: int = field(default=2, **_help("How many step checkpoints to keep."))
    early_stop_patience: Optional[int] = field(default=None, **_help(
        "Stop when the validation loss has not improved by 1% on its best for this many evaluations in a row "
        "(null: run all iters/epochs). With `epochs` as the upper bound, the run length follows the data."))
    objective: str = field(default="sft", **_help("sft (cross-entropy on targets) | dpo (Direct Preference Optimization; the reference is the base with adapters off) | orpo (odds-ratio preference optimization, no reference). dpo and orpo need preference data: rows with prompt or messages, chosen, rejected."))
    beta: float = field(default=0.1, **_help("dpo: strength of the pull towards the reference (the KL weight; IPO's tau) | orpo: weight of the odds-ratio term (lambda)."))
    loss_type: str = field(default="sigmoid", **_help("dpo only: sigmoid (the DPO paper) | ipo (squared, per-token averaged, as TRL) | hinge (SLiC)."))
    label_smoothing: float = field(default=0.0, **_help("dpo sigmoid only: assumed probability that a pair's labels are flipped (conservative DPO), in [0, 0.5)."))


@dataclass(frozen=True)
class EvalConfig:
    enabled: bool = field(default=True, **_help("Evaluate on the test split after training."))
    max_new_tokens: int = field(default=48, **_help("Greedy generation length for exact-match scoring."))
    limit: Optional[int] = field(default=None, **_help("Evaluate only the first N test examples (null: all)."))
    compare_base: bool = field(default=True, **_help("Also score the base model (adapters off) for a before/after table."))
    cache_base: bool = field(default=True, **_help("Reuse the base model's scores from an earlier run with the same base weights, test data and eval settings (kept in ~/.cache/mlx-lora/base-eval, keyed by a digest of all of them); false scores the base every time."))


@dataclass(frozen=True)
class DistributedConfig:
    backend: str = field(default="any", **_help("Data-parallel engine when launched with --hosts or -n: ring (TCP/Thunderbolt) | jaccl (RDMA over Thunderbolt 5) | mpi | any (MLX picks). A single process ignores it."))
    timeout_s: float = field(default=300.0, **_help("Seconds a rank waits for the others (a step, a checkpoint, validation) before it stops all with a message."))


@dataclass(frozen=True)
class Config:
    model: str = field(**_help("Base model: a Hugging Face folder, a hub id (org/name), a .gguf file, or `demo` (SmolLM2-135M-Instruct)."))
    output_dir: str = field(default="runs/latest", **_help("Run folder: adapters, metrics, plots, checkpoints, eval."))
    seed: int = field(default=0, **_help("Seed for adapter initialisation, shuffling and dropout."))
    backend: str = field(default="mlx", **_help("mlx (Apple silicon or CPU) | cuda (transformers + PEFT + bitsandbytes)."))
    data: DataConfig = field(default_factory=lambda: DataConfig(path="data"), **_help("Training data."))
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig, **_help("Frozen base quantization."))
    lora: LoraConfig = field(default_factory=LoraConfig, **_help("LoRA adapters."))
    training: TrainingConfig = field(default_factory=TrainingConfig, **_help("Optimisation."))
    eval: EvalConfig = field(default_factory=EvalConfig, **_help("Evaluation after training."))
    distributed: DistributedConfig = field(default_factory=DistributedConfig, **_help("Data-parallel training over several processes or Macs."))


CHOICES = {
    "backend": ("mlx", "cuda"),
    "data.overlong": ("truncate", "drop"),
    "quantization.mode": ("none", "affine", "nf4"),
    "quantization.bits": (4, 8),
    "training.lr_schedule": ("constant", "linear", "cosine"),
    "training.objective": ("sft", "dpo", "orpo"),
    "training.float_weights": ("auto", "float", "quantized"),
    "training.loss_type": ("sigmoid", "ipo", "hinge"),
    "distributed.backend": ("ring", "jaccl", "mpi", "any"),
}


def _check_ranges(cfg: Config) -> list[str]:
    problems = []

    def need(ok: bool, key: str, message: str):
        if not ok:
            problems.append(f"{key}: {message}")

    for key, allowed in CHOICES.items():
        value = get_key(cfg, key)
        need(value in allowed, key, f"{value!r} is not one of {', '.join(map(str, allowed))}")
    streams = cfg.training.cpu_streams
    need(streams == "auto" or (isinstance(streams, int) and not isinstance(streams, bool) and streams >= 1),
         "training.cpu_streams", f"must be auto or a positive integer, got {streams!r}")
    need(cfg.lora.rank > 0, "lora.rank", f"must be a positive integer, got {cfg.lora.rank}")
    need(cfg.lora.alpha > 0, "lora.alpha", f"must be positive, got {cfg.lora.alpha}")
    need(0 <= cfg.lora.dropout < 1, "lora.dropout", f"must be in [0, 1), got {cfg.lora.dropout}")
    need(cfg.lora.num_layers == -1 or cfg.lora.num_layers > 0, "lora.num_layers", f"must be -1 (all) or a positive count, got {cfg.lora.num_layers}")
    need(len(cfg.lora.target_modules) > 0, "lora.target_modules", "must name at least one module, e.g. [q_proj, v_proj]")
    need(0 <= cfg.data.valid_fraction < 1, "data.valid_fraction", f"must be in [0, 1), got {cfg.data.valid_fraction}")
    need(cfg.data.max_seq_length >= 8, "data.max_seq_length", f"must be at least 8, got {cfg.data.max_seq_length}")
    need(cfg.quantization.group_size in (32, 64, 128), "quantization.group_size", f"must be 32, 64 or 128, got {cfg.quantization.group_size}")
    need(cfg.quantization.block_size > 0 and cfg.quantization.block_size % 2 == 0, "quantization.block_size", f"must be a positive even number, got {cfg.quantization.block_size}")
    t = cfg.training
    need(t.iters > 0, "training.iters", f"must be positive, got {t.iters}")
    need(t.epochs is None or t.epochs > 0, "training.epochs", f"must be positive or null, got {t.epochs}")
    need(t.early_stop_patience is None or t.early_stop_patience > 0, "training.early_stop_patience",
         f"must be a positive number of evaluations or null, got {t.early_stop_patience}")
    need(t.early_stop_patience is None or t.steps_per_eval > 0, "training.early_stop_patience",
         "needs validation during training: set training.steps_per_eval > 0")
    need(not cfg.data.pack or t.objective not in ("dpo", "orpo"), "data.pack",
         f"packing is for objective sft (this run: {t.objective}); set data.pack: false")
    need(t.batch_size == "auto" or (isinstance(t.batch_size, int) and t.batch_size > 0), "training.batch_size",
         f"must be a positive integer or auto, got {t.batch_size!r}")
    need(t.effective_batch_size is None or t.effective_batch_size > 0, "training.effective_batch_size",
         f"must be positive or null, got {t.effective_batch_size}")
    if isinstance(t.batch_size, int) and t.batch_size > 0 and t.effective_batch_size and t.grad_accumulation > 0:
        steps = t.effective_batch_size / t.batch_size
        fix = (f"set training.grad_accumulation={int(steps)}" if steps == int(steps)
               else f"use a batch_size that divides {t.effective_batch_size}") + ", or training.batch_size=auto to derive both"
        need(t.effective_batch_size == t.batch_size * t.grad_accumulation, "training.effective_batch_size",
             f"{t.effective_batch_size} examples per step, but batch_size {t.batch_size} x grad_accumulation "
             f"{t.grad_accumulation} is {t.batch_size * t.grad_accumulation}; {fix}")
    need(t.memory_limit in ("auto", "none") or _is_memory_size(t.memory_limit), "training.memory_limit",
         f"{t.memory_limit!r} is not auto, none or a size such as 16GB, 32GB, 64GB, 24GiB or 512MB")
    need(t.grad_accumulation > 0, "training.grad_accumulation", f"must be positive, got {t.grad_accumulation}")
    need(t.learning_rate > 0, "training.learning_rate", f"must be positive, got {t.learning_rate}")
    need(t.warmup_steps >= 0, "training.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    need(0 <= t.min_lr_ratio <= 1, "training.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    need(t.grad_clip is None or t.grad_clip > 0, "training.grad_clip", f"must be positive or null, got {t.grad_clip}")
    need(t.steps_per_report > 0, "training.steps_per_report", f"must be positive, got {t.steps_per_report}")
    need(t.steps_per_eval >= 0, "training.steps_per_eval", f"must be >= 0, got {t.steps_per_eval}")
    need(t.save_every >= 0, "training.save_every", f"must be >= 0, got {t.save_every}")
    need(t.keep_checkpoints >= 1, "training.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}")
    need(t.val_batches == -1 or t.val_batches > 0, "training.val_batches", f"must be -1 or positive, got {t.val_batches}")
    need(t.beta > 0, "training.beta", f"must be positive, got {t.beta}")
    need(0 <= t.label_smoothing < 0.5, "training.label_smoothing", f"must be in [0, 0.5), got {t.label_smoothing}")
    need(t.label_smoothing == 0 or (t.objective == "dpo" and t.loss_type == "sigmoid"), "training.label_smoothing",
         "applies only to training.objective: dpo with loss_type: sigmoid; set it to 0")
    need(t.loss_type == "sigmoid" or t.objective == "dpo" or t.objective not in CHOICES["training.objective"],
         "training.loss_type",
         f"{t.loss_type!r} applies only to training.objective: dpo (this run: {t.objective}); remove it")
    need(cfg.distributed.timeout_s > 0, "distributed.timeout_s", f"must be positive, got {cfg.distributed.timeout_s}")
    need(cfg.eval.max_new_tokens > 0, "eval.max_new_tokens", f"must be positive, got {cfg.eval.max_new_tokens}")
    need(cfg.eval.limit is None or cfg.eval.limit > 0, "eval.limit",
         f"must be a positive number of test examples or null (all of them), got {cfg.eval.limit}")
    return problems


def _is_memory_size(text: str) -> bool:
    from .memory.sizes import parse_memory

    try:
        parse_memory(text)
    except ValueError:
        return False
    return True


# --- building dataclasses from plain data -------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp, key: str, problems: list[str]) -> Any:
    """Convert a YAML value to the annotated type, or record why it cannot be."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for arg in args:  # Union[int, str]: the first type that takes the value
            trial: list[str] = []
            converted = _coerce(value, arg, key, trial)
            if not trial:
                return converted
        if len(args) == 1:
            problems.extend(trial)
            return converted
        kinds = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        problems.append(f"{key}: expected {' or '.join(kinds.get(a, str(a)) for a in args)}, got {value!r}")
        return None
    if origin is tuple:
        (item_type, _) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {value!r}")
            return ()
        return tuple(_coerce(v, item_type, f"{key}[{i}]", problems) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{key}: expected true or false, got {value!r}")
        return False
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(f"{key}: expected an integer, got {value!r}")
        return 0
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{key}: expected a number, got {value!r}")
        return 0.0
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{key}: expected a string, got {value!r}")
        return ""
    raise TypeError(f"unsupported config type {tp} at {key}")


def _build(cls, data: Any, prefix: str, problems: list[str]):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'top level'}: expected a mapping of keys, got {data!r}")
        data = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            guess = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            # a key of a section given one level too high (`grad_checkpoint` for `training.grad_checkpoint`)
            inner = [f"{name}.{key}" for name, f in fields.items() if dataclasses.is_dataclass(hints[name])
                     and key in {g.name for g in dataclasses.fields(hints[name])}]
            hint = (f"; did you mean '{prefix}{inner[0]}'?" if inner else f"; did you mean '{prefix}{guess[0]}'?"
                    if guess else f"; known keys: {', '.join(fields)}")
            problems.append(f"{prefix}{key}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            sub = data.get(name)
            if name == "data" and sub is not None and not isinstance(sub, dict):
                sub = {"path": sub}  # `data: folder` is shorthand for `data: {path: folder}`
            kwargs[name] = _build(tp, sub, f"{key}.", problems)
        elif name in data:
            found: list[str] = []
            kwargs[name] = _coerce(data[name], tp, key, found)
            if found and "forms" in f.metadata:  # what this field takes, not the Union's member types
                found = [f"{key}: must be {f.metadata['forms']}, got {data[name]!r}"]
            problems.extend(found)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{key}: required ({f.metadata.get('help', '')})")
            kwargs[name] = ""
    return cls(**kwargs)


# --- public API -----------------------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into (['a', 'b'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected key.path=value, e.g. training.iters=50"], "command line")
    key, raw = text.split("=", 1)
    if not key.strip() or any(not part.strip() for part in key.split(".")):
        raise ConfigError([f"override {text!r}: the key {key.strip()!r} is empty or has an empty part; expected "
                           "key.path=value, e.g. training.iters=50"], "command line")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of `data` with each `key.path=value` set (creating sections as needed)."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None or part != "data" else {"path": node[part]}
            node = node[part]
        node[path[-1]] = value
    return data


def config_from_dict(data: dict, source: str = "config") -> Config:
    """Build and validate a Config, raising ConfigError with every problem at once."""
    problems: list[str] = []
    cfg = _build(Config, data, "", problems)
    # Range checks on keys that already failed to parse would only repeat the problem.
    bad_keys = {p.split(":", 1)[0] for p in problems}
    problems += [p for p in _check_ranges(cfg) if p.split(":", 1)[0] not in bad_keys]
    if problems:
        raise ConfigError(problems, source)
    return cfg


def keys_given_twice(node, path: tuple[str, ...] = ()) -> list[str]:
    """Problems for keys given twice in one mapping of a composed YAML document (`yaml.compose`):
    PyYAML's loader would silently keep only the last value."""
    if isinstance(node, yaml.SequenceNode):
        return [problem for item in node.value for problem in keys_given_twice(item, path)]
    if not isinstance(node, yaml.MappingNode):
        return []
    problems: list[str] = []
    seen: dict[str, yaml.Node] = {}
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        first = seen.setdefault(key.value, value)
        if first is not value:
            if path == ("adapters",):
                problems.append(f"adapters: adapter name {key.value!r} is used twice ({_where(first)} and "
                                f"{_where(value)})")
            else:
                problems.append(f"{'.'.join(path + (key.value,))}: given twice ({_where(first)} and {_where(value)}); "
                                "YAML would keep only the last")
        problems += keys_given_twice(value, path + (key.value,))
    return problems


def _where(node) -> str:
    """A YAML value and its line, for messages: `runs/a (line 3)`."""
    text = node.value if isinstance(node.value, str) else f"a {node.id}"
    return f"{text} (line {node.start_mark.line + 1})"


def load_config(path: str | Path | None, overrides: list[str] = (), need_data: bool = True) -> Config:
    """Load a YAML config, apply `key.path=value` overrides, resolve data.path, validate.

    `need_data=False` (for commands that read no data, such as `plan`) lets data.path be left out."""
    data: dict = {}
    base_dir = Path.cwd()
    source = "command line"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError([f"config file not found: {path} (pass a YAML file such as configs/demo.yaml)"], source)
        try:
            text = path.read_text(encoding="utf-8")
            twice = keys_given_twice(yaml.compose(text, Loader=yaml.SafeLoader))
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError([yaml_error_line(err)], source) from err
        if twice:
            raise ConfigError(twice, source)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"top level must be a mapping of keys, got {type(loaded).__name__}"], source)
        data = loaded or {}
        base_dir = path.resolve().parent
    data = apply_overrides(data, list(overrides))
    section = data.get("data")
    if not need_data and (section is None or (isinstance(section, dict) and section.get("path") is None)):
        data["data"] = {**(section or {}), "path": "."}  # never read
    try:
        cfg = config_from_dict(data, source)
    except ConfigError as err:  # say which problems the command line's key=value gave
        given = {".".join(parse_override(text)[0]) for text in overrides}
        problems = [f"{key} (from the command line):{rest}" if key in given or any(g.startswith(f"{key}.") for g in given)
                    else problem for problem in err.problems for key, _, rest in [problem.partition(":")]]
        raise ConfigError(problems, err.source) from None
    template = cfg.data.chat_template and resolve_data_path(cfg.data.chat_template, base_dir)
    # a relative model folder or .gguf is found as data is (a hub id or `demo` exists nowhere and stays)
    model = cfg.model if cfg.model == "demo" else resolve_data_path(cfg.model, base_dir)
    return dataclasses.replace(cfg, model=model, data=dataclasses.replace(
        cfg.data, path=resolve_data_path(cfg.data.path, base_dir), chat_template=template or None))


def resolve_data_path(path: str, base_dir: Path) -> str:
    """A relative path (data, chat template, model) means the config's folder if it exists there, else
    that folder's parent, else the working directory; returned as given when it exists in none."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    for root in (base_dir, base_dir.parent, Path.cwd()):
        if (root / candidate).exists():
            return str((root / candidate).resolve())
    return str(candidate)


def config_to_dict(cfg: Config) -> dict:
    """Plain-data form (tuples as lists) for YAML/JSON output."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def _flat(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def yaml_error_line(err) -> str:
    """PyYAML's error as `invalid YAML:LINE:COLUMN: problem (context)`, 1-based. A key missing its ':'
    is found only on the next line (PyYAML's problem mark), so the key's own line (its context mark)
    is named instead."""
    problem, context = getattr(err, "problem", None), getattr(err, "context", None)
    mark, context_mark = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
    if problem is None:
        return f"invalid YAML: {err}"
    if "expected ':'" in problem and context_mark is not None:
        mark, context = context_mark, None
    where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
    extra = f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})" if context and context_mark else ""
    hint = "; check this line's indentation and the line above" if "not allowed here" in problem else ""
    return f"invalid YAML{where}: {problem}{extra}{hint}"


def resumed_config(cfg: Config, overrides: list[str] = ()) -> tuple[Config, list[str]]:
    """The config a `--resume` continues with, and one line per setting that differs from `cfg`.

    A resumed run keeps its own settings, as recorded in `<output_dir>/train_config.yaml` when it
    started (with `auto` values resolved), whatever the config file says now; the keys given as
    `overrides` on the command line go on top (e.g. `training.iters=400` to train longer). Without a
    recorded file, `cfg` is returned as it is.
    """
    recorded_file = Path(cfg.output_dir) / "train_config.yaml"
    if not recorded_file.is_file():
        return cfg, []
    given = {".".join(parse_override(text)[0]) for text in overrides}
    try:
        recorded = load_config(recorded_file)
        merged = load_config(recorded_file, list(overrides))
    except ConfigError as err:
        raise ConfigError([f"--resume: the run's recorded settings cannot be read ({err}); restore the file, or "
                           "start a new output_dir"], str(recorded_file)) from None
    merged = dataclasses.replace(merged, output_dir=cfg.output_dir)
    now, before, after = (_flat(config_to_dict(c)) for c in (cfg, recorded, merged))
    lines = []
    for key in sorted(set(now) | set(after)):
        if any(key == g or key.startswith(f"{g}.") for g in given):
            if before.get(key) != after.get(key):
                lines.append(f"resume: {key} {before.get(key)!r} -> {after.get(key)!r} (from the command line)")
        elif now.get(key) == after.get(key):
            continue
        elif now.get(key) == "auto":
            lines.append(f"resume: {key} stays {after.get(key)!r}, what 'auto' chose when the run started")
        else:
            lines.append(f"resume: {key} stays {after.get(key)!r} as the run started (train_config.yaml; "
                         f"the config now says {now.get(key)!r}; pass {key}=... to change it)")
    return merged, lines


# Settings that decide what a trained adapter is scored or checked on, and against which base.
RUN_DEFINING_KEYS = ("model", "data.path", "data.max_seq_length", "quantization.mode", "quantization.bits",
                     "quantization.group_size", "training.objective")


def run_differences(cfg: Config, adapter_dir: str | Path) -> list[str]:
    """One line per RUN_DEFINING_KEYS setting where `cfg` differs from the run that trained the
    adapters in `adapter_dir` (its `train_config.yaml`, or its run's for a checkpoints/step_N
    folder); empty when there is no record or nothing differs."""
    from .checkpoints import run_file

    recorded_file = run_file(adapter_dir, "train_config.yaml")
    if not recorded_file.is_file():
        return []
    try:
        recorded = load_config(recorded_file)
    except ConfigError:
        return []
    return [f"{key}: {get_key(cfg, key)!r} here, {get_key(recorded, key)!r} in the run" for key in RUN_DEFINING_KEYS
            if get_key(cfg, key) != get_key(recorded, key)]


def get_key(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def describe(cls=Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) rows for every setting: the source of `--help` and the README's table."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, f"{prefix}{f.name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        if isinstance(default, tuple):
            default = list(default)
        rows.append((f"{prefix}{f.name}", str(default), f.metadata.get("help", "")))
    return rows


def markdown_table() -> str:
    """The settings table of the README, generated from the dataclass metadata."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, help_ in describe():
        lines.append(f"| `{key}` | `{default}` | {help_.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
