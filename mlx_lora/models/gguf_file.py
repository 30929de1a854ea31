"""The GGUF container: header, metadata and tensor directory (no tensor data, no model logic).

Layout from ggml's docs/gguf.md: magic, version, tensor count, key/value metadata, tensor
infos (name, dims, GGML type, offset), then the aligned data section. Read by `gguf.py`
(weights) and `gguf_tokenizer.py` (vocabulary), which therefore do not import each other.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TensorInfo:
    """One tensor's entry in a GGUF header."""

    name: str
    type_name: str  # GGML type, e.g. "Q4_1"
    shape: tuple[int, ...]  # numpy order: (rows, ..., row length)
    offset: int  # from the start of the data section


@dataclass
class GGUFHeader:
    """A GGUF file's metadata and tensor directory (no tensor data)."""

    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    data_start: int = 0


def is_gguf_file(path: str | Path) -> bool:
    """Whether `path` is a file starting with the GGUF magic, whatever its name: Ollama keeps its models
    as blobs named by digest (~/.ollama/models/blobs/sha256-...), with no .gguf suffix."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def read_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF header: metadata (strings, numbers, lists) and the tensor directory.

    Ours rather than `gguf.GGUFReader`, which takes seconds on a 49k-token vocabulary.
    """
    from gguf import GGMLQuantizationType

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (it does not start with the GGUF magic number); "
                             "pass a .gguf file from llama.cpp's converter or a Hugging Face model folder")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse_header(path, buf, GGMLQuantizationType)
            except (struct.error, UnicodeDecodeError, IndexError) as err:
                raise ValueError(f"{path}: the GGUF header is truncated or corrupt ({err}); "
                                 "download the file again") from err


def _parse_header(path: Path, buf, type_enum) -> GGUFHeader:
    import numpy as np

    # GGUF metadata value types 0-12 except 8 (string) and 9 (array): struct and numpy formats
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    numpy_of = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                10: "<u8", 11: "<i8", 12: "<f8"}
    pos = 4

    def take(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        length = take("<Q")
        pos += length
        return bytes(buf[pos - length: pos]).decode("utf-8")

    def value(kind: int):
        nonlocal pos
        if kind in scalar:
            return take(scalar[kind])
        if kind == 8:
            return string()
        if kind == 9:
            item_kind, count = take("<I"), take("<Q")
            if item_kind in numpy_of:  # numbers in one read; kept as a list like the rest
                if pos + count * np.dtype(numpy_of[item_kind]).itemsize > len(buf):
                    raise struct.error(f"an array of {count} numbers runs past the end of the file")
                items = np.frombuffer(buf, dtype=numpy_of[item_kind], count=count, offset=pos)
                pos += items.nbytes
                return items.tolist()
            return [value(item_kind) for _ in range(count)]
        raise ValueError(f"{path}: unknown GGUF metadata value type {kind}; the file is corrupt or from a newer format")

    version = take("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3 are); "
                         "re-convert the model with a current llama.cpp")
    n_tensors, n_kv = take("<Q"), take("<Q")
    header = GGUFHeader(path=path)
    for _ in range(n_kv):
        key = string()
        header.metadata[key] = value(take("<I"))
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        type_id, offset = take("<I"), take("<Q")
        try:
            type_name = type_enum(type_id).name
        except ValueError:
            type_name = f"type {type_id}"
        header.tensors[name] = TensorInfo(name, type_name, tuple(reversed(dims)), offset)
    alignment = int(header.metadata.get("general.alignment", 32))
    header.data_start = -(-pos // alignment) * alignment
    return header


def required_key(header: GGUFHeader, key: str) -> Any:
    if key not in header.metadata:
        raise ValueError(f"{header.path}: GGUF metadata has no '{key}'; the file is incomplete or not a "
                         "llama-family model. Re-convert it with llama.cpp's convert_hf_to_gguf.py")
    return header.metadata[key]


def tensor_bytes(header: GGUFHeader, info: TensorInfo, rows: int | None = None):
    """A tensor's bytes as stored (uint8, shape (rows, bytes per row)); the first `rows` rows, or all.

    Row size comes from ggml's block table (gguf.constants.GGML_QUANT_SIZES: weights per block,
    bytes per block). Raises ValueError when the file is shorter than its directory says.
    """
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES

    try:
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[info.type_name]]
    except KeyError as err:
        raise ValueError(f"{header.path}: tensor {info.name} has GGML type {info.type_name}, which the gguf "
                         "package does not know; the file is newer than this kit") from err
    total_rows = 1
    for dim in info.shape[:-1]:
        total_rows *= dim
    rows = total_rows if rows is None else min(rows, total_rows)
    row_bytes = info.shape[-1] // block * block_bytes
    start = header.data_start + info.offset
    if start + rows * row_bytes > header.path.stat().st_size:
        raise ValueError(f"{header.path}: tensor {info.name} runs past the end of the file; it is truncated, "
                         "download it again")
    data = np.memmap(header.path, dtype=np.uint8, mode="r", offset=start, shape=(rows * row_bytes,))
    return np.array(data).reshape(rows, row_bytes)


def read_float_tensor(header: GGUFHeader, name: str):
    """A small F32 / F16 tensor (rope factors and the like) as a float32 numpy array of its shape."""
    import numpy as np

    info = header.tensors[name]
    dtypes = {"F32": "<f4", "F16": "<f2"}
    if info.type_name not in dtypes:
        raise ValueError(f"{header.path}: {name} is {info.type_name}; expected F32 or F16")
    return tensor_bytes(header, info).view(dtypes[info.type_name]).astype(np.float32).reshape(info.shape)
