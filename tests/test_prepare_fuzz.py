"""No input crashes the converter: arbitrary bytes and arbitrary JSON give either rows the loader accepts or a clean error."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_lora.prepare.cli import main

SUFFIXES = [".jsonl", ".json", ".csv", ".tsv", ".txt", ".jsonl.gz"]
KEYS = ["messages", "conversations", "instruction", "input", "output", "system", "prompt", "completion", "text",
        "role", "content", "from", "value", "tool_calls", "tools", "type"]
ROLE_WORDS = ["user", "assistant", "system", "tool", "human", "gpt", "developer", "robot", ""]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8) \
    | st.sampled_from(ROLE_WORDS)
# Values built from the format's own keys reach the deep validation paths, not just "unknown format".
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=5), max_leaves=20)


def convert(name: str, payload: bytes, *flags: str) -> None:
    """Run the CLI on one file; it must succeed with loader-valid rows or fail with exit 1 and one line."""
    from mlx_lora.data import row_format

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / name
        if name.endswith(".gz"):
            import gzip
            payload = gzip.compress(payload)
        source.write_bytes(payload)
        out, err = io.StringIO(), io.StringIO()
        code = main([str(source), "-o", str(Path(tmp) / "out"), "--valid-fraction", "0", "--test-fraction", "0", *flags],
                    stdout=out, stderr=err)
        if code == 1:
            assert err.getvalue().startswith("error: ") and err.getvalue().count("\n") == 1
            return
        assert code == 0
        for number, line in enumerate((Path(tmp) / "out" / "train.jsonl").read_text(encoding="utf-8").splitlines(), 1):
            row_format(json.loads(line), f"train.jsonl:{number}")  # raises if the training loader would refuse it


@SETTINGS
@given(suffix=st.sampled_from(SUFFIXES), payload=st.binary(max_size=300), skip=st.booleans())
def test_arbitrary_bytes(suffix, payload, skip):
    convert("data" + suffix, payload, *(["--skip-invalid"] if skip else []))


@SETTINGS
@given(records=st.lists(json_value, min_size=1, max_size=6), skip=st.booleans(),
       output=st.sampled_from(["chat", "completions", "text"]))
def test_arbitrary_json_records(records, skip, output):
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8", "surrogatepass")
    convert("data.jsonl", payload, "--output-format", output, *(["--skip-invalid"] if skip else []))


@SETTINGS
@given(document=json_value)
def test_arbitrary_json_document(document):
    convert("data.json", json.dumps(document).encode())


@SETTINGS
@given(turns=st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLE_WORDS), "content": json_leaf}), max_size=5),
       skip=st.booleans())
def test_near_valid_chats(turns, skip):
    payload = (json.dumps({"messages": turns}) + "\n" + json.dumps({"messages": turns[::-1]}) + "\n").encode()
    convert("data.jsonl", payload, *(["--skip-invalid"] if skip else []))


def test_deeply_nested_json_is_a_clean_error(tmp_path):
    convert("data.jsonl", b"[" * 100_000 + b"\n")
    convert("data.json", b"[" * 100_000)
    convert("data.jsonl", (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b",
                                       "tool_calls": "x"}], "tools": [[[[[]]]]]}) + "\n").encode())
