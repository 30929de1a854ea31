"""Continuous batching: which sequences decode together, who joins and leaves, and when prompts are read.

The scheduler knows token ids, KV caches and adapter slots, not HTTP, text or model internals.
Each `step()`:
1. drops sequences whose client went away (their rows leave the batch, their slots are free);
2. admits waiting sequences (up to `max_batch` in all, and while the batch's KV stays within
   `kv_tokens`, see `kv_slots`) into the prefill group, beside any whose prompts are still being
   read, looking each prompt up in the prompt cache, and reads one chunk of every prompt in the group
   (about `prefill_seconds` of work while others decode, 4x that alone, at most `prefill_chunk`
   tokens per row, and no more than the shortest prompt's rest, see `prefill_size`), so a long
   prompt never stalls the running streams for more than one short chunk, and a short prompt that
   arrives while a long one is read waits for the chunk in flight, then is read at once;
3. moves the group's rows whose prompts are read into the running batch; the others read on;
4. decodes one token for every running sequence in a single forward pass (rows may use different
   adapters and sampling settings), newcomers included: a request arriving while others decode gets
   its first token from the next decode step, not the one after.

A row that leaves becomes a hole: its KV stays where it is and the batch goes on decoding it (its
tokens dropped), and a newcomer whose KV fits before the batch's current position takes the hole
(its KV written into that row; nothing else moves). Removing a row from mlx-lm's `BatchKVCache`
(`filter`) copies every other row's KV in every layer, as does appending one (`extend`): ~60 ms for
8 rows of ~80 tokens in the demo's 30 layers on this CPU (MLX's CPU copies run at ~1.5 GB/s here),
a whole step's work, paid at every leave and every join, and growing with the context. Holes
nobody takes within `HOLE_PATIENCE` steps are removed then (one copy), as they are when newcomers
need more rows than there are holes; caches other than `BatchKVCache` (sliding windows) are
compacted at once, as before.

Decoding runs one step ahead, as mlx-lm's `BatchGenerator` does: step n+1 is built on step n's
sampled tokens while they are still being computed, and step n's tokens are then read, streamed and
checked for stops while step n+1 computes, so the Python work of a step (graph building,
detokenizing, the events) overlaps the model's. Step n+1's first layers are queued before step n's
tokens are read and the rest after (`_first_layers`): queued whole, MLX would hold the scheduler
until step n+1 was nearly done, and every token would reach its client most of a step late
(in process, fused demo, 12 alternating pairs: time to first token 119 -> 84 ms for one client,
287 -> 190 ms for 8 at once; request times unchanged). A row that turns out to have finished
at step n leaves with its one extra KV entry trimmed; its token from step n+1 is dropped. Rows whose
next logits depend on their accepted tokens (penalties, logit_bias, a grammar) make the batch wait
for each step, as do merges of newcomers; when every row's step-n token is its last by
`max_tokens`, no step is run ahead.

KV caches, their batching (left padding, merge, extend, filter) and chunked batched prefill are
mlx-lm's (`BatchKVCache`, `PromptProcessingBatch`); the prompt cache is mlx-lm's `LRUPromptCache`
keyed by (adapter, tokens). As in mlx-lm, the last prompt token is not prefilled: it is the first
decode input, so a newcomer's first token comes from the same batched decode step as everyone's.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import mlx.core as mx

from .sampling import RowSampler, SamplingParams, token_logprobs

MIN_PREFILL_CHUNK = 16  # prompt tokens per row a prefill chunk reads at least, however slow
ALONE_BUDGET = 4  # with nobody decoding, a prefill chunk may take this many times `prefill_seconds`
PRIMED_LAYERS = 4  # layers of a step queued before the previous step's tokens are accepted (`_first_layers`)
HOLE_PATIENCE = 4  # decode steps a left row's place is kept for a newcomer before the batch is compacted
# forward(tokens (B, L) int32, caches, adapter slots per row) -> logits (B, L, V)
Forward = Callable[[mx.array, list, list[int]], mx.array]


@dataclass
class TokenEvent:
    """One generated token with its log-probability and, when asked, the top alternatives."""

    token: int
    logprob: Optional[float] = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Issued:
    """A decode step whose tokens are being computed and are not yet accepted: one entry per running row."""

    tokens: mx.array  # (B,) uint32 sampled ids, lazy
    logits: Optional[mx.array] = None  # (B, V) float32, when no row adjusted its logits
    rows: Optional[list] = None  # per row (V,) float32 logits after adjustments and masks, otherwise

    def row(self, i: int) -> mx.array:
        return self.logits[i] if self.rows is None else self.rows[i]

    def keep(self, indices: list[int]) -> None:
        self.tokens = self.tokens[mx.array(indices, dtype=mx.int32)]
        if self.rows is None:
            self.logits = self.logits[mx.array(indices, dtype=mx.int32)]
        else:
            self.rows = [self.rows[i] for i in indices]


@dataclass(eq=False)
class Sequence:
    """One request's generation. `on_token` returns True to stop (a stop string was reached);
    `on_finish(reason)` is called once: "stop", "length" or "cancelled"."""

    prompt: list[int]
    max_tokens: int
    on_token: Callable[[TokenEvent], bool]
    on_finish: Callable[[str], None]
    slot: int = 0  # adapter slot (0: the base)
    cache_key: str = ""  # prompt-cache namespace: the adapter's name and version
    params: SamplingParams = field(default_factory=SamplingParams)
    constraint: Any = None  # grammar: .mask() -> (V,) bool or None, .accept(token), .is_finished()
    cancelled: threading.Event = field(default_factory=threading.Event)
    # state, filled in by the scheduler
    generated: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    pending: list[int] = field(default_factory=list)  # prompt tokens still to prefill
    next_input: int = 0
    kv_tokens: int = 0  # how many of prompt + generated the KV cache holds
    sampler: Optional[RowSampler] = None
    admitted: float = 0.0
    on_error: Optional[Callable[[str], None]] = None  # called instead of on_finish when its step failed

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    """Continuous batching over one model (see the module doc). Call `step()` from one thread only;
    `add` may be called from any thread."""

    def __init__(self, forward: Forward, make_cache: Callable[[], list], eos_ids: set[int], max_batch: int = 8,
                 prefill_chunk: int = 512, prompt_cache_size: int = 0, prompt_cache_bytes: int = 1 << 30,
                 kv_tokens: Optional[int] = None, kv_windows: tuple[Optional[int], ...] = (), run_ahead: bool = True,
                 prefill_seconds: float = 0.25):
        from mlx_lm.models.cache import BatchKVCache, LRUPromptCache

        self.forward, self.make_cache, self.eos_ids = forward, make_cache, set(eos_ids)
        self.max_batch, self.prefill_chunk, self.run_ahead = max_batch, prefill_chunk, run_ahead
        # A prefill chunk is sized to take about `prefill_seconds` while others decode, ALONE_BUDGET x that
        # alone (0: always `prefill_chunk` tokens), from the rate the last chunk was read at: a chunk late in
        # a long prompt costs more (attention over all before it), and on a CPU 512 tokens took up to 8 s
        # (the demo model, 1,600-token prompt), a gap in every running stream and a wait for every newcomer.
        self.prefill_seconds = prefill_seconds
        self._prefill_rate: Optional[float] = None  # prompt tokens per second, the group's last chunk
        # KV budget in token slots (None: unbounded). The batch's caches are one rectangle: every row
        # as long as the longest (left padding), grown `kv_step` slots at a time, so a batch of n rows
        # whose longest prompt + max_tokens is T holds at most n * (T + kv_step) slots.
        # `kv_windows`: per layer, None for a full cache, or the window of a sliding-window layer
        # (mlx-lm's RotatingKVCache: Gemma 3, Mistral-style `layer_types`), which never holds more
        # than window - 1 + one prefill chunk per row, however long the sequence. A token slot is one
        # token in every layer (the planner's bytes per token).
        self.kv_tokens, self.kv_step = kv_tokens, BatchKVCache.step
        self.kv_windows = tuple(kv_windows) if any(w is not None for w in kv_windows) else ()
        self.prompt_cache = LRUPromptCache(prompt_cache_size, prompt_cache_bytes) if prompt_cache_size > 0 else None
        self._inbox: deque[Sequence] = deque()
        self._lock = threading.Lock()
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Optional[Sequence]] = []  # the batch's rows, in KV cache order; None: a hole
        self._caches: list = []  # per layer, the running batch's BatchKVCache
        self._hole_steps = 0  # decode steps the batch has had holes in
        self.prefilling: list[Sequence] = []
        self._prefill = None  # mlx-lm PromptProcessingBatch of the group being read
        self._ahead: Optional[Issued] = None  # the decode step in flight, not yet accepted (see the module doc)
        self.steps = 0
        self.ahead_steps = 0  # decode steps built before the previous step's tokens were read
        self._copies: list = []  # leaving rows' KV copies for the prompt cache, evaluated at the step's end
        self.holes_filled = 0  # newcomers placed into a left row's place (no copy of the batch)
        self.compactions = 0  # times the batch's holes were removed (a copy of every row's KV)

    @property
    def running(self) -> list[Sequence]:
        """The sequences decoding, in batch order (holes left out)."""
        return [seq for seq in self.rows if seq is not None]

    # --- queue ---

    def add(self, seq: Sequence) -> None:
        with self._lock:
            self._inbox.append(seq)

    def queued(self) -> int:
        with self._lock:
            return len(self._inbox) + len(self.waiting)

    def active(self) -> int:
        return len(self.running) + len(self.prefilling)

    def idle(self) -> bool:
        return not (self.running or self.prefilling or self.waiting or self._inbox)

    def uses_slot(self, slot: int) -> int:
        """How many queued or running sequences use adapter `slot`."""
        with self._lock:
            everyone = [*self._inbox, *self.waiting, *self.running, *self.prefilling]
        return sum(seq.slot == slot for seq in everyone)

    def cancel_all(self) -> None:
        with self._lock:
            everyone = [*self._inbox, *self.waiting, *self.running, *self.prefilling]
        for seq in everyone:
            seq.cancel()

    def abandon(self) -> list[Sequence]:
        """After a step raised: drop the running and prefilling sequences with the batch's KV caches and
        the step in flight (their state is unknown), and return them; waiting ones stay queued."""
        dropped = self.running + self.prefilling
        self.rows, self.prefilling, self._caches, self._prefill, self._ahead = [], [], [], None, None
        self._copies = []
        return dropped

    # --- the step ---

    def step(self) -> None:
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
        self._drop_cancelled()
        if self.waiting and self.active() < self.max_batch:
            self._admit()
        if self.prefilling:
            self._prefill_chunk()
        if self.running:
            self._decode()
        self._tend_holes()
        if self._copies:  # queued behind the step in flight, they let the batch's old KV buffers go
            mx.async_eval(self._copies)
            self._copies = []
        self.steps += 1

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.waiting if s.cancelled.is_set()]:
            self.waiting.remove(seq)
            seq.on_finish("cancelled")
        gone = [i for i, s in enumerate(self.rows) if s is not None and s.cancelled.is_set()]
        if gone:
            self._leave(gone, "cancelled")
        gone = [i for i, s in enumerate(self.prefilling) if s.cancelled.is_set()]
        if gone:
            for i in gone:
                self.prefilling[i].on_finish("cancelled")
            self._split_prefill(gone)

    def row_slots(self, length: int) -> int:
        """KV token slots one row holds when the batch's longest prompt + max_tokens is `length`: full
        layers grow to length + kv_step; a sliding-window layer stops at its window + one prefill chunk."""
        full = length + self.kv_step
        if not self.kv_windows:
            return full
        held = sum(full if w is None else min(full, w + self.prefill_chunk) for w in self.kv_windows)
        return -(-held // len(self.kv_windows))  # the layers' mean, rounded up

    def kv_slots(self, rows: list[Sequence]) -> int:
        """KV token slots a batch of `rows` may come to hold (see `kv_tokens`)."""
        return len(rows) * self.row_slots(max(len(s.prompt) + s.max_tokens for s in rows)) if rows else 0

    def fits_alone(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether one sequence of this size fits the KV budget on its own (else it never can)."""
        return self.kv_tokens is None or self.row_slots(prompt_tokens + max_tokens) <= self.kv_tokens

    def most_tokens_alone(self, prompt_tokens: int) -> int:
        """The largest max_tokens a sequence with this prompt may ask for within the KV budget (0: none)."""
        # Full layers are at least 1 / layers of a slot, so no length past kv_tokens x layers fits.
        low, high = 0, (self.kv_tokens or 0) * max(len(self.kv_windows), 1)
        while low < high:  # row_slots grows with the length: the last max_tokens that fits
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self.fits_alone(prompt_tokens, mid) else (low, mid - 1)
        return low

    def _admit(self) -> None:
        from mlx_lm.generate import PromptProcessingBatch

        if self.kv_tokens is not None and len(self.rows) > len(self.running):
            self._compact()  # holes hold KV the budget does not count (a group is read beside them)
        group: list[Sequence] = []
        present = self.running + self.prefilling
        while self.waiting and self.active() + len(group) < self.max_batch:
            # FIFO: the head waits for room rather than letting smaller requests pass it forever.
            # With nothing running the head goes in regardless (the engine refuses what never fits).
            over = self.kv_tokens is not None and self.kv_slots(present + group + [self.waiting[0]]) > self.kv_tokens
            if over and (present or group):
                break
            group.append(self.waiting.popleft())
        if not group:
            return
        caches = []
        for seq in group:
            cache, rest = self._cached(seq)
            seq.cached_tokens = len(seq.prompt) - len(rest)
            seq.pending, seq.next_input = list(rest[:-1]), rest[-1]
            seq.kv_tokens = len(seq.prompt) - 1
            seq.sampler = RowSampler(seq.params, seq.prompt)
            seq.admitted = time.perf_counter()
            caches.append(cache)
        # Empty per-row sampler lists of the right length, so mlx-lm's `filter` and `extend` work (unused here).
        batch = PromptProcessingBatch(model=self._group_forward, uids=list(range(len(group))), caches=caches,
                                      prefill_step_size=self.prefill_chunk, samplers=[None] * len(group),
                                      logits_processors=[[] for _ in group])
        if self._prefill is None:
            self._prefill = batch
        else:  # beside prompts still being read: one forward reads a chunk of each (a copy of the group's KV)
            self._prefill.extend(batch)
        self.prefilling = self.prefilling + group

    def _cached(self, seq: Sequence) -> tuple[list, list[int]]:
        """(KV cache holding a prefix of the prompt, the prompt tokens after it); at least one token is left."""
        if self.prompt_cache is None:
            return self.make_cache(), seq.prompt
        from mlx_lm.models.cache import trim_prompt_cache

        cache, rest = self.prompt_cache.fetch_nearest_cache(seq.cache_key, seq.prompt)
        if cache is None:
            return self.make_cache(), seq.prompt
        if not rest:  # the whole prompt is cached: give back its last token to feed as the first input
            trim_prompt_cache(cache, 1)
            rest = seq.prompt[-1:]
        return cache, list(rest)

    def _group_forward(self, tokens, cache):
        return self.forward(tokens, cache, [seq.slot for seq in self.prefilling])

    def prefill_size(self) -> int:
        """Prompt tokens per row for the next prefill chunk: about `prefill_seconds` of work at the rate the
        last chunk was read (`ALONE_BUDGET` times that with nobody decoding: a request arriving meanwhile
        waits about that long for the chunk in flight), between `MIN_PREFILL_CHUNK` and `prefill_chunk`
        tokens; and, while prompts of different lengths are read together, no more than the shortest
        one's rest, so a short prompt is read at once beside a long one and no row reads padding."""
        if self.prefill_seconds <= 0:
            size = self.prefill_chunk
        elif self._prefill_rate is None:  # the group's first chunk, rate unknown: a small one measures it
            size = min(self.prefill_chunk, MIN_PREFILL_CHUNK * 4)
        else:
            budget = self.prefill_seconds * (1 if self.running else ALONE_BUDGET)
            rows = max(1, sum(bool(seq.pending) for seq in self.prefilling))
            size = max(MIN_PREFILL_CHUNK, min(self.prefill_chunk, int(self._prefill_rate * budget / rows)))
        rests = [len(seq.pending) for seq in self.prefilling if seq.pending]
        if len(rests) > 1:
            size = min(size, max(MIN_PREFILL_CHUNK, min(rests)))
        return size

    def _prefill_chunk(self) -> None:
        size = self.prefill_size()
        chunks = [seq.pending[:size] for seq in self.prefilling]
        if any(chunks):
            started = time.perf_counter()
            self._prefill.prompt(chunks)  # evaluates the group's caches before it returns
            self._prefill_rate = sum(map(len, chunks)) / max(time.perf_counter() - started, 1e-6)
            for seq, chunk in zip(self.prefilling, chunks):
                del seq.pending[: len(chunk)]
        read = [i for i, seq in enumerate(self.prefilling) if not seq.pending]
        if not read:
            return
        group, caches = self._split_prefill(read)
        self._settle()  # the newcomers join a batch whose every token is accepted
        if not self.running:
            self.rows, self._caches, self._hole_steps = list(group), caches, 0
        elif not self._fill_holes(group, caches):
            self._compact()
            for mine, theirs in zip(self._caches, caches):
                mine.extend(theirs)
            self.rows = self.rows + group

    def _split_prefill(self, rows: list[int]) -> tuple[list[Sequence], list]:
        """Take `rows` (indices into `prefilling`) out of the group being read: (their sequences, their KV
        caches per layer); the others stay in the group. Taking every row lets the group go (no copy);
        otherwise each part's KV is gathered from the group's (mlx-lm's `filter`, a copy of its rows)."""
        taken = [self.prefilling[i] for i in rows]
        if len(rows) == len(self.prefilling):
            caches = self._prefill.prompt_cache
            self.prefilling, self._prefill, self._prefill_rate = [], None, None
            return taken, caches
        from mlx_lm.models.cache import ArraysCache, BatchKVCache, BatchRotatingKVCache

        taking = set(rows)
        keep = [i for i in range(len(self.prefilling)) if i not in taking]
        # mlx-lm's `split` deep-copies the whole group's KV first; these caches' `filter` only reassigns
        # their arrays, so a shallow copy filters apart (others, e.g. a CacheList, are copied whole)
        part = copy.copy(self._prefill)
        part.prompt_cache = [copy.copy(c) if type(c) in (BatchKVCache, BatchRotatingKVCache, ArraysCache)
                             else copy.deepcopy(c) for c in self._prefill.prompt_cache]
        part.filter(rows)
        self._prefill.filter(keep)
        self.prefilling = [self.prefilling[i] for i in keep]
        return taken, part.prompt_cache

    def _decode(self) -> None:
        if self._ahead is not None and not self._ahead_pays():
            self._settle()
            if not self.running:
                return
        previous = self._ahead
        if previous is not None:
            inputs = previous.tokens[:, None]  # (B, 1), still being computed
            self.ahead_steps += 1
        else:
            inputs = mx.array([seq.next_input if seq else 0 for seq in self.rows], dtype=mx.int32)[:, None]  # (B, 1)
        slots = [seq.slot if seq else 0 for seq in self.rows]  # a hole decodes on the bare base, its token dropped
        logits = self.forward(inputs, self._caches, slots)[:, -1, :]  # (B, V)
        self._ahead = self._sample(logits.astype(mx.float32))
        if previous is not None:
            # Queue this step's first layers, then accept the previous step's tokens as soon as they are
            # computed, then queue the rest: see `_first_layers`.
            mx.async_eval(self._first_layers())
            self._accept_step(previous)  # may empty the batch, the step just built with it
        if self._ahead is not None:
            mx.async_eval(self._ahead.tokens)
            if not self._may_run_ahead():
                self._settle()

    def _first_layers(self) -> list:
        """The KV state of the first `PRIMED_LAYERS` layers of the step just built (lazy arrays).

        MLX's `async_eval` returns only when at most ~100 operations of what it was given are left to
        run (`MAX_ACTIVE_TASKS` x `DISPATCHES_PER_TASK` in mlx/transforms.cpp, mlx/backend/cpu/encoder.h):
        called on a whole step it holds the caller for ~80% of that step (measured: 90 of 112 ms, 8 rows,
        fused demo on this CPU), so the step before it, long computed, would be read and streamed only
        then, and a finished request's client would hear of it most of a step late. Evaluating these
        layers first keeps the device busy while the previous step's tokens are accepted."""
        from mlx.utils import tree_flatten

        layer = min(PRIMED_LAYERS, len(self._caches)) - 1
        return [a for _, a in tree_flatten(self._caches[layer].state) if isinstance(a, mx.array)] if layer >= 0 else []

    def _sample(self, logits: mx.array) -> Issued:
        """This step's tokens from logits (B, V) float32, each row by its own settings."""
        if all(seq.params.temperature == 0.0 and seq.constraint is None and not seq.params.adjusts_logits()
               for seq in self.running):
            return Issued(mx.argmax(logits, axis=-1), logits=logits)
        tokens, rows = [], []
        for i, seq in enumerate(self.rows):
            row = logits[i]
            if seq is None:
                rows.append(row)
                tokens.append(mx.argmax(row))
                continue
            if seq.params.adjusts_logits():
                row = seq.sampler.adjust(row, seq.generated)
            if seq.constraint is not None:
                mask = seq.constraint.mask()
                if mask is not None:
                    row = mx.where(mask, row, -mx.inf)
            rows.append(row)
            tokens.append(seq.sampler.draw(row))
        return Issued(mx.stack(tokens), rows=rows)

    def _may_run_ahead(self) -> bool:
        """Whether the next step may be built before this one's tokens are read: no row's logits
        depend on its accepted tokens (penalties and logit_bias count them, a grammar follows them)."""
        return self.run_ahead and all(seq.constraint is None and not seq.params.adjusts_logits()
                                      for seq in self.running)

    def _ahead_pays(self) -> bool:
        """Whether some row goes on after the step in flight (else a step built ahead is wasted)."""
        return any(len(seq.generated) + 1 < seq.max_tokens for seq in self.running)

    def _settle(self) -> None:
        """Wait for the step in flight and accept its tokens."""
        issued, self._ahead = self._ahead, None
        if issued is not None:
            self._accept_step(issued)

    def _accept_step(self, issued: Issued) -> None:
        """Accept one step's tokens, a row each (`self.rows`' order, holes skipped); finished rows leave."""
        finished = []
        for i, (seq, token) in enumerate(zip(self.rows, issued.tokens.tolist())):
            if seq is None:
                continue
            seq.next_input = token
            seq.kv_tokens += 1
            reason = self._accept(seq, token, issued.row(i))
            if reason is not None:
                finished.append((i, reason))
        if finished:
            self._leave([i for i, _ in finished], [reason for _, reason in finished])

    def _accept(self, seq: Sequence, token: int, row: mx.array) -> Optional[str]:
        """Record one sampled token; the finish reason when the sequence is done."""
        if token in self.eos_ids:
            return "stop"
        if seq.constraint is not None:
            seq.constraint.accept(token)
        seq.generated.append(token)
        event = TokenEvent(token)
        if seq.params.logprobs:
            logprobs = row - mx.logsumexp(row)
            event.logprob, event.top = token_logprobs(logprobs, token, seq.params.top_logprobs)
        if seq.on_token(event):
            return "stop"
        if seq.constraint is not None and seq.constraint.is_finished():
            return "stop"
        if len(seq.generated) >= seq.max_tokens:
            return "length"
        return None

    def _leave(self, rows: list[int], reasons) -> None:
        """Make `rows` holes in the batch (storing their KV in the prompt cache), then finish them."""
        reasons = [reasons] * len(rows) if isinstance(reasons, str) else reasons
        leaving = [self.rows[i] for i in rows]
        if self.prompt_cache is not None:
            from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

            for i, seq in zip(rows, leaving):
                fed = (seq.prompt + seq.generated)[: seq.kv_tokens]
                if not fed:
                    continue
                held = [c.extract(i) for c in self._caches]
                if self._ahead is not None:  # the step in flight fed one more token than was accepted
                    if not can_trim_prompt_cache(held):
                        continue
                    trim_prompt_cache(held, 1)
                # The row's copy is lazy and would keep the whole batch's KV buffers alive (all rows, every
                # layer) until first used, so it is computed at the end of this step (`step`), after the step
                # in flight; not here: queueing it would queue most of that step and hold the scheduler
                # (see `_first_layers`), so the leaving rows' clients would hear of their end a step late.
                self._copies.append([c.state for c in held])
                self.prompt_cache.insert_cache(seq.cache_key, fed, held)
        for i in rows:
            self.rows[i] = None
        self._hole_steps = 0  # patience counts from the batch's last change
        holes = len(self.rows) - len(self.running)
        # A hole costs about a row's share of every step, a compaction a copy of the rows that stay: with
        # more holes than rows left, the copy is the cheaper (and with no row left, free).
        if holes > len(self.running) or not self._may_hold_holes():
            self._compact()
        for seq, reason in zip(leaving, reasons):
            seq.on_finish(reason)

    # --- holes ---

    def _may_hold_holes(self) -> bool:
        from mlx_lm.models.cache import BatchKVCache

        return all(type(c) is BatchKVCache for c in self._caches)

    def _tend_holes(self) -> None:
        """Remove the batch's holes once `HOLE_PATIENCE` steps passed since a row last left or joined, unless
        a prompt being read is short enough to take one."""
        if len(self.rows) == len(self.running):
            self._hole_steps = 0
            return
        self._hole_steps += 1
        end = self._caches[0]._idx if self._caches else 0
        if self._hole_steps >= HOLE_PATIENCE and not any(len(s.prompt) - 1 <= end for s in self.prefilling):
            self._compact()

    def _compact(self) -> None:
        """Remove the holes from the batch (mlx-lm's `filter`: a copy of every remaining row's KV)."""
        keep = [i for i, seq in enumerate(self.rows) if seq is not None]
        self._hole_steps = 0
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self._caches, self._ahead = [], [], None
            self.compactions += 1
            return
        for cache in self._caches:
            cache.filter(keep)
        if self._ahead is not None:
            self._ahead.keep(keep)
        self.rows = [self.rows[i] for i in keep]
        self.compactions += 1

    def _fill_holes(self, group: list[Sequence], caches: list) -> bool:
        """Place a read group into the batch's holes when there are enough of them, the caches are plain
        `BatchKVCache`s and each newcomer's KV fits before the batch's position: newcomer j's KV, right-
        aligned at the batch's `_idx` like every row's, with the positions before it masked as left
        padding. Returns False (nothing changed) otherwise. Needs no step in flight."""
        from mlx_lm.models.cache import BatchKVCache

        holes = [i for i, seq in enumerate(self.rows) if seq is None]
        if len(group) > len(holes) or not all(type(c) is BatchKVCache for c in caches) or not self._may_hold_holes():
            return False
        end, their_end = self._caches[0]._idx, caches[0]._idx
        lengths = [their_end - pad for pad in caches[0].left_padding.tolist()]
        if max(lengths) > end:
            return False
        padding = self._caches[0].left_padding.tolist()
        for hole, length in zip(holes, lengths):
            padding[hole] = end - length
        live = [p for i, p in enumerate(padding) if self.rows[i] is not None or i in holes[: len(group)]]
        shift = min(live)  # positions no row needs any more: dropped from the left (a view, no copy)
        padding = [max(p - shift, 0) for p in padding]
        left_padding = mx.array(padding)
        offset = (end - shift) - left_padding  # tokens each row holds (BatchKVCache's offset = _idx - left_padding)
        for mine, theirs in zip(self._caches, caches):
            for j, (hole, length) in enumerate(zip(holes, lengths)):
                if length:
                    mine.keys[hole:hole + 1, :, end - length:end, :] = theirs.keys[j:j + 1, :, their_end - length:their_end, :]
                    mine.values[hole:hole + 1, :, end - length:end, :] = theirs.values[j:j + 1, :, their_end - length:their_end, :]
            if shift:
                mine.keys, mine.values = mine.keys[..., shift:, :], mine.values[..., shift:, :]
                mine._idx -= shift
            mine.left_padding, mine.offset = left_padding, offset
        for hole, seq in zip(holes, group):
            self.rows[hole] = seq
        self.holes_filled += len(group)
        self._hole_steps = 0
        return True
