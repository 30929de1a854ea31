"""FSDP for the CUDA backend: what changes when `accelerate launch` runs it with distributed_type FSDP.

QLoRA under FSDP follows Answer.AI's FSDP-QLoRA as PEFT's "FSDP + QLoRA" guide describes it:
the 4-bit weights are stored in the compute dtype (`bnb_4bit_quant_storage`), because FSDP
shards only floating-point tensors; the base is loaded in that same dtype; PEFT's wrap policy
puts each LoRA layer in its own FSDP unit, so no unit mixes trainable and frozen weights (FSDP1
with `use_orig_params: false` needs one `requires_grad` per unit). FSDP version 1 only:
FSDP2's `fully_shard` turns bitsandbytes' Params4bit into plain tensors and loses their
quantization state. Checkpoints and the final adapters are the full (gathered) LoRA weights and
optimizer state, written by rank 0 alone, so a run's files look the same under FSDP, DDP or one
process. The training loop lives in `cuda_loop.py`; this module holds only the FSDP differences.
"""

from __future__ import annotations

from contextlib import contextmanager


def fsdp_enabled(accelerator) -> bool:
    """True when accelerate prepared this process for FSDP (an FSDP config file, any number of processes)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_fsdp(accelerator, cfg) -> None:
    """Raise ValueError for an FSDP set-up this backend cannot train correctly."""
    if not fsdp_enabled(accelerator):
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 1:
        raise ValueError(f"accelerate FSDP version {plugin.fsdp_version}: FSDP2 loses bitsandbytes' 4-bit quantization "
                         "state when it shards; use fsdp_version: 1, as in configs/accelerate/fsdp_qlora.yaml")
    if plugin.use_orig_params:
        raise ValueError("fsdp_use_orig_params: true is not supported with a frozen 4-bit base here; set it to false "
                         "(configs/accelerate/fsdp_qlora.yaml)")
    if cfg.training.objective != "sft":
        raise ValueError(f"training.objective {cfg.training.objective} does not run under FSDP (its reference pass "
                         "needs the whole model in one process); launch it without the FSDP config")


def quant_storage(fsdp: bool, dtype):
    """The dtype bitsandbytes packs 4-bit weights into: the compute dtype under FSDP (so it can
    shard them), uint8 otherwise (the single-GPU memory figures)."""
    import torch

    return dtype if fsdp else torch.uint8


def use_lora_wrap_policy(accelerator, model) -> None:
    """Have FSDP wrap each LoRA layer apart from the frozen base (PEFT's `fsdp_auto_wrap_policy`)."""
    from peft.utils.other import fsdp_auto_wrap_policy

    accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)


@contextmanager
def _full_state(accelerator, model):
    """FSDP's FULL_STATE_DICT context: gathered on rank 0 only when there are several processes,
    and moved to CPU memory when the model is on a GPU (FSDP refuses both in a world of one, and
    offloading CPU tensors to the CPU frees them under gloo)."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    several = accelerator.num_processes > 1
    offload = several and accelerator.device.type != "cpu"
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=offload, rank0_only=several),
                              FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=several)):
        yield


def trainable_state(accelerator, model) -> dict:
    """The full LoRA weights, by the PEFT model's parameter names, on rank 0 ({} on the others).

    Every process must call it (the gather is a collective). It gathers the whole state dict
    unit by unit and keeps the trainable part, so rank 0 needs CPU memory for the whole 4-bit
    base once (e.g. ~35 GB for a 70B model stored in bfloat16 packing).
    """
    unwrapped = accelerator.unwrap_model(model)
    trainable = {name for name, p in unwrapped.named_parameters() if p.requires_grad}
    with _full_state(accelerator, model):
        state = model.state_dict()
    if not accelerator.is_main_process:
        return {}
    # Names of the FSDP state dict are the unwrapped module's; flat parameters are not.
    return {name: tensor for name, tensor in state.items() if name in trainable or _is_lora(name)}


def _is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def save_peft_adapter(model, folder, state: dict) -> dict:
    """Write a PEFT adapter folder (adapter_model.safetensors + adapter_config.json) from gathered
    LoRA weights; returns them by PEFT's saved names.

    PEFT's own `save_pretrained(state_dict=...)` picks the adapter's entries by the model's module
    names, which FSDP has changed (`..._fsdp_wrapped_module...`), and so would save nothing.
    """
    from pathlib import Path

    from safetensors.torch import save_file

    name = model.active_adapter
    weights = {key.replace(f".{name}.", "."): tensor.detach().contiguous() for key, tensor in state.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    model.peft_config[name].save_pretrained(str(folder))
    return weights


def optimizer_state(accelerator, model, optimizer) -> dict:
    """The optimizer's full state keyed by parameter names, on rank 0 (collective; {} on the others)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with _full_state(accelerator, model):
        state = FSDP.optim_state_dict(model, optimizer)
    return state if accelerator.is_main_process else {}


def load_optimizer_state(accelerator, model, optimizer, state: dict) -> None:
    """Load a full optimizer state (from `optimizer_state`, read by every process) into the sharded optimizer."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(),
                              FullOptimStateDictConfig(rank0_only=False)):
        optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, state))

