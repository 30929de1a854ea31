"""CSV / TSV as spreadsheets save them: the delimiter detected (--delimiter overrides), a
byte-order mark, CRLF inside quoted cells, header names in any case; a ragged row's error names
line, column and the dialect assumed.

Inputs include the shared case `tests/cases/csv_excel/` (a ';' file and a ',' file, both with a
BOM and CRLF line ends).
"""

from __future__ import annotations

import json
from pathlib import Path

from test_prepare import read_rows, run_cli, write_jsonl

CASE = Path(__file__).parent / "cases" / "csv_excel"
ALL_TRAIN = ["--valid-fraction", "0", "--test-fraction", "0", "--no-dedupe"]


def pairs(tmp_path: Path, *argv) -> set[tuple[str, str]]:
    out = tmp_path / "out"
    code, _, err = run_cli(*argv, "-o", out, *ALL_TRAIN)
    assert code == 0, err
    return {(r["messages"][0]["content"], r["messages"][1]["content"]) for r in read_rows(out / "train.jsonl")}


def test_shared_case_spreadsheet_csvs(tmp_path):
    got = pairs(tmp_path, CASE, "--prompt-key", "question", "--completion-key", "answer")
    assert got == {
        ("Capital of Austria?", "Vienna"), ("List two colours,\nplease", "Red\nBlue"), ("Capital of Italy?", "Rome"),
        ("Wie spät ist es in Tokio, wenn es in Berlin 12 Uhr ist?", "20 Uhr (Sommerzeit: 19 Uhr)"),
        ("Nenne zwei Farben;\nkurz bitte", "Rot; Blau"), ("Hauptstadt von Österreich?", "Wien"),
    }


def test_pipe_and_tab_files_with_capitalised_headers(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "p.csv").write_bytes("\ufeffInstruction|Output\r\nSay hi|hi, there\r\n".encode())
    (tmp_path / "in" / "t.tsv").write_text("PROMPT\tCompletion\nTwo, three\t\"four\r\nfive\"\n")
    assert pairs(tmp_path, tmp_path / "in") == {("Say hi", "hi, there"), ("Two, three", "four\nfive")}


def test_delimiter_option_overrides_detection(tmp_path):
    (tmp_path / "x.csv").write_text("prompt;completion\na, b;c, d\ne, f;g, h\n")
    assert pairs(tmp_path, tmp_path / "x.csv", "--delimiter", ";") == {("a, b", "c, d"), ("e, f", "g, h")}
    # The shared ';' file read with ',' as told: two fields on the German line, one in the header.
    code, _, err = run_cli(CASE / "excel_semicolon.csv", "-o", tmp_path / "o", "--delimiter", ",")
    assert code == 1
    assert "excel_semicolon.csv:2:" in err and "reading it with delimiter comma ',', quote" in err
    assert "(detected)" not in err


def test_ragged_rows_name_line_column_and_dialect(tmp_path):
    (tmp_path / "r.csv").write_text("prompt;completion\nok;fine\nNenne;zwei;Farben\n")
    code, _, err = run_cli(tmp_path / "r.csv", "-o", tmp_path / "out")
    assert code == 1
    assert err.strip() == (f"error: {tmp_path / 'r.csv'}:3:12: 3 fields but the header has 2 (an extra field starts "
                           "here), reading it with delimiter semicolon ';' (detected), quote '\"'; quote fields that "
                           "contain the delimiter, fix the row, or pass --delimiter to read it otherwise")
    code, _, err = run_cli(tmp_path / "r.csv", "-o", tmp_path / "out", "--delimiter", "tab")
    assert code == 1 and "no known record format" in err  # one column 'prompt;completion' under a tab
    code, _, err = run_cli(tmp_path / "r.csv", "-o", tmp_path / "out", "--delimiter", ";;")
    assert code == 1 and "--delimiter ';;': must be one character" in err


def test_header_names_match_every_key_option_in_any_case(tmp_path):
    # Before: --prompt-key Question (the header's own spelling) failed with "field 'Question' is
    # missing", because the header was respelled 'question' after a preference format's prompt key.
    (tmp_path / "qa.csv").write_text("Question,Answer\nhi,there\nfoo,bar\n")
    for keys in (("Question", "Answer"), ("question", "answer"), ("QUESTION", "aNsWeR")):
        argv = ("--prompt-key", keys[0], "--completion-key", keys[1], "--force")
        assert pairs(tmp_path, tmp_path / "qa.csv", *argv) == {("hi", "there"), ("foo", "bar")}
        report = json.loads((tmp_path / "out" / "transform_report.json").read_text())
        assert report["totals"]["dropped_fields"] == {}  # the key columns were read, whatever their case
    (tmp_path / "notes.tsv").write_text("Body\tNotes\nsome text\tx\n")
    for key in ("Body", "body"):
        out = tmp_path / f"text_{key}"
        code, _, err = run_cli(tmp_path / "notes.tsv", "-o", out, "--text-key", key, "--output-format", "text",
                               *ALL_TRAIN)
        assert code == 0, err
        assert read_rows(out / "train.jsonl") == [{"text": "some text"}]
    # A built-in name in another case does not compete with the user's key: preference columns.
    (tmp_path / "pairs.csv").write_text("Question,Chosen,Rejected\nhi?,hello,go away\n")
    out = tmp_path / "pref"
    code, _, err = run_cli(tmp_path / "pairs.csv", "-o", out, "--prompt-key", "Question", *ALL_TRAIN)
    assert code == 0, err
    assert read_rows(out / "train.jsonl") == [{"prompt": "hi?", "chosen": "hello", "rejected": "go away"}]


def test_errors_show_headers_and_keys_as_written(tmp_path):
    # Before: a BOM + ';' export listed ['Answer', 'Notes', 'question'] (only the column named
    # like a built-in key was lower-cased).
    (tmp_path / "sheet.csv").write_bytes("\ufeffQuestion;Answer;Notes\r\nhi;there;x\r\n".encode())
    code, _, err = run_cli(tmp_path / "sheet.csv", "-o", tmp_path / "out", "--prompt-key", "Frage")
    assert code == 1 and "no known record format in keys ['Answer', 'Notes', 'Question']" in err
    assert "'Frage'+'completion'" in err
    code, _, err = run_cli(tmp_path / "sheet.csv", "-o", tmp_path / "out", "--prompt-key", "QUESTION",
                           "--completion-key", "Reply")
    assert code == 1 and "field 'Reply' is missing; every record of this format needs 'Reply'" in err


def test_json_fields_match_the_key_options_as_spelled(tmp_path):
    source = write_jsonl(tmp_path / "qa.jsonl", [{"Question": "hi", "Answer": "there"}])
    assert pairs(tmp_path, source, "--prompt-key", "Question", "--completion-key", "Answer") == {("hi", "there")}
    # JSON names are exact (an object may hold both 'question' and 'Question'); the error says so.
    code, _, err = run_cli(source, "-o", tmp_path / "o", "--prompt-key", "question", "--completion-key", "answer")
    assert code == 1
    assert "JSON field names match exactly: the record has 'Question', not 'question'" in err


def test_an_unclosed_quote_is_named_where_it_opens_and_skipping_it_keeps_the_rows_after(tmp_path):
    source = tmp_path / "q.csv"
    source.write_text('question,answer\nhi,there\nsay,"a ""quoted"" word"\n"stray,quote\nok,fine\nlast,one\n')
    code, _, err = run_cli(source, "-o", tmp_path / "out", "--prompt-key", "question", "--completion-key", "answer")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "q.csv:4:1: a quoted field opens here and is never closed" in err  # where it opens, not the file's end
    got = pairs(tmp_path, source, "--prompt-key", "question", "--completion-key", "answer", "--skip-invalid")
    assert got == {("hi", "there"), ("say", 'a "quoted" word'), ("ok", "fine"), ("last", "one")}
    report = json.loads((tmp_path / "out" / "transform_report.json").read_text())
    assert "invalid_csv" in json.dumps(report) and "q.csv:4:1" in json.dumps(report)
