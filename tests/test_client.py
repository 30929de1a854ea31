"""test_mlx.py against a running server: answers, timings, exact match, JSON output, a server that is down."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_serve import make_adapter, start_server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    adapter = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "a", seed=1)
    with start_server(tiny_model_dir, {"tuned": adapter}) as (url, _):
        yield url + "/v1"


def test_scores_a_test_split(live, tiny_data_dir, tmp_path, capsys):
    from mlx_lora.serve.client import main

    out = tmp_path / "results.json"
    code = main(["--base-url", live, "--prompts", str(tiny_data_dir / "test.jsonl"), "--model", "tuned",
                 "--limit", "3", "--max-tokens", "4", "--stream", "--concurrency", "2", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "exact match:" in printed and "tok/s" in printed
    data = json.loads(out.read_text())
    assert data["model"] == "tuned" and data["summary"]["prompts"] == 3 and data["summary"]["errors"] == 0
    assert all(r["ttft_s"] is not None and r["reference"] for r in data["results"])
    assert 0.0 <= data["summary"]["exact_match"] <= 1.0


def test_exact_match_counts_matches(live, tmp_path):
    """A reference equal to the server's own greedy answer scores 100%, a wrong one 0%."""
    from mlx_lora.serve.client import Client, PromptCase, run_all, summarize

    client = Client(live)
    answer = client.run(PromptCase(prompt="say hello"), "base", 4, stream=False).answer
    cases = [PromptCase(prompt="say hello", reference=f"  {answer} "), PromptCase(prompt="say hello", reference="zzz")]
    results, wall = run_all(client, cases, client.models()[0], 4, stream=False, concurrency=2)
    assert [r.match for r in results] == [True, False]
    assert summarize(results, wall)["exact_match"] == 0.5


def test_script_with_server_down_gives_a_clear_error(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    from mlx_lora.serve.app import free_port

    result = subprocess.run([sys.executable, str(ROOT / "test_mlx.py"), "--base-url",
                             f"http://127.0.0.1:{free_port()}/v1", "--prompts", str(prompts)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 1
    assert "cannot reach the server" in result.stderr and "Traceback" not in result.stderr


def test_read_prompts_formats(tmp_path):
    from mlx_lora.serve.client import read_prompts

    path = tmp_path / "p.jsonl"
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"prompt": "p", "completion": "c"}, "bare"]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cases = read_prompts(path)
    assert [(c.messages, c.prompt, c.reference) for c in cases] == [
        ([{"role": "user", "content": "q"}], None, "a"), (None, "p", "c"), (None, "bare", None)]
    path.write_text("{oops\n")
    with pytest.raises(ValueError, match=":1: invalid JSON"):
        read_prompts(path)


def test_preference_pairs_are_scored_against_the_chosen_answer(tmp_path):
    from mlx_lora.serve.client import read_prompts

    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in (
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"messages": [{"role": "user", "content": "3+3?"}], "chosen": [{"role": "assistant", "content": "6"}],
         "rejected": [{"role": "assistant", "content": "7"}]})) + "\n")
    cases = read_prompts(path)
    assert [(c.reference, c.from_pair) for c in cases] == [("4", True), ("6", True)]
