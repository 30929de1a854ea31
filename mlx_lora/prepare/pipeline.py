"""The conversion run: inputs -> converted, deduplicated rows -> train/valid/test + report.

`prepare(options)` is the whole job as a library call; `cli.py` parses flags into
`PrepareOptions` and prints the returned report.
"""

from __future__ import annotations

import json
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import formats, stats, writer
from .preference import SkipRecord
from .readers import RawRecord, Skipped, TransformError, expand_inputs, input_kind, read_json, read_jsonl, read_text
from .tables import header_row, read_csv

REPORT_NAME = "transform_report.json"
MAX_SKIP_EXAMPLES = 20  # skipped records quoted in the report per file; the counts cover all of them
MIXED_EXAMPLE_LINES = 3  # line numbers listed per format when a file mixes formats


def _help(text: str) -> dict:
    return {"metadata": {"help": text}}


@dataclass(frozen=True)
class PrepareOptions:
    """Everything a conversion run needs; the CLI's defaults and help come from here."""

    inputs: tuple[Path, ...]
    output_dir: Path
    input_format: str = field(default="auto", **_help("Record format of the inputs: auto (detected per record) or one of " + ", ".join(formats.INPUT_FORMATS) + "."))
    output_format: str = field(default="chat", **_help("Rows to write: chat ({messages}), completions ({prompt, completion}) or text ({text})."))
    valid_fraction: float = field(default=0.1, **_help("Fraction of the examples for valid.jsonl (0 writes no file: training then runs without validation loss, or holds out data.valid_fraction of train.jsonl)."))
    test_fraction: float = field(default=0.1, **_help("Fraction of the examples for test.jsonl (0 writes no file: then train with eval.enabled: false)."))
    seed: int = field(default=0, **_help("Seed of the shuffle before splitting (same inputs + seed = same files)."))
    system: str | None = field(default=None, **_help("System prompt added to every example that has none (completions: put before the prompt)."))
    dedupe: bool = field(default=True, **_help("Drop exact duplicates after whitespace normalisation (counted in the report)."))
    skip_invalid: bool = field(default=False, **_help("Skip and count invalid records instead of stopping at the first."))
    force: bool = field(default=False, **_help("Overwrite the splits in an existing, non-empty output folder."))
    encoding: str = field(default="utf-8", **_help("Text encoding of the inputs."))
    prompt_key: str = field(default="prompt", **_help("Field / column holding the prompt (e.g. question)."))
    completion_key: str = field(default="completion", **_help("Field / column holding the completion (e.g. answer)."))
    text_key: str = field(default="text", **_help("Field / column holding plain text."))
    chosen_key: str = field(default="chosen", **_help("Preference pairs: field / column holding the preferred answer (e.g. good)."))
    rejected_key: str = field(default="rejected", **_help("Preference pairs: field / column holding the other answer (e.g. bad)."))
    delimiter: str | None = field(default=None, **_help("Field delimiter of CSV / TSV inputs (one character; 'tab' or '\\t' for a tab). Default: detected for .csv among , ; tab |, tab for .tsv."))
    text_unit: str = field(default="document", **_help("For .txt/.md inputs, one example per: document (file), paragraph or line."))
    max_seq_length: int = field(default=512, **_help("With --model: count examples longer than this many tokens (the trainer's data.max_seq_length default)."))


@dataclass
class FileReport:
    """Counts for one input file; `rows_read == converted + sum(skipped.values())`."""

    path: str
    formats: Counter = field(default_factory=Counter)
    rows_read: int = 0
    converted: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[dict] = field(default_factory=list)
    dropped_fields: Counter = field(default_factory=Counter)  # field name -> rows whose field was left out
    empty: bool = False  # no records at all (skipped whole with --skip-invalid)
    empty_reason: str = ""  # why: "the file is empty or blank", or a table with a header row only
    _first_lines: dict[str, list[int]] = field(default_factory=dict, repr=False)

    def skip(self, line: int, reason: str, message: str = "") -> None:
        self.skipped[reason] += 1
        if len(self.skipped_examples) < MAX_SKIP_EXAMPLES:
            self.skipped_examples.append({"line": line, "reason": reason, "message": message})

    def to_json(self) -> dict:
        return {"path": self.path, "formats": dict(self.formats), "rows_read": self.rows_read,
                "converted": self.converted, "skipped": dict(self.skipped), "skipped_examples": self.skipped_examples,
                "dropped_fields": dict(sorted(self.dropped_fields.items())), "empty": self.empty,
                **({"empty_reason": self.empty_reason} if self.empty else {})}


def _validate(options: PrepareOptions) -> None:
    problems = []
    for name in ("valid_fraction", "test_fraction"):
        value = getattr(options, name)
        if not 0.0 <= value < 1.0:
            problems.append(f"--{name.replace('_', '-')} {value}: must be at least 0 and below 1")
    if options.valid_fraction + options.test_fraction >= 1.0:
        problems.append(f"--valid-fraction + --test-fraction = {options.valid_fraction + options.test_fraction:g}: "
                        "must stay below 1 to leave training examples")
    if options.input_format != "auto" and options.input_format not in formats.INPUT_FORMATS:
        problems.append(f"--format {options.input_format!r}: expected auto or one of {', '.join(formats.INPUT_FORMATS)}")
    if options.system is not None and not options.system.strip():
        problems.append("--system '': an empty system prompt would be added to every example; leave --system out")
    if options.output_format not in formats.OUTPUT_FORMATS:
        problems.append(f"--output-format {options.output_format!r}: expected one of {', '.join(formats.OUTPUT_FORMATS)}")
    if options.delimiter is not None and len(options.delimiter) != 1:
        problems.append(f"--delimiter {options.delimiter!r}: must be one character (e.g. ';', ',' or tab)")
    if options.max_seq_length < 1:
        problems.append(f"--max-seq-length {options.max_seq_length}: must be positive")
    if not options.inputs:
        problems.append("no input given; pass one or more files or folders")
    if problems:
        raise TransformError("; ".join(problems))


def _mixed_error(path: Path, first_lines: dict[str, list[int]]) -> TransformError:
    listing = "; ".join(f"{fmt} at line(s) {', '.join(map(str, lines))}" for fmt, lines in first_lines.items())
    return TransformError(f"{path}: the file mixes record formats ({listing}); give each format its own file, "
                          "or pass --format to read every record one way")


def read_records(path: Path, encoding: str = "utf-8", skip_invalid: bool = False, text_unit: str = "document",
                 delimiter: str | None = None, field_names: tuple[str, ...] = ()) -> Iterator[RawRecord | Skipped]:
    """Every record of one input file, streamed (a .json file is parsed whole).

    `delimiter` and `field_names` are for CSV / TSV (see `tables.read_csv`); a .tsv file defaults to tab.
    """
    kind = input_kind(path)
    if kind == "jsonl":
        return read_jsonl(path, encoding, skip_invalid)
    if kind == "json":
        return read_json(path, encoding, skip_invalid)
    if kind in ("csv", "tsv"):
        return read_csv(path, encoding, skip_invalid, delimiter or (None if kind == "csv" else "\t"), field_names)
    return read_text(path, encoding, skip_invalid, text_unit)


class _Run:
    """State of one run: the spool, the dedupe set, per-file counts and token lengths."""

    def __init__(self, options: PrepareOptions, spool: writer.Spool, tokenizer: Any):
        self.options = options
        self.spool = spool
        self.tokenizer = tokenizer
        self.keys = formats.Keys(options.prompt_key, options.completion_key, options.text_key,
                                 options.chosen_key, options.rejected_key)
        self.converter = formats.Converter(options.output_format, options.system, self.keys)
        # Hashes of the normalised rows. Python's 64-bit string hash is randomised per process but
        # fixed within it, and a collision among a million rows has odds near 1e-8.
        self.seen: set[int] = set()
        self.lengths = array("I")
        self.first_of_kind: dict[str, str] = {}  # "preference pairs" / "SFT rows" -> where the first was read

    def read_file(self, path: Path) -> FileReport:
        report = FileReport(str(path))
        options = self.options
        for item in read_records(path, options.encoding, options.skip_invalid, options.text_unit,
                                 options.delimiter, formats.field_names(self.keys)):
            report.rows_read += 1
            if isinstance(item, Skipped):
                report.skip(item.line, item.reason, item.message)
                continue
            try:
                self._convert(item, report)
            except TransformError as err:
                if not options.skip_invalid:
                    raise
                report.skip(item.line, "invalid_record", str(err))
        if report.rows_read == 0:
            header = header_row(path, options.encoding) if input_kind(path) in ("csv", "tsv") else None
            reason = f"a header row ({header}) and no data rows" if header else "the file is empty or blank"
            if not options.skip_invalid:
                raise TransformError(f"{path}: no records ({reason}); remove it from the inputs, "
                                     "or pass --skip-invalid to skip it (named in the report)")
            report.empty, report.empty_reason = True, reason
        return report

    def _convert(self, record: RawRecord, report: FileReport) -> None:
        record = formats.with_pair_keys(record, self.keys)
        fmt = self.options.input_format
        if fmt == "auto":
            fmt = formats.detect(record.value, self.keys)
            if fmt is None:
                raise formats.unknown_format_error(record, self.keys)
            lines = report._first_lines.setdefault(fmt, [])
            if len(lines) < MIXED_EXAMPLE_LINES:
                lines.append(record.line)
            if len(report._first_lines) > 1 and fmt != next(iter(report._first_lines)):
                # with --skip-invalid only the rows unlike the file's first are skipped, not all after them
                raise _mixed_error(record.path, report._first_lines)
        try:
            row = self.converter.convert(record, fmt)
        except SkipRecord as skip:  # a preference pair with identical answers, a tie: counted, not fatal
            report.formats[fmt] += 1
            report.skip(record.line, skip.reason, str(skip))
            return
        report.formats[fmt] += 1
        report.dropped_fields.update(formats.dropped_fields(record.value, fmt, self.keys, self.options.output_format))
        if row is None:
            report.skip(record.line, "empty", "no reply / text to learn from")
            return
        kind = "preference pairs" if isinstance(row, dict) and "chosen" in row else "SFT rows"
        if kind == "preference pairs" and self.options.output_format != "chat":
            raise TransformError(f"{record.where()}: --output-format {self.options.output_format} is for SFT rows; "
                                 "preference pairs are written as {prompt or messages, chosen, rejected}: leave "
                                 "--output-format out")
        self.first_of_kind.setdefault(kind, record.where())
        if len(self.first_of_kind) > 1:  # training reads one kind per folder: refuse the mix here, not there
            pairs, rows = self.first_of_kind["preference pairs"], self.first_of_kind["SFT rows"]
            raise TransformError(f"the inputs mix preference pairs (first at {pairs}) and SFT rows (first at {rows}); "
                                 "a training folder holds one kind: convert them into separate folders")
        if self.options.dedupe:
            try:
                key = hash(writer.dedupe_key(row))
            except RecursionError:
                raise TransformError(f"{record.where()}: the record is nested too deeply; flatten it") from None
            if key in self.seen:
                report.skip(record.line, "duplicate", "same as an earlier row after whitespace normalisation")
                return
            self.seen.add(key)
        line = writer.serialise(record, row)
        if self.tokenizer is not None:
            try:
                self.lengths.append(stats.token_length(self.tokenizer, row))
            except ValueError as err:  # a ChatTemplateError names the template's file:line
                raise TransformError(f"{record.where()}: {err}") from None
            except Exception as err:  # noqa: BLE001 - third-party tokenizer code: report where it failed
                raise TransformError(f"{record.where()}: the tokenizer could not encode this row "
                                     f"({type(err).__name__}: {err})") from None
        self.spool.append(line)
        report.converted += 1


def prepare(options: PrepareOptions, tokenizer: Any = None) -> dict:
    """Convert `options.inputs` into train/valid/test JSONL in `options.output_dir`; return the report.

    `tokenizer` (anything with `encode` and `apply_chat_template`) adds token statistics.
    Raises TransformError (a ValueError) or FileNotFoundError with a message naming the place
    and the fix; nothing is written to the output folder before every input has converted.
    """
    _validate(options)
    out = Path(options.output_dir)
    writer.check_output_dir(out, options.force)
    files, ignored = expand_inputs([Path(p) for p in options.inputs], exclude=out)
    try:
        spool = writer.Spool(writer.existing_parent(out))
    except OSError as err:
        raise TransformError(f"-o {out}: cannot write there ({err.strerror or err}); choose a folder you can "
                             "write to") from None
    try:
        run = _Run(options, spool, tokenizer)
        file_reports = [run.read_file(path) for path in files]
        n = len(spool)
        _check_pair_keys_used(options, run)
        if n == 0:
            read = sum(r.rows_read for r in file_reports)
            raise TransformError(f"no examples left: {read} record(s) read, all skipped "
                                 f"({_skip_summary(file_reports)}); see the reasons and fix the inputs")
        sizes = writer.split_sizes(n, options.valid_fraction, options.test_fraction)
        indices = writer.assign_splits(n, sizes, options.seed)
        try:
            out.mkdir(parents=True, exist_ok=True)
            for split in writer.SPLITS:
                target = out / f"{split}.jsonl"
                if sizes[split]:
                    writer.write_atomic(target, spool.rows(indices[split]))
                elif target.exists():
                    target.unlink()  # a fraction of 0 this time: an old file would be mistaken for this run's
        except OSError as err:
            raise TransformError(f"-o {out}: cannot write there ({err.strerror or err}); choose a folder you can "
                                 "write to") from None
    finally:
        spool.close()
    report = _report(options, file_reports, ignored, sizes, indices, run.lengths if tokenizer is not None else None)
    writer.write_atomic(out / REPORT_NAME, iter([(json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode()]))
    return report


def _check_pair_keys_used(options: PrepareOptions, run: _Run) -> None:
    """--chosen-key / --rejected-key given, and no record had them: say so rather than write SFT rows."""
    given = [f"--{flag} {name}" for flag, name, default in (("chosen-key", options.chosen_key, "chosen"),
                                                            ("rejected-key", options.rejected_key, "rejected"))
             if name != default]
    if given and "preference pairs" not in run.first_of_kind:
        raise TransformError(f"{' and '.join(given)}: no record has that field, so no preference pair was read; "
                             "check the column names (a table's header, a JSON record's keys)")


def _skip_summary(file_reports: list[FileReport]) -> str:
    total: Counter = Counter()
    for r in file_reports:
        total.update(r.skipped)
    return ", ".join(f"{k}: {v}" for k, v in sorted(total.items())) or "none"


def _report(options: PrepareOptions, file_reports: list[FileReport], ignored: list[Path],
            sizes: dict[str, int], indices: dict[str, list[int]], lengths: array | None) -> dict:
    skipped: Counter = Counter()
    dropped: Counter = Counter()
    for r in file_reports:
        skipped.update(r.skipped)
        dropped.update(r.dropped_fields)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}
    settings["inputs"] = [str(p) for p in options.inputs]
    token_stats = None
    if lengths is not None:
        token_stats = {"all": stats.summarise(lengths, options.max_seq_length)}
        for split, rows in indices.items():
            if rows:
                token_stats[split] = stats.summarise([lengths[i] for i in rows], options.max_seq_length)
    return {
        "settings": settings,
        "inputs": [r.to_json() for r in file_reports],
        "ignored_files": [str(p) for p in ignored],
        "totals": {"rows_read": sum(r.rows_read for r in file_reports),
                   "converted": sum(r.converted for r in file_reports), "skipped": dict(skipped),
                   "dropped_fields": dict(sorted(dropped.items()))},
        "splits": sizes,
        "token_stats": token_stats,
    }
