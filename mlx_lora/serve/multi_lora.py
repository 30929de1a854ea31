"""Many LoRA adapters on one frozen base, with a different adapter for each row of a batch.

`MultiLoRALinear` wraps a base linear and holds every adapter that touches it, by slot number
(slot 0 is "no adapter"). Before each forward pass the scheduler's owner sets, in the shared
`RowAdapters`, which slot each batch row uses; the layer then applies, per row, that row's A and B:

    y[i] = base(x[i]) + scaling_k * x[i] @ A_k @ B_k      with k = slot[i]

The per-row term is computed one of three ways (`RowAdapters.strategy`): "stacked" (the
default: every A side by side, (in, slots*rank), and every B one above the other: two plain BLAS
products per layer, each row keeping only its own adapter's columns through a (B, slots*rank) mask
times its scaling, built once per forward pass for all layers alike), "gather" (two `mx.gather_mm`
calls over stacked (slots, in, rank) / (slots, rank, out) adapters: the vLLM/LoRAX "gather by
index" idea) and "group" (rows sharing an adapter take one plain product each, then a scatter).
Measured on SmolLM2-135M float32, 8 rows over 4 rank-8 adapters against 8 rows on one, CPU, MKL,
a shared 2-core machine: through the engine's worker (`Engine.submit`, 8 x 32 tokens, 4
alternating rounds, median ms per 8-row step) one adapter 127-207, gather 191-305, stacked
117-182, i.e. gather 0.47-0.80x the one-adapter throughput and stacked 0.77-1.17x (median 1.08x);
under `perf` the gather run spent 12% in MKL's small-product kernel (2% for one adapter) and 7.5%
in thread switching (1%): many small BLAS calls, each waking MKL's threads. Timed with
`bench/bench_multi_lora.py --model` (the scheduler driven from the main thread), gather and
stacked were alike (1.08x / 1.10x the one-adapter step; an earlier OpenBLAS run 0.92-1.22x /
1.07-1.65x), group 1.66x. All three give identical tokens (tested). When every row shares one
adapter (or none), a plain product (or nothing) is used.

Reading adapter files and checking them against the base is `install_adapter`'s job; choosing
slots and names is the engine's.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..lora import is_linear, linear_dims, transformer_blocks
from .cpu_decode import DecodeLinear

NO_ADAPTER = 0  # slot 0: the bare base


class RowAdapters:
    """Which adapter slot each batch row uses in the next forward pass (shared by every layer)."""

    def __init__(self) -> None:
        self.slots: Optional[mx.array] = None  # (B,) uint32, when rows differ
        self.uniform: Optional[int] = NO_ADAPTER  # the one slot, when all rows share it
        self.groups: list[tuple[int, mx.array]] = []  # (slot, row indices), for the grouped strategy
        self.max_slot = NO_ADAPTER
        self.strategy = "stacked"  # or "gather", "group"; see the module doc
        self._keep: dict = {}  # this pass's "stacked" column masks, per bank layout (see `keep`)

    def set(self, slots: list[int]) -> None:
        self._keep = {}
        self.max_slot = max(slots, default=NO_ADAPTER)
        if len(set(slots)) <= 1:
            self.uniform, self.slots, self.groups = (slots[0] if slots else NO_ADAPTER), None, []
            return
        self.uniform, self.slots = None, mx.array(slots, dtype=mx.uint32)
        if self.strategy == "group":
            self.groups = [(slot, mx.array([i for i, s in enumerate(slots) if s == slot], dtype=mx.uint32))
                           for slot in sorted(set(slots)) if slot != NO_ADAPTER]


    def slot_array(self, rows: int) -> mx.array:
        """(rows,) uint32: each row's slot, for this pass (made once per pass when all rows share one)."""
        if self.slots is not None:
            return self.slots
        held = self._keep.get(("uniform", rows))
        if held is None:
            held = self._keep[("uniform", rows)] = mx.full((rows,), self.uniform, dtype=mx.uint32)
        return held

    def keep(self, bank: "AdapterBank", slots: mx.array) -> mx.array:
        """(B, S*r) float32: each row's own adapter's columns of `bank.a_wide` times its scaling, zero
        elsewhere. Built once per forward pass for every bank of the same layout (most layers share one)."""
        key = (bank.layout, id(slots))
        held = self._keep.get(key)
        if held is None:
            mask = (bank.column_slot[None, :] == slots[:, None]) * bank.scales[slots][:, None]
            held = self._keep[key] = (slots, mask)  # holding `slots` keeps its id from being reused this pass
        return held[1]


class AdapterBank:
    """slot -> (A (in, rank), B (rank, out), scaling), plus the stacks the mixed-batch strategies use.

    A plain object, not an nn.Module, so MLX's parameter walks (and fusing, saving) never see it.
    """

    def __init__(self) -> None:
        self.entries: dict[int, tuple[mx.array, mx.array, float]] = {}
        self.a_stack: Optional[mx.array] = None  # (slots, in, max_rank), zero where unused ("gather")
        self.b_stack: Optional[mx.array] = None  # (slots, max_rank, out)
        self.scales: Optional[mx.array] = None  # (slots,)
        self.a_wide: Optional[mx.array] = None  # (in, slots * max_rank): every A side by side ("stacked")
        self.b_tall: Optional[mx.array] = None  # (slots * max_rank, out): every B one above the other
        self.column_slot: Optional[mx.array] = None  # (slots * max_rank,) uint32: the slot of each column
        self.layout: tuple = ()  # (slots, max_rank, scalings): banks alike share `RowAdapters.keep`'s masks
        self.b_panels: Optional[mx.array] = None  # b_stack packed for the CPU panel kernel, made on first use

    def restack(self) -> None:
        self.b_panels = None
        if not self.entries:
            self.a_stack = self.b_stack = self.scales = self.a_wide = self.b_tall = self.column_slot = None
            return
        any_a, any_b, _ = next(iter(self.entries.values()))
        in_dims, out_dims = any_a.shape[0], any_b.shape[1]
        slots = max(self.entries) + 1
        rank = max(a.shape[1] for a, _, _ in self.entries.values())
        a_stack = mx.zeros((slots, in_dims, rank))
        b_stack = mx.zeros((slots, rank, out_dims))
        scales = [0.0] * slots
        for slot, (a, b, scaling) in self.entries.items():
            # Zero columns of A and zero rows of B past an adapter's own rank add exact zeros.
            a_stack[slot, :, : a.shape[1]] = a
            b_stack[slot, : b.shape[0], :] = b
            scales[slot] = scaling
        self.a_stack, self.b_stack, self.scales = a_stack, b_stack, mx.array(scales)
        self.layout = (slots, rank, tuple(scales))
        self.a_wide = a_stack.transpose(1, 0, 2).reshape(in_dims, slots * rank)
        self.b_tall = b_stack.reshape(slots * rank, out_dims)
        self.column_slot = mx.repeat(mx.arange(slots, dtype=mx.uint32), rank)
        mx.eval(self.a_stack, self.b_stack, self.scales, self.a_wide, self.b_tall, self.column_slot)


class MultiLoRALinear(nn.Module):
    """A frozen base linear plus any number of adapters, each batch row using its own (see module doc)."""

    def __init__(self, base: nn.Module, rows: RowAdapters):
        super().__init__()
        base.freeze()
        self.linear = base
        self._rows = rows
        self._bank = AdapterBank()

    def put(self, slot: int, lora_a: mx.array, lora_b: mx.array, scaling: float) -> None:
        self._bank.entries[slot] = (lora_a, lora_b, scaling)
        self._bank.restack()

    def drop(self, slot: int) -> None:
        if self._bank.entries.pop(slot, None) is not None:
            self._bank.restack()

    def __call__(self, x):
        bank, rows = self._bank, self._rows
        fused = self._panel_product(x)
        if fused is not None:
            return fused
        y = self.linear(x)  # (B, L, out); the base's own product (see decode_weights.py)
        if rows.uniform is not None:
            entry = bank.entries.get(rows.uniform)
            if entry is None:
                return y
            lora_a, lora_b, scaling = entry
            return y + (((x @ lora_a) * scaling) @ lora_b).astype(y.dtype)  # (B, L, in) @ (in, r) @ (r, out)
        if bank.a_stack is None:
            return y
        slots = rows.slots
        if slots.shape[0] != x.shape[0]:
            raise ValueError(f"RowAdapters holds {slots.shape[0]} rows but the batch has {x.shape[0]}")
        if rows.strategy == "group":
            return y + self._grouped(x, rows.groups).astype(y.dtype)
        if bank.a_stack.shape[0] <= rows.max_slot:  # some row's adapter does not touch this layer
            slots = mx.where(slots < bank.a_stack.shape[0], slots, NO_ADAPTER).astype(mx.uint32)
        if rows.strategy == "stacked":
            return y + self._stacked(x, slots).astype(y.dtype)
        z = mx.gather_mm(x.astype(mx.float32), bank.a_stack, rhs_indices=slots)  # (B, L, r)
        z = z * bank.scales[slots][:, None, None]
        return y + mx.gather_mm(z, bank.b_stack, rhs_indices=slots).astype(y.dtype)  # (B, L, out)

    def _panel_product(self, x: mx.array) -> Optional[mx.array]:
        """The base product and every row's adapter term as one call of the CPU panel kernel
        (`panel_kernel.py`: each row's z = scaling * x @ A, then z @ B added panel by panel), when the
        base is a `DecodeLinear` whose plan uses the kernel for this many rows; else None."""
        base, bank = self.linear, self._bank
        if type(base) is not DecodeLinear or base._panels is None or bank.a_stack is None or x.dtype != mx.float32:
            return None
        rows = x.size // x.shape[-1]
        out = base.weight.shape[0]
        if base.plan.method(tuple(base.weight.shape), rows) != "panel":
            return None
        slots = self._rows.slot_array(x.shape[0])
        if x.shape[0] != rows:  # several positions per row (a prefill): each position takes its row's slot
            slots = mx.repeat(slots, rows // x.shape[0])
        if bank.b_panels is None:
            from .panel_kernel import pack_lora_b

            bank.b_panels = pack_lora_b(bank.b_stack)
            mx.eval(bank.b_panels)
        y = base.plan.kernel.lora_panel_matmul(x.reshape(rows, x.shape[-1]), base._panels, out, bank.a_stack,
                                               bank.b_panels, bank.scales, slots)
        y = y.reshape(*x.shape[:-1], out)
        return y + base["bias"] if "bias" in base else y

    def _stacked(self, x: mx.array, slots: mx.array) -> mx.array:
        """The adapter term as two plain products over every adapter side by side, other rows' columns zeroed.

        x (B, L, in) @ a_wide (in, S*r) -> (B, L, S*r); each row keeps only its own slot's r columns,
        times that adapter's scaling; then @ b_tall (S*r, out). Computes S adapters' worth of a
        rank-r product per row (cheap at decode sizes) in two BLAS calls instead of B small ones.
        """
        bank = self._bank
        keep = self._rows.keep(bank, slots)  # (B, S*r) float32
        z = (x.astype(mx.float32) @ bank.a_wide) * keep[:, None, :]  # (B, L, S*r)
        return z @ bank.b_tall  # (B, L, out)

    def _grouped(self, x: mx.array, groups: list[tuple[int, mx.array]]) -> mx.array:
        """The adapter term by groups of rows sharing an adapter: one plain product each, then a scatter."""
        delta = mx.zeros(x.shape[:-1] + (linear_dims(self.linear)[1],), dtype=mx.float32)  # (B, L, out)
        for slot, index in groups:
            entry = self._bank.entries.get(slot)
            if entry is not None:
                lora_a, lora_b, scaling = entry
                delta[index] = ((x[index] @ lora_a) * scaling) @ lora_b
        return delta


def read_checked_adapter(model: nn.Module, folder: str | Path) -> tuple[dict[str, tuple[mx.array, mx.array]], float]:
    """{module path: (A, B)} and the scaling of the adapter in `folder`, checked against `model`.

    Raises ValueError listing every module the model lacks or whose shape differs (all at once),
    FileNotFoundError when the folder holds no adapter.
    """
    from ..adapters import read_adapter
    from ..adapters.load import base_mismatch

    raw, lora, weights = read_adapter(folder, len(transformer_blocks(model)))
    warning = base_mismatch(model, raw, str(folder))
    if warning:  # the shapes may fit another base all the same
        print(warning, file=sys.stderr, flush=True)
    modules = dict(model.named_modules())
    paths = sorted({key.rsplit(".", 1)[0] for key in weights})
    problems, found = [], {}
    for path in paths:
        lora_a, lora_b = weights.get(f"{path}.lora_a"), weights.get(f"{path}.lora_b")
        module = modules.get(path)
        base = module.linear if isinstance(module, MultiLoRALinear) else module
        if base is None or not is_linear(base):
            problems.append(f"{path}: no linear layer of that name in the base model")
            continue
        if lora_a is None or lora_b is None or lora_a.ndim != 2 or lora_b.ndim != 2:
            problems.append(f"{path}: needs 2-D lora_a and lora_b (this is not a LoRA adapter)")
            continue
        in_dims, out_dims = linear_dims(base)
        if lora_a.shape != (in_dims, lora_a.shape[1]) or lora_b.shape != (lora_a.shape[1], out_dims):
            problems.append(f"{path}: adapter shapes {tuple(lora_a.shape)}, {tuple(lora_b.shape)} do not fit "
                            f"a ({in_dims} -> {out_dims}) layer")
            continue
        found[path] = (lora_a.astype(mx.float32), lora_b.astype(mx.float32))
    if not paths:
        problems.append("no lora_a / lora_b tensors (this is not a LoRA adapter)")
    if problems:
        raise ValueError(f"adapter {folder} does not fit the base model:\n  " + "\n  ".join(problems[:20])
                         + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    mx.eval([w for pair in found.values() for w in pair])
    return found, lora.scaling


def install_adapter(model: nn.Module, slot: int, weights: dict[str, tuple[mx.array, mx.array]], scaling: float,
                    rows: RowAdapters) -> int:
    """Put checked adapter `weights` (from `read_checked_adapter`) in `slot`; returns the layers touched."""
    from mlx.utils import tree_unflatten

    modules = dict(model.named_modules())
    new_wrappers = []
    for path, (lora_a, lora_b) in weights.items():
        module = modules[path]
        if not isinstance(module, MultiLoRALinear):
            module = MultiLoRALinear(module, rows)
            new_wrappers.append((path, module))
            modules[path] = module
        module.put(slot, lora_a, lora_b, scaling)
    if new_wrappers:
        model.update_modules(tree_unflatten(new_wrappers))
    return len(weights)


def remove_adapter(model: nn.Module, slot: int) -> None:
    """Drop the adapter in `slot` from every layer (the wrappers stay; with no adapters they add nothing)."""
    for _, module in model.named_modules():
        if isinstance(module, MultiLoRALinear):
            module.drop(slot)
