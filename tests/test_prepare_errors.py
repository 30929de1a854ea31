"""data_transform.py on bad input: each case stops with one actionable line (file:line:col, field, fix), exit 1."""

from __future__ import annotations

import io
import json
from pathlib import Path

from mlx_lora.prepare.cli import main


def run_cli(*argv) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in argv], stdout=out, stderr=err)
    return code, err.getvalue()


def fails_with(tmp_path: Path, source: Path, *flags) -> str:
    """The error line of a failing conversion; also checks nothing was written."""
    out = tmp_path / "out"
    code, err = run_cli(source, "-o", out, *flags)
    assert code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists()  # an input error leaves no output folder behind
    return err


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"prompt": "p", "completion": "c"})


def test_malformed_json_names_file_line_column_and_shows_the_line(tmp_path):
    source = write_lines(tmp_path / "d.jsonl", GOOD, '{"prompt": "a", "completion": "b",}')
    err = fails_with(tmp_path, source)
    assert f"{source}:2:35: invalid JSON" in err
    assert "'{\"prompt\": \"a\", \"completion\": \"b\",}'" in err  # the snippet
    assert "--skip-invalid" in err


def test_malformed_json_in_a_json_file_names_its_line(tmp_path):
    source = tmp_path / "d.json"
    source.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a" "completion": "b"}\n]\n')
    assert f"{source}:3:18: invalid JSON" in fails_with(tmp_path, source)


def test_skip_invalid_skips_and_counts_instead(tmp_path):
    source = write_lines(tmp_path / "d.jsonl", GOOD, "{broken", json.dumps({"prompt": "q", "completion": "r"}),
                         json.dumps({"prompt": 3, "completion": "r"}))
    out = tmp_path / "out"
    code, err = run_cli(source, "-o", out, "--skip-invalid", "--valid-fraction", "0", "--test-fraction", "0")
    assert code == 0, err
    report = json.loads((out / "transform_report.json").read_text())
    assert report["inputs"][0]["skipped"] == {"invalid_json": 1, "invalid_record": 1}
    assert [e["line"] for e in report["inputs"][0]["skipped_examples"]] == [2, 4]


def test_number_where_text_expected_names_line_and_field(tmp_path):
    source = write_lines(tmp_path / "d.jsonl", json.dumps({"instruction": "i", "output": "o"}),
                         json.dumps({"instruction": "i", "input": 42, "output": "o"}))
    err = fails_with(tmp_path, source)
    assert f"{source}:2:" in err and "field 'input' is a number, expected text" in err


def test_list_where_text_expected_in_chat(tmp_path):
    source = write_lines(tmp_path / "d.jsonl", json.dumps({"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": ["b", "c"]}]}))
    err = fails_with(tmp_path, source)
    assert f"{source}:1:2:" in err and "'messages[1].content[0]'" in err


def test_missing_required_field(tmp_path):
    source = write_lines(tmp_path / "d.jsonl", json.dumps({"instruction": "i", "input": "x"}))
    err = fails_with(tmp_path, source)
    assert f"{source}:1:" in err and "field 'output' is missing" in err


def test_unknown_role_and_unknown_sharegpt_speaker(tmp_path):
    chat = write_lines(tmp_path / "c.jsonl", json.dumps({"messages": [
        {"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}))
    err = fails_with(tmp_path, chat)
    assert "'messages[1].role' is 'robot', an unknown role" in err and "system, user, assistant, tool" in err
    share = write_lines(tmp_path / "s.jsonl", json.dumps({"conversations": [{"from": "alien", "value": "x"}]}))
    assert "'conversations[0].from' is 'alien'" in fails_with(tmp_path, share)


def test_unknown_record_format_suggests_key_options(tmp_path):
    source = write_lines(tmp_path / "d.jsonl", json.dumps({"question": "q", "answer": "a"}))
    err = fails_with(tmp_path, source)
    assert "['answer', 'question']" in err and "--prompt-key NAME --completion-key NAME" in err


def test_non_utf8_names_byte_offset_and_encoding_option_fixes_it(tmp_path):
    source = tmp_path / "d.jsonl"
    first = (GOOD + "\n").encode()
    source.write_bytes(first + '{"prompt": "caf\u00e9", "completion": "c"}\n'.encode("latin-1"))
    err = fails_with(tmp_path, source)
    assert f"{source}:2:16:" in err and f"byte offset {len(first) + 15}" in err and "--encoding" in err
    out = tmp_path / "ok"
    code, err = run_cli(source, "-o", out, "--encoding", "latin-1", "--valid-fraction", "0", "--test-fraction", "0")
    assert code == 0, err
    assert "café" in (out / "train.jsonl").read_text(encoding="utf-8")


def test_empty_file(tmp_path):
    source = tmp_path / "d.jsonl"
    source.write_text("\n  \n")
    assert f"{source}: no records (the file is empty" in fails_with(tmp_path, source)


def test_split_that_would_be_empty_says_counts_and_fraction(tmp_path):
    source = write_lines(tmp_path / "d.jsonl", *(json.dumps({"prompt": f"p{i}", "completion": "c"}) for i in range(3)))
    err = fails_with(tmp_path, source)
    assert "3 example(s)" in err and "--valid-fraction 0.1" in err and "at least 5 examples" in err


def test_file_mixing_formats_lists_lines_of_each(tmp_path):
    alpaca = json.dumps({"instruction": "i", "output": "o"})
    chat = json.dumps({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]})
    source = write_lines(tmp_path / "d.jsonl", alpaca, alpaca, chat)
    err = fails_with(tmp_path, source)
    assert "mixes record formats (alpaca at line(s) 1, 2; chat at line(s) 3)" in err and "--format" in err


def test_existing_output_folder_needs_force(tmp_path):
    source = write_lines(tmp_path / "d.jsonl", *(json.dumps({"prompt": f"p{i}", "completion": "c"}) for i in range(10)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(source, "-o", out)
    assert code == 1 and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert run_cli(source, "-o", out, "--force")[0] == 0
    assert (out / "train.jsonl").exists() and (out / "keep.txt").exists()


def test_missing_input_and_unknown_suffix(tmp_path):
    assert "no such file or folder" in fails_with(tmp_path, tmp_path / "nope.jsonl")
    other = tmp_path / "data.parquet"
    other.write_bytes(b"PAR1")
    assert "unknown file type" in fails_with(tmp_path, other)


def test_bad_fractions_are_reported_together(tmp_path):
    source = write_lines(tmp_path / "d.jsonl", GOOD)
    err = fails_with(tmp_path, source, "--valid-fraction", "0.7", "--test-fraction", "1.5")
    assert "--test-fraction 1.5" in err and "must stay below 1" in err


def test_unpaired_surrogate_is_a_clean_error(tmp_path):
    source = write_lines(tmp_path / "d.jsonl", '{"prompt": "a\\ud800", "completion": "b"}')
    assert "unpaired surrogate" in fails_with(tmp_path, source)


def test_text_records_need_text_output(tmp_path):
    source = tmp_path / "doc.txt"
    source.write_text("Some text.\n")
    assert "use --output-format text" in fails_with(tmp_path, source)


def test_bad_csv_row(tmp_path):
    source = tmp_path / "d.csv"
    source.write_text("prompt,completion\na,b\nc,d,e\n")
    err = fails_with(tmp_path, source)
    assert f"{source}:3:5: 3 fields but the header has 2 (an extra field starts here)" in err


def test_a_misspelled_field_is_named_with_what_the_record_has(tmp_path):
    source = write_lines(tmp_path / "d.jsonl", GOOD, json.dumps({"prompt": "p2", "completon": "c2"}))
    err = fails_with(tmp_path, source)
    assert "field 'completion' is missing" in err and "the record has 'completon': a misspelling?" in err


def test_an_output_folder_that_cannot_be_written_is_named(tmp_path):
    source = write_lines(tmp_path / "d.jsonl", *[GOOD.replace('"p"', f'"p{i}"') for i in range(20)])
    (tmp_path / "file").write_text("x")
    code, err = run_cli(source, "-o", tmp_path / "file" / "out")  # a path through a file
    assert code == 1 and err.startswith(f"error: -o {tmp_path / 'file' / 'out'}: cannot write there"), err
    assert err.count("\n") == 1


def test_an_input_folder_inside_the_output_folder_says_so(tmp_path):
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    write_lines(raw / "d.jsonl", *[GOOD.replace('"p"', f'"p{i}"') for i in range(20)])
    code, err = run_cli(raw, "-o", tmp_path / "data", "--force")
    assert code == 1 and "inside the output folder" in err and "another folder" in err, err


def test_folders_name_what_they_leave_out_and_skip_an_empty_file_only_when_asked(tmp_path):
    import codecs
    import os

    folder = tmp_path / "in"
    folder.mkdir()
    rows = [GOOD.replace('"p"', f'"p{i}"') for i in range(20)]
    write_lines(folder / "train.jsonl", *rows)
    (folder / "README.md").write_text("# A dataset card\n\nNot data.\n")
    os.symlink(tmp_path / "nowhere.jsonl", folder / "broken.jsonl")
    (folder / "empty.jsonl").write_text("")
    (folder / "header.csv").write_text("prompt,completion\n\n")  # a spreadsheet exported before any row was typed
    # a UTF-16 file with its byte-order mark, as Excel's "Unicode Text" saves it, read without --encoding
    (folder / "wide.jsonl").write_bytes(codecs.BOM_UTF16_LE + "".join(
        GOOD.replace('"p"', f'"w{i}"') + "\n" for i in range(5)).encode("utf-16-le"))
    assert "empty.jsonl: no records" in fails_with(tmp_path, folder)
    out = io.StringIO()
    code = main([str(folder), "-o", str(tmp_path / "out"), "--skip-invalid"], stdout=out, stderr=io.StringIO())
    assert code == 0
    printed = out.getvalue()
    assert f"ignored (a folder's README: a dataset card, not data): {folder / 'README.md'}" in printed
    assert f"ignored (a broken link): {folder / 'broken.jsonl'}" in printed
    assert f"skipped (no records: the file is empty or blank): {folder / 'empty.jsonl'}" in printed
    assert f"skipped (no records: a header row (prompt,completion) and no data rows): {folder / 'header.csv'}" in printed
    report = json.loads((tmp_path / "out" / "transform_report.json").read_text())
    assert report["totals"]["converted"] == 25  # the UTF-16 file's 5 rows too


def test_preference_pairs_and_sft_rows_are_not_mixed_in_one_folder(tmp_path):
    sft = write_lines(tmp_path / "sft.jsonl", *[GOOD.replace('"p"', f'"p{i}"') for i in range(5)])
    pairs = write_lines(tmp_path / "pairs.jsonl", *[json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"})
                                                    for i in range(5)])
    code, err = run_cli(sft, pairs, "-o", tmp_path / "out")
    assert code == 1 and err.count("\n") == 1, err
    assert f"mix preference pairs (first at {pairs}:1:1) and SFT rows (first at {sft}:1:1)" in err
    assert "separate folders" in err and not (tmp_path / "out").exists()


def test_a_workbook_is_told_to_export_csv_and_an_empty_system_prompt_is_refused(tmp_path):
    book = tmp_path / "data.xlsx"
    book.write_bytes(b"PK\x03\x04")
    code, err = run_cli(book, "-o", tmp_path / "out")
    assert code == 1 and "export the sheet as CSV" in err, err
    source = write_lines(tmp_path / "d.jsonl", *[GOOD.replace('"p"', f'"p{i}"') for i in range(20)])
    code, err = run_cli(source, "-o", tmp_path / "out", "--system", "")
    assert code == 1 and "--system ''" in err, err


def test_max_seq_length_without_a_model_says_it_needs_one(tmp_path):
    source = write_lines(tmp_path / "d.jsonl", *[GOOD.replace('"p"', f'"p{i}"') for i in range(20)])
    assert "needs a tokenizer: add --model" in fails_with(tmp_path, source, "--max-seq-length", "256")
