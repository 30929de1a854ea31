"""Data parallel over the CPU's cores inside one process: a micro-batch's rows split into groups,
each group's forward and backward pass on its own MLX CPU stream.

Why: MLX's CPU backend runs each stream's element-wise work (SwiGLU, softmax, RoPE, norms, the
dequantizing of the CPU path) on one thread, while the BLAS splits each matrix product over the
cores. MLX runs every stream on a thread of its own, so with the rows split over as many streams
as there are cores, the element-wise work runs on all of them, and each stream's products run
single-threaded side by side (on this project's 2-core x86 machines two single-threaded products
at once beat one two-threaded product by ~1.2x: the BLAS's threads stop waiting on each other).

How: `blas_threads(1)` while the groups run (OpenBLAS's `openblas_set_num_threads`, MKL's
`MKL_Set_Num_Threads`; nothing with MLX's own reference BLAS, which is single-threaded), and MLX
told to interleave the groups' operations: MLX builds its evaluation order breadth-first up to a
width (`MLX_BFS_MAX_WIDTH`, 20 by default) and depth-first beyond it, so at the default every
operation of the first group is queued before the second's and the groups run one after the
other. `mlx-lora train` sets the width to `BFS_WIDTH` (`prepare_process`) before MLX first reads
it (at its first evaluation); `interleaving()` says whether that took, and without it a run
keeps one stream. Not with `grad_checkpoint`: MLX's wider evaluation order then recomputes
checkpointed blocks side by side (the test-shape checkpointed step peaked at 241 MB against ~200
at the default width, measured), which is what checkpointing exists to avoid.

SFT: the step's loss and gradient are the target-token weighted means of the groups' (a group's
loss is already a mean over its target tokens). DPO / ORPO: a group is a run of whole pairs (its
chosen rows and their rejected rows, `split_pairs`), whose loss divides by the whole batch's pair
and NLL target counts (`objectives.preference_loss`'s `totals`), so the groups' losses, metrics and
gradients add up. Either way a split step equals the unsplit one up to float32 rounding
(tests/test_cpu_streams.py). With LoRA dropout the random draws differ from the
unsplit step's, as they would for any other batch layout, and stay reproducible.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np

BFS_WIDTH = 2048  # above the number of arrays a step returns (a 48-block model's LoRA gradients: 672)
BFS_ENV = "MLX_BFS_MAX_WIDTH"
MAX_AUTO_STREAMS = 8


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def interleaving() -> bool:
    """Whether MLX interleaves independent streams' operations in one evaluation (see the module doc)."""
    try:
        return int(os.environ.get(BFS_ENV, "20")) >= BFS_WIDTH
    except ValueError:
        return False


def wants_streams(training) -> bool:
    """Whether a run with these TrainingConfig settings splits its rows over CPU streams where it
    can: `cpu_streams` not 1, no `grad_checkpoint` (see the module doc)."""
    return training.cpu_streams != 1 and not training.grad_checkpoint


def prepare_process(training) -> bool:
    """Before MLX's first evaluation in this process: set the evaluation width that interleaves
    the streams when `training` wants them (a width the caller set is kept). Returns interleaving()."""
    if wants_streams(training):
        os.environ.setdefault(BFS_ENV, str(BFS_WIDTH))
    return interleaving()


def stream_count(training, rows: int, on_cpu: bool, interleaved: bool | None = None) -> int:
    """Row groups for a micro-batch of `rows` rows (pairs for DPO / ORPO) under TrainingConfig `training`: `cpu_streams`
    (auto: one per usable core, at most 8) capped at `rows`; 1 off the CPU (a GPU runs a batch's
    element-wise work in parallel already), when `wants_streams` says no, and where MLX would
    not interleave the groups (`interleaved`, default: this process's `interleaving()`)."""
    interleaved = interleaving() if interleaved is None else interleaved
    if not on_cpu or rows < 2 or not wants_streams(training) or not interleaved:
        return 1
    setting = training.cpu_streams
    wanted = min(usable_cores(), MAX_AUTO_STREAMS) if setting == "auto" else int(setting)
    return max(1, min(wanted, rows))


def split_pairs(pairs: int, groups: int) -> list[np.ndarray]:
    """The rows of each of `groups` runs of consecutive pairs of a preference batch of `pairs` pairs
    (`collate_pairs`' layout: chosen rows 0..B-1, then their rejected rows B..2B-1), each group's
    indices in the same layout (its chosen rows, then theirs rejected), int32."""
    bounds = np.linspace(0, pairs, groups + 1).round().astype(int)
    return [np.concatenate([np.arange(lo, hi), pairs + np.arange(lo, hi)]).astype(np.int32)
            for lo, hi in zip(bounds[:-1], bounds[1:])]


def split_rows(arrays: Sequence[np.ndarray], groups: int) -> list[list[np.ndarray]]:
    """Each (rows, ...) array cut into `groups` consecutive row ranges of near-equal size (the
    first ones one row larger): a list of groups, each the list of its slices in `arrays` order."""
    rows = arrays[0].shape[0]
    bounds = np.linspace(0, rows, groups + 1).round().astype(int)
    return [[a[lo:hi] for a in arrays] for lo, hi in zip(bounds[:-1], bounds[1:])]


def _blas_thread_functions():
    """(get, set) for the BLAS in this process, or None: OpenBLAS, else MKL (found by symbol, as a
    preloaded library's symbols are global)."""
    process = ctypes.CDLL(None)
    for getter, setter in (("openblas_get_num_threads", "openblas_set_num_threads"),
                           ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads")):
        get, set_ = getattr(process, getter, None), getattr(process, setter, None)
        if get is not None and set_ is not None:
            get.restype, set_.restype = ctypes.c_int, None
            set_.argtypes = [ctypes.c_int]
            return get, set_
    return None


@contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Run the block with the BLAS on `n` threads (None: unchanged), then restore its count."""
    functions = _blas_thread_functions() if n is not None else None
    if functions is None:
        yield
        return
    get, set_ = functions
    before = get()
    set_(n)
    try:
        yield
    finally:
        set_(before)
