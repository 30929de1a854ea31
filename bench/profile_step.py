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
  fused          kept-float with each block's q/k/v and gate/up frozen products as one product
                 each (their float copies concatenated; the outputs sliced apart), the lever
                 "larger effective matmuls" of issue 11: compare it with kept-float

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


class FusedProducts:
    """One frozen product for layers that read the same input (q/k/v, gate/up), sliced apart.

    The first layer of the group computes x @ [W_1; W_2; ...].T and keeps it with x; the others,
    called next with the same x (as mlx-lm's attention and MLP call them), take their columns.
    Any other call falls back to the layer's own product.
    """

    def __init__(self, layers, kept_key):
        import mlx.core as mx

        weights = [layer.__dict__[kept_key] for layer in layers]
        self.weight = mx.concatenate(weights)
        self.bounds = [0]
        for weight in weights:
            self.bounds.append(self.bounds[-1] + weight.shape[0])
        self.last = None
        self.shared = 0  # products served from the group's one product (the check counts them)
        mx.eval(self.weight)

    def product(self, index, x, fallback):
        import mlx.core as mx

        if index == 0:
            self.last = (x, x.astype(mx.float32) @ self.weight.T)
        elif self.last is None or self.last[0] is not x:
            return fallback()
        self.shared += index > 0
        out = self.last[1][..., self.bounds[index]:self.bounds[index + 1]]
        if index == len(self.bounds) - 2:
            self.last = None
        return out.astype(x.dtype)


def fuse_frozen_products(model):
    """Give each block's q/k/v and gate/up bases (float copies kept, no biases) a FusedProducts; returns a switch."""
    from mlx_lora import lora
    from mlx_lora.frozen_matmul import KEPT

    groups = []
    for block in model.layers:
        for parent, names in ((block.self_attn, ("q_proj", "k_proj", "v_proj")), (block.mlp, ("gate_proj", "up_proj"))):
            bases = [getattr(getattr(parent, name), "linear", getattr(parent, name)) for name in names]
            if all(KEPT in base.__dict__ and "bias" not in base for base in bases):
                group = FusedProducts(bases, KEPT)
                groups.append(group)
                for index, base in enumerate(bases):
                    object.__setattr__(base, "_fused", (group, index))
    plain = lora.frozen_linear

    def fused(layer, x):
        entry = layer.__dict__.get("_fused")
        if entry is None:
            return plain(layer, x)
        return entry[0].product(entry[1], x, lambda: plain(layer, x))

    def switch(on):
        lora.frozen_linear = fused if on else plain
    switch.groups = groups
    return switch


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
                "packed": make_step(batch_loss), "fused": make_step(batch_loss)}
    variants = {name: variants[name] for name in args.variants.split(",")}
    batches = make_batches(train, cfg.training.batch_size)
    chosen = [batches[i] for i in epoch_order(len(batches), 0, 0)[: args.steps]]
    unpacked = [collate(train, indices)[:2] for indices in chosen]
    packed = [pack_batch(train, indices, cfg.data.max_seq_length)[:3] for indices in chosen]
    print(f"rows x width per step: unpacked {[t.shape for t, _ in unpacked]}, packed {[t.shape for t, _, _ in packed]}")
    switch_fused = None
    if "fused" in variants:
        with float_weights_kept(model):
            switch_fused = fuse_frozen_products(model)  # groups hold their own concatenated copies
            tokens, mask = unpacked[0]
            tokens, mask, positions, weights = map(mx.array, (tokens, mask, *target_positions(mask)))
            losses = []
            for on in (False, True):  # the same loss both ways, or the variant measures something else
                switch_fused(on)
                losses.append(batch_loss(model, tokens, mask, positions, weights)[0].item())
            switch_fused(False)
            shared = sum(group.shared for group in switch_fused.groups)
            print(f"fused check: loss {losses[0]:.6f} plain, {losses[1]:.6f} fused ({len(switch_fused.groups)} groups, "
                  f"{shared} products taken from a shared one)")
    times = {name: [] for name in variants}
    for round_index in range(args.rounds + 1):  # the first round compiles and is not counted
        for name, step in variants.items():
            kept = float_weights_kept(model) if name in ("kept-float", "fused") else None
            if kept:
                kept.__enter__()
            if switch_fused:
                switch_fused(name == "fused")
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
    reference = "current" if "current" in times else next(iter(times))
    base = statistics.median(times[reference])
    print(f"demo step, batch {cfg.training.batch_size}, {args.steps} steps x {args.rounds} rounds (median s/step):")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:12s} {median:6.2f} s/step  {median / base:5.2f}x {reference}  (min {min(values):.2f}, max {max(values):.2f})")


if __name__ == "__main__":
    main()
