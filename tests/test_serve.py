"""The server over real HTTP on loopback with a tiny model and two adapters.

Helpers here (`make_adapter`, `start_server`) are shared by the other serve/fuse/client tests.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

CHAT = [{"role": "user", "content": "say hello"}]


def make_adapter(model_dir: Path, folder: Path, seed: int, magnitude: float = 0.5) -> Path:
    """A trained-looking adapter: LoRA on every projection with random B (so it changes the answers)."""
    import mlx.core as mx

    from mlx_lora.adapters import adapter_config, save_adapters
    from mlx_lora.config import LoraConfig
    from mlx_lora.lora import apply_lora, lora_layers
    from mlx_lora.models import load_model

    model, _, _ = load_model(str(model_dir))
    lora = LoraConfig(rank=4, alpha=8)
    keys = apply_lora(model, lora)
    mx.random.seed(seed)
    for _, layer in lora_layers(model):
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * magnitude
    save_adapters(folder, model, adapter_config(lora, keys, len(model.layers), {"model": str(model_dir)}))
    return Path(folder)


@contextmanager
def start_server(model_dir: Path, adapters: dict, engine_limits=None, failed_steps: int = 0, **limits):
    """(base url, engine) of a live server on a free loopback port; stops it on exit, checking that no
    generation step failed (a failed step answers its requests with 500s and is otherwise only logged)."""
    from mlx_lora.serve.app import ServerLimits, ServerThread, create_app
    from mlx_lora.serve.engine import Engine

    engine = Engine.from_source(str(model_dir), adapters, base_name="base", limits=engine_limits)
    limits = {"max_tokens": 4096, "default_max_tokens": 16, **limits}
    with ServerThread(create_app(engine, ServerLimits(**limits))) as url:
        yield url, engine
    assert engine._thread is None  # the app's shutdown stopped the generation worker
    assert engine.failed_steps == failed_steps, engine.last_error


def greedy_reference(model_dir: Path, adapter: Path | None, max_tokens: int) -> str:
    """What mlx-lm generates greedily from base (+ adapter) loaded the ordinary way."""
    from mlx_lm.generate import generate

    from mlx_lora.adapters import load_adapters
    from mlx_lora.models import load_model

    model, tokenizer, _ = load_model(str(model_dir))
    if adapter is not None:
        load_adapters(model, adapter)
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    return generate(model, tokenizer, prompt, max_tokens=max_tokens)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("adapters")
    return {"a": make_adapter(tiny_model_dir, root / "a", seed=1), "b": make_adapter(tiny_model_dir, root / "b", seed=2)}


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters):
    with start_server(tiny_model_dir, adapters) as (url, engine):
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, engine


def chat(client, model: str, max_tokens: int = 8, **extra) -> dict:
    response = client.post("/v1/chat/completions", json={"model": model, "messages": CHAT, "max_tokens": max_tokens, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_models_and_health(server):
    client, _ = server
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "a", "b"]
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["models"] == ["base", "a", "b"]
    assert "/v1/chat/completions" in client.get("/openapi.json").json()["paths"]


def test_each_adapter_answers_like_its_own_model_without_reloading_the_base(server, tiny_model_dir, adapters):
    client, engine = server
    base_weight = engine.model.model.layers[0].self_attn.q_proj.linear.weight
    answers = {name: chat(client, name)["choices"][0]["message"]["content"] for name in ("base", "a", "b", "a", "base")}
    assert len({answers["base"], answers["a"], answers["b"]}) == 3
    assert answers["a"] == greedy_reference(tiny_model_dir, adapters["a"], 8)
    assert answers["base"] == greedy_reference(tiny_model_dir, None, 8)
    # switching adapters touched no base weight: the very same array object is still in place
    assert engine.model.model.layers[0].self_attn.q_proj.linear.weight is base_weight


def test_chat_response_shape_usage_and_length(server):
    client, _ = server
    body = chat(client, "a", max_tokens=3)
    assert body["object"] == "chat.completion" and body["model"] == "a"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["role"] == "assistant"
    usage = body["usage"]
    assert usage["completion_tokens"] == 3 and usage["total_tokens"] == usage["prompt_tokens"] + 3


def test_max_completion_tokens_wins(server):
    client, _ = server
    body = chat(client, "a", max_tokens=9, max_completion_tokens=2)
    assert body["usage"]["completion_tokens"] == 2


def read_sse(client, path: str, body: dict) -> list:
    events = []
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line and not line.startswith(":"):  # ":" starts an SSE comment (the server's keep-alive)
                assert line.startswith("data: ")
                events.append(line[len("data: "):])
    return events


def test_stream_equals_non_stream_and_ends_with_done(server):
    client, _ = server
    expected = chat(client, "b", max_tokens=6)["choices"][0]["message"]["content"]
    events = read_sse(client, "/v1/chat/completions", {"model": "b", "messages": CHAT, "max_tokens": 6, "stream": True,
                                                       "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_completions_and_stop(server):
    client, _ = server
    body = {"model": "a", "prompt": "say hello", "max_tokens": 12}
    full = client.post("/v1/completions", json=body).json()
    text = full["choices"][0]["text"]
    assert full["object"] == "text_completion" and full["choices"][0]["finish_reason"] == "length"
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = client.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.find(stop)]
    streamed = read_sse(client, "/v1/completions", {**body, "stop": stop, "stream": True})
    assert "".join(json.loads(e)["choices"][0]["text"] for e in streamed[:-1]) == cut["text"]


def test_seeded_sampling_is_repeatable(server):
    client, _ = server
    first = chat(client, "a", max_tokens=8, temperature=1.0, seed=7)["choices"][0]["message"]["content"]
    assert chat(client, "a", max_tokens=8, temperature=1.0, seed=7)["choices"][0]["message"]["content"] == first


BAD_REQUESTS = [
    ("not json", b"{bad", 400),
    ("a list", b"[]", 400),
    ("no messages", json.dumps({"model": "a"}), 400),
    ("empty messages", json.dumps({"messages": []}), 400),
    ("wrong type", json.dumps({"messages": CHAT, "max_tokens": "many"}), 400),
    ("bad role", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), 400),
    ("temperature out of range", json.dumps({"messages": CHAT, "temperature": 9}), 400),
    ("n is 2", json.dumps({"messages": CHAT, "n": 2}), 400),
    ("over the max_tokens cap", json.dumps({"messages": CHAT, "max_tokens": 10**6}), 400),
    ("five stops", json.dumps({"messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}), 400),
    ("unknown model", json.dumps({"model": "nope", "messages": CHAT}), 404),
    ("a path as model", json.dumps({"model": "/etc/passwd", "messages": CHAT}), 404),
    ("too large", b'{"messages": "' + b"x" * 1_100_000 + b'"}', 413),
]


@pytest.mark.parametrize("name,body,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(server, name, body, status):
    client, _ = server
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_api_key(tiny_model_dir):
    with start_server(tiny_model_dir, {}, api_key="sekret") as (url, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/v1/models").status_code == 401
            wrong = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
            assert client.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
            assert client.get("/health").json() == {"status": "ok"}  # up, without naming what it serves
            keyed = client.get("/health", headers={"Authorization": "Bearer sekret"}).json()
            assert keyed["status"] == "ok" and keyed["models"] == ["base"]


def test_a_body_that_is_not_utf8_is_named_in_one_line(server):
    client, _ = server
    body = b'{"model": "a", "messages": [{"role": "user", "content": "caf\xe9"}]}'  # Latin-1, not UTF-8
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (f"the body is not UTF-8 (byte 0xe9 at offset {body.index(0xe9)}): "
                                                   "send the JSON encoded as UTF-8")


def test_browser_pages_from_this_machine_may_call_others_may_not(tiny_model_dir):
    from mlx_lora.serve.cli import LOCAL_ORIGINS

    with start_server(tiny_model_dir, {}, cors_origins=LOCAL_ORIGINS) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
            for origin in ("http://localhost:3000", "http://127.0.0.1", "http://[::1]:8080"):
                answer = client.options("/v1/chat/completions", headers={"Origin": origin, **preflight})
                assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == origin
            for origin in ("https://evil.example", "http://localhost.evil.example", "http://127.0.0.1.nip.io"):
                answer = client.options("/v1/chat/completions", headers={"Origin": origin, **preflight})
                assert answer.status_code == 400 and "access-control-allow-origin" not in answer.headers
            simple = client.get("/v1/models", headers={"Origin": "http://localhost:5173"})
            assert simple.headers["access-control-allow-origin"] == "http://localhost:5173"
    with start_server(tiny_model_dir, {}, cors_origins=("*",)) as (url, _):
        answer = httpx.get(url + "/v1/models", headers={"Origin": "https://any.example"}, timeout=60)
        assert answer.headers["access-control-allow-origin"] in ("*", "https://any.example")


def test_concurrent_clients_all_get_their_answers(server):
    client, _ = server
    expected = {m: chat(client, m, max_tokens=5)["choices"][0]["message"]["content"] for m in ("a", "b")}
    results, errors = [], []

    def worker(model):
        try:
            results.append((model, chat(client, model, max_tokens=5)["choices"][0]["message"]["content"]))
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=("ab"[i % 2],)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(results) == 12
    assert all(text == expected[model] for model, text in results)


def test_client_disconnect_stops_generation(server):
    client, engine = server
    max_tokens = 480  # within the tiny model's 512-token context
    body = {"model": "base", "prompt": "say hello", "max_tokens": max_tokens, "stream": True,
            "logit_bias": {str(i): -100 for i in engine.tokenizer.eos_token_ids}}  # it would run to max_tokens
    with paced(engine):
        with client.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break  # got a token; leaving the block closes the connection
        done = finished_with(engine, max_tokens)
    assert done and done[-1]["finish_reason"] == "cancelled"
    assert done[-1]["completion_tokens"] < max_tokens
    assert engine.running() == 0  # the batch slot is free again


@contextmanager
def paced(engine, seconds: float = 0.005):
    """Each model step takes at least `seconds` longer: ~470 tokens then need > 2 s on any machine,
    where the tiny model alone can finish them before a client's disconnect is seen."""
    forward = engine.scheduler.forward

    def slower(*args):
        time.sleep(seconds)
        return forward(*args)

    engine.scheduler.forward = slower
    try:
        yield
    finally:
        engine.scheduler.forward = forward


def finished_with(engine, max_tokens: int, timeout: float = 30.0) -> list[dict]:
    """The engine's history entries of requests for `max_tokens` tokens, once there is one (or [] at the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [h for h in engine.history if h["max_tokens"] == max_tokens]
        if done:
            return done
        time.sleep(0.05)
    return []


def test_a_non_streamed_client_that_goes_away_stops_its_generation_while_tokens_flow(server):
    client, engine = server
    max_tokens = 470
    body = {"model": "base", "prompt": "say hello", "max_tokens": max_tokens,
            "logit_bias": {str(i): -100 for i in engine.tokenizer.eos_token_ids}}  # it would run to max_tokens
    started = time.monotonic()
    with paced(engine):
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.4))
        done = finished_with(engine, max_tokens)
    assert done and done[-1]["finish_reason"] == "cancelled", done
    assert done[-1]["completion_tokens"] < max_tokens
    assert engine.running() == 0 and time.monotonic() - started < 30


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_end_with_the_text_a_stop_string_cut(server, stream):
    client, _ = server
    full = chat(client, "base", max_tokens=24, logprobs=True)["choices"][0]
    text, all_tokens = full["message"]["content"], [t["token"] for t in full["logprobs"]["content"]]
    assert len(text) > 12, text
    stop = text[8:12]  # the answer cut after 8 characters; the tokens that complete the stop are generated
    body = {"model": "base", "messages": CHAT, "max_tokens": 24, "logprobs": True, "stop": [stop]}
    if stream:
        content, tokens, usage = "", [], None
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    for choice in chunk["choices"]:
                        content += choice["delta"].get("content") or ""
                        tokens += [t["token"] for t in (choice.get("logprobs") or {}).get("content") or []]
    else:
        reply = chat(client, "base", **{k: v for k, v in body.items() if k not in ("model", "messages")})
        usage, choice = reply["usage"], reply["choices"][0]
        content, tokens = choice["message"]["content"], [t["token"] for t in choice["logprobs"]["content"]]
    assert content == text[:text.find(stop)]
    assert tokens and tokens == all_tokens[:len(tokens)]  # the same greedy tokens, in order...
    assert len(tokens) < usage["completion_tokens"]  # ...without those whose text the stop string cut


@pytest.mark.parametrize("path,body,param,words", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "txt": "hi"}]}]},
     "messages.0.content.0.txt", ["did you mean 'text'"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content.0", ["only text content parts are supported", "image_url"]),
    ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt", ["token-id prompts are not supported"]),
])
def test_a_bad_value_inside_a_union_is_named_by_the_member_it_was_meant_for(server, path, body, param, words):
    client, _ = server
    response = client.post(path, json={"model": "base", "max_tokens": 2, **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param, error
    assert all(word in error["message"] for word in words), error
    assert "str" not in error["param"].split(".") and "[" not in error["param"]


@pytest.mark.parametrize("field,value", [("max_tokens", "3"), ("stream", "yes"), ("temperature", "0.5"),
                                         ("max_tokens", 2.5), ("logprobs", 1)])
def test_a_value_of_the_wrong_json_type_is_refused_naming_its_field(server, field, value):
    client, _ = server
    response = client.post("/v1/chat/completions", json={"model": "base", "messages": CHAT, field: value})
    assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text


def test_negative_seeds_are_accepted_and_reproducible(server):
    client, _ = server
    answers = [chat(client, "base", max_tokens=6, temperature=1.0, seed=seed)["choices"][0]["message"]["content"]
               for seed in (-5, -5, 2**63 - 1, -2**63)]
    assert answers[0] == answers[1]


def test_stop_matcher_holds_back_partial_stops():
    from mlx_lora.serve.text import StopMatcher

    matcher = StopMatcher(["END"])
    assert matcher.feed("abcE") == ("abc", False)
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("Dxyz") == ("", True)
    matcher = StopMatcher(["END"])
    assert matcher.feed("abE") == ("ab", False)
    assert matcher.feed("x") == ("Ex", False)
    assert matcher.flush() == ""


def test_adapter_that_does_not_fit_is_refused(tiny_model_dir, tmp_path):
    from mlx_lora.serve.engine import Engine

    other = __import__("tiny").make_model_dir(tmp_path / "wide", hidden_size=32)
    wrong = make_adapter(other, tmp_path / "wrong", seed=3)
    with pytest.raises(ValueError, match="does not fit"):
        Engine.from_source(str(tiny_model_dir), {"wrong": wrong})
    with pytest.raises(ValueError, match="adapter name"):
        Engine.from_source(str(tiny_model_dir), {"../etc": wrong})


NULL_BODIES = json.loads((Path(__file__).parent / "cases" / "server_null_params.json").read_text())


@pytest.mark.parametrize("case", sorted(NULL_BODIES))
def test_null_means_default(server, case):
    """A user's failing bodies (shared case server_null_params): `null` for an optional field is its default."""
    client, _ = server
    body = NULL_BODIES[case]
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    defaults = client.post(path, json={k: v for k, v in body.items() if v is not None}).json()
    assert response.json()["choices"] == defaults["choices"]


def test_n_above_one_is_refused_naming_n(server):
    client, _ = server
    response = client.post("/v1/chat/completions", json={"messages": CHAT, "n": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


@pytest.mark.parametrize("path,field,suggestion", [
    ("/v1/chat/completions", "temprature", "temperature"),
    ("/v1/chat/completions", "frobnicate", None),
    ("/v1/chat/completions", "suffix", None),  # OpenAI's, but only for /v1/completions
    ("/v1/completions", "reasoning_effort", None),  # OpenAI's, but only for chat
    ("/v1/completions", "max_token", "max_tokens"),
])
def test_unknown_fields_are_refused_naming_them(server, path, field, suggestion):
    """A field that is neither OpenAI's (for that endpoint) nor ours gets OpenAI's 400, never silence."""
    client, _ = server
    body = {"messages": CHAT} if "chat" in path else {"prompt": "say hello"}
    response = client.post(path, json={**body, "max_tokens": 2, field: 0.1})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"
    expected = f"Unrecognized request argument supplied: {field}"
    assert error["message"] == (expected if suggestion is None else f"{expected} (did you mean '{suggestion}'?)")


def test_openai_fields_we_do_not_act_on_are_accepted_and_named(server, caplog):
    """`user`, `store`, ... from real clients: 200, the same answer, and named in a header and the server log."""
    client, _ = server
    plain = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4})
    assert plain.status_code == 200 and "x-ignored-fields" not in plain.headers
    ignored = {"user": "u-1", "store": False, "metadata": {"k": "v"}, "parallel_tool_calls": False,
               "prediction": {"type": "content", "content": "hi"}, "service_tier": None}  # null: not given
    with caplog.at_level("WARNING", logger="mlx_lora.serve"):
        response = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4, **ignored})
    assert response.status_code == 200, response.text
    assert response.headers["x-ignored-fields"] == "metadata, parallel_tool_calls, prediction, store, user"
    assert response.json()["choices"] == plain.json()["choices"]
    assert any("prediction" in record.getMessage() for record in caplog.records)
    streamed = client.post("/v1/completions", json={"prompt": "say hello", "max_tokens": 2, "stream": True,
                                                   "best_of": 1, "suffix": "!"})
    assert streamed.status_code == 200 and streamed.headers["x-ignored-fields"] == "best_of, suffix"


def test_a_failing_generation_step_answers_500_and_the_server_goes_on(tiny_model_dir):
    # a model that raises inside a step (a broken export, an out-of-range cache index) must not leave
    # every later request waiting forever behind a dead worker
    with start_server(tiny_model_dir, {}, failed_steps=1) as (url, engine):
        forward, calls = engine.scheduler.forward, []

        def failing_once(*args):
            calls.append(1)
            if len(calls) == 1:
                raise IndexError("list index out of range")
            return forward(*args)

        engine.scheduler.forward = failing_once
        with httpx.Client(base_url=url, timeout=60) as client:
            body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            failed = client.post("/v1/chat/completions", json=body)
            assert failed.status_code == 500 and "IndexError" in failed.json()["error"]["message"]
            health = client.get("/health").json()
            assert health["status"] == "degraded" and health["failed_steps"] == 1 and "IndexError" in health["last_error"]
            assert client.post("/v1/chat/completions", json=body).status_code == 200  # the worker went on
            streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
            assert streamed.status_code == 200 and "[DONE]" in streamed.text
