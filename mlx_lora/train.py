"""The training loop: AdamW with warmup and decay, accumulation, clipping, checkpointing, resume.

`train()` takes a prepared model and tokenized data (examples for `objective: sft`, preference
pairs for dpo / orpo, whose losses live in `objectives.py`) and talks only through callbacks (see
`report.py`). Checkpoints hold adapters, optimizer state, step and data position (dropout is
seeded by step), so `resume=True` continues exactly where the run stopped, including after Ctrl-C.
Data parallelism enters through the `world` argument (`distributed.py` holds every rank-dependent
line): a batch share per rank, averaged gradients and losses, rank-0 checkpoints.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from . import checkpoints
from .config import TrainingConfig
from .cpu_streams import blas_threads, split_pairs, split_rows, stream_count
from .data import BatchPosition, Example, iterate_eval, iterate_train, make_batches
from .distributed import LastGood, World, check_batch_size
from .loss import batch_loss, enable_chunked_loss, target_positions
from .objectives import METRICS, evaluate_preferences, preference_loss, reference_logps
from .packing import pack_batch, packing_matches


EARLY_STOP_MIN_IMPROVEMENT = 0.01  # a validation loss counts as better when 1% under the best so far


class TrainingStopped(RuntimeError):
    """Training ended early (non-finite loss, memory); the message says why and what was kept."""


class MemoryLimitExceeded(TrainingStopped):
    """A step's peak memory passed the run's limit; a resumable checkpoint was written first."""


@dataclass
class StepReport:
    step: int
    total_steps: int
    train_loss: float
    learning_rate: float
    tokens: int
    tokens_per_second: float
    peak_memory_gb: float
    elapsed_s: float
    val_loss: float | None = None
    # dpo / orpo only (means over the window's pairs): the implicit reward margin and accuracy,
    # each answer's reward, and the summed completion log-probabilities of the policy.
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    chosen_rewards: float | None = None
    rejected_rewards: float | None = None
    chosen_logps: float | None = None
    rejected_logps: float | None = None
    val_preference_accuracy: float | None = None


def total_steps(config: TrainingConfig, num_train: int) -> int:
    """Optimizer steps for the run: `iters`, or `epochs` worth of batches when set."""
    if config.epochs is None:
        return config.iters
    batches_per_epoch = num_train // config.batch_size
    return max(1, math.ceil(config.epochs * batches_per_epoch / config.grad_accumulation))


def learning_rate_schedule(config: TrainingConfig, steps: int):
    """step -> learning rate: linear warmup from 0, then constant, linear or cosine decay."""
    peak, warmup = config.learning_rate, config.warmup_steps
    floor = peak * config.min_lr_ratio
    decay_steps = max(1, steps - warmup)

    def schedule(step):
        step = mx.array(step, mx.float32)
        warm = peak * mx.minimum(1.0, (step + 1) / max(1, warmup)) if warmup else mx.array(peak)
        progress = mx.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if config.lr_schedule == "linear":
            decayed = floor + (peak - floor) * (1 - progress)
        elif config.lr_schedule == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1 + mx.cos(math.pi * progress))
        else:
            decayed = mx.array(peak)
        return mx.where(step < warmup, warm, decayed)

    return schedule


def evaluate_loss(model: nn.Module, examples: list[Example], batch_size: int, max_batches: int = -1) -> float:
    """Token-weighted mean loss over (up to `max_batches` of) a split."""
    if examples and not hasattr(model, "chunked_loss"):  # a model that was not trained here (mlx-lora eval)
        enable_chunked_loss(model, mx.array([examples[0].tokens]))
    total, count = 0.0, 0.0
    for tokens, mask, _ in iterate_eval(examples, batch_size, max_batches):
        loss, n = batch_loss(model, mx.array(tokens), mx.array(mask), *map(mx.array, target_positions(mask)))
        mx.eval(loss, n)
        total += loss.item() * n.item()
        count += n.item()
    return total / max(count, 1)


def still_improving(val_history: list[dict]) -> tuple[float, float] | None:
    """(previous, last) validation loss when the last evaluation was still 1% under the one
    before it (training stopped while the model was still getting better), else None."""
    if len(val_history) < 2:
        return None
    previous, last = val_history[-2]["val_loss"], val_history[-1]["val_loss"]
    return (previous, last) if last < previous * (1 - EARLY_STOP_MIN_IMPROVEMENT) else None


def enable_grad_checkpoint(model: nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass.

    Only this model's blocks change class (to a subclass that checkpoints), not every instance
    of the architecture in the process.
    """
    for block in model.layers:
        base = type(block)
        if getattr(base, "_mlx_lora_checkpointed", False):
            continue

        def checkpointed_call(self, *args, __base=base, **kwargs):
            def inner(params, *args, **kwargs):
                self.update(params)
                return __base.__call__(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        block.__class__ = type(f"Checkpointed{base.__name__}", (base,), {"__call__": checkpointed_call, "_mlx_lora_checkpointed": True})


class GracefulInterrupt:
    """Turn the first Ctrl-C into a flag checked between steps (a second one interrupts at once).

    Stopping between steps means the checkpoint never holds a half-applied update.
    """

    def __init__(self):
        self.requested = False
        self.previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _size(n_bytes: float) -> str:
    """Bytes as GB (two decimals), or as MB below 1 GB, so a small limit does not read 0.00 GB."""
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def weighted_loss(model: nn.Module, tokens: mx.array, mask: mx.array, positions: mx.array, weights: mx.array,
                  share: mx.array, segments: mx.array | None = None):
    """`batch_loss` times this rank's share of the global batch's target tokens (1 on a single process).

    `segments` (B, T): packed rows (`packing.pack_batch`)."""
    loss, count = batch_loss(model, tokens, mask, positions, weights, segments)
    return loss * share, count


def check_packing(model: nn.Module, train_set: list[Example], config: TrainingConfig, world: World) -> None:
    """ValueError unless packing can run here: SFT, one process, and a model that passes the probe."""
    if config.objective != "sft" or world.size > 1:
        raise ValueError(f"data.pack: packing runs for objective sft in one process (this run: {config.objective}, "
                         f"{world.size} rank(s)); set data.pack: false")
    if len(train_set) > 1 and not packing_matches(model, sorted(train_set, key=lambda e: e.length)[:2]):
        raise ValueError("data.pack: this model computes a packed example differently from the example alone (its "
                         "attention takes no per-example mask, or its positions are absolute); set data.pack: false")


def train(model: nn.Module, train_set: list[Example], valid_set: list[Example], config: TrainingConfig,
          output_dir: Path, seed: int = 0, resume: bool = False, callbacks=(), memory_limit: float | None = None,
          world: World | None = None, pack_capacity: int | None = None) -> dict:
    """Train the trainable (adapter) parameters of `model`; returns a summary dict.

    Callbacks get `on_start(info)`, `on_report(StepReport)`, `on_checkpoint(path)`, `on_end(summary)`.
    With `config.early_stop_patience`, training ends once that many validation losses in a row
    were not 1% under the best one (`summary["stopped_early"]`); `summary["val_history"]` lists
    this session's validation losses.
    `memory_limit` (bytes): the memory guard. After any step whose peak (`mx.get_peak_memory()`)
    passed it, a checkpoint is written and MemoryLimitExceeded is raised, so the run stops before
    a larger batch pushes the machine into swap; `--resume` continues from that checkpoint.
    `world` (distributed.init()) makes this one rank of a data-parallel run; rank 0 writes.
    `pack_capacity` (tokens): pack each batch's examples into rows of up to this many tokens
    (`packing.pack_batch`; SFT in one process), after checking the model computes each packed
    example as it would alone (`packing.packing_matches`; a ValueError when it does not).
    """
    output_dir = Path(output_dir)
    world = world or World()
    steps = total_steps(config, len(train_set))
    check_batch_size(config.batch_size, world.size)
    if world.time_all_reduce and config.compile:
        raise ValueError("timing the gradient all-reduce evaluates the step in pieces; set training.compile=false")
    make_batches(train_set, config.batch_size)  # fail early when the split is smaller than a batch
    optimizer = optim.AdamW(learning_rate=learning_rate_schedule(config, steps), weight_decay=config.weight_decay)
    position = BatchPosition()
    start_step = 0
    mx.random.seed(seed)
    if resume and world.is_main:  # the others get rank 0's state in start_together
        state = checkpoints.load_latest(output_dir, model, optimizer)
        if state is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {output_dir / 'checkpoints'}; start without --resume")
        start_step, position = state["step"], BatchPosition(**state["position"])
    else:
        optimizer.init(model.trainable_parameters())
    if config.grad_checkpoint:
        enable_grad_checkpoint(model)
    preference = config.objective != "sft"
    if pack_capacity is not None:
        check_packing(model, train_set, config, world)
    longest = max(train_set, key=lambda e: e.length)
    enable_chunked_loss(model, mx.array([longest.chosen.tokens if preference else longest.tokens]))

    start_step = world.start_together(model, optimizer, start_step, position)
    if preference:
        if world.size > 1:
            raise ValueError(f"training.objective {config.objective} runs in one process for now (this run has "
                             f"{world.size} ranks); train it without -n / --hosts")

        def objective(model, inputs):  # tokens, masks; the reference log-probs for dpo; totals for a group
            return preference_loss(model, inputs["tokens"], inputs["masks"], inputs.get("reference"), config,
                                   inputs.get("totals"))
    else:
        def objective(model, inputs):  # (tokens, mask, positions, weights, this rank's share)
            return weighted_loss(model, *inputs)
    loss_and_grad = nn.value_and_grad(model, objective)
    accumulation = config.grad_accumulation
    compiled_state = [model.state, optimizer.state, mx.random.state]
    reference_fn = None
    if config.objective == "dpo":
        # A separate evaluation before the step: the reference forward's activations are freed
        # before the policy's forward and backward begin, so a step holds one model's worth.
        reference_fn = partial(reference_logps, model)
        if config.compile:
            reference_fn = partial(mx.compile, inputs=[model.state, mx.random.state], outputs=[mx.random.state])(reference_fn)

    def update(loss, aux, grad, previous_grad, do_update):
        if previous_grad is not None:
            grad = tree_map(mx.add, grad, previous_grad)
        if do_update:
            grad = world.average_gradients(grad)  # before clipping, so the clip sees the global norm
            if accumulation > 1:
                grad = tree_map(lambda g: g / accumulation, grad)
            if config.grad_clip is not None:
                grad, _ = optim.clip_grad_norm(grad, config.grad_clip)
            optimizer.update(model, grad)
            grad = None
        return world.average(loss), aux, grad

    def step_fn(inputs, previous_grad, do_update):
        (loss, aux), grad = loss_and_grad(model, inputs)
        return update(loss, aux, grad, previous_grad, do_update)

    def split_step_fn(parts, previous_grad, do_update):  # parts: (loss, target count, grad) per row group
        total = sum(count for _, count, _ in parts)
        shares = [count / mx.maximum(total, 1) for _, count, _ in parts]
        loss = sum(part_loss * share for (part_loss, _, _), share in zip(parts, shares))
        grad = tree_map(lambda *g: sum(x * share for x, share in zip(g, shares)), *[part[2] for part in parts])
        return update(loss, total, grad, previous_grad, do_update)

    def summed_step_fn(parts, previous_grad, do_update):  # preference groups: (loss, metrics, grad), each a share
        grad = tree_map(lambda *g: sum(g), *[part[2] for part in parts])
        return update(sum(part[0] for part in parts), sum(part[1] for part in parts), grad, previous_grad, do_update)

    # On the CPU: a micro-batch's rows (pairs) in groups, each on its own stream (cpu_streams.py)
    rows = config.batch_size // world.size if isinstance(config.batch_size, int) else 1
    streams = stream_count(config, rows, mx.default_device() == mx.cpu)
    group_fns = []
    for _ in range(streams if streams > 1 else 0):
        def group_fn(inputs):
            (loss, aux), grad = loss_and_grad(model, inputs)  # aux: SFT's target count, or the pairs' metrics
            return loss, aux, grad
        if config.compile:  # one compiled function per stream: a trace keeps the stream it was made on
            group_fn = mx.compile(group_fn, inputs=compiled_state, outputs=compiled_state)
        group_fns.append((mx.new_stream(mx.cpu), group_fn))

    if config.compile:
        step_fn = partial(mx.compile, inputs=compiled_state, outputs=compiled_state)(step_fn)
        split_step_fn = partial(mx.compile, inputs=compiled_state, outputs=compiled_state)(split_step_fn)
        summed_step_fn = partial(mx.compile, inputs=compiled_state, outputs=compiled_state)(summed_step_fn)

    def sft_inputs(tokens, mask, share):  # (tokens, mask, positions, weights, this rank's share[, segments])
        return (mx.array(tokens), mx.array(mask), *map(mx.array, target_positions(mask)), *map(mx.array, share))

    def run_step(tokens, mask, share, previous_grad, do_update):
        """One SFT micro-batch: whole, or its rows in groups on the CPU streams."""
        groups = min(len(group_fns), tokens.shape[0])
        if groups < 2:
            return step_fn(sft_inputs(tokens, mask, share), previous_grad, do_update)
        scalar, rest = share[:1], [np.asarray(a) for a in share[1:]]  # packed batches: the segments split too
        parts = []
        for (stream, group_fn), (t, m, *seg) in zip(group_fns, split_rows([tokens, mask, *rest], groups)):
            with mx.stream(stream):
                parts.append(group_fn(sft_inputs(t, m, [*scalar, *seg])))
        return split_step_fn(parts, previous_grad, do_update)

    def run_preference_step(tokens, masks, previous_grad, do_update):
        """One batch of pairs (tokens (2B, T), masks (2, 2B, T-1)): whole, or runs of pairs on the CPU streams."""
        inputs = {"tokens": mx.array(tokens), "masks": mx.array(masks)}
        if reference_fn is not None:
            inputs["reference"] = reference_fn(inputs["tokens"], inputs["masks"][0])
            mx.eval(inputs["reference"])
        pairs = tokens.shape[0] // 2
        groups = min(len(group_fns), pairs)
        if groups < 2:
            return step_fn(inputs, previous_grad, do_update)
        totals = mx.array([pairs, float(masks[1, :pairs].sum())], dtype=mx.float32)  # masks: collate_pairs' numpy
        parts = []
        for (stream, group_fn), rows in zip(group_fns, split_pairs(pairs, groups)):
            group = {"tokens": mx.array(tokens[rows]), "masks": mx.array(masks[:, rows]), "totals": totals}
            if "reference" in inputs:
                group["reference"] = inputs["reference"][mx.array(rows)]
            with mx.stream(stream):
                parts.append(group_fn(group))
        return summed_step_fn(parts, previous_grad, do_update)

    for callback in callbacks:
        callback.on_start({"total_steps": steps, "start_step": start_step, "cpu_streams": streams})
    model.train()
    if preference:
        from .preference_data import collate_pairs

        batches = iterate_train(train_set, config.batch_size, seed, position, collate_fn=collate_pairs)
    elif pack_capacity is not None:  # (tokens, mask, count, share 1, segments)
        batches = ((t, m, n, np.float32(1.0), seg) for t, m, seg, n in iterate_train(
            train_set, config.batch_size, seed, position, collate_fn=partial(pack_batch, capacity=pack_capacity)))
    else:
        batches = world.share(iterate_train(train_set, config.batch_size, seed, position))
    window_loss, window_tokens, window_steps = 0.0, 0, 0
    window_metrics = [0.0] * len(METRICS)
    window_start = time.perf_counter()
    elapsed_before = checkpoints.elapsed_of(output_dir) if resume else 0.0
    run_start = time.perf_counter()
    last_good = None
    step = start_step
    val_loss = val_accuracy = None
    val_history: list[tuple[int, float]] = []  # (step, validation loss) of this session
    stale_evals = 0  # evaluations in a row without a 1% improvement on the best
    stopped_early = False
    mx.reset_peak_memory()

    def report_window(at_step: int, val_loss, val_accuracy=None) -> None:
        """One StepReport over the steps since the last one (to every callback), then a new window."""
        nonlocal window_loss, window_tokens, window_steps, window_metrics, window_start
        if not window_steps:
            return
        now = time.perf_counter()
        report = StepReport(
            step=at_step, total_steps=steps, train_loss=window_loss / window_steps,
            learning_rate=float(optimizer.learning_rate.item()), tokens=window_tokens,
            tokens_per_second=window_tokens / max(now - window_start, 1e-9),
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            elapsed_s=elapsed_before + now - run_start, val_loss=val_loss,
        )
        if preference:
            for name, total in zip(METRICS, window_metrics):
                setattr(report, name, total / window_steps)
            report.val_preference_accuracy = val_accuracy
        for callback in callbacks:
            callback.on_report(report)
        window_loss, window_tokens, window_steps = 0.0, 0, 0
        window_metrics = [0.0] * len(METRICS)
        window_start = time.perf_counter()

    def save(at_step: int) -> Path | None:
        if not world.is_main:
            return None
        path = checkpoints.save(output_dir, model, optimizer, at_step, position,
                                elapsed_before + time.perf_counter() - run_start, config.keep_checkpoints)
        for callback in callbacks:
            callback.on_checkpoint(path)
        return path

    def save_kept(good: LastGood) -> Path:  # after another rank failed: the last step all finished
        return checkpoints.save_state(output_dir, good.adapters, good.optimizer_state, good.step,
                                      BatchPosition(good.epoch, good.index),
                                      elapsed_before + time.perf_counter() - run_start, config.keep_checkpoints)

    with GracefulInterrupt() as interrupt, world.guard(save_kept):
        while step < steps:
            if world.any(interrupt.requested):
                report_window(step, None)  # the steps since the last report were applied: their metrics too
                path = save(step) if step > start_step else last_good
                for callback in callbacks:
                    callback.on_interrupt(step, path)
                world.barrier()  # no rank exits (and so stops the launcher) before rank 0 has written
                raise KeyboardInterrupt
            position_before = BatchPosition(position.epoch, position.index)
            grad = None
            step_loss, step_tokens = 0.0, 0
            try:
                for micro in range(accumulation):
                    # Dropout draws depend on (seed, step, micro-batch) only, so a resumed run repeats them.
                    mx.random.seed(world.seed(seed * 1_000_003 + step * accumulation + micro))
                    tokens, mask, n_tokens, *share = next(batches)
                    do_update = micro == accumulation - 1
                    if preference:
                        loss, aux, grad = run_preference_step(tokens, mask, grad, do_update)
                    else:  # the output head only where there is loss; this rank's share
                        loss, aux, grad = run_step(tokens, mask, share, grad, do_update)
                    with blas_threads(1 if streams > 1 else None):
                        mx.eval(loss, aux, model.state, optimizer.state, *([grad] if grad is not None else []))
                    step_loss += loss.item() / accumulation
                    step_tokens += n_tokens
                    if preference:
                        window_metrics = [w + m / accumulation for w, m in zip(window_metrics, aux.tolist())]
            except RuntimeError as err:  # Metal refuses an allocation: the step is lost, earlier ones are kept
                if "memory" not in str(err).lower() and "malloc" not in str(err).lower():
                    raise
                kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                raise MemoryLimitExceeded(f"step {step + 1} ran out of memory ({err}); stopped ({kept}). "
                                          "`mlx-lora plan CONFIG` lists settings that fit") from err
            if not math.isfinite(step_loss):
                position.epoch, position.index = position_before.epoch, position_before.index
                kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                raise TrainingStopped(
                    f"loss became {step_loss} at step {step + 1}; stopped ({kept}). "
                    "Lower training.learning_rate, enable training.grad_clip, or check the data."
                )
            step += 1
            world.keep(step, position, model, optimizer)
            window_loss += step_loss
            window_tokens += step_tokens
            window_steps += 1
            if memory_limit is not None and mx.get_peak_memory() > memory_limit:
                path = save(step)
                report_window(step, None)  # the steps since the last report were applied: their metrics too
                for callback in callbacks:  # e.g. the progress bar ends its line before the message
                    getattr(callback, "close", lambda: None)()
                raise MemoryLimitExceeded(
                    f"step {step} peaked at {_size(mx.get_peak_memory())}, over the memory limit of "
                    f"{_size(memory_limit)} (training.memory_limit); stopped with a checkpoint at {path}. "
                    "Lower training.batch_size or data.max_seq_length, or set training.grad_checkpoint=true "
                    "(`mlx-lora plan CONFIG` lists settings that fit), then rerun with --resume")
            is_last = step == steps
            if config.steps_per_eval and (step % config.steps_per_eval == 0 or is_last) and valid_set and world.is_main:
                model.eval()
                if preference:
                    scores = evaluate_preferences(model, valid_set, config.batch_size, config, config.val_batches)
                    val_loss, val_accuracy = scores["loss"], scores["preference_accuracy"]
                else:
                    val_loss = evaluate_loss(model, valid_set, config.batch_size, config.val_batches)
                model.train()
                best = min((loss for _, loss in val_history), default=math.inf)
                stale_evals = 0 if val_loss < best * (1 - EARLY_STOP_MIN_IMPROVEMENT) else stale_evals + 1
                val_history.append((step, val_loss))
                if config.early_stop_patience and stale_evals >= config.early_stop_patience and not is_last:
                    stopped_early = is_last = True
            else:
                val_loss = val_accuracy = None
            if step % config.steps_per_report == 0 or is_last or val_loss is not None:
                report_window(step, val_loss, val_accuracy)
            if config.save_every and step % config.save_every == 0 and not is_last:
                last_good = save(step)
            stopped_early = world.any(stopped_early)  # validation runs on rank 0 only: all stop together
            if stopped_early:
                break
        interrupted = world.any(interrupt.requested)  # Ctrl-C during the last step: the run is done, say so
    final = save(step)
    summary = {
        "steps": step, "final_checkpoint": str(final),
        "elapsed_s": elapsed_before + time.perf_counter() - run_start,
        "peak_memory_gb": mx.get_peak_memory() / 1e9, "val_loss": val_loss,
        "planned_steps": steps, "stopped_early": stopped_early,
        "val_history": [{"step": s, "val_loss": v} for s, v in val_history],
        **({"interrupted": True} if interrupted else {}),
    }
    for callback in callbacks:
        callback.on_end(summary)
    return summary
