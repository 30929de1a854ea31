"""Decoding a few rows at a time on the CPU: products in the faster orientation, rotary tables,
compiled norms.

A serving step multiplies a handful of rows (one per running sequence) by every weight of the
model, and applies every attention layer's rotary embedding to one position per row. Three things
that are right for training's long batches are slow at that shape on the CPU:

- **The product's orientation.** `x @ W.T` (rows, in) x (in, out) and `(W @ x.T).T` are the same
  numbers, but a BLAS packs and blocks them differently; for a few rows one can be much faster.
  Measured on the fused demo model (SmolLM2-135M float32, 8 rows, a 2-core Xeon, same run):
  MKL 1536x576 15.2 vs 11.9 ms for 30 weights, 49152x576 head 21.0 vs 13.9 ms; OpenBLAS 0.3.21
  the other way round or equal. Faster than both at 2-8 rows is our own kernel on weights packed
  as panels (`panel_kernel.py`: a step's products at 8 rows cost about what one row's do). So
  nothing is assumed: `tune_products` times the three at start-up, per weight shape and row
  count, over all the model's weights of that shape (so the weights stream from memory as in a
  real step); the kernel takes every decode product or none (`_panel_wins`), else
  `DecodeLinear` / `DecodeEmbedding` use the faster orientation for those row counts (`x @ W.T`
  otherwise, e.g. for prefill). With adapters, the kernel adds each row's own adapter term in
  the same call (`multi_lora.MultiLoRALinear._panel_product`).
- **The rotary embedding.** MLX's CPU `mx.fast.rope` computes its cosines and sines on every
  call (MLX's CPU `cos` / `sin` run at ~30 M elements/s here: ~190 us for one layer's queries of
  8 rows, twice per layer). `TableRoPE` reads them from a table made once (positions x dims / 2,
  4 MB for 8192 positions of a 64-dim head) by running the model's own rotary module on unit
  vectors, so any variant that depends on the position only (plain, Llama 3, YaRN, ...) gives
  its own numbers; a self-check against the module at several offsets keeps the module
  wherever the two differ (e.g. Phi-3's switch between short and long factors). Looking up a
  step's rows is ~20 small ops (a gather, clipping, broadcasts): within the engine's forward pass
  (`ForwardPasses`) it is done once for every layer (fused demo, same run: a 1-row step 65.9 ->
  60.0 ms, an 8-row step 118.8 -> 112.5).
- **RMSNorm.** `mx.fast.rms_norm` took ~80 us for (8, 576) on the CPU, the same formula as one
  compiled kernel ~45 us (`DecodeRMSNorm`, for a decode step's rows only).

Together, in one process, alternating (fused demo, 8 rows, MKL, 8 rounds): a decode step's
median 123.5 -> 105.1 ms (products alone 113.4, rotary tables alone 113.3). `use_cpu_decode(model,
...)` installs all three on the CPU and returns what it chose; on a GPU it changes nothing
(Metal's kernels are fused already). Outputs equal the library's to float32 rounding (tested
against the unmodified modules, and a served batch token for token).
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from ..thread_compile import per_thread

ROPE_CHECK_TOLERANCE = 1e-5  # max |table - module| on unit-scale inputs for the table to be used
ORIENTATION_MARGIN = 0.95  # the transposed product must take under this share of the plain one's time
TUNE_REPEATS = 3  # timed passes per orientation (the minimum counts)


# --- products ---------------------------------------------------------------------------------

METHODS = ("plain", "transposed", "panel")  # x @ W.T, (W @ x.T).T, panel_kernel.py's kernel


@dataclass
class ProductPlan:
    """For each weight shape (out, in): the row counts measured and, per count, the fastest of
    `METHODS`. Rows above `max_rows` always use `x @ W.T`."""

    max_rows: int = 0
    measured: dict[tuple[int, int], dict[int, str]] = field(default_factory=dict)
    timings: dict[tuple[tuple[int, int], int], dict[str, float]] = field(default_factory=dict)  # seconds per method
    seconds: float = 0.0  # time spent measuring
    kernel: Optional[object] = None  # panel_kernel.py's module, when "panel" may be chosen
    kernel_note: str = ""  # how the kernel was found, or why it is not used

    def method(self, shape: tuple[int, int], rows: int) -> str:
        choices = self.measured.get(shape)
        if not choices or rows > self.max_rows:
            return "plain"
        at = min((r for r in choices if r >= rows), default=None)
        return choices[at] if at is not None else "plain"

    def uses(self, shape: tuple[int, int], method: str) -> bool:
        return method in self.measured.get(shape, {}).values()

    def summary(self) -> str:
        """e.g. 'panel kernel for 1536x576 at 2,4,8 rows; transposed for 49152x576 at 8 rows (measured in 0.9 s)'."""
        parts = []
        for method, label in (("panel", "panel kernel"), ("transposed", "transposed")):
            shapes = []
            for (out_dims, in_dims), choices in sorted(self.measured.items()):
                rows = sorted(r for r, m in choices.items() if m == method)
                if rows:
                    shapes.append(f"{out_dims}x{in_dims} at {','.join(map(str, rows))} rows")
            if shapes:
                parts.append(f"{label} for " + ", ".join(shapes))
        chosen = "; ".join(parts) if parts else "x @ W.T everywhere"
        return f"{chosen} (measured in {self.seconds:.1f} s)"


def _plain(x2: mx.array, weight: mx.array) -> mx.array:
    return x2 @ weight.T


def _transposed(x2: mx.array, weight: mx.array) -> mx.array:
    return (weight @ x2.T).T


def _product(layer_weight: mx.array, panels: Optional[mx.array], x: mx.array, plan: Optional[ProductPlan]) -> Optional[mx.array]:
    """x (..., in) @ W.T as (..., out) by the method `plan` chose, or None to use the layer's own."""
    if plan is None:
        return None
    rows = x.size // x.shape[-1]
    method = plan.method(tuple(layer_weight.shape), rows)
    if method == "panel" and (panels is None or x.dtype != mx.float32):
        method = "transposed"
    if method == "plain":
        return None
    x2 = x.reshape(rows, x.shape[-1])
    y = plan.kernel.panel_matmul(x2, panels, layer_weight.shape[0]) if method == "panel" else _transposed(x2, layer_weight)
    return y.reshape(*x.shape[:-1], layer_weight.shape[0])


class DecodeLinear(nn.Linear):
    """`nn.Linear` whose product, for the row counts its plan names, is `(W @ x.T).T` or the panel
    kernel's (on `_panels`, a copy of the weight kept outside the parameters); made by
    `twin(DecodeLinear, layer, plan)`, sharing the layer's arrays."""

    plan: Optional[ProductPlan] = None
    _panels: Optional[mx.array] = None

    def __call__(self, x):
        y = _product(self["weight"], self._panels, x, self.plan)
        if y is None:
            return super().__call__(x)
        return y + self["bias"] if "bias" in self else y


class DecodeEmbedding(nn.Embedding):
    """`nn.Embedding` whose tied output projection (`as_linear`) uses the plan like `DecodeLinear`."""

    plan: Optional[ProductPlan] = None
    _panels: Optional[mx.array] = None

    def as_linear(self, x):
        y = _product(self.weight, self._panels, x, self.plan)
        return super().as_linear(x) if y is None else y


def twin(cls, layer: nn.Module, plan: ProductPlan, panels: Optional[mx.array] = None):
    """`layer` as `cls`, sharing its arrays and frozen state; `panels` (the weight packed by
    `panel_kernel.pack`) is kept as a plain attribute, out of the module's parameters."""
    made = cls.__new__(cls)
    nn.Module.__init__(made)
    for key, value in layer.items():
        made[key] = value
    if not layer.trainable_parameters():
        made.freeze()
    made.plan = plan
    object.__setattr__(made, "_panels", panels)
    return made


def _row_counts(max_rows: int) -> list[int]:
    counts, r = [], 1
    while r < max_rows:
        counts.append(r)
        r *= 2
    return counts + [max_rows]


def _time_pass(fn, x2: mx.array, weights: list) -> float:
    start = time.perf_counter()
    mx.eval([fn(x2, w) for w in weights])
    return time.perf_counter() - start


def tune_products(weights_by_shape: dict[tuple[int, int], list[mx.array]], max_rows: int,
                  pinned: Optional[str] = None, kernel=None,
                  panels_by_shape: Optional[dict[tuple[int, int], list[mx.array]]] = None) -> ProductPlan:
    """Time each of `METHODS` for 1, 2, 4, ... `max_rows` rows over every weight of each shape
    (float32 (out, in) arrays; "panel" only with `kernel` and the shape's `panels_by_shape`); the
    minimum of `TUNE_REPEATS` passes each, taken in turn. "transposed" and "panel" must beat `x @ W.T`
    by `ORIENTATION_MARGIN`. `pinned`: that method everywhere (where it can run), nothing timed."""
    plan = ProductPlan(max_rows=max_rows, kernel=kernel)
    panels_by_shape = panels_by_shape or {}
    start = time.perf_counter()
    for shape, weights in weights_by_shape.items():
        plan.measured[shape] = {}
        methods = {"plain": (_plain, weights), "transposed": (_transposed, weights)}
        if kernel is not None and shape in panels_by_shape:
            methods["panel"] = (lambda x2, p, out=shape[0]: kernel.panel_matmul(x2, p, out), panels_by_shape[shape])
        for rows in _row_counts(max_rows):
            if pinned is not None:
                plan.measured[shape][rows] = pinned if pinned in methods else "plain"
                continue
            x2 = mx.random.normal((rows, shape[1]), key=mx.random.key(rows))
            mx.eval(x2)
            for fn, arrays in methods.values():  # warm up
                _time_pass(fn, x2, arrays[:1])
            best = {name: float("inf") for name in methods}
            for _ in range(TUNE_REPEATS):
                for name, (fn, arrays) in methods.items():
                    best[name] = min(best[name], _time_pass(fn, x2, arrays))
            plan.timings[(shape, rows)] = best
            blas = "transposed" if best["transposed"] < ORIENTATION_MARGIN * best["plain"] else "plain"
            plan.measured[shape][rows] = blas
    if pinned is None and kernel is not None and _panel_wins(plan, panels_by_shape):
        for shape in panels_by_shape:
            plan.measured[shape] = {rows: "panel" for rows in plan.measured[shape]}
    plan.seconds = time.perf_counter() - start
    return plan


def _panel_wins(plan: ProductPlan, panels_by_shape: dict) -> bool:
    """Whether the panel kernel takes every decode product: it must beat the BLAS's faster orientation
    over all of a step's products at the most rows (`ORIENTATION_MARGIN`). All or nothing: a BLAS's
    threads spin for a while after each call (OpenMP's wait policy; MKL and OpenBLAS alike) and take
    the core the kernel's helper needs, so mixing the two per shape loses in a real step what each
    wins alone (fused demo, 8 rows, separate processes: all panel 78-83 ms a step, mixed 104-109,
    BLAS alone 105-122)."""
    rows = plan.max_rows
    panel = blas = 0.0
    for shape in panels_by_shape:
        times = plan.timings.get((shape, rows))
        if times is None or "panel" not in times:
            return False
        panel += times["panel"]
        blas += min(times["plain"], times["transposed"])
    return panel < ORIENTATION_MARGIN * blas


def _output_embedding(model: nn.Module) -> Optional[nn.Embedding]:
    """The input embedding when the model ties its output projection to it (mlx-lm's
    `args.tie_word_embeddings`), else None."""
    args = getattr(model, "args", None)
    if not getattr(args, "tie_word_embeddings", False):
        return None
    inner = getattr(model, "model", None)
    embedding = getattr(inner, "embed_tokens", None)
    return embedding if type(embedding) is nn.Embedding else None


def use_decode_products(model: nn.Module, max_rows: int, pinned: Optional[str] = None, kernel: bool = True) -> ProductPlan:
    """Measure (`tune_products`) and swap the model's float `nn.Linear` layers (and a tied
    `nn.Embedding`) for their `Decode*` twins sharing the same arrays. With `kernel`, the panel
    kernel (`panel_kernel.py`) is built or loaded and every weight packed for it when the copies
    take under half the available memory; packed copies of shapes it does not win are dropped.
    Quantized layers are `decode_weights.py`'s and stay as they are."""
    from mlx.utils import tree_unflatten

    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and m.weight.dtype == mx.float32]
    embedding = _output_embedding(model)
    layers = [layer for _, layer in linears]
    if embedding is not None and embedding.weight.dtype == mx.float32:
        layers.append(embedding)
    else:
        embedding = None
    by_shape: dict[tuple[int, int], list[mx.array]] = {}
    for layer in layers:
        by_shape.setdefault(tuple(layer.weight.shape), []).append(layer.weight)
    module, note, panels = _panel_copies(layers, kernel and pinned in (None, "panel"))
    panels_by_shape: dict[tuple[int, int], list[mx.array]] = {}
    for layer in layers:
        if id(layer) in panels:
            panels_by_shape.setdefault(tuple(layer.weight.shape), []).append(panels[id(layer)])
    plan = tune_products(by_shape, max_rows, pinned, module, panels_by_shape)
    plan.kernel_note = note
    if module is not None and not any(plan.uses(shape, "panel") for shape in panels_by_shape):
        plan.kernel, plan.kernel_note = None, note.split(";")[0] + f"; not chosen: the BLAS was faster at {max_rows} rows"

    def kept(layer):  # the packed copy, where the plan uses it
        return panels.get(id(layer)) if plan.uses(tuple(layer.weight.shape), "panel") else None

    swaps = [(name, twin(DecodeLinear, layer, plan, kept(layer))) for name, layer in linears
             if set(plan.measured[tuple(layer.weight.shape)].values()) != {"plain"}]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    if embedding is not None and set(plan.measured[tuple(embedding.weight.shape)].values()) != {"plain"}:
        model.model.embed_tokens = twin(DecodeEmbedding, embedding, plan, kept(embedding))
    return plan


def _panel_copies(layers: list[nn.Module], wanted: bool) -> tuple[Optional[object], str, dict[int, mx.array]]:
    """(kernel module or None, a line for the log, {id(layer): its weight packed}) for `layers`."""
    if not wanted:
        return None, "panel kernel: not used", {}
    from . import panel_kernel
    from .decode_weights import available_memory_bytes

    build = panel_kernel.load()
    if build.module is None:
        return None, build.note, {}
    need = sum(layer.weight.nbytes for layer in layers)
    free = available_memory_bytes()
    if free is not None and need >= free // 2:
        return None, f"panel kernel: not used: its copy of the weights ({need / 1e9:.2f} GB) would take over half the available memory ({free / 1e9:.2f} GB)", {}
    panels = {id(layer): panel_kernel.pack(layer.weight) for layer in layers}
    mx.eval(list(panels.values()))
    return build.module, f"{build.note}; weights packed: {need / 1e9:.2f} GB", panels


# --- rotary embeddings ------------------------------------------------------------------------

class ForwardPasses:
    """Marks the model's forward passes in which every layer rotates the same positions, so a table's
    rows (a gather and ~20 small ops per call, ~0.35 ms a layer on this CPU) are built once per pass.

    True of a serving step: mlx-lm's attention layers rotate queries and keys at their own cache's
    offset, and the caches of one batch advance together. `with passes.one():` around the model call;
    outside, each layer builds its own rows."""

    def __init__(self) -> None:
        self.current: Optional[int] = None
        self._count = 0

    @contextmanager
    def one(self):
        self._count += 1
        self.current = self._count
        try:
            yield
        finally:
            self.current = None


class RotaryTable:
    """cos and sin of every (position, frequency) of one rotary module, read off the module itself.

    `cos`, `sin`: (positions, dims // 2) float32, including any scale the module applies (YaRN's
    mscale). Rotation as in `mx.fast.rope`: the first `dims` features of each head, either as two
    halves (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos) or, `traditional`, as adjacent pairs."""

    def __init__(self, module: nn.Module, dims: int, traditional: bool, positions: int):
        self.dims, self.traditional, self.positions = dims, traditional, positions
        half = dims // 2
        if traditional:
            unit = mx.stack([mx.ones((half,)), mx.zeros((half,))], axis=-1).reshape(dims)
        else:
            unit = mx.concatenate([mx.ones((half,)), mx.zeros((half,))])
        probe = mx.broadcast_to(unit, (1, 1, positions, dims)).astype(mx.float32)
        out = module(probe, offset=0)[0, 0]  # (positions, dims)
        if traditional:
            cos, sin = out[:, 0::2], out[:, 1::2]
        else:
            cos, sin = out[:, :half], out[:, half:]
        self.cos_sin = mx.contiguous(mx.stack([cos, sin], axis=0))  # (2, positions, half)
        mx.eval(self.cos_sin)
        self.passes: Optional[ForwardPasses] = None  # set by use_rotary_tables
        self._pass_rows: tuple = (None, None, None)  # (pass, (length, int offset or None), rows)

    def pass_rows(self, offset: Union[int, mx.array], length: int) -> Optional[tuple[mx.array, mx.array]]:
        """`rows(offset, length)`, built once per forward pass (`ForwardPasses.one`) and shared by every layer
        using this table; None outside a pass."""
        number = self.passes.current if self.passes is not None else None
        if number is None:
            return None
        key = (length, offset if isinstance(offset, int) else None)
        seen, seen_key, rows = self._pass_rows
        if seen != number or seen_key != key:
            rows = self.rows(offset, length)
            self._pass_rows = (number, key, rows)
        return rows

    def rows(self, offset: Union[int, mx.array], length: int) -> tuple[mx.array, mx.array]:
        """cos, sin for positions offset + 0..length-1: (1, 1, length, dims // 2) for an int offset,
        (B, 1, length, dims // 2) for a (B,) array of per-row offsets (mlx-lm's batch caches)."""
        steps = mx.arange(length)
        if isinstance(offset, mx.array) and offset.ndim == 1:
            positions = mx.clip(offset[:, None] + steps[None], 0, self.positions - 1)  # (B, L)
            cs = self.cos_sin[:, positions]  # (2, B, L, half)
            return cs[0][:, None], cs[1][:, None]
        positions = mx.clip(steps + offset, 0, self.positions - 1)
        cs = self.cos_sin[:, positions]  # (2, L, half)
        return cs[0][None, None], cs[1][None, None]


def _halves_kernel(x1: mx.array, x2: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _pairs_kernel(x1: mx.array, x2: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    return mx.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)  # (..., half, 2)


# Decoding: one fused kernel per call (MLX retraces a shapeless function only for new ranks);
# per thread, so the server's worker frees them before it ends (thread_compile.py).
_halves_compiled = per_thread(_halves_kernel, shapeless=True)
_pairs_compiled = per_thread(_pairs_kernel, shapeless=True)


def _rotate(x: mx.array, cos: mx.array, sin: mx.array, traditional: bool, fused: bool) -> mx.array:
    """x (..., L, head_dim) with its first 2 * half features rotated by (cos, sin) (..., L, half)."""
    half = cos.shape[-1]
    head, rest = x[..., :2 * half], x[..., 2 * half:]
    if traditional:
        kernel = _pairs_compiled if fused else _pairs_kernel
        rotated = kernel(head[..., 0::2], head[..., 1::2], cos, sin).reshape(head.shape)
    else:
        kernel = _halves_compiled if fused else _halves_kernel
        rotated = kernel(head[..., :half], head[..., half:], cos, sin)
    return mx.concatenate([rotated, rest], axis=-1) if rest.shape[-1] else rotated


class TableRoPE(nn.Module):
    """A rotary module's rotation from its `RotaryTable`; calls the module itself for anything
    else (other keyword arguments, positions past the table)."""

    def __init__(self, module: nn.Module, table: RotaryTable):
        super().__init__()
        # Plain attributes, not children: parameter and module walks (saving, fusing, LoRA) skip them.
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_table", table)
        object.__setattr__(self, "_last", (None, 0, None))  # (offset, length, (cos, sin)): queries and keys share rows

    def __call__(self, x: mx.array, offset: Union[int, mx.array] = 0, **kwargs) -> mx.array:
        table = self._table
        length = x.shape[-2]
        if kwargs or x.shape[-1] < table.dims or (isinstance(offset, int) and offset + length > table.positions):
            return self._module(x, offset=offset, **kwargs)
        rows = table.pass_rows(offset, length)
        if rows is None:  # outside the engine's forward pass: this layer's queries and keys share rows
            last_offset, last_length, rows = self._last
            if last_offset is not offset or last_length != length:
                rows = table.rows(offset, length)
                object.__setattr__(self, "_last", (offset, length, rows))
        cos, sin = rows
        return _rotate(x, cos, sin, table.traditional, fused=length == 1).astype(x.dtype)


def _rope_layout(module: nn.Module) -> Optional[tuple[int, bool]]:
    dims = getattr(module, "dims", None) or getattr(module, "dim", None)
    if not isinstance(dims, int) or dims % 2:
        return None
    return dims, bool(getattr(module, "traditional", False))


def _agrees(module: nn.Module, replacement: TableRoPE, dims: int, positions: int) -> bool:
    """Whether the table reproduces `module` at int and per-row offsets, for 1 and 3 positions."""
    x = mx.random.normal((2, 3, 3, dims + 4), key=mx.random.key(0))
    checks = [(x[:, :, :1], 0), (x, 5), (x[:, :, :1], positions - 1), (x, positions - 3),
              (x[:, :, :1], mx.array([0, positions - 1])), (x, mx.array([7, positions - 3]))]
    for probe, offset in checks:
        want, got = module(probe, offset=offset), replacement(probe, offset=offset)
        if want.shape != got.shape or not mx.allclose(want, got, atol=ROPE_CHECK_TOLERANCE, rtol=0).item():
            return False
    return True


def use_rotary_tables(model: nn.Module, positions: int, passes: Optional[ForwardPasses] = None) -> int:
    """Replace each attention layer's `rope` module by a `TableRoPE` over `positions` positions,
    where the table agrees with the module (`_agrees`); modules with equal settings share one
    table, and within one of `passes` one set of rows. Returns how many were replaced."""
    tables: dict[tuple, Optional[RotaryTable]] = {}
    replaced = 0
    for _, module in model.named_modules():
        rope = module.get("rope") if isinstance(module, dict) else None
        if not isinstance(rope, nn.Module) or isinstance(rope, TableRoPE):
            continue
        layout = _rope_layout(rope)
        if layout is None:
            continue
        settings = (type(rope).__name__, layout, repr(sorted(
            (k, v.tolist() if isinstance(v, mx.array) else v) for k, v in vars(rope).items()
            if not k.startswith("_") and k not in ("training",))), repr(rope))
        if settings not in tables:
            table = RotaryTable(rope, layout[0], layout[1], positions)
            tables[settings] = table if _agrees(rope, TableRoPE(rope, table), layout[0], positions) else None
            table.passes = passes  # after the check, which runs outside any pass
        if tables[settings] is not None:
            module["rope"] = TableRoPE(rope, tables[settings])
            replaced += 1
    return replaced


# --- RMSNorm ----------------------------------------------------------------------------------

@per_thread(shapeless=True)
def _rms_norm(x: mx.array, weight: mx.array, eps: mx.array) -> mx.array:
    return (x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps)) * weight


class DecodeRMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` as one compiled kernel for a decode step's rows (MLX's CPU `mx.fast.rms_norm`
    took ~80 us for (8, 576) here, the compiled formula ~45 us); `mx.fast.rms_norm` otherwise."""

    max_rows: int = 0

    def __call__(self, x):
        if x.size // x.shape[-1] <= self.max_rows:
            return _rms_norm(x, self["weight"], self._eps).astype(x.dtype)
        return super().__call__(x)


def use_decode_norms(model: nn.Module, max_rows: int) -> int:
    """Swap the model's `nn.RMSNorm` layers for `DecodeRMSNorm` twins; returns how many."""
    from mlx.utils import tree_unflatten

    swaps = []
    for name, layer in model.named_modules():
        if type(layer) is nn.RMSNorm:
            twin = DecodeRMSNorm.__new__(DecodeRMSNorm)
            nn.Module.__init__(twin)
            for key, value in layer.items():
                twin[key] = value
            twin.eps, twin.max_rows = layer.eps, max_rows
            object.__setattr__(twin, "_eps", mx.array(layer.eps, mx.float32))
            twin.freeze()
            swaps.append((name, twin))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


@dataclass
class DecodeSetup:
    """What `use_cpu_decode` installed."""

    products: Optional[ProductPlan] = None
    rotary_layers: int = 0
    norms: int = 0
    passes: Optional[ForwardPasses] = None

    def forward_pass(self):
        """Context for one model call whose layers all rotate the same positions (see `ForwardPasses`)."""
        return self.passes.one() if self.passes is not None else nullcontext()

    def summary(self) -> str:
        if self.products is None:
            return "CPU decode: not used (not on the CPU)"
        return (f"CPU decode: products {self.products.summary()}; rotary tables in {self.rotary_layers} layers; "
                f"{self.products.kernel_note}")


MODES = ("auto", "none", "plain", "transposed", "panel")


def use_cpu_decode(model: nn.Module, max_rows: int, positions: int, mode: str = "auto") -> DecodeSetup:
    """On the CPU: `use_decode_products` for up to `max_rows` rows (the batch size),
    `use_rotary_tables` for `positions` positions (the context length) and `use_decode_norms`.
    `mode`: "auto" (measures, the panel kernel included); "none" (nothing); "plain" / "transposed" /
    "panel" pin every product's method instead of measuring (tests; "panel" where the kernel runs). Elsewhere than on the CPU: nothing. Raises ValueError on a bad mode."""
    if mode not in MODES:
        raise ValueError(f"cpu_decode: {mode!r} is not one of {', '.join(MODES)}")
    if mx.default_device() != mx.cpu or mode == "none":
        return DecodeSetup()
    pinned = None if mode == "auto" else mode
    passes = ForwardPasses()
    return DecodeSetup(use_decode_products(model, max_rows, pinned), use_rotary_tables(model, positions, passes),
                       use_decode_norms(model, max_rows), passes)
