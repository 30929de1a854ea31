"""Nothing a user gave is dropped without a word: fields are converted (Alpaca `history` ->
earlier turns, a top-level `system` / `tools` kept) or counted and named in the printed report
and transform_report.json; output lines stay single lines for line-splitting readers.

One input is the shared case `tests/cases/sharegpt_tools/sharegpt_tools_known_speakers.json`
(today its top-level `tools` is dropped without a word).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from test_prepare import read_rows, run_cli, write_jsonl

CASES = Path(__file__).parent / "cases"
ALL_TRAIN = ["--valid-fraction", "0", "--test-fraction", "0", "--no-dedupe"]


def convert(tmp_path: Path, *inputs, flags=()) -> tuple[list[dict], dict, str]:
    out = tmp_path / "out"
    code, printed, err = run_cli(*inputs, "-o", out, *ALL_TRAIN, *flags)
    assert code == 0, err
    report = json.loads((out / "transform_report.json").read_text())
    return read_rows(out / "train.jsonl"), report, printed


def test_shared_case_keeps_system_and_tools(tmp_path):
    rows, report, _ = convert(tmp_path, CASES / "sharegpt_tools" / "sharegpt_tools_known_speakers.json")
    (row,) = rows
    assert row["messages"][0] == {"role": "system", "content": "You are a weather helper."}
    assert [t["function"]["name"] for t in row["tools"]] == ["get_weather"]
    assert report["totals"]["dropped_fields"] == {}


def test_alpaca_history_becomes_earlier_turns_and_unread_fields_are_named(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "And in French?", "input": "", "output": "Bonjour", "system": "Translate.",
         "history": [["Say hello in German.", "Hallo"], ["And in Spanish?", "Hola"]], "id": 7, "source": "web"},
        {"instruction": "Say bye.", "output": "bye", "id": 8},
    ])
    rows, report, printed = convert(tmp_path, source)
    by_reply = {r["messages"][-1]["content"]: r for r in rows}
    assert by_reply["Bonjour"]["messages"] == [
        {"role": "system", "content": "Translate."},
        {"role": "user", "content": "Say hello in German."}, {"role": "assistant", "content": "Hallo"},
        {"role": "user", "content": "And in Spanish?"}, {"role": "assistant", "content": "Hola"},
        {"role": "user", "content": "And in French?"}, {"role": "assistant", "content": "Bonjour"}]
    assert report["inputs"][0]["dropped_fields"] == {"id": 2, "source": 1}
    assert report["totals"]["dropped_fields"] == {"id": 2, "source": 1}
    assert f"fields not carried into the output: {source}: id (2 rows), source (1 rows)" in printed
    # A history cannot become one prompt and one reply: refused with the fix, not flattened.
    code, _, err = run_cli(source, "-o", tmp_path / "c", *ALL_TRAIN, "--output-format", "completions")
    assert code == 1 and "is not one prompt and one reply; use --output-format chat" in err


def test_sharegpt_turn_keys_csv_columns_and_chat_system_are_accounted_for(tmp_path):
    sharegpt = tmp_path / "s.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi", "weight": 0},
                                                       {"from": "gpt", "value": "hello", "weight": 1}]}]))
    table = tmp_path / "t.csv"
    table.write_text("prompt,completion,label\nhi,hello,greeting\n")
    chat = write_jsonl(tmp_path / "c.jsonl", [{"system": "Be kind.", "messages": [
        {"role": "user", "content": "hey"}, {"role": "assistant", "content": "hey you"}]}])
    rows, report, _ = convert(tmp_path, sharegpt, table, chat)
    dropped = {Path(r["path"]).name: r["dropped_fields"] for r in report["inputs"]}
    assert dropped == {"s.json": {"conversations[].weight": 1}, "t.csv": {"label": 1}, "c.jsonl": {}}
    (chat_row,) = [r for r in rows if r["messages"][-1]["content"] == "hey you"]
    assert chat_row["messages"][0] == {"role": "system", "content": "Be kind."}


def test_line_separators_are_escaped_so_each_row_is_one_line(tmp_path):
    texts = ["one\u2028two", "three\u2029four", "five\x85six"]
    source = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "completion": t} for i, t in enumerate(texts)])
    out = tmp_path / "out"
    code, _, err = run_cli(source, "-o", out, *ALL_TRAIN)
    assert code == 0, err
    text = (out / "train.jsonl").read_text(encoding="utf-8")
    assert len(text.splitlines()) == 3  # str.splitlines breaks on all three characters when raw
    assert "\\u2028" in text and "\\u2029" in text and "\\u0085" in text
    assert sorted(json.loads(line)["messages"][-1]["content"] for line in text.splitlines()) == sorted(texts)


def test_only_fields_holding_data_are_counted_as_dropped(tmp_path):
    # Before: a Notes column filled in 30 of 60 rows was reported as dropped from all 60.
    sheet = tmp_path / "sheet.csv"
    with open(sheet, "w", newline="", encoding="utf-8-sig") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["Question", "Answer", "Notes", "Blank"])
        for i in range(60):
            w.writerow([f"Reverse: a{i} b", f"b a{i}", "note" if i % 2 else ("" if i % 4 else "  "), " "])
    _, report, printed = convert(tmp_path, sheet, flags=("--prompt-key", "question", "--completion-key", "answer"))
    assert report["inputs"][0]["dropped_fields"] == {"Notes": 30}
    assert f"fields not carried into the output: {sheet}: Notes (30 rows)" in printed
    # JSON: null, "", [] and {} hold nothing; any other value (0, false, " ") is data and counted.
    pairs = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "completion": "b", "id": None, "tags": [], "meta": {}, "note": ""},
        {"prompt": "c", "completion": "d", "id": 0, "tags": ["x"], "meta": {"k": None}, "note": " ", "flag": False}])
    chats = write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "human", "value": "hi", "weight": None},
                           {"from": "gpt", "value": "yo", "weight": 0}]},
        {"conversations": [{"from": "human", "value": "hey", "mark": ""},
                           {"from": "gpt", "value": "hm", "mark": None}]}])
    _, report, _ = convert(tmp_path, pairs, chats, flags=("--force",))
    dropped = {Path(r["path"]).name: r["dropped_fields"] for r in report["inputs"]}
    assert dropped == {"p.jsonl": {"flag": 1, "id": 1, "meta": 1, "note": 1, "tags": 1},
                       "s.jsonl": {"conversations[].weight": 1}}
