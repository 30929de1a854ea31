"""The KV-cache memory budget: bytes per token from the memory planner against a real mlx-lm cache,
a batch that never outgrows its budget, and the 400 / 429 a client gets when it would."""

from __future__ import annotations

import threading

import pytest

from test_serve import CHAT, start_server
from test_serve_admin import wait_until
from test_serve_batching import SPECS, drain, scheduler, sequence

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from mlx_lora.serve.engine import Engine

    return Engine.from_source(str(tiny_model_dir), base_name="base")


def test_planner_kv_bytes_per_token_equal_a_real_cache(engine):
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(engine.model)
    tokens = 37
    engine.rows.set([0])
    engine.model(mx.array([list(range(5, 5 + tokens))], dtype=mx.int32), cache=cache)
    held = sum(layer.keys[:, :, : layer.offset].nbytes + layer.values[:, :, : layer.offset].nbytes for layer in cache)
    assert held == tokens * engine.kv_bytes_per_token
    assert engine.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # 2 layers x (K, V) x 2 kv heads x head_dim 16 x float32


def test_the_batch_stays_within_its_kv_budget_and_answers_are_unchanged(engine):
    free = {}
    sched = scheduler(engine)
    specs = [{**spec, "max_tokens": 10} for spec in SPECS[:4]]
    for spec in specs:
        sched.add(sequence(engine, spec, free))
    drain(sched)
    longest = max(len(engine.tokenizer.encode(s["prompt"])) + 10 for s in specs)
    budget_tokens = 2 * (longest + 256)  # room for two rows of the longest request
    out, rows, slots = {}, [], []
    sched = scheduler(engine, kv_tokens=budget_tokens)
    for spec in specs:
        sched.add(sequence(engine, spec, out))
    while not sched.idle():
        sched.step()
        rows.append(sched.active())
        slots.append(sum(c.keys.shape[0] * c.keys.shape[2] for c in sched._caches[:1] if c.keys is not None))
    assert max(rows) == 2 and max(slots) <= budget_tokens  # allocated KV slots (rows x length) of layer 0
    assert {k: v["tokens"] for k, v in out.items()} == {k: v["tokens"] for k, v in free.items()}


def test_a_request_that_never_fits_gets_400_and_a_full_queue_429(tiny_model_dir):
    from mlx_lora.serve.engine import Engine, EngineLimits

    probe = Engine.from_source(str(tiny_model_dir), base_name="base")
    budget = probe.kv_bytes_per_token * (256 + 150)  # one sequence of up to 150 tokens at a time
    limits = EngineLimits(max_queue=1, kv_budget_bytes=budget)
    with start_server(tiny_model_dir, {}, engine_limits=limits) as (url, engine):
        assert engine.scheduler.kv_tokens == 256 + 150
        with httpx.Client(base_url=url, timeout=60) as client:
            over = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 200})
            assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"
            assert "KV-cache budget" in over.json()["error"]["message"]
            eos = sorted(engine.tokenizer.eos_token_ids)[0]
            body = {"messages": CHAT, "max_tokens": 130, "logit_bias": {str(eos): -100}}  # runs all 130 steps
            results = []
            with engine._model_lock:  # the worker waits, so the order below is certain
                first = threading.Thread(target=lambda: results.append(client.post("/v1/chat/completions", json=body)))
                first.start()
                wait_until(lambda: engine.queued() == 1)
            wait_until(lambda: engine.running() == 1)
            second = threading.Thread(target=lambda: results.append(client.post("/v1/chat/completions", json=body)))
            second.start()
            # the second waits in the scheduler's queue: two rows would pass the KV budget
            wait_until(lambda: engine.scheduler.queued() == 1 and engine.running() == 1, timeout=10)
            refused = client.post("/v1/chat/completions", json=body)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            first.join(120)
            second.join(120)
            assert [r.status_code for r in results] == [200, 200]


def test_kv_memory_setting():
    from mlx_lora.config import ConfigError
    from mlx_lora.serve.cli import load_serve_config
    from mlx_lora.serve.engine import kv_budget

    assert kv_budget("none") is None and kv_budget("512MB") == 512_000_000 and kv_budget("auto") > 0
    with pytest.raises(ValueError, match="kv_memory"):
        kv_budget("lots")
    with pytest.raises(ConfigError, match="kv_memory"):
        load_serve_config(None, ["model=demo", "kv_memory=lots"], {})
    assert load_serve_config(None, ["model=demo", "kv_memory=2GB"], {}).kv_memory == "2GB"


def test_sliding_window_layers_are_counted_at_their_window(tmp_path):
    """Gemma 3 keeps 5 of every 6 layers in a sliding window (mlx-lm's RotatingKVCache): the budget
    counts those at window + one prefill chunk, so it admits what really fits, and the memory the
    batch's caches hold stays within it."""
    pytest.importorskip("torch")
    import mlx.core as mx
    from tiny_torch import make_family_dir

    from mlx_lora.serve.engine import Engine

    folder = make_family_dir(tmp_path / "gemma3", "gemma3_text", overrides={"sliding_window": 8})
    engine = Engine.from_source(str(folder), base_name="base")
    assert engine.kv_windows == (8, 8, 8, 8, 8, None)
    specs = [{"id": f"s{i}", "prompt": "say hello world " * (i + 2), "adapter": None, "max_tokens": 40,
              "params": {"logit_bias": {t: -100.0 for t in engine.tokenizer.eos_token_ids}}} for i in range(3)]
    alone = {}
    for spec in specs:
        sched = scheduler(engine, prefill_chunk=4)
        sched.add(sequence(engine, spec, alone))
        drain(sched)
    longest = max(len(engine.tokenizer.encode(s["prompt"])) + 40 for s in specs)
    full = longest + 256
    row = -(-(5 * (8 + 4) + full) // 6)  # five windowed layers and one full layer, per row
    budget = 3 * row
    assert budget < 2 * full  # counting every layer in full, only one row would have fitted
    out, rows, held = {}, [], []
    sched = scheduler(engine, prefill_chunk=4, kv_tokens=budget, kv_windows=engine.kv_windows)
    assert sched.row_slots(longest) == row
    for spec in specs:
        sched.add(sequence(engine, spec, out))
    while not sched.idle():
        sched.step()
        rows.append(sched.active())
        held.append(sum(c.keys.nbytes + c.values.nbytes for c in sched._caches if getattr(c, "keys", None) is not None))
    mx.eval(mx.zeros(1))
    assert max(rows) == 3
    assert max(held) <= budget * engine.kv_bytes_per_token
    assert {k: v["tokens"] for k, v in out.items()} == {k: v["tokens"] for k, v in alone.items()}


def test_without_max_tokens_the_default_is_capped_to_the_kv_budget(tiny_model_dir):
    from mlx_lora.serve.engine import Engine, EngineLimits

    probe = Engine.from_source(str(tiny_model_dir), base_name="base")
    limits = EngineLimits(kv_budget_bytes=probe.kv_bytes_per_token * (256 + 40))
    with start_server(tiny_model_dir, {}, engine_limits=limits, default_max_tokens=200) as (url, engine):
        eos = {str(t): -100 for t in engine.tokenizer.eos_token_ids}  # no early stop: runs to the cap
        with httpx.Client(base_url=url, timeout=60) as client:
            response = client.post("/v1/chat/completions", json={"messages": CHAT, "logit_bias": eos})
            assert response.status_code == 200, response.text
            usage = response.json()["usage"]
            assert usage["completion_tokens"] == engine.scheduler.most_tokens_alone(usage["prompt_tokens"]) > 0
            explicit = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 200})
            assert explicit.status_code == 400 and "KV-cache budget" in explicit.json()["error"]["message"]
