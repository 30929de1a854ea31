"""Output side: the spool of converted rows, the reproducible split, and atomic file writes.

Converted rows are appended to an anonymous temporary file (the spool) and only their byte
offsets stay in memory, so a million rows cost megabytes, not the dataset's size.
"""

from __future__ import annotations

import os
import random
import secrets
import tempfile
from array import array
from pathlib import Path
from typing import IO, Iterator

from .readers import TransformError

SPLITS = ("train", "valid", "test")


class Spool:
    """Append-only store of serialised rows; `rows(indices)` reads them back in any order."""

    def __init__(self, folder: Path):
        self._file: IO[bytes] = tempfile.TemporaryFile(dir=folder, prefix=".prepare-spool-")
        self._offsets = array("Q", [0])  # row i is bytes offsets[i]:offsets[i + 1]

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def append(self, line: bytes) -> None:
        """Add one serialised row (ending in a newline)."""
        self._file.write(line)
        self._offsets.append(self._offsets[-1] + len(line))

    def rows(self, indices: list[int]) -> Iterator[bytes]:
        """The rows at `indices`, in that order."""
        # pread, not mmap: mapped pages would count as this process's memory (the whole spool).
        self._file.flush()
        fd = self._file.fileno()
        offsets = self._offsets
        for i in indices:
            yield os.pread(fd, offsets[i + 1] - offsets[i], offsets[i])

    def close(self) -> None:
        """Delete the spool (the OS does so too if the process dies)."""
        self._file.close()


def existing_parent(path: Path) -> Path:
    """The nearest folder of `path` that exists (where the spool goes: same disk as the output)."""
    path = path.absolute()
    while not path.is_dir():
        path = path.parent
    return path


def split_sizes(n: int, valid_fraction: float, test_fraction: float) -> dict[str, int]:
    """Rows per split; an error if a split asked for (or train) would be empty."""
    valid = int(n * valid_fraction + 0.5)
    test = int(n * test_fraction + 0.5)
    sizes = {"train": n - valid - test, "valid": valid, "test": test}
    asked = {"train": 1.0 - valid_fraction - test_fraction, "valid": valid_fraction, "test": test_fraction}
    for split, size in sizes.items():
        if size <= 0 and asked[split] > 0:
            need = _fewest_rows(asked[split])
            raise TransformError(
                f"{n} example(s) after conversion, so the {split} split "
                f"({'the rest' if split == 'train' else f'--{split}-fraction {asked[split]:g}'}) would be empty; "
                f"give at least {need} examples or change the fractions"
            )
    return sizes


def _fewest_rows(fraction: float) -> int:
    """Fewest rows for which `fraction` of them rounds to at least one."""
    n = 1
    while int(n * fraction + 0.5) < 1:
        n += 1
    return n


def assign_splits(n: int, sizes: dict[str, int], seed: int) -> dict[str, list[int]]:
    """Row indices per split: one seeded shuffle (Python's `random`, stable across versions), then cut."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test_end = sizes["test"]
    valid_end = test_end + sizes["valid"]
    return {"test": order[:test_end], "valid": order[test_end:valid_end], "train": order[valid_end:]}


def write_atomic(path: Path, chunks: Iterator[bytes]) -> None:
    """Write `chunks` to a temporary file beside `path`, then rename it over `path`.

    An interrupted run leaves the old file (or none), never half of one; the temporary file is
    removed on any error.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 lets the umask decide the mode, as for any new file (tempfile would make it 0600).
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def check_output_dir(folder: Path, force: bool) -> None:
    """Refuse a non-empty existing folder unless `force`, and anything that is not a folder."""
    if folder.exists() and not folder.is_dir():
        raise TransformError(f"-o {folder}: exists and is not a folder; choose another output path")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise TransformError(f"-o {folder}: the folder exists and is not empty; pass --force to overwrite "
                             "its train/valid/test files, or choose another folder")
