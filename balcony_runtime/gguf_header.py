"""A GGUF file's metadata and tensor table, read in one pass over the mapped file.

Why not gguf's ``GGUFReader``: it builds a numpy view for every part of every value, so the
vocabulary and merges of a 49k-token model (two arrays of about 49k strings each) cost it seconds,
and transformers' loader runs it once for the config and again for the tokenizer. Here string arrays
are skipped (their length prefixes walked, nothing built) unless asked for, and tensors are
numpy views of the mapped file, read only when dequantized.

Layout (little-endian, versions 2 and 3): magic "GGUF", u32 version, u64 tensor count, u64
key-value count; key-value pairs (string key, u32 type, value); tensor infos (string name, u32 rank,
u64 dims fastest-first, u32 ggml type, u64 offset); the tensor data from the next
``general.alignment`` boundary (32 by default).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """Not a GGUF file this reader understands (bad magic, version, or a truncated table)."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    dims: tuple[int, ...]  # numpy order (slowest first): the reverse of the file's
    ggml_type: int
    data: np.ndarray  # uint8 view of the mapped file: the tensor's bytes


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict  # key -> value; a skipped string array is its length
    tensors: tuple[GGUFTensor, ...]


def read_gguf(path: Path, keep_string_arrays: frozenset[str] = frozenset()) -> GGUFHeader:
    if Path(path).stat().st_size < 24:  # magic, version and the two counts
        raise GGUFFormatError(f"{path} is too short to be a GGUF file")
    try:
        return _read(path, keep_string_arrays)
    except struct.error as exc:  # a length prefix read past the end
        raise GGUFFormatError(f"{path} is truncated inside its header: {exc}") from None


def _read(path: Path, keep_string_arrays: frozenset[str]) -> GGUFHeader:
    blob = np.memmap(path, dtype=np.uint8, mode="r")
    reader = _Cursor(memoryview(blob))
    if bytes(reader.take(4)) != b"GGUF":
        raise GGUFFormatError(f"{path} is not a GGUF file")
    version = reader.scalar(4)
    if version not in (2, 3):
        raise GGUFFormatError(f"GGUF version {version} (big-endian or unknown): only 2 and 3 are read here")
    tensor_count, kv_count = reader.scalar(10), reader.scalar(10)
    metadata = {}
    for _ in range(kv_count):
        key = reader.string()
        metadata[key] = reader.value(reader.scalar(4), keep_strings=key in keep_string_arrays)
    infos = []
    for _ in range(tensor_count):
        name = reader.string()
        dims = tuple(reader.scalar(10) for _ in range(reader.scalar(4)))
        infos.append((name, dims, reader.scalar(4), reader.scalar(10)))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-reader.pos // alignment) * alignment
    tensors = []
    for name, dims, ggml_type, offset in infos:
        start, nbytes = data_start + offset, _byte_count(ggml_type, dims)
        if start + nbytes > blob.size:
            raise GGUFFormatError(f"{path} is truncated: tensor {name!r} runs past the end of the file")
        tensors.append(GGUFTensor(name, tuple(reversed(dims)), ggml_type, blob[start : start + nbytes]))
    return GGUFHeader(metadata, tuple(tensors))


def _byte_count(ggml_type: int, dims: tuple[int, ...]) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except ValueError:
        raise GGUFFormatError(f"unknown ggml tensor type {ggml_type}") from None
    return int(np.prod(dims, dtype=np.int64)) // block * size


class _Cursor:
    def __init__(self, view: memoryview):
        self.view, self.pos = view, 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.view):
            raise GGUFFormatError("the GGUF header runs past the end of the file")
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, value_type: int):
        fmt = _SCALAR[value_type]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar(10))).decode("utf-8", errors="replace")

    def value(self, value_type: int, keep_strings: bool = False):
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.scalar(4), self.scalar(10)
            if item_type == _STRING and not keep_strings:
                for _ in range(count):  # walk the length prefixes only
                    self.pos += 8 + struct.unpack_from("<Q", self.view, self.pos)[0]
                return count
            if item_type in _SCALAR:
                fmt = _SCALAR[item_type]
                width = struct.calcsize(fmt)
                return list(struct.unpack(f"<{count}{fmt[1]}", self.take(width * count)))
            return [self.value(item_type, keep_strings) for _ in range(count)]
        if value_type not in _SCALAR:
            raise GGUFFormatError(f"unknown GGUF value type {value_type}")
        return self.scalar(value_type)
