"""data_transform.py / mlx_lora.prepare: every input format converts to the expected rows, and the report adds up."""

from __future__ import annotations

import csv
import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_lora.prepare import PrepareOptions, TransformError, prepare
from mlx_lora.prepare.cli import main
from mlx_lora.prepare.writer import write_atomic

ROOT = Path(__file__).resolve().parent.parent
ALL_TRAIN = ["--valid-fraction", "0", "--test-fraction", "0"]  # every row lands in train.jsonl, in shuffled order


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def convert_all(tmp_path: Path, source: Path, *flags: str) -> list[dict]:
    """Convert with every row in train, returning the rows in input order (train is shuffled)."""
    out = tmp_path / "out"
    code, _, err = run_cli(source, "-o", out, *ALL_TRAIN, "--no-dedupe", *flags)
    assert code == 0, err
    rows = read_rows(out / "train.jsonl")
    return rows


def same_rows(a: list[dict], b: list[dict]) -> bool:
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    return sorted(map(key, a)) == sorted(map(key, b))


# --- formats ------------------------------------------------------------------------------------

def test_alpaca_with_and_without_input_and_system(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say bye.", "output": "bye", "system": "Be brief."},
    ])
    rows = convert_all(tmp_path, source)
    assert same_rows(rows, [
        {"messages": [{"role": "user", "content": "Translate.\n\nchat"}, {"role": "assistant", "content": "cat"}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say bye."},
                      {"role": "assistant", "content": "bye"}]},
    ])


def test_alpaca_to_completions_puts_system_before_prompt(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Q?", "input": "x", "output": "A", "system": "S"}])
    rows = convert_all(tmp_path, source, "--output-format", "completions")
    assert rows == [{"prompt": "S\n\nQ?\n\nx", "completion": "A"}]


def test_sharegpt_multi_turn_with_system(tmp_path):
    source = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "system", "value": "You are terse."}, {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}])
    rows = convert_all(tmp_path, source)
    assert rows == [{"messages": [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]}]


def test_openai_chat_with_tool_calls_passes_through(tmp_path):
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 2}"}}
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    record = {"messages": [
        {"role": "system", "content": "Use tools."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
        {"role": "assistant", "content": "It is 4."}], "tools": tools, "id": "conversation-7"}
    rows = convert_all(tmp_path, write_jsonl(tmp_path / "c.jsonl", [record]))
    assert rows == [{"messages": record["messages"], "tools": tools}]


def test_openai_text_content_parts_are_joined(tmp_path):
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                           {"role": "assistant", "content": "c"}]}
    rows = convert_all(tmp_path, write_jsonl(tmp_path / "c.jsonl", [record]))
    assert rows[0]["messages"][0] == {"role": "user", "content": "ab"}


def test_csv_with_custom_keys_quoting_and_newlines(tmp_path):
    source = tmp_path / "qa.csv"
    with open(source, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "answer"])
        writer.writerow(["Commas, \"quotes\" and\nnewlines?", "Yes, all \"kept\"."])
        writer.writerow(["Plain?", "Plain."])
    rows = convert_all(tmp_path, source, "--prompt-key", "question", "--completion-key", "answer",
                       "--output-format", "completions")
    assert same_rows(rows, [{"prompt": "Commas, \"quotes\" and\nnewlines?", "completion": "Yes, all \"kept\"."},
                            {"prompt": "Plain?", "completion": "Plain."}])


def test_tsv_prompt_completion(tmp_path):
    source = tmp_path / "pc.tsv"
    source.write_text("prompt\tcompletion\nQ1\tA1\nQ2\tA2\n", encoding="utf-8")
    rows = convert_all(tmp_path, source)
    assert same_rows(rows, [
        {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]} for i in (1, 2)])


@pytest.mark.parametrize("wrap", [False, True])
def test_json_array_and_object_holding_one_list(tmp_path, wrap):
    records = [{"instruction": f"I{i}", "output": f"O{i}"} for i in range(3)]
    source = tmp_path / "data.json"
    source.write_text(json.dumps({"version": 2, "data": records} if wrap else records, indent=2), encoding="utf-8")
    rows = convert_all(tmp_path, source, "--output-format", "completions")
    assert same_rows(rows, [{"prompt": f"I{i}", "completion": f"O{i}"} for i in range(3)])


@pytest.mark.parametrize("record", [{"instruction": "I", "output": "O"},
                                    {"messages": [{"role": "user", "content": "I"}, {"role": "assistant", "content": "O"}]}])
def test_json_file_holding_one_record(tmp_path, record):
    # one example saved on its own: the object is the record, and a chat's `messages` are its turns, not records
    source = tmp_path / "one.json"
    source.write_text(json.dumps(record, indent=2), encoding="utf-8")
    rows = convert_all(tmp_path, source, "--output-format", "completions")
    assert same_rows(rows, [{"prompt": "I", "completion": "O"}])


def test_text_folder_documents_and_paragraphs(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("First doc.\n\nSecond paragraph.\n", encoding="utf-8")
    (folder / "sub" / "b.md").write_text("# Title\nBody\n", encoding="utf-8")
    (folder / "notes.pdf").write_bytes(b"%PDF")
    out = tmp_path / "out"
    code, printed, err = run_cli(folder, "-o", out, *ALL_TRAIN, "--output-format", "text")
    assert code == 0, err
    assert same_rows(read_rows(out / "train.jsonl"),
                     [{"text": "First doc.\n\nSecond paragraph.\n"[:-1]}, {"text": "# Title\nBody"}])
    assert "notes.pdf" in printed  # ignored files are named, not silently dropped
    rows = convert_all(tmp_path, folder / "a.txt", "--output-format", "text", "--text-unit", "paragraph", "--force")
    assert same_rows(rows, [{"text": "First doc."}, {"text": "Second paragraph."}])


def test_gzip_input(tmp_path):
    source = tmp_path / "a.jsonl.gz"
    with gzip.open(source, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    assert convert_all(tmp_path, source, "--output-format", "completions") == [{"prompt": "p", "completion": "c"}]


def test_unicode_and_embedded_newlines_survive_byte_for_byte(tmp_path):
    text = "Ünïcödé 日本語 🙂 \u200b and\nnew\r\nlines\ttabs"
    source = write_jsonl(tmp_path / "u.jsonl", [{"prompt": text, "completion": text[::-1]}])
    rows = convert_all(tmp_path, source, "--output-format", "completions")
    assert rows == [{"prompt": text, "completion": text[::-1]}]
    raw = (tmp_path / "out" / "train.jsonl").read_bytes()
    assert "日本語 🙂".encode() in raw  # written as UTF-8, not \u escapes
    assert raw.count(b"\n") == 1  # one row, one line


def test_system_option_added_where_missing(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"},
                                                {"instruction": "c", "output": "d", "system": "own"}])
    rows = convert_all(tmp_path, source, "--system", "global")
    systems = sorted(r["messages"][0]["content"] for r in rows)
    assert systems == ["global", "own"]


def test_multi_turn_chat_cannot_become_completions(tmp_path):
    source = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"},
        {"from": "gpt", "value": "d"}]}])
    code, _, err = run_cli(source, "-o", tmp_path / "out", *ALL_TRAIN, "--output-format", "completions")
    assert code == 1 and "use --output-format chat" in err and f"{source}:1:1" in err


# --- counting, dedupe, splitting -----------------------------------------------------------------

def test_dedupe_after_whitespace_normalisation_and_empty_records_are_counted(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Hello  world", "output": "x"},
        {"instruction": " Hello world\n", "output": "x "},   # duplicate after normalisation
        {"instruction": "Other", "output": "   "},           # empty reply
        {"instruction": "Third", "output": "y"},
    ])
    out = tmp_path / "out"
    assert run_cli(source, "-o", out, *ALL_TRAIN)[0] == 0
    report = json.loads((out / "transform_report.json").read_text())
    file_report = report["inputs"][0]
    assert file_report["rows_read"] == 4 and file_report["converted"] == 2
    assert file_report["skipped"] == {"duplicate": 1, "empty": 1}
    assert len(read_rows(out / "train.jsonl")) == 2
    assert run_cli(source, "-o", out, *ALL_TRAIN, "--no-dedupe", "--force")[0] == 0
    assert len(read_rows(out / "train.jsonl")) == 3


def test_counts_add_up_and_splits_partition_the_rows(tmp_path):
    records = [{"instruction": f"q{i % 90}", "output": "a"} for i in range(100)] + ["not json"]
    source = tmp_path / "a.jsonl"
    source.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in records) + "\n\n")
    other = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(20)])
    out = tmp_path / "out"
    code, printed, err = run_cli(source, other, "-o", out, "--skip-invalid")
    assert code == 0, err
    report = json.loads((out / "transform_report.json").read_text())
    for file_report in report["inputs"]:
        assert file_report["rows_read"] == file_report["converted"] + sum(file_report["skipped"].values())
    assert report["inputs"][0]["skipped"] == {"duplicate": 10, "invalid_json": 1}
    invalid = [e for e in report["inputs"][0]["skipped_examples"] if e["reason"] == "invalid_json"]
    assert invalid[0]["line"] == 101 and "invalid JSON" in invalid[0]["message"]
    totals = report["totals"]
    assert totals["rows_read"] == 121 and totals["converted"] == 110
    assert report["splits"] == {"train": 88, "valid": 11, "test": 11}
    splits = {s: [json.dumps(r) for r in read_rows(out / f"{s}.jsonl")] for s in ("train", "valid", "test")}
    assert {s: len(v) for s, v in splits.items()} == report["splits"]
    union = set().union(*map(set, splits.values()))
    assert len(union) == 110  # disjoint, no duplicates
    assert "total" in printed and "invalid_json" in printed


def test_split_is_reproducible_and_depends_on_seed(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(50)])
    contents = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert run_cli(source, "-o", tmp_path / name, "--seed", seed)[0] == 0
        contents[name] = [(tmp_path / name / f"{s}.jsonl").read_bytes() for s in ("train", "valid", "test")]
    assert contents["a"] == contents["b"]
    assert contents["a"] != contents["c"]


def test_zero_fraction_writes_no_file_and_removes_a_stale_one(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(10)])
    out = tmp_path / "out"
    assert run_cli(source, "-o", out)[0] == 0
    assert (out / "test.jsonl").exists()
    assert run_cli(source, "-o", out, "--test-fraction", "0", "--force")[0] == 0
    assert not (out / "test.jsonl").exists()
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl", "transform_report.json", "valid.jsonl"]


def test_atomic_write_leaves_old_file_and_no_temporary_on_failure(tmp_path):
    target = tmp_path / "train.jsonl"
    target.write_bytes(b"old\n")

    def chunks():
        yield b"new row\n"
        raise KeyboardInterrupt  # an interrupted run

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, chunks())
    assert target.read_bytes() == b"old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]


def test_library_call_returns_the_report(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(10)])
    report = prepare(PrepareOptions(inputs=(source,), output_dir=tmp_path / "out"))
    assert report["splits"] == {"train": 8, "valid": 1, "test": 1}
    with pytest.raises(TransformError, match="--force"):
        prepare(PrepareOptions(inputs=(source,), output_dir=tmp_path / "out"))


# --- the script and the demo ----------------------------------------------------------------------

def test_help_documents_defaults_and_prog_is_configurable(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"], prog="mlx-lora prepare")
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert text.startswith("usage: mlx-lora prepare")
    for default in ("(default: 0.1)", "(default: 0)", "(default: chat)", "(default: on)"):
        assert default in text


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["in.jsonl"])  # -o missing
    assert exit_info.value.code == 2


def test_script_entry_point_error_is_one_line_without_traceback(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n')
    result = subprocess.run([sys.executable, str(ROOT / "data_transform.py"), str(source), "-o", str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {source}:2:12: invalid JSON")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_demo_splits_are_this_converters_output(tmp_path):
    """The committed demo splits regenerate byte for byte with the documented command."""
    demo = ROOT / "mlx_lora" / "demo"
    code, _, err = run_cli(demo / "dates_raw.jsonl", "-o", tmp_path / "dates", "--valid-fraction", "0.1",
                           "--test-fraction", "0.1", "--seed", "0", "--force")
    assert code == 0, err
    for split, size in (("train", 800), ("valid", 100), ("test", 100)):
        produced = (tmp_path / "dates" / f"{split}.jsonl").read_bytes()
        assert produced.count(b"\n") == size
        assert produced == (demo / "dates" / f"{split}.jsonl").read_bytes(), f"{split}.jsonl is stale; rerun the README command"


def test_output_folder_inside_the_input_folder_is_not_read_back(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(10)])
    for _ in range(2):  # the second run would see the first run's splits as more input
        code, _, err = run_cli(folder, "-o", folder / "out", "--force")
        assert code == 0, err
    report = json.loads((folder / "out" / "transform_report.json").read_text())
    assert report["totals"]["rows_read"] == 10 and report["ignored_files"] == []
