"""A GGUF file's metadata and tensor shapes, read without its tensors or vocabulary.

The gguf package's ``GGUFReader`` parses every metadata field into numpy views first,
SmolLM2's 49,152 vocabulary strings and 48,900 merges included: seconds before the
first key is known (BENCHMARKS.md, "SmolLM2 warm start"). A warm start needs only a dozen numbers
to know whether the config can map at all, so this reads the header, the scalar and
string fields and the tensor infos in one pass over the file's bytes, stepping over
arrays, and leaves the tensors to ``GGUFReader``.

Layout (GGUF v2 and v3, little-endian): magic ``GGUF``, version u32, tensor count u64,
field count u64; each field a key string (u64 length + UTF-8), a type u32 and a value;
each tensor info a name, a dimension count u32, the dimensions u64 (innermost first), a
type u32 and an offset u64.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

# GGUF value type -> struct format of one scalar; 8 (string) and 9 (array) are read apart.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass
class GgufHeader:
    """Scalar and string metadata by key (arrays left out), and each tensor's shape."""

    fields: dict[str, Any]
    shapes: dict[str, list[int]]


def read_gguf_header(path: str | Path) -> GgufHeader:
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _Parser(data).header()
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read GGUF file {path}: {exc}") from None


class _Parser:
    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.at = data, 0

    def header(self) -> GgufHeader:
        if self.data[:4] != b"GGUF":
            raise ValueError("not a GGUF file (no GGUF magic)")
        self.at = 4
        version = self.scalar("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (2 and 3 are read)")
        tensors, count = self.scalar("Q"), self.scalar("Q")
        fields = {}
        for _ in range(count):
            key, kind = self.string(), self.scalar("I")
            value = self.value(kind)
            if value is not None:
                fields[key] = value
        shapes = {}
        for _ in range(tensors):
            name = self.string()
            dims = [self.scalar("Q") for _ in range(self.scalar("I"))]
            self.at += 4 + 8  # type and offset
            shapes[name] = dims
        return GgufHeader(fields, shapes)

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.scalar("Q")
        text = self.data[self.at:self.at + size].decode("utf-8")
        self.at += size
        return text

    def value(self, kind: int) -> Any:
        """A scalar or a string; an array is stepped over (None)."""
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("I"), self.scalar("Q")
            if item in _SCALARS:
                self.at += count * struct.calcsize(_SCALARS[item])
            elif item == _STRING:  # a vocabulary: lengths only, nothing decoded
                for _ in range(count):
                    self.at += 8 + struct.unpack_from("<Q", self.data, self.at)[0]
            else:
                for _ in range(count):
                    self.value(item)
            return None
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        value = self.scalar(_SCALARS[kind])
        # float32 metadata (1e-5 stored as 9.99999975e-06): its shortest repr is the value meant
        return float(str(np.float32(value))) if kind == 6 else value
