"""Where a training step's time goes, on the demo model: each lever against the current step.

Times one compiled training step (forward, backward, AdamW) of the demo configuration for
several variants, interleaved round by round in one process so that a shared machine's drift
hits all of them alike, and prints the median seconds per step and the ratio to `current`:

  current        the training step as `mlx-lora train` runs it
  full-head      the output head and loss at every position (the step before target positions)
  kept-float     the frozen base's weights dequantized once and kept in float32 (no
                 dequantize in the step; costs a float32 copy of the base in memory)
  no-lora        the step with the LoRA products switched off: frozen forward, input gradient,
                 head and loss (current minus this is the LoRA products' cost)
  packed         the same examples per step packed into fewer rows (`packing.pack_batch`, rows of
                 up to data.max_seq_length tokens, block-diagonal causal attention)

    python bench/profile_step.py [--steps 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from mlx_lora.blas import preload_command_env

    env = preload_command_env()
    if env is not None:
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="current,full-head,kept-float,no-lora", help="comma-separated")
    args = parser.parse_args()

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlx_lora.config import load_config
    from mlx_lora.data import collate, epoch_order, load_datasets, make_batches
    from mlx_lora.frozen_matmul import float_weights_kept
    from mlx_lora.loss import (batch_loss, chunked_cross_entropy, enable_chunked_loss, masked_loss, output_head,
                               target_positions)
    from mlx_lora.packing import pack_batch
    from mlx_lora.run import prepare_model

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs" / "demo.yaml", [])
    model, tokenizer, _, _, _ = prepare_model(cfg)
    train = load_datasets(cfg.data, tokenizer, splits=("train",))[0]["train"]
    enable_chunked_loss(model, mx.array([train[0].tokens]))
    optimizer = optim.AdamW(learning_rate=1e-5)
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state]

    def make_step(loss_fn):
        loss_and_grad = nn.value_and_grad(model, loss_fn)

        @partial(mx.compile, inputs=state, outputs=state)
        def step(tokens, mask, positions, weights, *segments):
            (loss, _), grad = loss_and_grad(model, tokens, mask, positions, weights, *segments)
            optimizer.update(model, grad)
            return loss
        return step

    def full_head(m, tokens, mask, positions, weights):
        return masked_loss(m, tokens, mask)

    def lora_scale(m, off):
        for _, layer in m.named_modules():
            if hasattr(layer, "lora_b"):
                layer.scale = 0.0 if off else layer.alpha / layer.rank

    def frozen_only(m, tokens, mask, positions, weights):
        # The step with the LoRA products switched off and everything else kept: the loss still
        # flows back through every frozen block to the embeddings, where a zero-valued term of one
        # adapter matrix gives the optimizer a gradient, so the frozen forward, the input gradient,
        # the head and the loss all run. current minus this is what the LoRA products cost.
        lora_scale(m, off=True)
        try:
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            probe = m.model.layers[0].self_attn.q_proj.lora_a.sum() * 0.0
            hidden = m.model(inputs, input_embeddings=m.model.embed_tokens(inputs) + probe)
            picked = hidden.reshape(-1, hidden.shape[-1])[positions]
            ce = chunked_cross_entropy(picked, targets.reshape(-1)[positions], output_head(m)) * weights
            return ce.sum() / mx.maximum(weights.sum(), 1), weights.sum()
        finally:
            lora_scale(m, off=False)

    variants = {"current": make_step(batch_loss), "full-head": make_step(full_head),
                "kept-float": make_step(batch_loss), "no-lora": make_step(frozen_only),
                "packed": make_step(batch_loss)}
    variants = {name: variants[name] for name in args.variants.split(",")}
    batches = make_batches(train, cfg.training.batch_size)
    chosen = [batches[i] for i in epoch_order(len(batches), 0, 0)[: args.steps]]
    unpacked = [collate(train, indices)[:2] for indices in chosen]
    packed = [pack_batch(train, indices, cfg.data.max_seq_length)[:3] for indices in chosen]
    print(f"rows x width per step: unpacked {[t.shape for t, _ in unpacked]}, packed {[t.shape for t, _, _ in packed]}")
    times = {name: [] for name in variants}
    for round_index in range(args.rounds + 1):  # the first round compiles and is not counted
        for name, step in variants.items():
            kept = float_weights_kept(model) if name == "kept-float" else None
            if kept:
                kept.__enter__()
            start = time.perf_counter()
            for tokens, mask, *segments in (packed if name == "packed" else unpacked):
                positions, weights = target_positions(mask)
                mx.eval(step(*map(mx.array, (tokens, mask, positions, weights, *segments))), state)
            seconds = (time.perf_counter() - start) / args.steps
            if kept:
                kept.__exit__(None, None, None)
            if round_index:
                times[name].append(seconds)
            print(f"round {round_index} {name}: {seconds:.2f} s/step", flush=True)
    base = statistics.median(times["current"])
    print(f"demo step, batch {cfg.training.batch_size}, {args.steps} steps x {args.rounds} rounds (median s/step):")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:12s} {median:6.2f} s/step  {median / base:5.2f}x current  (min {min(values):.2f}, max {max(values):.2f})")


if __name__ == "__main__":
    main()
