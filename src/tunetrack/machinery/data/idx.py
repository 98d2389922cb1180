"""LeCun's IDX format: an array of unsigned bytes with its shape in a small header, as the files
of several image data sets come, plain or gzip-compressed."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def read_idx(path: Path) -> np.ndarray:
    """An array of unsigned bytes in LeCun's IDX format, gzip-compressed when its name ends in .gz."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        content = f.read()
    kind, dimensions = content[2], content[3]
    if content[:2] != b"\0\0" or kind != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{dimensions}I", content[4 : 4 + 4 * dimensions])
    return np.frombuffer(bytearray(content), np.uint8, offset=4 + 4 * dimensions).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """``array`` (unsigned bytes) as an IDX file, gzip-compressed when the name ends in .gz."""
    path.write_bytes(idx_bytes(array, compressed=path.suffix == ".gz"))


def idx_bytes(array: np.ndarray, compressed: bool = False) -> bytes:
    """``array`` (unsigned bytes) in the IDX format, as a file holds it."""
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, 0x08, array.ndim, *array.shape)
    content = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    return gzip.compress(content, mtime=0) if compressed else content
