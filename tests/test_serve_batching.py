"""Continuous batching on a tiny model: a sequence's tokens do not depend on who shares its batch.

The scheduler is driven step by step here (no HTTP, no worker thread) so each test controls
exactly when sequences join; `run_alone` is the reference each batched run must equal token for token.
"""

from __future__ import annotations

import time

import pytest

from test_serve import make_adapter

CHUNK = 8  # prefill chunk small enough that the long prompts below take several steps


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    from mlx_lora.serve.engine import Engine

    root = tmp_path_factory.mktemp("adapters")
    adapters = {"a": make_adapter(tiny_model_dir, root / "a", seed=1),
                "b": make_adapter(tiny_model_dir, root / "b", seed=2, magnitude=0.8)}
    return Engine.from_source(str(tiny_model_dir), adapters, base_name="base")


def scheduler(engine, **kwargs):
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_lora.serve.scheduler import Scheduler

    settings = {"max_batch": 8, "prefill_chunk": CHUNK, **kwargs}
    return Scheduler(engine._forward, lambda: make_prompt_cache(engine.model), set(engine.tokenizer.eos_token_ids),
                     **settings)


def sequence(engine, spec: dict, out: dict):
    """A Sequence for `spec` (prompt text, adapter name, sampling settings) recording into out[spec id]."""
    from mlx_lora.serve.sampling import SamplingParams
    from mlx_lora.serve.scheduler import Sequence

    key = spec["id"]
    out[key] = {"tokens": [], "finish": None, "cached": None}
    adapter = engine.adapters.get(spec.get("adapter"))
    seq = Sequence(prompt=list(engine.tokenizer.encode(spec["prompt"])), max_tokens=spec.get("max_tokens", 12),
                   on_token=lambda event: out[key]["tokens"].append(event.token) or False,
                   on_finish=lambda reason: out[key].update(finish=reason),
                   slot=adapter.slot if adapter else 0, cache_key=spec.get("adapter") or "base",
                   params=SamplingParams(**spec.get("params", {})))
    seq.on_finish = lambda reason, seq=seq: out[key].update(finish=reason, cached=seq.cached_tokens)
    return seq


def drain(sched, limit: int = 500) -> int:
    steps = 0
    while not sched.idle():
        sched.step()
        steps += 1
        assert steps < limit, "the scheduler did not finish"
    return steps


def run_alone(engine, specs: list[dict]) -> dict:
    out = {}
    for spec in specs:
        sched = scheduler(engine)
        sched.add(sequence(engine, spec, out))
        drain(sched)
    return out


LONG = "The quick brown fox jumps over the lazy dog. " * 6  # ~5 prefill chunks
SPECS = [
    {"id": "greedy-base", "prompt": "say hello", "adapter": None},
    {"id": "greedy-a-long", "prompt": LONG, "adapter": "a"},
    {"id": "seeded-b", "prompt": "what is the capital of France?", "adapter": "b",
     "params": {"temperature": 0.9, "seed": 11, "top_p": 0.9}},
    {"id": "seeded-a-filters", "prompt": "hello world", "adapter": "a",
     "params": {"temperature": 1.3, "seed": 5, "top_k": 20, "min_p": 0.02, "repetition_penalty": 1.3,
                "frequency_penalty": 0.5, "presence_penalty": 0.4}},
    {"id": "greedy-b-bias", "prompt": "Convert this date", "adapter": "b", "max_tokens": 7,
     "params": {"logit_bias": {5: 4.0, 9: -100.0}, "logprobs": True, "top_logprobs": 3}},
    {"id": "greedy-base-long", "prompt": LONG[:100], "adapter": None},
]


def test_mixed_batch_equals_each_sequence_alone(engine):
    alone = run_alone(engine, SPECS)
    assert len({tuple(v["tokens"]) for v in alone.values()}) == len(SPECS)  # the settings really differ
    together = {}
    sched = scheduler(engine)
    for spec in SPECS:
        sched.add(sequence(engine, spec, together))
    sched.step()
    assert sched.active() == len(SPECS)  # all admitted in one prefill group
    drain(sched)
    for spec in SPECS:
        assert together[spec["id"]]["tokens"] == alone[spec["id"]]["tokens"], spec["id"]
        assert together[spec["id"]]["finish"] == alone[spec["id"]]["finish"]


def test_mixed_batch_equals_each_sequence_alone_on_the_panel_kernel(tiny_model_dir, tmp_path):
    """The engine with every decode product on the CPU panel kernel, adapters' terms inside it."""
    from mlx_lora.serve import multi_lora
    from mlx_lora.serve.engine import Engine

    from test_serve_panel_kernel import _kernel

    _kernel()  # fails where the kernel should build (Linux, g++, nanobind), else skips saying why
    adapters = {"a": make_adapter(tiny_model_dir, tmp_path / "a", seed=1),
                "b": make_adapter(tiny_model_dir, tmp_path / "b", seed=2, magnitude=0.8)}
    engine = Engine.from_source(str(tiny_model_dir), adapters, base_name="base", cpu_decode="panel")
    wrapped = [m for _, m in engine.model.named_modules() if isinstance(m, multi_lora.MultiLoRALinear)]
    assert wrapped and all(m.linear._panels is not None for m in wrapped)
    alone = run_alone(engine, SPECS)
    together = {}
    sched = scheduler(engine)
    for spec in SPECS:
        sched.add(sequence(engine, spec, together))
    drain(sched)
    assert {k: v["tokens"] for k, v in together.items()} == {k: v["tokens"] for k, v in alone.items()}
    assert len({tuple(v["tokens"]) for v in alone.values()}) == len(SPECS)


@pytest.mark.parametrize("strategy", ["gather", "group"])
def test_other_mixing_strategies_give_each_sequence_its_own_tokens(engine, strategy):
    alone = run_alone(engine, SPECS)  # one row: the plain one-adapter product
    together = {}
    default, engine.rows.strategy = engine.rows.strategy, strategy
    try:
        sched = scheduler(engine)
        for spec in SPECS:
            sched.add(sequence(engine, spec, together))
        drain(sched)
    finally:
        engine.rows.strategy = default
    assert {k: v["tokens"] for k, v in together.items()} == {k: v["tokens"] for k, v in alone.items()}


def _base_linear(strategy: str):
    """A (12 -> 10) base; for "panel" a `DecodeLinear` whose products run on the CPU panel kernel."""
    import mlx.nn as nn

    base = nn.Linear(12, 10, bias=False)
    if strategy != "panel":
        return base
    from mlx_lora.serve import panel_kernel
    from mlx_lora.serve.cpu_decode import DecodeLinear, ProductPlan, twin

    from test_serve_panel_kernel import _kernel

    kernel = _kernel()  # fails where the kernel should build (Linux, g++, nanobind), else skips saying why
    plan = ProductPlan(max_rows=8, measured={(10, 12): {8: "panel"}}, kernel=kernel)
    return twin(DecodeLinear, base, plan, panel_kernel.pack(base.weight))


@pytest.mark.parametrize("strategy", ["stacked", "gather", "group", "panel"])
def test_each_row_gets_its_own_adapter_term_in_every_layer(strategy):
    """Per row y = x W^T + s_k x A_k B_k (k its slot), against float64 numpy, with layers of equal
    and of different adapter sets (adapter 2 leaves the second layer alone); the "stacked" column
    masks are built once per pass for the layers alike. "panel": the base product and every row's
    adapter term in one call of the CPU panel kernel (`MultiLoRALinear._panel_product`)."""
    import mlx.core as mx
    import numpy as np

    from mlx_lora.serve.multi_lora import MultiLoRALinear, RowAdapters

    rng = np.random.default_rng(0)
    rows = RowAdapters()
    rows.strategy = "stacked" if strategy == "panel" else strategy
    layers = [MultiLoRALinear(_base_linear(strategy), rows) for _ in range(3)]
    terms = {}  # (layer, slot) -> (A, B, scaling)
    for index, layer in enumerate(layers):
        for slot, rank, scaling in ((1, 4, 2.0), (2, 2, 0.5), (3, 4, 1.0)):
            if slot == 2 and index == 1:
                continue
            a, b = rng.normal(size=(12, rank)), rng.normal(size=(rank, 10))
            layer.put(slot, mx.array(a, dtype=mx.float32), mx.array(b, dtype=mx.float32), scaling)
            terms[index, slot] = (a, b, scaling)
    x = rng.normal(size=(6, 1, 12))
    for slots in ([1, 0, 2, 3, 2, 1], [3] * 6, [0] * 6):  # mixed, one adapter, the bare base
        rows.set(slots)
        if strategy == "panel":
            assert all(layer._panel_product(mx.array(x, dtype=mx.float32)) is not None for layer in layers)
        outputs = [np.array(layer(mx.array(x, dtype=mx.float32)), dtype=np.float64) for layer in layers]
        for index, (layer, got) in enumerate(zip(layers, outputs)):
            weight = np.array(layer.linear.weight, dtype=np.float64)
            for row, slot in enumerate(slots):
                want = x[row] @ weight.T
                if (index, slot) in terms:
                    a, b, scaling = terms[index, slot]
                    want = want + scaling * (x[row] @ a @ b)
                np.testing.assert_allclose(got[row], want, rtol=1e-4, atol=1e-4, err_msg=f"{slots}: layer {index} row {row}")
    rows.set([1, 0, 2, 3, 2, 1])
    [layer(mx.array(x, dtype=mx.float32)) for layer in layers]
    if strategy == "stacked":  # layers 0 and 2 alike: one mask; layer 1 (a slot missing) its own
        assert len(rows._keep) == 2
    rows.set(slots)  # the next pass builds afresh
    assert rows._keep == {}


def test_a_sequence_joining_mid_batch_changes_no_one(engine):
    first, joiner = SPECS[:3], SPECS[3:5]
    alone = run_alone(engine, SPECS[:5])
    out = {}
    sched = scheduler(engine)
    for spec in first:
        sched.add(sequence(engine, spec, out))
    while not all(out[s["id"]]["tokens"] for s in first):  # until all three decode
        sched.step()
    for spec in joiner:
        sched.add(sequence(engine, spec, out))
    drain(sched)
    for spec in SPECS[:5]:
        assert out[spec["id"]]["tokens"] == alone[spec["id"]]["tokens"], spec["id"]



def test_a_newcomer_is_in_the_very_next_decode_step(engine):
    """A request arriving while others decode is read and joins before that step's decode is built, so its
    first token comes from the next decode step, not the one after (a step is ~100 ms on a CPU)."""
    out = {}
    sched = scheduler(engine)
    sched.add(sequence(engine, {"id": "running", "prompt": "count to a hundred", "max_tokens": 40}, out))
    while not out["running"]["tokens"]:
        sched.step()
    sched.add(sequence(engine, {"id": "newcomer", "prompt": "say hi", "max_tokens": 5}, out))  # read in one chunk
    sched.step()  # read, joined, decoded together with the running row (in flight)
    sched.step()  # that step's tokens accepted
    assert len(out["newcomer"]["tokens"]) == 1
    drain(sched)
    assert out["newcomer"]["tokens"] == run_alone(engine, [{"id": "newcomer", "prompt": "say hi", "max_tokens": 5}])["newcomer"]["tokens"]

def test_max_batch_bounds_the_running_batch(engine):
    alone = run_alone(engine, SPECS[:4])
    out, sizes = {}, []
    sched = scheduler(engine, max_batch=2)
    for spec in SPECS[:4]:
        sched.add(sequence(engine, spec, out))
    while not sched.idle():
        sched.step()
        sizes.append(sched.active())
    assert max(sizes) == 2
    assert {k: v["tokens"] for k, v in out.items()} == {k: v["tokens"] for k, v in alone.items()}


def test_cancelled_sequence_leaves_at_the_next_step(engine):
    out = {}
    sched = scheduler(engine)
    seqs = [sequence(engine, {**spec, "max_tokens": 200}, out) for spec in SPECS[:3]]
    for seq in seqs:
        sched.add(seq)
    for _ in range(10):
        sched.step()
    seqs[1].cancel()
    sched.step()
    assert sched.active() == 2 and out[SPECS[1]["id"]]["finish"] == "cancelled"
    drain(sched)
    finishes = [out[s["id"]]["finish"] for s in SPECS[:3]]
    assert finishes[1] == "cancelled" and finishes[0] in ("stop", "length") and finishes[2] in ("stop", "length")


READ_LONG = {"id": "read-long", "prompt": LONG * 2, "adapter": "b", "max_tokens": 6}  # ~10 chunks of CHUNK tokens


@pytest.mark.parametrize("running", [False, True], ids=["nothing-decoding", "beside-a-decoding-row"])
def test_a_short_prompt_does_not_wait_for_a_long_one_being_read(engine, running):
    """A short request arriving while a long prompt is being read is read beside it and starts
    decoding as soon as its own prompt is read (not when the long one's is); everyone's tokens equal
    their run alone (seeded and greedy, two adapters)."""
    runner = {"id": "runner", "prompt": "hello world", "adapter": "a", "max_tokens": 40,
              "params": {"temperature": 0.8, "seed": 9}}
    short = {"id": "short", "prompt": "what is the capital of France?", "adapter": None, "max_tokens": 8}
    specs = ([runner] if running else []) + [READ_LONG, short]
    alone = run_alone(engine, specs)
    out = {}
    sched = scheduler(engine, prefill_seconds=0)  # fixed CHUNK-token chunks
    if running:
        sched.add(sequence(engine, runner, out))
        step_until(sched, lambda: out["runner"]["tokens"])
    sched.add(sequence(engine, READ_LONG, out))
    sched.step()
    sched.step()
    assert len(sched.prefilling) == 1 and len(sched.prefilling[0].pending) > 2 * CHUNK
    sched.add(sequence(engine, short, out))
    step_until(sched, lambda: out["short"]["tokens"])
    assert [seq.pending != [] for seq in sched.prefilling] == [True]  # the long prompt is still being read
    assert out["read-long"]["tokens"] == []
    drain(sched)
    for key, result in alone.items():
        assert out[key]["tokens"] == result["tokens"], key
        assert out[key]["finish"] == result["finish"], key



def test_beside_a_long_prompt_a_short_one_is_read_whole_in_one_short_chunk(engine):
    """While prompts of different lengths are read together, a chunk reads no more than the shortest
    one's rest (at least MIN_PREFILL_CHUNK tokens): the short prompt is read at once, the long one
    only as far, and no row reads padding."""
    from mlx_lora.serve.scheduler import MIN_PREFILL_CHUNK

    short = {"id": "short", "prompt": "what is the capital of France? Answer briefly.", "adapter": "a",
             "max_tokens": 8}
    alone = run_alone(engine, [READ_LONG, short])
    out = {}
    sched = scheduler(engine, prefill_chunk=64, prefill_seconds=0)
    sched.add(sequence(engine, READ_LONG, out))
    sched.step()
    long_seq = sched.prefilling[0]
    before = len(long_seq.pending)
    assert before > 64  # still reading, 64 tokens a step
    sched.add(sequence(engine, short, out))
    reads = []
    original = sched._prefill.prompt
    sched._prefill.prompt = lambda chunks: reads.append([len(c) for c in chunks]) or original(chunks)
    sched.step()
    rest = len(engine.tokenizer.encode(short["prompt"])) - 1
    assert reads == [[max(rest, MIN_PREFILL_CHUNK), rest]] and rest < 64
    assert before - len(long_seq.pending) == max(rest, MIN_PREFILL_CHUNK)
    assert [seq.pending != [] for seq in sched.prefilling] == [True]  # the short one left the group
    drain(sched)
    assert {k: v["tokens"] for k, v in out.items()} == {k: v["tokens"] for k, v in alone.items()}

def test_a_cancelled_request_leaves_the_group_being_read_at_the_next_step(engine):
    """A client that goes away while its prompt is being read frees its place at once; the prompt read
    beside it goes on, its tokens unchanged."""
    other = {"id": "other", "prompt": LONG, "adapter": "a", "max_tokens": 6}
    alone = run_alone(engine, [other])
    out = {}
    sched = scheduler(engine, prefill_seconds=0)
    leaving = sequence(engine, READ_LONG, out)
    sched.add(leaving)
    sched.add(sequence(engine, other, out))
    sched.step()
    assert len(sched.prefilling) == 2
    leaving.cancel()
    sched.step()
    assert out["read-long"]["finish"] == "cancelled" and len(sched.prefilling) == 1
    assert sched.active() == 1
    drain(sched)
    assert out["other"]["tokens"] == alone["other"]["tokens"]


def test_prompt_cache_gives_identical_tokens_and_counts_cached_tokens(engine):
    turn1 = {"id": "t1", "prompt": LONG, "adapter": "a", "max_tokens": 6}
    plain = run_alone(engine, [turn1])
    follow = {"id": "t2", "prompt": LONG + engine.tokenizer.decode(plain["t1"]["tokens"]) + " and then", "adapter": "a"}
    other_adapter = {**follow, "id": "t2b", "adapter": "b"}
    reference = run_alone(engine, [follow, other_adapter])
    out = {}
    sched = scheduler(engine, prompt_cache_size=4)
    for spec in (turn1, follow, other_adapter):
        sched.add(sequence(engine, spec, out))
        drain(sched)
    assert out["t1"]["tokens"] == plain["t1"]["tokens"] and out["t1"]["cached"] == 0
    assert out["t2"]["tokens"] == reference["t2"]["tokens"]
    assert out["t2"]["cached"] > len(engine.tokenizer.encode(LONG)) // 2  # the first turn's prefix was reused
    assert out["t2b"]["cached"] == 0  # another adapter's KV is never reused
    assert out["t2b"]["tokens"] == reference["t2b"]["tokens"]
    # the very same prompt again: all but its last token come from the cache
    again = {}
    sched.add(sequence(engine, {**follow, "id": "t3"}, again))
    drain(sched)
    assert again["t3"]["tokens"] == reference["t2"]["tokens"]
    assert again["t3"]["cached"] == len(engine.tokenizer.encode(follow["prompt"])) - 1


def test_logprobs_are_normalised_and_rank_the_sampled_token(engine):
    events = []
    sched = scheduler(engine)
    out = {}
    seq = sequence(engine, SPECS[4], out)
    seq.on_token = lambda event: events.append(event) or False
    sched.add(seq)
    drain(sched)
    assert events and all(e.logprob <= 0 and len(e.top) == 3 for e in events)
    for e in events:  # greedy: the sampled token is the most likely one
        assert e.top[0][0] == e.token and abs(e.top[0][1] - e.logprob) < 1e-6
        assert e.top[0][1] >= e.top[1][1] >= e.top[2][1]
    assert 9 not in [e.token for e in events]  # logit_bias -100 bans it


PLAIN = [  # no row's logits depend on its accepted tokens: the scheduler decodes one step ahead
    {"id": "g-base", "prompt": "say hello", "adapter": None, "max_tokens": 4},
    {"id": "g-a", "prompt": LONG[:120], "adapter": "a", "max_tokens": 14},
    {"id": "s-b", "prompt": "what is the capital of France?", "adapter": "b", "max_tokens": 9,
     "params": {"temperature": 0.9, "seed": 3, "top_k": 30, "min_p": 0.01}},
    {"id": "g-b-logprobs", "prompt": "hello world", "adapter": "b", "max_tokens": 11,
     "params": {"logprobs": True, "top_logprobs": 2}},
]


def run_batch(engine, specs, run_ahead: bool, join_after: int = 0, **kwargs) -> tuple[dict, object]:
    """All `specs` in one scheduler; those after the first `join_after` join once the first ones decode."""
    out = {}
    sched = scheduler(engine, run_ahead=run_ahead, **kwargs)
    first, later = (specs[:join_after], specs[join_after:]) if join_after else (specs, [])
    for spec in first:
        sched.add(sequence(engine, spec, out))
    while later and not all(out[s["id"]]["tokens"] for s in first):
        sched.step()
    for spec in later:
        sched.add(sequence(engine, spec, out))
    drain(sched)
    return out, sched


def test_decoding_one_step_ahead_gives_the_tokens_of_step_by_step_decoding(engine):
    reference, sched = run_batch(engine, PLAIN, run_ahead=False)
    assert sched.ahead_steps == 0
    for join_after in (0, 2):  # rows leave while a step is in flight; newcomers merge into a running batch
        ahead, sched = run_batch(engine, PLAIN, run_ahead=True, join_after=join_after)
        assert sched.ahead_steps > 5  # the path under test really ran
        assert {k: (v["tokens"], v["finish"]) for k, v in ahead.items()} == \
            {k: (v["tokens"], v["finish"]) for k, v in reference.items()}


def test_a_row_leaving_while_a_step_is_in_flight_caches_exactly_what_it_was_fed(engine):
    short = {"id": "short", "prompt": LONG[:150], "adapter": "a", "max_tokens": 3}
    long = {"id": "long", "prompt": "say hello", "adapter": None, "max_tokens": 20}
    out, sched = run_batch(engine, [short, long], run_ahead=True, prompt_cache_size=4)
    assert sched.ahead_steps > 0
    follow = {"id": "follow", "prompt": short["prompt"] + engine.tokenizer.decode(out["short"]["tokens"]) + " then",
              "adapter": "a", "max_tokens": 8}
    reference = run_alone(engine, [follow])  # no prompt cache
    again = {}
    sched.add(sequence(engine, follow, again))
    drain(sched)
    assert again["follow"]["cached"] > len(engine.tokenizer.encode(short["prompt"])) // 2
    assert again["follow"]["tokens"] == reference["follow"]["tokens"]


def test_a_prefill_chunk_next_to_running_streams_is_sized_by_time(engine):
    # While others decode, a chunk takes about prefill_seconds at the rate the last one was read:
    # late in a long prompt on a CPU, prefill_chunk tokens took seconds, a gap in every stream.
    from mlx_lora.serve.scheduler import MIN_PREFILL_CHUNK

    sched = scheduler(engine, prefill_chunk=512, prefill_seconds=0.25)
    assert sched.prefill_size() == 4 * MIN_PREFILL_CHUNK  # the rate unknown: a small chunk measures it
    sched._prefill_rate = 400.0  # tokens/s; nobody decoding: 4 x 0.25 s is 400 tokens
    assert sched.prefill_size() == 400
    sched._prefill_rate = 4000.0
    assert sched.prefill_size() == 512  # at most prefill_chunk
    sched._prefill_rate = None
    out: dict = {}
    sched.add(sequence(engine, {"id": "running", "prompt": "hello there", "max_tokens": 40}, out))
    sched.step()
    sched.step()
    assert sched.running
    sched.add(sequence(engine, {"id": "long", "prompt": "bonjour " * 80, "max_tokens": 2}, out))
    sched.step()
    assert sched.prefilling and sched.prefill_size() <= 512
    sched._prefill_rate = 400.0  # tokens/s: 0.25 s is 100 tokens for the one row reading
    assert sched.prefill_size() == 100
    sched._prefill_rate = 10.0  # slower than the floor allows
    assert sched.prefill_size() == MIN_PREFILL_CHUNK
    sched.prefill_seconds = 0
    assert sched.prefill_size() == 512
    sched.prefill_seconds = 0.25
    sched._prefill_rate = None
    reads = []
    original = sched._prefill.prompt

    def slow_prompt(chunks):  # a slow machine: 4 ms a prompt token, so 0.25 s is ~62 tokens
        reads.append([len(c) for c in chunks])
        time.sleep(0.004 * sum(map(len, chunks)))
        return original(chunks)

    sched._prefill.prompt = slow_prompt
    drain(sched)
    assert len(reads) > 2 and all(r[0] <= 80 for r in reads)  # short chunks, not 512 at once
    assert out["long"]["finish"] and out["running"]["finish"]
    alone: dict = {}
    solo = scheduler(engine, prefill_chunk=512, prefill_seconds=0.25)
    solo.add(sequence(engine, {"id": "long", "prompt": "bonjour " * 80, "max_tokens": 2}, alone))
    drain(solo)
    assert alone["long"]["tokens"] == out["long"]["tokens"]  # chunking does not change what is generated


def test_prompt_cache_entries_do_not_keep_the_batch_buffers_alive(engine):
    """A leaving row's KV goes into the prompt cache as its own copy; computed lazily, that copy kept
    the whole batch's KV buffers (every row, every layer) alive until first used: memory the cache's
    byte bound does not see (the demo model: 263 MiB held for 29 MiB counted)."""
    import mlx.core as mx

    sched = scheduler(engine, prompt_cache_size=16)
    out = {}
    mx.synchronize()
    before = mx.get_active_memory()
    for i in range(8):
        sched.add(sequence(engine, {"id": i, "prompt": f"request {i} says hello there " * (1 + i), "max_tokens": 3 + 2 * i},
                           out))  # leaving one by one: each copy from another version of the buffers
    drain(sched)
    mx.synchronize()
    held = mx.get_active_memory() - before
    counted = sched.prompt_cache._n_bytes  # mlx-lm's LRUPromptCache's own count of its entries
    assert len(sched.prompt_cache) == 8 and counted > 0
    assert held < 1.5 * counted + (64 << 10), (held, counted)


def step_until(sched, done, limit: int = 200) -> None:
    for _ in range(limit):
        if done():
            return
        sched.step()
    raise AssertionError("the condition was not reached")


def until_one_leaves(engine, specs: list[dict], leaver: str, **kwargs):
    """A scheduler running `specs` together, stepped until sequence `leaver` finished: (it, their outputs)."""
    together = {}
    sched = scheduler(engine, **kwargs)
    for spec in specs:
        sched.add(sequence(engine, spec, together))
    step_until(sched, lambda: together[leaver]["finish"] is not None)
    return sched, together


HOLE_SPECS = [
    {"id": "leaves-first", "prompt": "say hello to the world", "adapter": "a", "max_tokens": 3},
    {"id": "long-seeded", "prompt": LONG[:120], "adapter": "b", "max_tokens": 16,
     "params": {"temperature": 0.9, "seed": 3, "top_p": 0.95}},
    {"id": "greedy-base", "prompt": "what is the capital of France?", "adapter": None, "max_tokens": 16},
]


def test_a_newcomer_takes_the_place_of_a_row_that_left_and_changes_no_one(engine):
    """A row that finishes leaves a hole; a newcomer whose KV is shorter than the batch so far is
    written into it (no copy of the others' KV); every sequence's tokens equal its run alone,
    including one whose prompt prefix comes from the prompt cache."""
    joiner = {"id": "joiner-cached", "prompt": "say hello to the world and then", "adapter": "a", "max_tokens": 6}
    alone = run_alone(engine, HOLE_SPECS + [joiner])
    sched, together = until_one_leaves(engine, HOLE_SPECS, "leaves-first", prompt_cache_size=4)
    assert len(sched.rows) == 3 and len(sched.running) == 2  # the row stays, as a hole
    sched.add(sequence(engine, joiner, together))
    step_until(sched, lambda: len(sched.running) == 3)
    assert len(sched.rows) == 3 and sched.holes_filled == 1 and sched.compactions == 0
    drain(sched)
    assert together["joiner-cached"]["cached"] > 0  # its prompt's start came from the prompt cache
    for key, result in alone.items():
        assert together[key]["tokens"] == result["tokens"], key
        assert together[key]["finish"] == result["finish"], key


def test_a_newcomer_longer_than_the_batch_so_far_is_appended_after_the_holes_go(engine):
    joiner = {"id": "joiner-long", "prompt": LONG, "adapter": None, "max_tokens": 5}
    specs = [HOLE_SPECS[0], HOLE_SPECS[2]]
    alone = run_alone(engine, specs + [joiner])
    sched, together = until_one_leaves(engine, specs, "leaves-first")
    sched.add(sequence(engine, joiner, together))
    step_until(sched, lambda: len(sched.running) == 2)
    assert len(sched.rows) == 2 and sched.holes_filled == 0 and sched.compactions == 1
    drain(sched)
    assert {k: v["tokens"] for k, v in together.items()} == {k: v["tokens"] for k, v in alone.items()}


def test_holes_no_one_takes_are_removed_after_a_few_steps(engine):
    from mlx_lora.serve.scheduler import HOLE_PATIENCE

    alone = run_alone(engine, HOLE_SPECS)
    sched, together = until_one_leaves(engine, HOLE_SPECS, "leaves-first")
    for _ in range(HOLE_PATIENCE - 1):
        assert len(sched.rows) == 3
        sched.step()
    sched.step()
    assert len(sched.rows) == 2 and sched.compactions == 1
    drain(sched)
    assert {k: v["tokens"] for k, v in together.items()} == {k: v["tokens"] for k, v in alone.items()}


def test_positions_no_row_needs_are_dropped_when_the_longest_row_leaves(engine):
    """The row with the longest prompt leaves and a short newcomer takes its place: the batch's KV
    then starts at the oldest position a row still attends to (the others' left padding shrinks)."""
    specs = [{"id": "long-leaves", "prompt": LONG[:150], "adapter": "b", "max_tokens": 3},
             {"id": "short-a", "prompt": "say hello to the world", "adapter": "a", "max_tokens": 14},
             {"id": "short-seeded", "prompt": "what is the capital of France?", "adapter": None, "max_tokens": 14,
              "params": {"temperature": 0.8, "seed": 9}}]
    joiner = {"id": "joiner", "prompt": "hello there", "adapter": "b", "max_tokens": 8}
    alone = run_alone(engine, specs + [joiner])
    sched, together = until_one_leaves(engine, specs, "long-leaves")
    before = sched._caches[0]._idx
    sched.add(sequence(engine, joiner, together))
    step_until(sched, lambda: len(sched.running) == 3)
    assert sched.holes_filled == 1 and sched.compactions == 0
    longest = max(len(seq.prompt) + len(seq.generated) for seq in sched.running)
    assert sched._caches[0]._idx < before and sched._caches[0]._idx <= longest
    drain(sched)
    assert {k: v["tokens"] for k, v in together.items()} == {k: v["tokens"] for k, v in alone.items()}


def test_more_holes_than_rows_left_are_removed_at_once_and_an_empty_batch_is_let_go(engine):
    """Compacting copies the rows that stay, a hole costs a row's share of every step: with more holes
    than rows the copy is done at once; when no row is left the batch's KV is dropped."""
    specs = [{"id": "a", "prompt": "say hello to the world", "adapter": "a", "max_tokens": 3},
             {"id": "b", "prompt": "what is the capital of France?", "adapter": None, "max_tokens": 3},
             {"id": "stays", "prompt": "hello there", "adapter": "b", "max_tokens": 9}]
    alone = run_alone(engine, specs)
    sched, together = until_one_leaves(engine, specs, "a")
    assert together["b"]["finish"] is not None  # both left at the same step
    assert len(sched.rows) == 1 and sched.compactions == 1
    drain(sched)
    assert sched.rows == [] and sched._caches == []
    assert {k: v["tokens"] for k, v in together.items()} == {k: v["tokens"] for k, v in alone.items()}


def test_under_a_kv_budget_holes_go_before_a_group_is_admitted(engine):
    """A group is read in caches of its own beside the batch: under a KV budget the batch's holes,
    which the budget does not count, are removed first."""
    specs = HOLE_SPECS
    joiner = {"id": "joiner", "prompt": "hello there", "adapter": "b", "max_tokens": 4}
    sched, together = until_one_leaves(engine, specs, "leaves-first", kv_tokens=10_000)
    assert len(sched.rows) == 3
    sched.add(sequence(engine, joiner, together))
    sched.step()
    assert len(sched.rows) <= len(sched.running) + len(sched.prefilling) and sched.compactions == 1
    drain(sched)
    assert {k: v["tokens"] for k, v in together.items()} == {k: v["tokens"] for k, v in run_alone(engine, specs + [joiner]).items()}


def test_a_short_prompt_read_beside_a_long_one_in_sliding_window_layers(tmp_path):
    """The same with Gemma 3's sliding-window layers (mlx-lm's rotating caches), the long prompt longer
    than the window: the short one leaves the group being read and both answer as they do alone."""
    pytest.importorskip("torch")
    from tiny_torch import make_family_dir

    from mlx_lora.serve.engine import Engine

    engine = Engine.from_source(str(make_family_dir(tmp_path / "gemma3", "gemma3_text",
                                                    overrides={"sliding_window": 8})), base_name="base")
    no_eos = {"logit_bias": {t: -100.0 for t in engine.tokenizer.eos_token_ids}}
    long = {"id": "long", "prompt": "say hello world " * 12, "adapter": None, "max_tokens": 12, "params": no_eos}
    short = {"id": "short", "prompt": "hello there", "adapter": None, "max_tokens": 12, "params": no_eos}
    alone = {}
    for spec in (long, short):
        sched = scheduler(engine, prefill_chunk=4, prefill_seconds=0)
        sched.add(sequence(engine, spec, alone))
        drain(sched)
    out = {}
    sched = scheduler(engine, prefill_chunk=4, prefill_seconds=0)
    sched.add(sequence(engine, long, out))
    for _ in range(3):
        sched.step()
    sched.add(sequence(engine, short, out))
    step_until(sched, lambda: out["short"]["tokens"])
    assert out["long"]["tokens"] == [] and len(sched.prefilling) == 1
    drain(sched)
    assert {k: v["tokens"] for k, v in out.items()} == {k: v["tokens"] for k, v in alone.items()}


def test_a_steps_tokens_are_streamed_before_the_next_step_is_queued_whole(engine, monkeypatch):
    """Step n+1 is built before step n's tokens are read; MLX's `async_eval` on all of it would hold the
    scheduler until step n+1 is nearly computed, so step n's tokens would reach the client a step late."""
    import mlx.core as mx

    sched = scheduler(engine)
    log = []
    queue = mx.async_eval

    def recording(*arrays):
        if sched._ahead is not None and len(arrays) == 1 and arrays[0] is sched._ahead.tokens:
            log.append("step queued")
        return queue(*arrays)

    monkeypatch.setattr(mx, "async_eval", recording)
    out = {}
    seq = sequence(engine, {"id": "s", "prompt": "count to ten", "max_tokens": 10}, out)
    on_token = seq.on_token
    seq.on_token = lambda event: log.append("token") or on_token(event)
    sched.add(seq)
    drain(sched)
    assert len(out["s"]["tokens"]) == 10 and sched.ahead_steps > 5
    # the j-th token is accepted once steps 1..j+1 are queued (its own and the next), never j+2
    queued_before = [log[:i].count("step queued") for i, what in enumerate(log) if what == "token"]
    assert queued_before == list(range(1, 11))


def test_a_leaving_rows_end_is_told_before_anything_queues_the_step_in_flight(engine, monkeypatch):
    """Queueing anything that depends on the step in flight (as the prompt cache's copy of a leaving row
    does) holds the scheduler for most of that step: the copy is queued after the step, at its end."""
    import mlx.core as mx

    sched = scheduler(engine, prompt_cache_size=4)
    log = []
    queue = mx.async_eval
    first_layers, primer = sched._first_layers, []

    def primed():
        primer[:] = [first_layers()]
        return primer[0]

    def recording(*arrays):
        whole = sched._ahead is not None and len(arrays) == 1 and arrays[0] is sched._ahead.tokens
        if primer and arrays and arrays[0] is primer[0]:
            log.append("first layers")
        elif whole:
            log.append("step")
        elif log and log[-1] == "first layers":
            log.append("something else")
        return queue(*arrays)

    monkeypatch.setattr(sched, "_first_layers", primed)
    monkeypatch.setattr(mx, "async_eval", recording)
    out = {}
    for spec in ({"id": "short", "prompt": "say hi", "max_tokens": 3}, {"id": "long", "prompt": "count", "max_tokens": 12}):
        sched.add(sequence(engine, spec, out))
    drain(sched)
    assert out["short"]["finish"] == "length" and len(sched.prompt_cache) == 2
    assert "something else" not in log and log.count("first layers") > 5


@pytest.mark.parametrize("rows", [1, 2])
def test_a_batch_whose_every_row_stops_at_once_while_a_step_is_in_flight(engine, rows):
    """Rows that stop on an end token (not foreseeable from max_tokens) leave while the next step is in
    flight; when none is left, that step goes with the batch and nothing fails."""
    specs = [{"id": i, "prompt": ["count to ten", "say hi"][i], "max_tokens": 12} for i in range(rows)]
    alone = run_alone(engine, specs)
    for spec in specs:
        spec["eos"] = alone[spec["id"]]["tokens"][3]
    out = {}
    sched = scheduler(engine)
    sched.eos_ids = {spec["eos"] for spec in specs}
    for spec in specs:
        sched.add(sequence(engine, spec, out))
    drain(sched)  # raised AttributeError when the batch emptied between building a step and queueing it
    for spec in specs:
        tokens = alone[spec["id"]]["tokens"]
        stop = min(i for i, t in enumerate(tokens) if t in sched.eos_ids)
        assert out[spec["id"]]["finish"] == "stop" and out[spec["id"]]["tokens"] == tokens[:stop]  # the end token unsent
    assert sched.idle() and sched.ahead_steps > 0
