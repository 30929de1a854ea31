"""Over HTTP: the limits that protect the machine (429 + Retry-After, 400 naming the field) and
adding / removing adapters at run time without a restart, guarded by the API key and confined to
the configured folders."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

from test_serve import CHAT, greedy_reference, make_adapter, start_server

httpx = pytest.importorskip("httpx")
KEY = {"Authorization": "Bearer k"}


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_full_queue_gets_429_with_retry_after(tiny_model_dir):
    from mlx_lora.serve.engine import EngineLimits

    with start_server(tiny_model_dir, {}, engine_limits=EngineLimits(max_batch=1, max_queue=1)) as (url, engine):
        with httpx.Client(base_url=url, timeout=60) as client:
            body = {"prompt": "say hello", "max_tokens": 4}
            results = []
            with engine._model_lock:  # the worker cannot step, so the requests stay queued
                # one for the free batch slot and one waiting (max_queue 1) are taken; the next is refused
                waiters = [threading.Thread(target=lambda: results.append(client.post("/v1/completions", json=body)))
                           for _ in range(2)]
                for number, waiter in enumerate(waiters, 1):
                    waiter.start()
                    wait_until(lambda n=number: engine.queued() == n)
                refused = client.post("/v1/completions", json=body)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "queue_full"
            for waiter in waiters:
                waiter.join(60)
            assert [r.status_code for r in results] == [200, 200]  # both served once the worker runs


def test_prompt_plus_completion_over_the_context_is_400_naming_the_field(tiny_model_dir):
    from mlx_lora.serve.engine import EngineLimits

    with start_server(tiny_model_dir, {}, engine_limits=EngineLimits(max_context=64)) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            over = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 60})
            assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"
            assert "64" in over.json()["error"]["message"]
            # OpenAI's code, which client frameworks match to trim the history and retry
            assert over.json()["error"]["code"] == "context_length_exceeded"
            long_prompt = client.post("/v1/completions", json={"prompt": "hello world " * 80, "max_tokens": 1})
            assert long_prompt.status_code == 400 and long_prompt.json()["error"]["param"] == "prompt"
            assert long_prompt.json()["error"]["code"] == "context_length_exceeded"
            streamed = client.post("/v1/completions", json={"prompt": "hello world " * 80, "max_tokens": 1,
                                                            "stream": True})
            assert streamed.status_code == 400 and streamed.json()["error"]["code"] == "context_length_exceeded"
            assert client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 8}).status_code == 200


@pytest.fixture(scope="module")
def admin(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("allowed")
    make_adapter(tiny_model_dir, root / "c", seed=4)
    other = __import__("tiny").make_model_dir(tmp_path_factory.mktemp("wide"), hidden_size=32)
    make_adapter(other, root / "misfit", seed=5)
    shutil.copytree(tiny_model_dir, root / "not-an-adapter")
    shutil.copytree(root / "c", root / "broken")
    (root / "broken" / "adapter_config.json").write_text("{rank: 8")
    outside = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("outside") / "d", seed=6)
    (root / "link").symlink_to(outside)
    with start_server(tiny_model_dir, {}, api_key="k", adapter_dirs=(str(root),)) as (url, engine):
        with httpx.Client(base_url=url, timeout=60, headers=KEY) as client:
            yield client, engine, root


def test_adapter_added_and_removed_at_run_time(admin, tiny_model_dir):
    client, engine, root = admin
    base_weight = engine.model.model.layers[0].self_attn.q_proj.weight
    added = client.post("/v1/adapters", json={"name": "c", "path": "c"})
    assert added.status_code == 200, added.text
    assert [m["id"] for m in added.json()["data"]] == ["base", "c"]
    answer = client.post("/v1/chat/completions", json={"model": "c", "messages": CHAT, "max_tokens": 8}).json()
    assert answer["choices"][0]["message"]["content"] == greedy_reference(tiny_model_dir, root / "c", 8)
    assert engine.model.model.layers[0].self_attn.q_proj.linear.weight is base_weight  # the base was not reloaded
    assert client.delete("/v1/adapters/c").status_code == 200
    gone = client.post("/v1/chat/completions", json={"model": "c", "messages": CHAT})
    assert gone.status_code == 404 and "base" in gone.json()["error"]["message"]
    assert client.delete("/v1/adapters/c").status_code == 404
    base = client.post("/v1/chat/completions", json={"model": "base", "messages": CHAT, "max_tokens": 8}).json()
    assert base["choices"][0]["message"]["content"] == greedy_reference(tiny_model_dir, None, 8)


@pytest.mark.parametrize("path,status,words", [
    ("misfit", 400, ["do not fit", "self_attn.q_proj"]),  # lists the mismatched layers
    ("not-an-adapter", 400, ["adapter"]),
    ("../outside", 400, ["allowed"]),
    ("/etc", 400, ["allowed"]),
    ("link", 400, ["allowed"]),  # a symlink out of the allowed folder
    ("missing", 400, ["'missing' is no folder"]),  # inside the allowed folder: not "outside" it
    ("broken", 400, ["adapter_config.json:1:2", "not valid JSON"]),  # the file named, where it breaks
])
def test_bad_adapter_uploads_are_refused(admin, path, status, words):
    client, engine, _ = admin
    response = client.post("/v1/adapters", json={"name": "x", "path": path})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert all(word in error["message"] for word in words), error
    assert "x" not in engine.model_names()


def test_adapter_endpoints_need_the_key_and_configured_folders(admin, tiny_model_dir):
    client, _, _ = admin
    no_key = httpx.post(str(client.base_url) + "/v1/adapters", json={"name": "c", "path": "c"})
    assert no_key.status_code == 401
    assert httpx.delete(str(client.base_url) + "/v1/adapters/c").status_code == 401
    with start_server(tiny_model_dir, {}) as (url, _):
        off = httpx.post(url + "/v1/adapters", json={"name": "c", "path": str(tiny_model_dir)})
        assert off.status_code == 403 and json.loads(off.text)["error"]["param"] == "path"


def test_without_max_tokens_the_default_is_capped_to_the_context_left(tiny_model_dir):
    """The server's own default_max_tokens may not fit the context; the client asked for nothing, so no 400."""
    from mlx_lora.serve.engine import EngineLimits

    limits = EngineLimits(max_context=64)
    with start_server(tiny_model_dir, {}, engine_limits=limits, default_max_tokens=100) as (url, engine):
        eos = {str(t): -100 for t in engine.tokenizer.eos_token_ids}  # no early stop: runs to the cap
        with httpx.Client(base_url=url, timeout=60) as client:
            for extra in ({}, {"max_tokens": None}, {"max_completion_tokens": None}):
                response = client.post("/v1/chat/completions", json={"messages": CHAT, "logit_bias": eos, **extra})
                assert response.status_code == 200, response.text
                body = response.json()
                assert body["usage"]["total_tokens"] == 64 and body["choices"][0]["finish_reason"] == "length"
            text = client.post("/v1/completions", json={"prompt": "say hello", "logit_bias": eos})
            assert text.status_code == 200 and text.json()["usage"]["total_tokens"] == 64
            explicit = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 100})
            assert explicit.status_code == 400 and explicit.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("how", ["flags", "yaml", "yaml and flag"])
def test_an_adapter_name_given_twice_is_refused_at_start(tiny_model_dir, tmp_path, monkeypatch, capsys, how):
    """`--adapter pc=A --adapter pc=B` would serve only one of them: refused in one line naming both folders."""
    from mlx_lora.serve import cli

    started = []
    monkeypatch.setattr(cli, "serve", started.append)
    first, second = tmp_path / "one", tmp_path / "two"
    serve_yaml = tmp_path / "serve.yaml"
    if how == "flags":
        argv = ["--model", str(tiny_model_dir), "--adapter", f"pc={first}", "--adapter", f"pc={second}"]
    elif how == "yaml":
        serve_yaml.write_text(f"model: {tiny_model_dir}\nadapters:\n  pc: {first}\n  pc: {second}\n")
        argv = [str(serve_yaml)]
    else:
        serve_yaml.write_text(f"model: {tiny_model_dir}\nadapters:\n  pc: {first}\n")
        argv = [str(serve_yaml), "--adapter", f"pc={second}"]
    assert cli.main(argv) == 1 and started == []
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "adapter name 'pc' is used twice" in error
    assert str(first) in error and str(second) in error


def test_an_adapter_upload_with_an_unknown_field_is_refused_naming_it(admin):
    client, engine, _ = admin
    response = client.post("/v1/adapters", json={"name": "x", "pth": "c"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "pth" and "'path'" in error["message"]
    assert "x" not in engine.model_names()


def test_ctrl_c_ends_open_streams_and_exits_without_tracebacks(tiny_model_dir):
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MLX_LORA_NO_BLAS_PRELOAD="1")
    server = subprocess.Popen([sys.executable, "-m", "mlx_lora", "serve", "--model", str(tiny_model_dir),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: server.poll() is not None or _up(url), timeout=180)
        assert server.poll() is None, server.stderr.read()[-2000:]
        ends, started = [], [threading.Event(), threading.Event()]

        def stream(started: threading.Event):  # long enough to be running when Ctrl-C comes
            body = {"prompt": "say hello", "max_tokens": 470, "stream": True, "logit_bias": {"2": -100}}
            lines = []
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        started.set()
                        lines.append(line)
            ends.append((lines[-1], "shutting down" in lines[-2] or "cancelled" in lines[-2], len(lines)))

        clients = [threading.Thread(target=stream, args=(event,)) for event in started]
        for client, event in zip(clients, started):  # one after the other: both are running at Ctrl-C
            client.start()
            assert event.wait(60)
        server.send_signal(signal.SIGINT)
        for client in clients:
            client.join(30)
        code = server.wait(timeout=30)
        assert code in (0, 130), server.stderr.read()[-3000:]  # 130: the shell convention for an exit by Ctrl-C
        err = server.stderr.read()
        assert "Traceback" not in err and "CancelledError" not in err, err[-3000:]
        # each stream ended at once, properly: an error chunk saying why, then [DONE] (not after its 470 tokens)
        assert [(last, said) for last, said, _ in ends] == [("data: [DONE]", True)] * 2, ends
        assert all(count < 470 for _, _, count in ends)
    finally:
        if server.poll() is None:
            server.kill()


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_adapter_dirs_that_do_not_exist_are_refused_at_start(tmp_path):
    from mlx_lora.config import ConfigError
    from mlx_lora.serve.cli import load_serve_config

    with pytest.raises(ConfigError, match="adapter_dirs: .*nowhere is not a folder"):
        load_serve_config(None, [], {"adapter_dirs": (str(tmp_path / "nowhere"),)})


def test_cors_origins_are_checked_at_start():
    from mlx_lora.config import ConfigError
    from mlx_lora.serve.cli import load_serve_config

    assert load_serve_config(None, ["model=demo", "cors_origins=[http://myapp.local:3000, '*']"], {}).cors_origins == (
        "http://myapp.local:3000", "*")
    with pytest.raises(ConfigError, match=r"cors_origins: 'localhost:3000' is not an origin; write .* http://localhost:3000"):
        load_serve_config(None, ["model=demo", "cors_origins=localhost:3000"], {})


def test_a_port_in_use_is_said_before_the_model_loads():
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # it said "serving on ..." after loading, then uvicorn's error and exit 3
        done = subprocess.run([sys.executable, "-m", "mlx_lora", "serve", "--model", "/nowhere/model", "--port", str(port)],
                              capture_output=True, text=True, timeout=120, env=dict(os.environ, MLX_LORA_NO_BLAS_PRELOAD="1"))
    assert done.returncode == 1 and "serving on" not in done.stdout and "loading" not in done.stdout
    assert f"port {port} on 127.0.0.1" in done.stderr and "Traceback" not in done.stderr
