"""Reading CSV / TSV as spreadsheets save them: delimiter detection, BOM, CRLF in quoted cells,
header names in any case (`TableRow`), and errors that name line, column and the dialect assumed.

Lines come from `readers.iter_lines` (gzip, encodings, byte-order mark); what the rows mean is
`formats.py`'s business.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterator

from .readers import RawRecord, Skipped, TransformError, iter_lines

CSV_DELIMITERS = (",", ";", "\t", "|")  # tried in this order; spreadsheets write ";" where "," is the decimal mark
SNIFF_CHARS = 1 << 16  # text read to detect a CSV file's delimiter
DELIMITER_NAMES = {"\t": "tab", ",": "comma", ";": "semicolon", "|": "pipe"}


class TableRow(dict):
    """One CSV / TSV row, {header as written: cell}, whose names are looked up without regard to
    case: `"question" in row`, `row.get("QUESTION")` and `row["Question"]` all find a `Question`
    column. Iterating gives the headers as the file spells them, so errors and the report of
    dropped fields name the columns as the user wrote them.
    """

    __slots__ = ("_names", "_folded")

    def __init__(self, cells: dict[str, str], names: dict[str, str | None], folded: dict[str, str]):
        super().__init__(cells)
        # Shared by a file's rows: `names` maps each name asked for to its header (or None) and
        # starts as {header: header}; `folded` maps casefolded names to headers as written.
        self._names = names
        self._folded = folded

    def header(self, name: str) -> str | None:
        """The header that `name` refers to (the exact spelling first, then any case); None if no column has it."""
        try:
            return self._names[name]
        except KeyError:  # first time this name is asked for in this file: remember the answer
            found = self._names[name] = self._folded.get(name.casefold())
            return found

    def __contains__(self, name: object) -> bool:
        return self.header(name) is not None  # type: ignore[arg-type]

    def __getitem__(self, name: str) -> str:
        header = self.header(name)
        if header is None:
            raise KeyError(name)
        return dict.__getitem__(self, header)

    def get(self, name: str, default: object = None) -> object:  # type: ignore[override]
        header = self.header(name)
        return default if header is None else dict.__getitem__(self, header)


def delimiter_name(delimiter: str) -> str:
    return f"{DELIMITER_NAMES.get(delimiter, 'character')} {delimiter!r}"


def detect_delimiter(sample: str) -> str:
    """The delimiter among CSV_DELIMITERS that splits `sample` (the start of a file) into the
    most rows with the header's field count (at least 2); ',' when none splits it."""
    if len(sample) >= SNIFF_CHARS and "\n" in sample:
        sample = sample[: sample.rfind("\n") + 1]  # whole lines only
    best, best_score = ",", 0
    for delimiter in CSV_DELIMITERS:
        try:
            rows = [row for row in csv.reader(io.StringIO(sample, newline=""), delimiter=delimiter) if row]
        except csv.Error:
            continue
        if not rows or len(rows[0]) < 2:
            continue
        score = sum(len(row) == len(rows[0]) for row in rows)
        if score > best_score:
            best, best_score = delimiter, score
    return best


def _sample(path: Path, encoding: str) -> str:
    parts, size = [], 0
    for item in iter_lines(path, encoding, skip_invalid=True):
        if isinstance(item, Skipped):
            continue
        parts.append(item[1])
        size += len(item[1])
        if size >= SNIFF_CHARS:
            break
    return "".join(parts)


def header_row(path: Path, encoding: str, limit: int = 80) -> str | None:
    """The first non-blank line of a table file, cut to `limit` characters, or None (for messages)."""
    for item in iter_lines(path, encoding, skip_invalid=True):
        if not isinstance(item, Skipped) and item[1].strip():
            text = item[1].strip()
            return text if len(text) <= limit else text[: limit - 3] + "..."
    return None


def _field_position(lines: list[tuple[int, str]], delimiter: str, index: int) -> tuple[int, int]:
    """(line, column) where field `index` (0-based) of a CSV record spread over `lines` starts;
    the record's end when it has fewer fields."""
    field, quoted = 0, False
    for number, text in lines:
        for col, char in enumerate(text, 1):
            if char == '"':
                quoted = not quoted
            elif char == delimiter and not quoted:
                field += 1
                if field == index:
                    return number, col + 1
    number, text = lines[-1] if lines else (1, "")
    return number, len(text.rstrip("\r\n")) + 1


def _unclosed_quote(lines: list[tuple[int, str]], delimiter: str) -> tuple[int, int] | None:
    """(line, column) of the quote that opens a quoted field and is still open at the end of `lines`
    (one CSV record as the reader consumed it), or None when every quoted field is closed."""
    opened, quoted, field_start, just_closed = None, False, True, False
    for number, text in lines:
        for col, char in enumerate(text, 1):
            if quoted:
                if char == '"':
                    quoted, just_closed = False, True
            elif char == '"' and (field_start or just_closed):  # a field's opening quote, or a doubled ""
                if field_start:
                    opened = (number, col)
                quoted, field_start, just_closed = True, False, False
            else:
                field_start, just_closed = char in (delimiter, "\n", "\r"), False
    return opened if quoted else None


def read_csv(path: Path, encoding: str, skip_invalid: bool, delimiter: str | None = None,
             field_names: tuple[str, ...] = ()) -> Iterator[RawRecord | Skipped]:
    """Rows as `TableRow`s ({header: value}, names matched without regard to case); the first row is the header.

    `delimiter` None detects it (`detect_delimiter`). Header names keep the file's spelling
    (less surrounding spaces); two that differ only in case are refused when they would both
    answer to one of `field_names` (the names some format reads). CRLF inside quoted fields (as
    spreadsheets save them) becomes LF. Errors name line, column and the dialect assumed.
    """
    dialect = f"delimiter {delimiter_name(delimiter)}" if delimiter else ""
    if delimiter is None:
        delimiter = detect_delimiter(_sample(path, encoding))
        dialect = f"delimiter {delimiter_name(delimiter)} (detected)"
    dialect += ", quote '\"'"
    fix_dialect = "pass --delimiter to read it otherwise" if "detected" in dialect else "check --delimiter"
    numbered: list[tuple[int, str]] = []
    replay: list[tuple[int, str]] = []  # lines to read again after an unclosed quote (--skip-invalid)
    source = iter(iter_lines(path, encoding, skip_invalid))

    def lines() -> Iterator[str]:
        while True:
            item = replay.pop(0) if replay else next(source, None)
            if item is None:
                return
            if isinstance(item, Skipped):
                skipped.append(item)
                continue
            numbered.append(item)
            yield item[1]

    skipped: list[Skipped] = []
    reader = csv.reader(lines(), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    read_names = {name.casefold() for name in field_names}
    while True:
        consumed = len(numbered)
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            record_lines = numbered[consumed:]
            opened = _unclosed_quote(record_lines, delimiter) if "end of data" in str(err) else None
            if opened is not None:
                # The reader ran to the end of the file inside a quoted field: name where it opened,
                # and when skipping, skip that record's first line only and read on after it.
                line, col = opened
                message = (f"{path}:{line}:{col}: a quoted field opens here and is never closed (the rest of the file, "
                           f"{len(record_lines)} line(s), would be one field), reading it with {dialect}; close the "
                           "quote, double a quote inside a quoted field (\"\"), or drop the stray quote")
                if skip_invalid and header is not None:
                    replay[:0] = record_lines[1:]
                    del numbered[consumed:]
                    reader = csv.reader(lines(), delimiter=delimiter, strict=True)
            else:
                line, col = (numbered[-1][0] if numbered else 1), 1
                message = (f"{path}:{line}:{col}: bad CSV ({err}) reading it with {dialect}; fields holding quotes, the "
                           f"delimiter or newlines must be quoted; {fix_dialect}")
            if not skip_invalid or header is None:
                raise TransformError(message) from None
            yield Skipped(path, line, "invalid_csv", message)
            continue
        yield from skipped
        skipped.clear()
        record_lines = numbered[consumed:] or numbered[-1:]
        line = record_lines[0][0] if record_lines else 1
        if not row or all(not field.strip() for field in row):
            continue
        if header is None:
            header = [name.strip() for name in row]
            # Exact repeats, or names a format reads twice over but for case (`Prompt` and `prompt`).
            keyed = [name.casefold() if name.casefold() in read_names else name for name in header]
            duplicated = sorted({name for name, key in zip(header, keyed) if keyed.count(key) > 1})
            # For TableRow's lookups; of unread names that differ only in case, the first answers.
            names: dict[str, str | None] = {name: name for name in header}
            folded = {name.casefold(): name for name in reversed(header)}
            if duplicated:
                raise TransformError(f"{path}:{line}:1: the header repeats column(s) {', '.join(map(repr, duplicated))} "
                                     "(names are matched without regard to case); give every column its own name")
            continue
        if len(row) != len(header):
            at_line, col = _field_position(record_lines, delimiter, min(len(row), len(header)))
            problem = "an extra field starts here" if len(row) > len(header) else "the row ends here"
            message = (f"{path}:{at_line}:{col}: {len(row)} fields but the header has {len(header)} ({problem}), "
                       f"reading it with {dialect}; quote fields that contain the delimiter, fix the row, or {fix_dialect}")
            if not skip_invalid:
                raise TransformError(message)
            yield Skipped(path, line, "invalid_csv", message)
            continue
        # Spreadsheets save line ends inside quoted cells as CRLF; the text means LF.
        yield RawRecord(path, line, 1, TableRow({name: value.replace("\r\n", "\n") for name, value in zip(header, row)},
                                                names, folded))
    yield from skipped
