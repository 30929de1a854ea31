"""CSV / TSV as spreadsheets save them: the delimiter detected (--delimiter overrides), a
byte-order mark, CRLF inside quoted cells, header names in any case; a ragged row's error names
line, column and the dialect assumed.

Inputs include the shared case `tests/cases/csv_excel/` (a ';' file and a ',' file, both with a
BOM and CRLF line ends).
"""

from __future__ import annotations

from pathlib import Path

from test_prepare import read_rows, run_cli

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
