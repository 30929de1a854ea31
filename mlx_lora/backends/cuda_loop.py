"""The CUDA backend's training loop, checkpoints and scoring, in torch; semantics follow `train.py`.

Same schedule (linear warmup from 0, then constant/linear/cosine to min_lr_ratio * peak), same
loss (mean cross-entropy over target tokens of each micro-batch, averaged over accumulation),
same batch order (`data.iterate_train`) and dropout seeding by (seed, step, micro-batch), so a
resumed run repeats what an uninterrupted one does. Checkpoints have the MLX backend's layout
(`checkpoints/step_N/` with state.json, a `latest` pointer), holding a PEFT adapter and the
optimizer's state_dict.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

from ..checkpoints import checkpoint_root, latest, write_checkpoint
from ..config import TrainingConfig
from ..data import BatchPosition, Example, iterate_eval, iterate_train, make_batches

OPTIMIZER_STATE = "optimizer.pt"
EVAL_BATCH = 16  # prompts generated together


def learning_rate_at(config: TrainingConfig, steps: int, step: int) -> float:
    """The learning rate of update `step` (0-based): `train.learning_rate_schedule` in plain Python."""
    peak, warmup = config.learning_rate, config.warmup_steps
    if warmup and step < warmup:
        return peak * min(1.0, (step + 1) / warmup)
    floor = peak * config.min_lr_ratio
    progress = min(max((step - warmup) / max(1, steps - warmup), 0.0), 1.0)
    if config.lr_schedule == "linear":
        return floor + (peak - floor) * (1 - progress)
    if config.lr_schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return peak


def masked_loss(model, tokens, mask):
    """(mean cross-entropy over target tokens, target count); tokens (B, T) int64, mask (B, T-1)."""
    import torch.nn.functional as F

    logits = model(input_ids=tokens[:, :-1]).logits  # (B, T-1, V)
    ce = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none") * mask  # (B, T-1)
    count = mask.sum()
    return ce.sum() / count.clamp(min=1), count


def evaluate_loss(model, examples: list[Example], batch_size: int, device, max_batches: int = -1) -> float:
    """Token-weighted mean loss over (up to `max_batches` of) a split."""
    import torch

    total, count = 0.0, 0.0
    with torch.no_grad():
        for tokens, mask, _ in iterate_eval(examples, batch_size, max_batches):
            loss, n = masked_loss(model, torch.as_tensor(tokens, dtype=torch.long, device=device),
                                  torch.as_tensor(mask, device=device))
            total += loss.item() * n.item()
            count += n.item()
    return total / max(count, 1)


def peak_memory_gb(device) -> float:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


# --- checkpoints ---------------------------------------------------------------------------------

def checkpoint_step(path: Path) -> int:
    return int(json.loads((Path(path) / "state.json").read_text())["step"])


def save_checkpoint(output_dir: Path, model, optimizer, step: int, position: BatchPosition, elapsed_s: float,
                    keep: int, gathered: tuple[dict, dict] | None = None) -> Path:
    """Write checkpoints/step_N/ (PEFT adapter, optimizer.pt, state.json) atomically; prune beyond `keep`.

    `gathered`: (LoRA weights, optimizer state) gathered by FSDP (`cuda_fsdp`), written instead
    of the model's and optimizer's own, which hold only this process's shards.
    """
    import torch

    from . import cuda_fsdp

    adapter, optimizer_state = gathered if gathered is not None else (None, optimizer.state_dict())

    def write_payload(folder: Path) -> None:
        if adapter is None:
            model.save_pretrained(str(folder))
        else:
            cuda_fsdp.save_peft_adapter(model, folder, adapter)
        torch.save(optimizer_state, folder / OPTIMIZER_STATE)

    return write_checkpoint(output_dir, step, position, elapsed_s, keep, write_payload, {"backend": "cuda"})


def load_checkpoint(output_dir: Path, model, optimizer, device) -> dict:
    """Restore adapter weights (and the optimizer state unless `optimizer` is None) from the
    newest checkpoint; returns its state.json, with "path" added."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = latest(output_dir)
    if path is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint_root(output_dir)}; start without --resume")
    state = json.loads((path / "state.json").read_text())
    if state.get("backend") != "cuda" or not (path / OPTIMIZER_STATE).is_file():
        raise ValueError(f"{path}: written by the mlx backend; resume it with backend: mlx, or start a new output_dir")
    weights = load_file(str(path / "adapter_model.safetensors"), device=str(device))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model's adapters ({', '.join(unexpected[:5])}); "
                         "resume with the same model and lora settings, or start a new output_dir")
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / OPTIMIZER_STATE, map_location=device, weights_only=False))
    return {**state, "path": str(path)}


# --- training ------------------------------------------------------------------------------------

def train(model, accelerator, train_set: list[Example], valid_set: list[Example], config: TrainingConfig,
          output_dir: Path, seed: int = 0, resume: bool = False, callbacks=()):
    """Train the PEFT model's trainable parameters; the callbacks are `train.train`'s.

    Returns (summary, the model as accelerate prepared it: DDP- or FSDP-wrapped, or itself).
    Under FSDP (`cuda_fsdp`) the model is wrapped before the optimizer is made (FSDP1 replaces
    its parameters by flat shards), the optimizer is torch's AdamW (bitsandbytes' paged state
    is not sharded by FSDP), and checkpoints hold the gathered weights and optimizer state.
    """
    import bitsandbytes as bnb
    import torch

    from ..distributed import World, check_batch_size
    from ..train import GracefulInterrupt, StepReport, TrainingStopped, total_steps
    from . import cuda_fsdp

    output_dir = Path(output_dir)
    device = accelerator.device
    # Only the batch shares and dropout seeds come from World; accelerate/DDP does the communication.
    ranks = World(rank=accelerator.process_index, size=accelerator.num_processes)
    check_batch_size(config.batch_size, ranks.size)
    steps = total_steps(config, len(train_set))
    make_batches(train_set, config.batch_size)  # fail early when the split is smaller than a batch
    fsdp = cuda_fsdp.fsdp_enabled(accelerator)
    learning_rate = learning_rate_at(config, steps, 0)
    position = BatchPosition()
    start_step = 0
    elapsed_before = 0.0
    if fsdp:
        state = load_checkpoint(output_dir, model, None, device) if resume else None
        cuda_fsdp.use_lora_wrap_policy(accelerator, model)
        model = accelerator.prepare(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = accelerator.prepare(torch.optim.AdamW(params, lr=learning_rate, weight_decay=config.weight_decay))
        if state is not None:
            full = torch.load(Path(state["path"]) / OPTIMIZER_STATE, map_location="cpu", weights_only=False)
            cuda_fsdp.load_optimizer_state(accelerator, model, optimizer, full)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        # Paged AdamW (QLoRA): optimizer state moves to CPU memory under GPU memory pressure.
        optimizer = bnb.optim.PagedAdamW(params, lr=learning_rate, weight_decay=config.weight_decay)
        state = load_checkpoint(output_dir, model, optimizer, device) if resume else None
        model, optimizer = accelerator.prepare(model, optimizer)
    if state is not None:
        start_step, position = state["step"], BatchPosition(**state["position"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
    unwrapped = accelerator.unwrap_model(model)
    scorer = model if fsdp else unwrapped  # under FSDP only the wrapped model gathers its shards
    accumulation = config.grad_accumulation

    for callback in callbacks:
        callback.on_start({"total_steps": steps, "start_step": start_step})
    model.train()
    preference = config.objective != "sft"
    if preference:
        from ..preference_data import METRICS
        from ..preference_data import collate_pairs
        from .cuda_objectives import evaluate_preferences, preference_loss, reference_logps

        if ranks.size > 1:
            raise ValueError(f"training.objective {config.objective} runs in one process for now (this run has "
                             f"{ranks.size}); launch it without accelerate's --num_processes")
        batches = ((*batch, 1.0) for batch in
                   iterate_train(train_set, config.batch_size, seed, position, collate_fn=collate_pairs))
    else:
        batches = ranks.share(iterate_train(train_set, config.batch_size, seed, position))
    window_loss, window_tokens, window_steps = 0.0, 0, 0
    window_metrics = None
    window_start = run_start = time.perf_counter()
    last_good, val_loss, val_accuracy, step = None, None, None, start_step
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)

    def save(at_step: int) -> Path | None:
        path = None
        gathered = None
        if fsdp:  # every process takes part in the gather; rank 0 writes
            gathered = (cuda_fsdp.trainable_state(accelerator, model),
                        cuda_fsdp.optimizer_state(accelerator, model, optimizer))
        if accelerator.is_main_process:
            path = save_checkpoint(output_dir, unwrapped, optimizer, at_step, position,
                                   elapsed_before + time.perf_counter() - run_start, config.keep_checkpoints, gathered)
            for callback in callbacks:
                callback.on_checkpoint(path)
        accelerator.wait_for_everyone()
        return path

    with GracefulInterrupt() as interrupt:
        while step < steps:
            if interrupt.requested:
                path = save(step) if step > start_step else last_good
                for callback in callbacks:
                    callback.on_interrupt(step, path)
                raise KeyboardInterrupt
            position_before = BatchPosition(position.epoch, position.index)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(config, steps, step)
            step_loss, step_tokens = 0.0, 0
            for micro in range(accumulation):
                # Data parallel: each process takes its rows of the global batch; `weight` makes DDP's
                # gradient average the mean over all of its target tokens (see distributed.py).
                tokens, mask, n_tokens, weight = next(batches)
                # Dropout draws depend on (seed, step, micro-batch, process) only, so a resumed run repeats them.
                torch.manual_seed(ranks.seed(seed * 1_000_003 + step * accumulation + micro))
                is_last = micro == accumulation - 1
                with accelerator.no_sync(model) if not is_last else nullcontext():
                    tokens, mask = torch.as_tensor(tokens, dtype=torch.long, device=device), torch.as_tensor(mask, device=device)
                    if preference:
                        # The reference goes through the unwrapped PEFT model (adapters off, no grad); the
                        # policy through `model`, so data-parallel gradients are synchronised.
                        reference = reference_logps(unwrapped, tokens, mask[0]) if config.objective == "dpo" else None
                        loss, metrics = preference_loss(model, tokens, mask, config, reference)
                        metrics = metrics / accumulation
                        window_metrics = metrics if window_metrics is None else window_metrics + metrics
                    else:
                        loss, _ = masked_loss(model, tokens, mask)
                        loss = loss * float(weight)
                    accelerator.backward(loss / accumulation)
                step_loss += loss.item() / accumulation
                step_tokens += n_tokens
            if ranks.size > 1:
                step_loss = accelerator.reduce(torch.tensor(step_loss, device=device), "mean").item()
            if not math.isfinite(step_loss):
                position.epoch, position.index = position_before.epoch, position_before.index
                kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                raise TrainingStopped(f"loss became {step_loss} at step {step + 1}; stopped ({kept}). "
                                      "Lower training.learning_rate, enable training.grad_clip, or check the data.")
            if config.grad_clip is not None:
                if fsdp:  # the root FSDP module computes the norm over every rank's shards
                    model.clip_grad_norm_(config.grad_clip)
                else:
                    accelerator.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            learning_rate = optimizer.param_groups[0]["lr"]
            step += 1
            window_loss += step_loss
            window_tokens += step_tokens
            window_steps += 1
            is_final = step == steps
            val_loss = val_accuracy = None
            if config.steps_per_eval and (step % config.steps_per_eval == 0 or is_final) and valid_set:
                model.eval()
                if preference:
                    scores = evaluate_preferences(unwrapped, valid_set, config.batch_size, config, device, config.val_batches)
                    val_loss, val_accuracy = scores["loss"], scores["preference_accuracy"]
                else:
                    val_loss = evaluate_loss(scorer, valid_set, config.batch_size, device, config.val_batches)
                model.train()
            if step % config.steps_per_report == 0 or is_final or val_loss is not None:
                now = time.perf_counter()
                report = StepReport(
                    step=step, total_steps=steps, train_loss=window_loss / window_steps, learning_rate=learning_rate,
                    tokens=window_tokens, tokens_per_second=window_tokens / max(now - window_start, 1e-9),
                    peak_memory_gb=peak_memory_gb(device), elapsed_s=elapsed_before + now - run_start,
                    val_loss=val_loss)
                if preference:
                    if ranks.size > 1:
                        window_metrics = accelerator.reduce(window_metrics, "mean")
                    for name, total in zip(METRICS, window_metrics.tolist()):
                        setattr(report, name, total / window_steps)
                    report.val_preference_accuracy = val_accuracy
                    window_metrics = None
                for callback in callbacks:
                    callback.on_report(report)
                window_loss, window_tokens, window_steps = 0.0, 0, 0
                window_start = time.perf_counter()
            if config.save_every and step % config.save_every == 0 and not is_final:
                last_good = save(step)
    final = save(step)
    summary = {"steps": step, "final_checkpoint": str(final), "elapsed_s": elapsed_before + time.perf_counter() - run_start,
               "peak_memory_gb": peak_memory_gb(device), "val_loss": val_loss}
    for callback in callbacks:
        callback.on_end(summary)
    return summary, model


# --- scoring -------------------------------------------------------------------------------------

def prompt_tokens(tokenizer, example: Example) -> list[int] | None:
    """The prompt as `data.py` tokenizes it for training (rendered template, then encoded)."""
    if example.prompt_messages is not None:
        tools = {"tools": example.tools} if example.tools else {}
        text = tokenizer.apply_chat_template(example.prompt_messages, tokenize=False, add_generation_prompt=True, **tools)
        return list(tokenizer.encode(text, add_special_tokens=True))
    if example.prompt_text is not None:
        return list(tokenizer.encode(example.prompt_text, add_special_tokens=True))
    return None


def generate_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy completions, batched with left padding."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    eos.discard(None)
    answers = []
    model.config.use_cache = True
    try:
        for start in range(0, len(prompts), EVAL_BATCH):
            chunk = prompts[start: start + EVAL_BATCH]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=sorted(eos), pad_token_id=pad)
            answers += [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out.tolist()]
    finally:
        model.config.use_cache = False
    return answers


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [value]


def score(model, tokenizer, examples: list[Example], batch_size: int, max_new_tokens: int) -> dict:
    """Loss, perplexity and exact match, with `evaluate.score`'s keys and normalisation."""
    from ..evaluate import exact_match_scores

    model.eval()
    device = next(model.parameters()).device
    loss = evaluate_loss(model, examples, batch_size, device)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "n": len(examples)}
    scored = [(p, e) for e in examples if e.reference is not None and (p := prompt_tokens(tokenizer, e)) is not None]
    if scored:
        answers = generate_answers(model, tokenizer, [p for p, _ in scored], max_new_tokens)
        result.update(exact_match_scores(answers, [e.reference for _, e in scored]))
    return result
