"""Will a run fit? The predicted peak against a memory size, the changes that make it fit,
`training.batch_size: auto`, and the table / JSON that `mlx-lora plan` and `train` print.

Library code: returns data and text, prints nothing. The memory size is this machine's unless
given: on macOS the GPU's recommended working set (`mx.metal.device_info()`), which is what
Metal can use without swapping, elsewhere the physical RAM.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from ..cpu_streams import stream_count
from .estimate import GB, REFERENCE_COMPONENT, StepSettings, adapted_blocks, components, float_copy_bytes, \
    lora_parameters, sequences
from .shape import ModelShape, read_shape
from .sizes import MEMORY_FORMS, parse_memory  # noqa: F401 - part of this module's interface

SAFETY_MARGIN = 0.9  # batch_size: auto and the guard's default keep the prediction under 90% of memory
AUTO_BATCH_CAP = 32  # batch_size: auto without effective_batch_size: the largest micro-batch tried


# Measured: uncompiled, MLX keeps most of each checkpointed block's activations (24 of 33 MB per
# block on the Qwen2.5-0.5B shape), and Llama-3.1-8B at batch 1 x 2048 passed 22 GB on the CPU
# path where the compiled step is predicted at 15.5 GB (README, "Will it fit?").
UNCOMPILED_WARNING = ("training.compile=false: this plan is for the compiled step; uncompiled, MLX keeps most "
                      "activations even with grad_checkpoint, so the peak can be far higher (keep training.compile=true)")


# The share of a Mac's RAM that macOS lets the GPU keep resident (Metal's recommendedMaxWorkingSetSize,
# what MLX reports as max_recommended_working_set_size). Readings published with the chip and RAM:
# 10.67 of 16 GiB (M4, macOS 15.6) and 21.33 of 32 GiB (M2 Max), 2/3; 24 of 32 GiB (M4, 2026), 3/4;
# 107.52 of 128 GiB (M5 Max, two machines), 0.84; 208 of 256 GiB (M3 Ultra), 0.81. Each class gets
# the lowest share read for it, so a plan that fits there fits on every Mac of that size; on a Mac
# itself `machine_memory` reads the real value.
MAC_WORKING_SET_SHARES = ((128 * 2**30, 0.81), (0, 2 / 3))  # (RAM at least, share), largest first


def mac_ram(size: float) -> float:
    """Bytes of RAM of the Mac sold as `size` (from `parse_memory`): Macs are sold in GiB called GB,
    so a whole number of decimal GB (32GB: 32e9) means that many GiB; other sizes are taken as given."""
    gigabytes = size / 1e9
    return round(gigabytes) * 2**30 if gigabytes >= 1 and abs(gigabytes - round(gigabytes)) < 1e-9 else size


def mac_working_set(ram: float) -> float:
    """Bytes of GPU working set on a Mac with `ram` bytes of RAM (see MAC_WORKING_SET_SHARES)."""
    return ram * next(share for least, share in MAC_WORKING_SET_SHARES if ram >= least)


def machine_memory() -> tuple[float, str]:
    """(bytes, description) of the memory a run on this machine may use."""
    import mlx.core as mx

    if mx.metal.is_available():
        size = mx.metal.device_info().get("max_recommended_working_set_size")
        if size:
            return float(size), "this Mac's GPU working set"
    if mx.default_device() == mx.gpu and hasattr(mx, "device_info"):  # MLX's CUDA backend
        info = mx.device_info()
        size = info.get("total_memory") or info.get("memory_size")
        if size:
            return float(size), f"this GPU's memory ({info.get('device_name', 'GPU')})"
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "this machine's RAM"
    except (ValueError, OSError):
        return 16 * GB, "assumed 16 GB (this machine's memory is unknown)"


def guard_limit(setting: str) -> float | None:
    """Bytes for the memory guard from `training.memory_limit`: auto (this machine's memory, as
    the planner counts it), none (no guard), or a size."""
    if setting == "none":
        return None
    return machine_memory()[0] if setting == "auto" else parse_memory(setting)


def uses_dequantize_path() -> bool:
    """True when frozen layers go through dequantize + BLAS (MLX on the CPU), as training does."""
    from ..frozen_matmul import use_dequantize_path

    return use_dequantize_path()


def settings_of(cfg, batch_size: int | None = None, dequantize_path: bool | None = None) -> StepSettings:
    """The StepSettings of a Config (`batch_size` replaces an `auto` or given micro-batch)."""
    q, lora, t = cfg.quantization, cfg.lora, cfg.training
    batch = batch_size if batch_size is not None else (t.batch_size if isinstance(t.batch_size, int) else 1)
    on_cpu = uses_dequantize_path() if dequantize_path is None else dequantize_path
    streams = stream_count(t, batch, on_cpu, interleaved=True)  # as `mlx-lora train` runs it
    return StepSettings(
        mode=q.mode, bits=q.bits, group_size=q.group_size, block_size=q.block_size, double_quant=q.double_quant,
        rank=lora.rank, target_modules=tuple(lora.target_modules), num_layers=lora.num_layers,
        batch_size=batch, seq_length=cfg.data.max_seq_length, grad_accumulation=t.grad_accumulation,
        grad_checkpoint=t.grad_checkpoint, float_weights=t.float_weights == "float", objective=t.objective,
        dequantize_path=on_cpu, cpu_streams=streams)


AUTO_FLOAT_FRACTION = 0.5  # float_weights: auto keeps float copies while the step's peak stays under this share


def choose_float_weights(shape: ModelShape, s: StepSettings, setting: str, memory: float) -> StepSettings:
    """`s` with float_weights decided: as set, or for `auto` on when the CPU path has quantized
    weights and the step with their float32 copies is predicted under AUTO_FLOAT_FRACTION of `memory`."""
    if setting != "auto":
        return dataclasses.replace(s, float_weights=setting == "float")
    with_copies = dataclasses.replace(s, float_weights=True)
    keep = float_copy_bytes(shape, with_copies) > 0 and predict(shape, with_copies) <= AUTO_FLOAT_FRACTION * memory
    return dataclasses.replace(s, float_weights=keep)


def predict(shape: ModelShape, settings: StepSettings) -> float:
    """Predicted training-step peak in bytes."""
    return sum(components(shape, settings).values())


@dataclass
class Plan:
    """A prediction for one run: the components, the peak, and whether it fits `memory` bytes."""

    model: str
    shape: ModelShape
    settings: StepSettings
    components: dict[str, float]
    memory: float
    memory_source: str
    suggestions: list[tuple[list[str], float]] = field(default_factory=list)  # (overrides, predicted peak)
    warnings: list[str] = field(default_factory=list)  # settings the prediction does not cover
    notes: list[str] = field(default_factory=list)  # what the plan chose or assumed, and why

    @property
    def peak(self) -> float:
        return sum(self.components.values())

    @property
    def fits(self) -> bool:
        return self.peak <= self.memory

    def to_json(self) -> dict:
        s = self.settings
        return {
            "model": self.model, "peak_gb": round(self.peak / GB, 3), "fits": self.fits,
            "memory_gb": round(self.memory / GB, 3), "memory_source": self.memory_source,
            "components": {name: round(value / GB, 4) for name, value in self.components.items()},
            "settings": dataclasses.asdict(s) | {"target_modules": list(s.target_modules)},
            "sequences_per_batch": sequences(s),
            "trainable_parameters": lora_parameters(self.shape, s),
            "suggestions": [{"overrides": o, "peak_gb": round(p / GB, 3)} for o, p in self.suggestions],
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }

    def _path(self) -> str:
        if not self.settings.dequantize_path:
            return ""
        if float_copy_bytes(self.shape, self.settings):
            return ", CPU path (float32 copies of the quantized weights kept: training.float_weights)"
        return ", CPU path (dequantize + BLAS)"

    def _batch(self) -> str:
        s = self.settings
        if sequences(s) == s.batch_size:
            return f"batch {s.batch_size}"
        return f"{s.objective} batch {s.batch_size} pairs = {sequences(s)} sequences (chosen + rejected)"

    def _notes(self) -> dict[str, str]:
        """A few words after a component's line: what a preference objective changes in it."""
        s = self.settings
        if sequences(s) == s.batch_size:
            return {}
        return {"activations": f"  ({sequences(s)} sequences = {s.batch_size} pairs x chosen + rejected)",
                "attention scores": f"  ({sequences(s)} sequences)",
                REFERENCE_COMPONENT: "  (a pass of its own before the step, adapters off, no gradient: only its "
                                     "log-probabilities are alive at the peak)"}

    def table(self) -> str:
        s, shape = self.settings, self.shape
        base = {"none": "float base", "affine": f"affine {s.bits}-bit group {s.group_size}",
                "nf4": f"nf4 block {s.block_size}{' + double quant' if s.double_quant else ''}"}[s.mode]
        if shape.gguf_tensors is not None:
            base += " for float tensors; GGUF tensors kept as held: " + ", ".join(
                f"{name} x {count}" for name, count in sorted(shape.source_formats.items()))
        elif shape.source_bits:
            base = f"source-quantized {shape.source_bits}-bit group {shape.source_group}"
        lines = [
            f"memory plan: {self.model}: {shape.model_type}, {shape.parameters() / 1e9:.2f}B parameters, {base}",
            f"  LoRA rank {s.rank} on {', '.join(s.target_modules)} x {adapted_blocks(shape, s)} blocks "
            f"({lora_parameters(shape, s):,} parameters); {self._batch()} x {s.seq_length} tokens"
            f"{f' x {s.grad_accumulation} accumulated' if s.grad_accumulation > 1 else ''}, "
            f"grad checkpoint {'on' if s.grad_checkpoint else 'off'}"
            f"{self._path()}; every batch counted at max_seq_length",
        ]
        notes = self._notes()
        lines += [f"  {name:20s} {value / GB:8.2f} GB{notes.get(name, '')}" for name, value in self.components.items()]
        verdict = "fits" if self.fits else "does NOT fit"
        tight = ""
        if self.fits and self.peak > SAFETY_MARGIN * self.memory:  # what batch_size: auto and the guard keep free
            tight = (f", with little headroom: {self.peak / self.memory:.0%} of it (batch_size: auto keeps a step "
                     f"under {SAFETY_MARGIN:.0%})")
        lines.append(f"  {'predicted peak':20s} {self.peak / GB:8.2f} GB: {verdict} in {self.memory / GB:.1f} GB "
                     f"({self.memory_source}){tight}")
        if self.suggestions:
            lines.append(f"  changes that bring it under {SAFETY_MARGIN:.0%} of the memory (predicted peak):")
            lines += [f"    {' '.join(o):58s} {p / GB:6.2f} GB" for o, p in self.suggestions]
        elif not self.fits:
            lines.append("  no change tried here makes it fit; use a smaller model or a machine with more memory")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _shorter_lengths(length: int, lowest: int = 128) -> list[int]:
    """Round sequence lengths below `length`, longest first: the powers of two from `lowest` up."""
    found, value = [], lowest
    while value < length:
        found.append(value)
        value *= 2
    return found[::-1]


def suggestions(cfg, shape: ModelShape, s: StepSettings, memory: float,
                dequantize_path: bool | None = None) -> list[tuple[list[str], float]]:
    """The cheapest single changes that bring the step under SAFETY_MARGIN x `memory` (the share
    `batch_size: auto` and the guard keep), each as `key=value` overrides with its peak; when no
    single change does, or only ones that cut the sequence, the adapted blocks or the base's bits,
    also the cheapest ones combined (float copies dropped, checkpointing, batch 1 with the same
    examples per optimizer step, a 4-bit base, then shorter sequences and fewer adapted blocks).

    Each peak is the plan of `cfg` with those overrides (`planned_settings`), so applying a
    suggestion and planning again prints the same figure.
    """
    from ..config import ConfigError, apply_overrides, config_from_dict, config_to_dict

    target = SAFETY_MARGIN * memory
    data = config_to_dict(cfg)

    def fitting(overrides: list[str]) -> float | None:
        try:
            changed = config_from_dict(apply_overrides(data, overrides))
        except ConfigError:
            return None
        peak = predict(shape, planned_settings(changed, shape, memory, dequantize_path))
        return peak if peak <= target else None

    found: list[tuple[list[str], float]] = []

    def offer(overrides: list[str]) -> bool:
        peak = fitting(overrides)
        if peak is not None:
            found.append((overrides, peak))
        return peak is not None

    copies = bool(float_copy_bytes(shape, s))
    if copies:
        offer(["training.float_weights=quantized"])
    if not s.grad_checkpoint:
        offer(["training.grad_checkpoint=true"])
    batch = s.batch_size // 2
    while batch >= 1:  # smaller micro-batch, same examples per optimizer step
        if offer(_smaller_batch(s, batch)):
            break
        batch //= 2
    for length in _shorter_lengths(s.seq_length):
        if offer([f"data.max_seq_length={length}"]):
            break
    blocks = adapted_blocks(shape, s) // 2
    while blocks >= 1:
        if offer([f"lora.num_layers={blocks}"]):
            break
        blocks //= 2
    for overrides in _lower_bits(shape, s):
        if offer(overrides):
            break
    singles_keep_the_shape = any(o[0].startswith(("training.grad_checkpoint", "training.batch_size", "training.float"))
                                 for o, _ in found)
    if found and (singles_keep_the_shape or s.grad_checkpoint):
        return found
    # nothing alone is enough, or only cutting the sequence, the adapted blocks or the base's bits
    # is: the changes that keep the data and the model first, then shorter sequences, then fewer
    # adapted blocks, until it fits (often a far smaller cut than any alone)
    combined = (["training.float_weights=quantized"] if copies else []) \
        + ([] if s.grad_checkpoint else ["training.grad_checkpoint=true"]) \
        + (_smaller_batch(s, 1) if s.batch_size > 1 else [])
    steps = [[]] + _lower_bits(shape, s)[-1:]  # then a 4-bit base, when the base is held wider
    steps += [[f"data.max_seq_length={length}"] for length in _shorter_lengths(s.seq_length)]
    blocks = adapted_blocks(shape, s) // 2
    while blocks >= 1:
        steps.append([f"lora.num_layers={blocks}"])
        blocks //= 2
    for step in steps:
        combined = [o for o in combined if o.split("=")[0] not in {k.split("=")[0] for k in step}] + step
        if (peak := fitting(combined)) is not None:
            if combined not in [o for o, _ in found]:
                found.append((combined, peak))
            break
    return found


def _smaller_batch(s: StepSettings, batch: int) -> list[str]:
    """Overrides for micro-batch `batch` with the same examples (pairs) per optimizer step."""
    return [f"training.batch_size={batch}", f"training.grad_accumulation={s.grad_accumulation * s.batch_size // batch}"]


def _lower_bits(shape: ModelShape, s: StepSettings) -> list[list[str]]:
    """Overrides for a narrower base than the run's, widest first (8-bit, then 4-bit): none for
    nf4, a 4-bit base, or a checkpoint that holds its own quantized weights (GGUF, MLX-quantized)."""
    if shape.gguf_tensors is not None or shape.source_bits or s.mode == "nf4" or (s.mode == "affine" and s.bits == 4):
        return []
    options = [] if s.mode == "affine" else [["quantization.mode=affine", "quantization.bits=8"]]
    return options + [["quantization.mode=affine", "quantization.bits=4"]]


def auto_batch(shape: ModelShape, s: StepSettings, memory: float, effective: int | None,
               largest: int | None = None) -> tuple[int, int]:
    """(micro-batch, grad_accumulation) for `batch_size: auto`: the largest micro-batch predicted
    under SAFETY_MARGIN x memory, a divisor of `effective` (examples per optimizer step) when set,
    else a power of two up to AUTO_BATCH_CAP with the accumulation left as it is. At least 1."""
    cap = min(effective or AUTO_BATCH_CAP, largest or AUTO_BATCH_CAP * 64)
    if effective:
        candidates = [b for b in range(cap, 0, -1) if effective % b == 0]
    else:
        candidates = [1 << k for k in range(cap.bit_length() - 1, -1, -1)]
    for batch in candidates:
        if predict(shape, dataclasses.replace(s, batch_size=batch)) <= SAFETY_MARGIN * memory:
            break
    else:
        batch = 1
    return batch, (effective // batch if effective else s.grad_accumulation)


def make_plan(cfg, memory: float | None = None, memory_source: str | None = None,
              dequantize_path: bool | None = None) -> Plan:
    """Plan the run `cfg` describes (reads config.json / the GGUF header only, never weights).

    `memory`: bytes to fit in (default: `machine_memory()`). With `batch_size: auto` the plan
    uses the micro-batch `auto_batch` picks. Raises FileNotFoundError / ValueError when the
    model's shape cannot be read (no config.json, unknown architecture).
    """
    if memory is None:
        memory, memory_source = machine_memory()
    shape = read_shape(cfg.model)
    warnings = config_warnings(cfg, shape, memory)
    settings = planned_settings(cfg, shape, memory, dequantize_path)
    plan = Plan(cfg.model, shape, settings, components(shape, settings), memory, memory_source or "given")
    if not plan.fits:
        plan.suggestions = suggestions(cfg, shape, settings, memory, dequantize_path)
    plan.warnings += warnings
    plan.notes = plan_notes(cfg, shape, settings, memory)
    return plan


def plan_notes(cfg, shape: ModelShape, s: StepSettings, memory: float) -> list[str]:
    """What the plan decided for `auto` settings, and assumptions that move its figures, one line each."""
    notes = []
    t = cfg.training
    if t.batch_size == "auto":
        chosen = f"{s.batch_size}" + (f" x {s.grad_accumulation} accumulated" if s.grad_accumulation > 1 else "")
        if predict(shape, s) <= SAFETY_MARGIN * memory:
            notes.append(f"training.batch_size auto: {chosen}, the largest micro-batch under {SAFETY_MARGIN:.0%} of the memory")
        else:
            notes.append(f"training.batch_size auto: {chosen}, and even batch 1 is over {SAFETY_MARGIN:.0%} of the memory")
    with_copies = dataclasses.replace(s, float_weights=True)
    if t.float_weights == "auto" and s.dequantize_path and not s.float_weights and float_copy_bytes(shape, with_copies):
        notes.append(f"training.float_weights auto: no float32 copies of the quantized weights (with them the step would "
                     f"peak at {predict(shape, with_copies) / GB:.2f} GB, over {AUTO_FLOAT_FRACTION:.0%} of the memory), so "
                     "each product dequantizes its layer: slower steps (the demo's ran 1.8x faster with copies)")
    if shape.gguf_tensors is not None and shape.dtype_bytes == 4 and not s.dequantize_path:
        notes.append("activations counted in float32: this GGUF holds no 16-bit float tensors, so its model computes "
                     "in float32 (a 16-bit Hugging Face checkpoint of the same model halves the activations)")
    return notes


def planned_settings(cfg, shape: ModelShape, memory: float, dequantize_path: bool | None = None) -> StepSettings:
    """The StepSettings a run of `cfg` would have in `memory` bytes: float copies decided
    (`choose_float_weights`) and an `auto` micro-batch picked (`auto_batch`)."""
    settings = settings_of(cfg, dequantize_path=dequantize_path)
    settings = choose_float_weights(shape, settings, cfg.training.float_weights, memory)
    if cfg.training.batch_size == "auto":
        batch, accumulation = auto_batch(shape, settings, memory, cfg.training.effective_batch_size)
        # as a run with that batch given would be planned: its CPU streams, and float copies decided
        # at that batch (dropping them only lowers the peak, so the pick still fits)
        settings = dataclasses.replace(settings_of(cfg, batch_size=batch, dequantize_path=dequantize_path),
                                       grad_accumulation=accumulation)
        settings = choose_float_weights(shape, settings, cfg.training.float_weights, memory)
    return settings


def config_warnings(cfg, shape: ModelShape, memory: float) -> list[str]:
    """What in `cfg` the plan cannot honour, one line each; raises ValueError when `lora.target_modules`
    match no projection of the model at all."""
    named = set(cfg.lora.target_modules) - {"all-linear"}
    projections = [p.name for p in shape.projections()]
    if named and not named & set(projections):
        raise ValueError(f"lora.target_modules: {', '.join(sorted(named))} match no layer of this model "
                         f"({shape.model_type}: {', '.join(projections)}); name some of those, or all-linear")
    warnings = [] if cfg.training.compile else [UNCOMPILED_WARNING]
    q = cfg.quantization
    if q.double_quant and q.mode != "nf4":
        warnings.append(f"quantization.double_quant applies to mode nf4 only; with mode {q.mode} it is ignored")
    if cfg.lora.num_layers > shape.layers:
        warnings.append(f"lora.num_layers {cfg.lora.num_layers} is above this model's {shape.layers} blocks: "
                        f"all {shape.layers} are adapted")
    limit = cfg.training.memory_limit
    if limit not in ("auto", "none") and parse_memory(limit) < memory:
        warnings.append(f"training.memory_limit {limit}: the run's guard stops any step above it, below the "
                        f"{memory / GB:.1f} GB this plan holds the step against")
    length = cfg.data.max_seq_length
    if shape.max_positions and length > shape.max_positions:
        warnings.append(f"data.max_seq_length {length} is past this model's context of {shape.max_positions} tokens "
                        "(max_position_embeddings): positions beyond it were never trained; keep it at or below")
    elif shape.sliding_window and length > shape.sliding_window:
        warnings.append(f"data.max_seq_length {length} is past gemma2's sliding window of {shape.sliding_window} tokens, "
                        "which mlx-lm's model does not apply: longer sequences compute differently from the original; "
                        f"keep it at or below {shape.sliding_window}")
    if cfg.backend == "cuda":
        warnings.append("backend: cuda trains with transformers + PEFT + bitsandbytes, which this plan does not model "
                        "(it predicts the MLX backend's step): take its figures as rough")
    if unknown := sorted(named - set(projections)):
        warnings.append(f"lora.target_modules: {', '.join(unknown)} not among this model's projections "
                        f"({', '.join(projections)}): not counted")
    return warnings
