"""Data-parallel training on MLX: every rank-dependent line of the MLX backend lives here.

`init()` joins the group that `mlx.launch` started (ring, JACCL or MPI; see `launch.py`), or
returns a world of one, whose methods are no-ops, when the process was started alone. The
training loop calls these hooks: `share` (each rank's rows of a global batch), `average` and
`average_gradients` (inside the compiled step), `any` (agree to stop), `start_together`
(everyone begins from rank 0's adapters, optimizer state and data position), `keep` and `guard`
(a lost or silent rank stops all with a checkpoint and a message instead of a hang).

The global batch is the config's `training.batch_size`; rank r takes rows [r*B/N, (r+1)*B/N) of
each one. Each rank's loss is its mean over its own target tokens times `weight = n_r * N / n`
(n_r its target tokens, n the global batch's), so the average over ranks is the mean over all
target tokens of the global batch: the single-process loss, gradient and clipping norm exactly.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

PEER_ERROR_PREFIXES = ("[ring]", "[jaccl]", "[mpi]", "[nccl]")  # how MLX's backends word a broken link


class RankFailed(RuntimeError):
    """Another rank died, hung or was stopped; the message says which step was kept and how to resume."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_batch_size(batch_size: int, world_size: int) -> None:
    """Raise ValueError unless the global batch splits evenly over `world_size` ranks."""
    if world_size <= 1 or batch_size % world_size == 0:
        return
    below = batch_size // world_size * world_size
    above = below + world_size
    nearest = " or ".join(str(b) for b in (below, above) if b > 0)
    raise ValueError(f"training.batch_size={batch_size} is the global batch and must divide by the "
                     f"{world_size} ranks; use training.batch_size={nearest}")


@dataclass
class LastGood:
    """References to the state after the last step every rank finished (evaluated arrays, not copies)."""

    step: int
    epoch: int
    index: int
    adapters: dict
    optimizer_state: dict


@dataclass
class World:
    """This process's place among the data-parallel ranks (a world of one when started alone)."""

    group: object | None = None  # mx.distributed.Group, None for a world of one
    rank: int = 0
    size: int = 1
    timeout_s: float = 300.0
    tell: Callable[[str], None] = _stderr  # how a rank that must exit at once says why
    last_good: LastGood | None = field(default=None, repr=False)
    stop_requested: bool = False
    # Benchmarks: time each gradient all-reduce on its own (seconds, appended per optimizer step).
    # It evaluates the step in pieces, so it needs training.compile=false (train() says so).
    time_all_reduce: bool = False
    all_reduce_s: list = field(default_factory=list, repr=False)
    _beat: float = field(default_factory=time.monotonic, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and reports."""
        return self.rank == 0

    @property
    def name(self) -> str:
        return f"rank {self.rank} ({socket.gethostname()})"

    # --- data ------------------------------------------------------------------------------

    def share(self, batches: Iterator[tuple]) -> Iterator[tuple]:
        """(tokens, mask, global token count, loss weight) of this rank's rows of each global batch.

        `batches` yields `data.iterate_train`'s (tokens (B, T) int32, mask (B, T-1), tokens in B).
        """
        for tokens, mask, n_tokens in batches:
            if self.size == 1:
                yield tokens, mask, n_tokens, np.float32(1.0)
                continue
            per_rank = tokens.shape[0] // self.size
            rows = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
            weight = mask[rows].sum() * self.size / max(mask.sum(), 1.0)
            yield tokens[rows], mask[rows], n_tokens, np.float32(weight)

    def seed(self, base: int) -> int:
        """A dropout seed distinct per rank (the same as `base` in a world of one)."""
        return base * self.size + self.rank

    # --- reductions (usable inside mx.compile) ---------------------------------------------

    def average(self, x):
        """Mean of `x` over ranks."""
        if self.size == 1:
            return x
        import mlx.core as mx

        return mx.distributed.all_sum(x, group=self.group) / self.size

    def average_gradients(self, grad):
        """Gradient tree averaged over ranks in a few large all-reduces (mlx.nn.average_gradients)."""
        if self.size == 1:
            return grad
        import mlx.nn as nn

        if not self.time_all_reduce:
            return nn.average_gradients(grad, group=self.group)
        import mlx.core as mx

        mx.eval(grad)  # this rank's forward and backward are done,
        self.barrier()  # and every other rank's: the time below is the exchange alone, not a wait
        start = time.perf_counter()
        grad = nn.average_gradients(grad, group=self.group)
        mx.eval(grad)
        self.all_reduce_s.append(time.perf_counter() - start)
        return grad

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says True (e.g. Ctrl-C reached only some)."""
        flag = bool(flag) or self.stop_requested
        if self.size == 1:
            return flag
        import mlx.core as mx

        return bool(mx.distributed.all_max(mx.array(int(flag)), group=self.group).item())

    def barrier(self) -> None:
        if self.size > 1:
            import mlx.core as mx

            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group))

    def from_main(self, tree):
        """Rank 0's values of an array tree on every rank (a sum in which the others add zeros)."""
        if self.size == 1:
            return tree
        import mlx.core as mx
        from mlx.utils import tree_map

        def send(x):
            return mx.distributed.all_sum(x if self.is_main else mx.zeros_like(x), group=self.group)

        tree = tree_map(send, tree)
        mx.eval(tree)
        return tree

    def start_together(self, model, optimizer, step: int, position) -> int:
        """Give every rank rank 0's adapters, optimizer state, step and data position; returns the step."""
        self._beat = time.monotonic()
        if self.size > 1:
            import mlx.core as mx

            model.update(self.from_main(model.trainable_parameters()))
            optimizer.state = self.from_main(optimizer.state)
            where = self.from_main(mx.array([step, position.epoch, position.index], dtype=mx.int32)).tolist()
            step, position.epoch, position.index = where
        self.keep(step, position, model, optimizer)
        return step

    # --- failures --------------------------------------------------------------------------

    def keep(self, step: int, position, model, optimizer) -> None:
        """Note the state after a finished step (a failure later saves this) and reset the timeout."""
        self._beat = time.monotonic()
        if self.size > 1:
            from mlx.utils import tree_map

            self.last_good = LastGood(step, position.epoch, position.index, model.trainable_parameters(),
                                      tree_map(lambda x: x, optimizer.state))

    @contextmanager
    def guard(self, save: Callable[[LastGood], object]):
        """Run the training loop so that no rank waits forever on another.

        A broken link (MLX raises `[ring] ...`) or SIGTERM from the launcher raises RankFailed
        after rank 0 saved the last good state with `save(last_good)`; a rank that hears
        nothing for `timeout_s` (a peer hung) saves the same way and exits the process,
        because its main thread is stuck in the collective.
        """
        if self.size == 1:
            yield
            return
        start_step = self.last_good.step if self.last_good else None
        done = threading.Event()

        def save_last_good() -> str:
            good = self.last_good
            if not self.is_main or good is None or good.step == start_step:
                return "no new checkpoint (rank 0 writes them; the last one written is kept)" if not self.is_main \
                    else "nothing new to save since the start"
            return f"saved step {good.step} in {save(good)}"

        def watchdog():
            while not done.wait(min(1.0, self.timeout_s / 4)):
                silent = time.monotonic() - self._beat
                if silent > self.timeout_s:
                    kept = save_last_good()
                    self.tell(f"error: {self.name}: no word from the other ranks for {silent:.0f}s "
                              f"(distributed.timeout_s={self.timeout_s:g}); a rank died or hung. {kept}; "
                              "resume with --resume when every host is up")
                    os._exit(1)

        def on_term(signum, frame):
            self.stop_requested = True  # stop at the next step boundary, with a checkpoint

        previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
        thread = threading.Thread(target=watchdog, name="mlx-lora-watchdog", daemon=True)
        thread.start()
        try:
            yield
        except RuntimeError as err:
            if not str(err).startswith(PEER_ERROR_PREFIXES):
                raise
            done.set()
            raise RankFailed(f"{self.name}: lost the link to another rank ({err}); {save_last_good()}; "
                             "resume with --resume when every host is up") from err
        finally:
            done.set()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def launched_engine() -> str | None:
    """The engine `mlx.launch` (or mpirun) prepared this process for, from its environment; None alone."""
    if "MLX_JACCL_COORDINATOR" in os.environ:
        return "jaccl"
    if "MLX_HOSTFILE" in os.environ and "MLX_RANK" in os.environ:
        return "ring"
    if any(k in os.environ for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK")):
        return "mpi"
    return None


def init(backend: str = "any", timeout_s: float = 300.0, tell: Callable[[str], None] = _stderr) -> World:
    """Join the ranks `mlx.launch` started, or return a world of one (no collective, no cost).

    Raises ValueError when the engine cannot start (e.g. MLX_HOSTFILE names unreachable ports).
    """
    import mlx.core as mx

    engine = launched_engine()
    if engine is None:
        return World(timeout_s=timeout_s, tell=tell)
    if backend == "any":  # what mlx.launch set up; MLX's own "any" may try MPI first and find a world of one
        backend = engine
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as err:
        raise ValueError(f"distributed.backend={backend}: could not join the other ranks ({err}); "
                         "check the hosts file with: mlx-lora doctor --hosts HOSTS.json") from err
    if group.size() == 1:
        return World(timeout_s=timeout_s, tell=tell)
    return World(group, group.rank(), group.size(), timeout_s, tell)


def gather_strings(world: World, text: str) -> list[str]:
    """Every rank's `text` (UTF-8, at most 4 KiB), in rank order."""
    if world.size == 1:
        return [text]
    import mlx.core as mx

    limit = 4096
    raw = text.encode()[:limit]
    buffer = np.zeros(limit + 4, np.uint8)
    buffer[:4] = np.frombuffer(len(raw).to_bytes(4, "little"), np.uint8)
    buffer[4:4 + len(raw)] = np.frombuffer(raw, np.uint8)
    rows = np.array(mx.distributed.all_gather(mx.array(buffer)[None], group=world.group))
    return [bytes(row[4:4 + int.from_bytes(bytes(row[:4]), "little")]).decode() for row in rows]
