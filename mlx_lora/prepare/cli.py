"""Command line of the converter (`data_transform.py`, `mlx-lora prepare`): flags in, table out.

Exit codes: 0 success, 1 a problem with the inputs or options (one `error: ...` line on
stderr), 2 a usage error (from argparse).
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, TextIO

from .formats import INPUT_FORMATS, OUTPUT_FORMATS
from .pipeline import REPORT_NAME, PrepareOptions, prepare
from .readers import TEXT_UNITS, TransformError, ignored_reason

DESCRIPTION = """\
Convert raw datasets into train.jsonl / valid.jsonl / test.jsonl for training.

Inputs: files or folders of .jsonl, .json (an array, or an object holding one list), .csv, .tsv,
.txt, .md, each optionally gzipped. CSV as spreadsheets save it: the delimiter is detected
(, ; tab |; --delimiter overrides), a byte-order mark is skipped, CRLF inside quoted cells becomes
LF, and header names match the keys below without regard to case.

Record formats are detected per record (one format per file: a file mixing them is refused, naming the
lines of each): Alpaca (instruction/input/output[/system/history/tools]),
ShareGPT (conversations of from/value), OpenAI chat (messages of role/content, tool calls kept),
prompt/completion (any two columns, see --prompt-key) and plain text. An Alpaca `history` ([[user, assistant], ...]) becomes earlier
turns; a top-level `system` becomes the system message. Empty records and duplicates are dropped
and counted; fields a format does not read (e.g. an `id`) are not carried over and are named with
the number of rows where they held something (blank cells, null, "", [] and {} hold nothing). All
of it is printed and saved in DIR/transform_report.json. Output lines escape U+2028, U+2029 and
U+0085, so line-splitting readers see one row per line.

The output folder is what training reads: train.jsonl always; valid.jsonl (optional: without it
training has no validation loss, or holds out data.valid_fraction of train.jsonl) and test.jsonl
(needed only when eval.enabled) unless their fraction is 0.
"""

EPILOG = """\
examples:
  %(prog)s alpaca.json -o data
  %(prog)s qa.csv --prompt-key question --completion-key answer -o data
  %(prog)s export.csv --delimiter ';' --prompt-key Frage --completion-key Antwort -o data
  %(prog)s chats/ -o data --model demo --max-seq-length 1024
"""


def _defaults() -> dict[str, Any]:
    return {f.name: f.default for f in fields(PrepareOptions) if f.name not in ("inputs", "output_dir")}


def _help(name: str) -> str:
    field = next(f for f in fields(PrepareOptions) if f.name == name)
    default = field.default
    shown = "none" if default is None else ("on" if default is True else "off" if default is False else default)
    return f"{field.metadata['help']} (default: {shown})"


def _delimiter(text: str) -> str:
    """--delimiter value: one character, with 'tab' and '\\t' for a tab (hard to type in a shell)."""
    return "\t" if text.lower() in ("tab", "\\t") else text


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; `prog` names the command in usage lines (e.g. 'mlx-lora prepare')."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="Files or folders to convert.")
    parser.add_argument("-o", "--output", dest="output_dir", type=Path, required=True, metavar="DIR",
                        help="Folder for train.jsonl, valid.jsonl, test.jsonl and transform_report.json.")
    parser.add_argument("--format", dest="input_format", choices=("auto",) + INPUT_FORMATS, help=_help("input_format"))
    parser.add_argument("--output-format", choices=OUTPUT_FORMATS, help=_help("output_format"))
    parser.add_argument("--valid-fraction", type=float, metavar="F", help=_help("valid_fraction"))
    parser.add_argument("--test-fraction", type=float, metavar="F", help=_help("test_fraction"))
    parser.add_argument("--seed", type=int, help=_help("seed"))
    parser.add_argument("--system", metavar="TEXT", help=_help("system"))
    parser.add_argument("--dedupe", action=argparse.BooleanOptionalAction, help=_help("dedupe"))
    parser.add_argument("--skip-invalid", action="store_true", default=None, help=_help("skip_invalid"))
    parser.add_argument("--force", action="store_true", default=None, help=_help("force"))
    parser.add_argument("--encoding", metavar="NAME", help=_help("encoding"))
    parser.add_argument("--prompt-key", metavar="NAME", help=_help("prompt_key"))
    parser.add_argument("--completion-key", metavar="NAME", help=_help("completion_key"))
    parser.add_argument("--text-key", metavar="NAME", help=_help("text_key"))
    parser.add_argument("--chosen-key", metavar="NAME", help=_help("chosen_key"))
    parser.add_argument("--rejected-key", metavar="NAME", help=_help("rejected_key"))
    parser.add_argument("--delimiter", type=_delimiter, metavar="CHAR", help=_help("delimiter"))
    parser.add_argument("--text-unit", choices=TEXT_UNITS, help=_help("text_unit"))
    parser.add_argument("--model", metavar="SOURCE",
                        help="Tokenizer for token statistics: a local Hugging Face folder, a .gguf file, a hub id, "
                             "or 'demo' (default: no statistics).")
    parser.add_argument("--max-seq-length", type=int, metavar="N", help=_help("max_seq_length"))
    parser.add_argument("-q", "--quiet", action="store_true", help="Print only errors.")
    return parser


def options_from_args(args: argparse.Namespace) -> PrepareOptions:
    """PrepareOptions from parsed flags; flags left out keep the dataclass defaults."""
    values = {name: getattr(args, name) for name in _defaults() if getattr(args, name, None) is not None}
    return PrepareOptions(inputs=tuple(args.inputs), output_dir=args.output_dir, **values)


def format_report(report: dict, out_dir: Path) -> str:
    """The printed summary: one table row per input file, then splits and token statistics."""
    reasons = sorted({k for r in report["inputs"] for k in r["skipped"]})
    header = ["file", "format", "read", "converted"] + [f"skip:{k}" for k in reasons]
    rows = [[r["path"], ",".join(r["formats"]) or "-", r["rows_read"], r["converted"]]
            + [r["skipped"].get(k, 0) for k in reasons] for r in report["inputs"]]
    totals = report["totals"]
    if len(rows) > 1:
        rows.append(["total", "", totals["rows_read"], totals["converted"]] + [totals["skipped"].get(k, 0) for k in reasons])
    table = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in report["inputs"]:
        if r["dropped_fields"]:
            named = ", ".join(f"{name} ({count} rows)" for name, count in r["dropped_fields"].items())
            lines.append(f"fields not carried into the output: {r['path']}: {named}")
    for path in report["ignored_files"]:
        lines.append(f"ignored ({ignored_reason(Path(path))}): {path}")
    for r in report["inputs"]:
        if r.get("empty"):
            lines.append(f"skipped (no records: {r.get('empty_reason') or 'the file is empty or blank'}): {r['path']}")
    sizes = report["splits"]
    lines.append(f"wrote {out_dir}: " + ", ".join(f"{k}.jsonl {v}" for k, v in sizes.items() if v)
                 + f" (report: {out_dir / REPORT_NAME})")
    token_stats = report.get("token_stats")
    if token_stats:
        for name, s in token_stats.items():
            lines.append(f"tokens {name}: min {s['min']}, median {s['median']}, p95 {s['p95']}, max {s['max']}; "
                         f"{s['over_max_seq_length']} of {s['examples']} over {s['max_seq_length']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Run the converter with `argv` (default: sys.argv[1:]); returns the exit code."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    args = build_parser(prog).parse_args(argv)
    # CSV fields over the csv module's 128 KiB default are normal for documents; raise the
    # process-wide limit here, in the entry point, rather than inside the library.
    csv.field_size_limit(2**31 - 1)
    try:
        if args.max_seq_length is not None and args.model is None:
            raise TransformError("--max-seq-length counts examples over N tokens, which needs a tokenizer: add "
                                 "--model SOURCE (e.g. --model demo), or leave --max-seq-length out")
        options = options_from_args(args)
        tokenizer = None
        if args.model is not None:
            from mlx_lora.models import load_tokenizer  # lazily: it imports mlx-lm / transformers

            tokenizer = load_tokenizer(args.model)
        report = prepare(options, tokenizer=tokenizer)
    except (TransformError, ValueError, FileNotFoundError, OSError) as err:
        message = str(err).replace("\n", " ")
        print(f"error: {message}", file=stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; the output folder holds no partial files", file=stderr)
        return 130
    if not args.quiet:
        print(format_report(report, options.output_dir), file=stdout)
    return 0
