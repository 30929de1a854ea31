"""Reading raw inputs: files and folders, gzip, encodings, JSONL / JSON / text (CSV / TSV: `tables.py`).

Each reader yields one `RawRecord` (or one `Skipped`, with `--skip-invalid`) at a time, with the
file, line and column it came from; what the records mean is `formats.py`'s business.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".md")
TEXT_UNITS = ("document", "paragraph", "line")
SNIPPET_CHARS = 60  # characters of a bad line shown in an error message
# Encodings whose bytes cannot be split on b"\n" (a newline is several bytes there).
_WIDE_ENCODINGS = ("utf-16", "utf-32")
# byte-order marks of the wide encodings, the 4-byte UTF-32 ones first (UTF-32 LE starts like UTF-16 LE)
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
              (codecs.BOM_UTF16_BE, "utf-16"))


class TransformError(ValueError):
    """A problem in the input or the options; the message names the place and the fix."""


@dataclass(frozen=True)
class RawRecord:
    """One record as read: a parsed JSON value, a CSV row as a dict, or a text string."""

    path: Path
    line: int
    col: int
    value: Any
    source_text: str | None = None  # the JSONL line, to point at a bad field's column

    def where(self, key: str | None = None) -> str:
        """`FILE:LINE:COL`, with COL at `"key"` on a JSONL line when it can be found."""
        col = self.col
        if key is not None and self.source_text is not None:
            found = self.source_text.find(json.dumps(key, ensure_ascii=False))
            if found >= 0:
                col = found + 1
        return f"{self.path}:{self.line}:{col}"


@dataclass(frozen=True)
class Skipped:
    """A record dropped by `--skip-invalid`: counted in the report under `reason`."""

    path: Path
    line: int
    reason: str
    message: str


def snippet(text: str, col: int = 1) -> str:
    """A short excerpt of `text` around column `col`, for error messages."""
    text = text.rstrip("\r\n")
    if len(text) <= SNIPPET_CHARS:
        return repr(text)
    start = max(0, min(col - 1 - SNIPPET_CHARS // 2, len(text) - SNIPPET_CHARS))
    piece = text[start : start + SNIPPET_CHARS]
    prefix = "..." if start > 0 else ""
    suffix = "..." if start + SNIPPET_CHARS < len(text) else ""
    return repr(prefix + piece + suffix)


def input_kind(path: Path) -> str:
    """The reader for a path by its suffix (`.gz` looked through): jsonl, json, csv, tsv, txt."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return "txt" if suffix == ".md" else suffix[1:]
    if name.endswith((".xlsx", ".xls", ".ods", ".numbers")):
        raise TransformError(f"{path}: a spreadsheet workbook; export the sheet as CSV (File > Save As / Export > CSV) "
                             "and pass the .csv")
    raise TransformError(
        f"{path}: unknown file type; supported: {', '.join(SUFFIXES)} (optionally .gz); rename the file to say what it holds"
    )


def _is_input_name(path: Path) -> bool:
    try:
        input_kind(path)
    except TransformError:
        return False
    return not path.name.startswith(".")


def expand_inputs(paths: list[Path], exclude: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(files to read, files ignored): folders are searched recursively, in sorted order.

    Files named directly must have a supported suffix; inside folders, other files (and
    hidden ones) are ignored and listed, so nothing disappears without a word. Files under
    `exclude` (the output folder) are never read back as input.
    """
    excluded = exclude.resolve() if exclude is not None else None
    files: list[Path] = []
    ignored: list[Path] = []
    for path in paths:
        if path.is_dir():
            everything = sorted(path.rglob("*"))
            inside_out = {p for p in everything if p.is_file() and excluded and p.resolve().is_relative_to(excluded)}
            found = [p for p in everything if p.is_file() and p not in inside_out]
            # a folder's README (a dataset card) is not data; links that are broken or lead to a folder
            # (which the search does not follow) are listed, not dropped without a word
            chosen = [p for p in found if _is_input_name(p) and not _is_card(p)]
            taken = set(chosen)
            ignored += [p for p in found if p not in taken]
            ignored += [p for p in everything if p.is_symlink() and not p.is_file()]
            if not chosen:
                if inside_out:
                    raise TransformError(f"{path}: its files are inside the output folder -o {exclude}, which is "
                                         "never read back as input; write the output to another folder")
                raise TransformError(
                    f"{path}: the folder holds no input files ({', '.join(SUFFIXES)}, optionally .gz); "
                    "point at the data files instead"
                )
            files += chosen
        elif path.is_file():
            input_kind(path)
            files.append(path)
        elif path.exists():
            raise TransformError(f"{path}: not a regular file or folder; pass a data file or a folder of them")
        else:
            raise FileNotFoundError(f"{path}: no such file or folder; check the path")
    return files, ignored


def _is_card(path: Path) -> bool:
    """A README (README.md, readme.txt, ...): in a folder, the dataset's card, not its data."""
    return path.name.lower().startswith("readme.")


def ignored_reason(path: Path) -> str:
    """Why `expand_inputs` left a file of a folder out (for the printed report)."""
    if path.is_symlink() and not path.exists():
        return "a broken link"
    if path.is_symlink() and path.is_dir():
        return "a link to a folder (not followed)"
    if path.name.startswith("."):
        return "hidden"
    if _is_card(path) and _is_input_name(path):
        return "a folder's README: a dataset card, not data"
    return "not a data file type"


def open_binary(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed when it is gzip (by suffix or by its magic number)."""
    handle = open(path, "rb")
    if path.name.lower().endswith(".gz") or handle.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=handle, mode="rb")  # type: ignore[return-value]
    return handle


def _check_encoding(encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except LookupError as err:
        raise TransformError(f"--encoding {encoding!r}: unknown encoding; try utf-8, latin-1 or cp1252") from err


def _decode_error(path: Path, line: int, offset: int, err: UnicodeDecodeError, encoding: str) -> str:
    bad = err.object[err.start : err.end]
    col = len(err.object[: err.start].decode(encoding, errors="replace")) + 1
    gz = " (of the decompressed data)" if path.name.lower().endswith(".gz") else ""
    return (f"{path}:{line}:{col}: byte(s) {bad!r} at byte offset {offset + err.start}{gz} are not valid {encoding}; "
            "pass --encoding (e.g. --encoding latin-1 or cp1252) or fix the file")


def iter_lines(path: Path, encoding: str, skip_invalid: bool) -> Iterator[tuple[int, str] | Skipped]:
    """(line number, decoded line) pairs, or `Skipped` for undecodable lines with `skip_invalid`.

    Bytes are split on newlines before decoding, so a decoding error can name its byte offset;
    UTF-16/32 (where that is impossible) are decoded as a stream instead.
    """
    encoding = _check_encoding(encoding)
    try:
        with open_binary(path) as handle:
            if encoding == "utf-8":  # the default: a UTF-16 / UTF-32 byte-order mark says otherwise (Excel's "Unicode Text")
                head = handle.peek(4)[:4]
                encoding = next((name for bom, name in _WIDE_BOMS if head.startswith(bom)), encoding)
            if encoding.startswith(_WIDE_ENCODINGS):
                yield from _iter_wide_lines(path, handle, encoding)
                return
            offset = 0
            for number, raw in enumerate(handle, 1):
                try:
                    text = raw.decode(encoding)
                except UnicodeDecodeError as err:
                    message = _decode_error(path, number, offset, err, encoding)
                    if not skip_invalid:
                        raise TransformError(message) from None
                    yield Skipped(path, number, "invalid_encoding", message)
                    text = None
                if text is not None:
                    if number == 1 and text.startswith("\ufeff"):
                        text = text[1:]  # a UTF-8 byte-order mark, as Windows editors write
                    yield number, text
                offset += len(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise TransformError(f"{path}: cannot read the file ({err}); check that it is complete and not corrupt") from err


def _iter_wide_lines(path: Path, handle: IO[bytes], encoding: str) -> Iterator[tuple[int, str]]:
    decoder = codecs.getincrementaldecoder(encoding)()
    pending = ""
    number = 0
    try:
        while chunk := handle.read(1 << 16):
            pending += decoder.decode(chunk)
            *lines, pending = pending.split("\n")
            for line in lines:
                number += 1
                yield number, line.lstrip("\ufeff") if number == 1 else line
        pending += decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise TransformError(f"{path}:{number + 1}: not valid {encoding} ({err.reason}); "
                             "pass the right --encoding or fix the file") from None
    if pending:
        yield number + 1, pending


# --- one reader per file kind -----------------------------------------------------------------

def read_jsonl(path: Path, encoding: str, skip_invalid: bool) -> Iterator[RawRecord | Skipped]:
    """One JSON value per non-blank line."""
    for item in iter_lines(path, encoding, skip_invalid):
        if isinstance(item, Skipped):
            yield item
            continue
        number, text = item
        if not text.strip():
            continue
        text = text.rstrip("\r\n")  # so an error's column is this line's, not column 1 of the next
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            message = (f"{path}:{number}:{err.colno}: invalid JSON ({err.msg}) in {snippet(text, err.colno)}; "
                       "fix the line or pass --skip-invalid to drop such lines")
            if not skip_invalid:
                raise TransformError(message) from None
            yield Skipped(path, number, "invalid_json", message)
            continue
        except (ValueError, RecursionError) as err:  # e.g. integers over Python's digit limit, deep nesting
            message = f"{path}:{number}:1: unreadable JSON ({type(err).__name__}: {str(err)[:100]}); fix the line"
            if not skip_invalid:
                raise TransformError(message) from None
            yield Skipped(path, number, "invalid_json", message)
            continue
        yield RawRecord(path, number, 1, value, text)


def _position(text: str, pos: int, line_starts: list[int]) -> tuple[int, int]:
    """(line, column), 1-based, of character `pos`; `line_starts` grows lazily as the walk advances."""
    while line_starts[-1] <= pos:
        nxt = text.find("\n", line_starts[-1])
        if nxt < 0:
            line_starts.append(len(text) + 1)
            break
        line_starts.append(nxt + 1)
    # Records are visited in increasing order, so the matching line is near the end.
    index = len(line_starts) - 1
    while line_starts[index] > pos:
        index -= 1
    return index + 1, pos - line_starts[index] + 1


_WHITESPACE = " \t\r\n"


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _json_error(path: Path, text: str, err: json.JSONDecodeError) -> TransformError:
    line_text = text.splitlines()[err.lineno - 1] if text.splitlines() else ""
    return TransformError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg}) in {snippet(line_text, err.colno)}; "
                          "fix the file (a .json file is parsed as a whole, so --skip-invalid cannot skip this)")


def _array_items(path: Path, text: str, pos: int, decoder: json.JSONDecoder) -> Iterator[tuple[int, Any]]:
    """(start position, value) of each element of the JSON array opening at `text[pos]`."""
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise _json_error(path, text, err) from None
        yield pos, value
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        err = json.JSONDecodeError("expected ',' or ']' between array elements", text, pos)
        raise _json_error(path, text, err)


# Lists that belong to one record (a chat's turns, a pair's answers, its tools), not a list of records.
RECORD_LISTS = frozenset({"messages", "conversations", "chosen", "rejected", "tools"})


def read_json(path: Path, encoding: str, skip_invalid: bool) -> Iterator[RawRecord | Skipped]:
    """The elements of a top-level array, or of the one list inside a top-level object, or the
    object itself when it is one record (it holds no list, or a list of `RECORD_LISTS`).

    A .json file is parsed whole (it is one value); JSONL is the format for huge datasets.
    """
    lines = [item for item in iter_lines(path, encoding, skip_invalid=False)]
    text = "\n".join(t.rstrip("\n").rstrip("\r") for _, t in lines)  # type: ignore[misc]
    decoder = json.JSONDecoder()
    start = _skip_ws(text, 0)
    if start >= len(text):
        return
    try:
        if text[start] == "[":
            items = _array_items(path, text, start, decoder)
        else:
            try:
                whole, end = decoder.raw_decode(text, start)
            except json.JSONDecodeError as err:
                raise _json_error(path, text, err) from None
            if _skip_ws(text, end) < len(text):
                raise _json_error(path, text, json.JSONDecodeError("extra data after the JSON value", text, _skip_ws(text, end)))
            if not isinstance(whole, dict):
                raise TransformError(f"{path}:1:{start + 1}: the file holds a single {type(whole).__name__}; "
                                     "expected an array of records or an object holding one list of records")
            lists = [key for key, value in whole.items() if isinstance(value, list)]
            if not lists or RECORD_LISTS.intersection(lists):
                # one record saved on its own: {"prompt": ..., "completion": ...} or {"messages": [...]}
                yield RawRecord(path, *_position(text, start, [0]), whole)
                return
            if len(lists) != 1:
                found = f"{len(lists)} lists ({', '.join(map(repr, lists))})" if lists else "no list"
                raise TransformError(f"{path}: the top-level object holds {found}; it must hold exactly one list "
                                     "of records (or make the file an array of records)")
            items = _array_items(path, text, _find_list(text, start, lists[0], decoder), decoder)
        line_starts = [0]
        for pos, value in items:
            line, col = _position(text, pos, line_starts)
            yield RawRecord(path, line, col, value)
    except (ValueError, RecursionError) as err:
        if isinstance(err, TransformError):
            raise
        raise TransformError(f"{path}: unreadable JSON ({type(err).__name__}: {str(err)[:100]}); fix the file") from None


def _find_list(text: str, start: int, key: str, decoder: json.JSONDecoder) -> int:
    """Position of the '[' that opens member `key` of the object opening at `text[start]`."""
    pos = _skip_ws(text, start + 1)
    while True:
        name, pos = decoder.raw_decode(text, pos)  # the member name (the object parsed before, so this is safe)
        pos = _skip_ws(text, _skip_ws(text, pos) + 1)  # past ':'
        if name == key and text[pos] == "[":
            return pos
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, _skip_ws(text, pos) + 1)  # past ','


def read_text(path: Path, encoding: str, skip_invalid: bool, unit: str) -> Iterator[RawRecord | Skipped]:
    """Plain text: the whole file, each blank-line-separated paragraph, or each line, as one record."""
    if unit not in TEXT_UNITS:
        raise TransformError(f"--text-unit {unit!r}: expected one of {', '.join(TEXT_UNITS)}")
    block: list[str] = []
    block_line = 1
    for item in iter_lines(path, encoding, skip_invalid):
        if isinstance(item, Skipped):
            yield item
            continue
        number, text = item
        text = text.rstrip("\r\n")
        if unit == "line":
            if text.strip():
                yield RawRecord(path, number, 1, text)
            continue
        if unit == "paragraph" and not text.strip():
            if block:
                yield RawRecord(path, block_line, 1, "\n".join(block))
            block = []
            continue
        if not block:
            block_line = number
        block.append(text)
    if block and "\n".join(block).strip():
        yield RawRecord(path, block_line, 1, "\n".join(block))
