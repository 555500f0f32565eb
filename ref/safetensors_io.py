"""safetensors files, read and written without the `safetensors` package.

Layout: 8-byte little-endian header length N, N bytes of JSON ({name: {dtype, shape, data_offsets}},
optional "__metadata__": {str: str}), then the data; offsets are relative to the end of the header.
Reading validates the (untrusted) header and memory-maps the file once; every tensor is a zero-copy,
read-only NumPy view (ml_dtypes for BF16 / F8), 0-d tensors stay 0-d. Writing supports the same dtypes,
which `safetensors.numpy` cannot (it has no F8_E4M3 and needs torch for BF16).
"""
from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple

import ml_dtypes
import numpy as np

from ref.errors import CheckpointError

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "I32": np.dtype("<i4"), "U32": np.dtype("<u4"),
    "I64": np.dtype("<i8"), "U64": np.dtype("<u8"),
    "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {dt: name for name, dt in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors package's own limit


def dtype_name(dtype: np.dtype) -> str:
    """safetensors dtype string for a NumPy / ml_dtypes dtype."""
    dtype = np.dtype(dtype)
    try:
        return _NAMES[dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype]
    except KeyError:
        raise CheckpointError(f"dtype {np.dtype(dtype)} cannot be stored in safetensors") from None


class TensorInfo(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one file's header -> ({name: TensorInfo}, metadata). Reads only the header."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short for a safetensors header")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > MAX_HEADER:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the {size}-byte file")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    data_start, data_len = 8 + n, size - 8 - n
    tensors = {name: _tensor_info(path, name, entry, data_start, data_len) for name, entry in header.items()}
    spans = sorted((t.begin, t.end, name) for name, t in tensors.items() if t.nbytes)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: tensors '{a}' and '{b}' overlap")
    return tensors, metadata


def _tensor_info(path: Path, name: str, entry, data_start: int, data_len: int) -> TensorInfo:
    """Validate one header entry (fast path; _explain says what is wrong)."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        n = DTYPES[dtype].itemsize
        for d in shape:
            if type(d) is not int or d < 0:
                raise ValueError
            n *= d
        if type(begin) is int and type(end) is int and 0 <= begin <= end <= data_len and end - begin == n:
            return TensorInfo(dtype, tuple(shape), data_start + begin, data_start + end)
    except (KeyError, TypeError, ValueError):
        pass
    _explain(path, name, entry, data_len)
    raise CheckpointError(f"{path}: tensor '{name}': malformed header entry {entry!r}")


def _explain(path: Path, name: str, entry, data_len: int) -> None:
    """Raise the CheckpointError that says what is wrong with a header entry."""
    where = f"{path}: tensor '{name}'"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry must be an object, got {entry!r}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end], got {offsets!r}")
    begin, end = offsets
    if not begin <= end <= data_len:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] outside the {data_len}-byte data section")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise CheckpointError(f"{where}: {end - begin} bytes but shape {shape} of {dtype} needs {expected}")


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class SafetensorsFile:
    """One validated file; the data is memory-mapped on first access and shared by all views."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        self._mm: mmap.mmap | None = None

    def _map(self) -> mmap.mmap:  # the whole file; pages are read only when a view touches them
        if self._mm is None:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < max((t.end for t in self.tensors.values()), default=0):
                    raise CheckpointError(f"{self.path}: file shrank to {size} bytes after its header was read")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def view_bytes(self, begin: int, end: int, prefetch: bool = False) -> memoryview:
        """Bytes [begin, end) of the file, zero-copy. Every tensor read goes through here.

        prefetch=True asks the kernel to start reading the whole range now (MADV_WILLNEED): cold
        pages are otherwise faulted in a few at a time, several times slower than one large read."""
        if begin == end:
            return memoryview(b"")
        mm = self._map()
        if prefetch:
            start = begin - begin % mmap.PAGESIZE
            mm.madvise(mmap.MADV_WILLNEED, start, end - start)
        return memoryview(mm)[begin:end]

    def tensor(self, name: str, row: int | None = None, prefetch: bool = False) -> np.ndarray:
        """Read-only view of tensor `name`, or of `name[row]` (mapping only that row's bytes);
        prefetch=True when the caller will read all of it."""
        info = self.info(name)
        dtype, shape, begin, end = DTYPES[info.dtype], info.shape, info.begin, info.end
        if row is not None:
            if not shape or not 0 <= row < shape[0]:
                raise CheckpointError(f"{self.path}: tensor '{name}' of shape {list(shape)} has no row {row}")
            step = info.nbytes // shape[0]
            begin, end, shape = begin + row * step, begin + (row + 1) * step, shape[1:]
        return np.frombuffer(self.view_bytes(begin, end, prefetch), dtype=dtype).reshape(shape)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor '{name}'") from None


@dataclass(frozen=True)
class LazyTensor:
    """A tensor to be written without holding it in memory: `produce()` returns the array, or an
    iterable of arrays whose bytes, concatenated in C order, are the tensor's."""
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray | Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray | LazyTensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (any DTYPES dtype, 0-d kept 0-d) as one safetensors file.

    Data is ordered by decreasing item size (stable), so every tensor starts at a multiple of its
    item size, as the safetensors package does it."""
    specs = {n: t if isinstance(t, LazyTensor) else _eager(t) for n, t in tensors.items()}
    order = sorted(specs, key=lambda n: -DTYPES[specs[n].dtype].itemsize)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for n in order:
        t = specs[n]
        header[n] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for n in order:
            _write_data(f, path, n, specs[n])


def _eager(a: np.ndarray) -> LazyTensor:
    a = np.asarray(a)
    return LazyTensor(dtype_name(a.dtype), a.shape, lambda: a)


def _write_data(f, path, name: str, t: LazyTensor) -> None:
    out = t.produce()
    written, dtype = 0, DTYPES[t.dtype]
    for chunk in [out] if isinstance(out, np.ndarray) else out:
        chunk = np.asarray(chunk)
        if chunk.dtype != dtype:
            raise CheckpointError(f"{path}: tensor '{name}' is {t.dtype} but its data came as {chunk.dtype}")
        written += f.write(_raw_bytes(chunk))
    if written != t.nbytes:
        raise CheckpointError(f"{path}: tensor '{name}' {list(t.shape)} needs {t.nbytes} bytes, got {written}")


def _raw_bytes(a: np.ndarray) -> memoryview:
    """The array's bytes in C order, little-endian (0-d arrays included)."""
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return memoryview(np.ascontiguousarray(a.reshape(-1)).view(np.uint8))


def overwrite_tensors(path: str | Path, values: Mapping[str, np.ndarray]) -> None:
    """Replace the bytes of existing tensors in place (same dtype and shape each)."""
    tensors, _ = read_header(path)
    with open(path, "r+b") as f:
        for name, value in values.items():
            info = tensors.get(name)
            value = np.asarray(value)
            if info is None:
                raise CheckpointError(f"{path}: no tensor '{name}'")
            if dtype_name(value.dtype) != info.dtype or value.shape != info.shape:
                raise CheckpointError(f"{path}: tensor '{name}' is {info.dtype} {list(info.shape)}, "
                                      f"got {dtype_name(value.dtype)} {list(value.shape)}")
            f.seek(info.begin)
            f.write(_raw_bytes(value))


def overwrite_tensor(path: str | Path, name: str, value: np.ndarray) -> None:
    """Replace one tensor's bytes in place (same dtype and shape)."""
    overwrite_tensors(path, {name: value})
