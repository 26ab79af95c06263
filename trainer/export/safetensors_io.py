"""Reading and writing safetensors files one tensor at a time, so a merge never holds a whole shard.

The format is the one documented by the safetensors project: 8 bytes (little-endian u64) giving the header
length N, N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`
padded with spaces to a multiple of 8, then the tensors' raw little-endian bytes back to back.

Reads use plain `readinto` rather than a memory map: touching a mapped file counts every page read toward the
process's resident memory, which is exactly what a streaming merge must not do. Writes take the full list of
(name, dtype, shape) first, write the header, then accept tensors in that order and check each one.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

# safetensors dtype name -> (torch dtype name, bytes per element)
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
_BY_TORCH = {torch_name: st for st, (torch_name, _) in _DTYPES.items()}
# Note: a header longer than this is not a model file (safetensors itself refuses headers over 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024


def dtype_name(torch_dtype) -> str:
    """safetensors name ("BF16") of a torch dtype."""
    return _BY_TORCH[str(torch_dtype).removeprefix("torch.")]


def element_size(st_dtype: str) -> int:
    return _DTYPES[st_dtype][1]


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int
    """Absolute byte offset of the tensor's data in the file."""
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[list[TensorEntry], dict[str, str]]:
    """Entries in file order, and the `__metadata__` mapping."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path} is not a safetensors file (header of {length} bytes)")
        header = json.loads(f.read(length))
    metadata = header.pop("__metadata__", {}) or {}
    entries = []
    for name, info in header.items():
        begin, end = info["data_offsets"]
        entries.append(TensorEntry(name=name, dtype=info["dtype"], shape=tuple(info["shape"]), path=path,
                                   start=8 + length + begin, nbytes=end - begin))
    entries.sort(key=lambda e: e.start)
    return entries, metadata


def read_tensor(entry: TensorEntry):
    """The tensor, read with plain file reads into memory this process owns."""
    import torch  # heavy import

    torch_dtype = getattr(torch, _DTYPES[entry.dtype][0])
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=torch_dtype)
    buf = bytearray(entry.nbytes)
    with open(entry.path, "rb") as f:
        f.seek(entry.start)
        view = memoryview(buf)
        got = 0
        while got < entry.nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise ValueError(f"{entry.path} ends inside tensor {entry.name}; the file is truncated")
            got += n
    return torch.frombuffer(buf, dtype=torch_dtype).reshape(entry.shape)


def read_all(path: Path) -> dict[str, Any]:
    """Every tensor of a (small) file, e.g. an adapter."""
    entries, _ = read_header(path)
    return {e.name: read_tensor(e) for e in entries}


class ShardWriter:
    """Writes one safetensors file whose tensors are declared up front and then written in order."""

    def __init__(self, path: Path, layout: Iterable[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._expected: list[tuple[str, str, tuple[int, ...], int]] = []
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, st_dtype, shape in layout:
            n = element_size(st_dtype)
            for d in shape:
                n *= d
            header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._expected.append((name, st_dtype, tuple(shape), n))
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        self.data_bytes = offset
        self.total_bytes = 8 + len(blob) + offset
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._next = 0

    def write(self, name: str, tensor) -> None:
        want_name, want_dtype, want_shape, nbytes = self._expected[self._next]
        if name != want_name:
            raise ValueError(f"shard {self.path.name}: expected tensor {want_name}, got {name}")
        if dtype_name(tensor.dtype) != want_dtype or tuple(tensor.shape) != want_shape:
            raise ValueError(
                f"shard {self.path.name}: {name} is {dtype_name(tensor.dtype)}{tuple(tensor.shape)}, "
                f"declared {want_dtype}{want_shape}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(dtype=_uint8()).numpy()
        if data.nbytes != nbytes:
            raise ValueError(f"shard {self.path.name}: {name} has {data.nbytes} bytes, declared {nbytes}")
        self._file.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            if self._next != len(self._expected):
                missing = self._expected[self._next][0]
                raise ValueError(f"shard {self.path.name} closed before tensor {missing} was written")
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()


def _uint8():
    import torch

    return torch.uint8
