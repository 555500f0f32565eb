"""ref.safetensors_io: our writer and reader round-trip every dtype (0-d included), files we write load
with the safetensors package, and every malformed header gives a CheckpointError naming the file."""
import json
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from ref.errors import CheckpointError
from ref.safetensors_io import DTYPES, LazyTensor, SafetensorsFile, overwrite_tensors, read_header, write_safetensors


def _sample(dtype: str, shape) -> np.ndarray:
    rng = np.random.default_rng(0)
    dt = DTYPES[dtype]
    if dt == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), shape, endpoint=True).astype(dt)
    return (rng.standard_normal(shape) * 4).astype(dt)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (1,), (3, 5), (2, 0, 4)])
def test_round_trip_every_dtype(tmp_path, dtype, shape):
    a = _sample(dtype, shape)
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"t": a, "pad": np.zeros(3, np.uint8)})
    f = SafetensorsFile(path)
    b = f.tensor("t")
    assert _same(a, b) and b.shape == shape  # 0-d stays 0-d
    assert not b.flags.writeable


@given(st.lists(st.tuples(st.sampled_from(sorted(DTYPES)),
                          st.lists(st.integers(0, 4), max_size=3)), min_size=1, max_size=6))
def test_round_trip_property(tmp_path_factory, specs):
    tensors = {f"t{i}": _sample(d, tuple(s)) for i, (d, s) in enumerate(specs)}
    path = tmp_path_factory.getbasetemp() / "property.safetensors"
    write_safetensors(path, tensors, {"format": "pt"})
    f = SafetensorsFile(path)
    assert f.metadata == {"format": "pt"}
    assert all(_same(a, f.tensor(n)) for n, a in tensors.items())
    assert all(f.info(n).begin % a.dtype.itemsize == 0 for n, a in tensors.items())  # aligned data


def test_safetensors_package_reads_what_we_write(tmp_path):
    tensors = {"f32": _sample("F32", (3, 4)), "scalar": np.asarray(np.float32(2.5)), "u8": _sample("U8", (7,)),
               "i64": _sample("I64", (2, 2)), "f16": _sample("F16", (5,)), "bool": _sample("BOOL", (3,))}
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, {"format": "pt"})
    loaded = load_file(path)
    assert all(_same(tensors[n], loaded[n]) for n in tensors)
    with safe_open(path, "np") as f:  # its Rust header validation accepts BF16 / F8 files too
        assert f.metadata() == {"format": "pt"}
    path2 = tmp_path / "y.safetensors"
    write_safetensors(path2, {"bf16": _sample("BF16", (4, 4)), "f8": _sample("F8_E4M3", (4, 16)),
                              "e5m2": _sample("F8_E5M2", (2,)), "s": np.asarray(np.float32(1))})
    with safe_open(path2, "np") as f:
        assert sorted(f.keys()) == ["bf16", "e5m2", "f8", "s"]


def test_we_read_what_the_safetensors_package_writes(tmp_path):
    tensors = {"a": _sample("F32", (2, 3)), "b": _sample("U8", (9,)), "c": np.asarray(np.float64(3.0))}
    save_file(tensors, tmp_path / "x.safetensors")
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert all(_same(a, f.tensor(n)) for n, a in tensors.items())


def test_rows_and_lazy_tensors(tmp_path):
    a = _sample("F8_E4M3", (4, 3, 16))
    chunks = [_sample("BF16", (2, 5)), _sample("BF16", (2, 5))]
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": a, "lazy": LazyTensor("BF16", (2, 2, 5), lambda: iter(chunks))})
    f = SafetensorsFile(path)
    assert _same(f.tensor("a", row=2), a[2])
    assert _same(f.tensor("lazy"), np.stack(chunks))
    with pytest.raises(CheckpointError, match="has no row 4"):
        f.tensor("a", row=4)
    with pytest.raises(CheckpointError, match="needs 40 bytes, got 20"):
        write_safetensors(tmp_path / "bad.safetensors", {"x": LazyTensor("BF16", (2, 2, 5), lambda: chunks[0])})


def test_overwrite_tensor_in_place(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"s": np.asarray(np.float32(1)), "w": _sample("U8", (8,))})
    overwrite_tensors(path, {"s": np.asarray(np.float32(0.25))})
    f = SafetensorsFile(path)
    assert f.tensor("s") == np.float32(0.25) and f.tensor("s").shape == ()
    with pytest.raises(CheckpointError, match="is F32 \\[\\], got F32 \\[1\\]"):
        overwrite_tensors(path, {"s": np.array([1.0], np.float32)})
    with pytest.raises(CheckpointError, match="no tensor 'nope'"):
        overwrite_tensors(path, {"nope": np.float32(1)})


# ---- untrusted headers -------------------------------------------------------------------------

def _raw(tmp_path, header, data: bytes = b"", length: int | None = None):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("header,data,length,message", [
    (b"", b"", None, "too short"),  # fewer than 8 bytes is caught below; an empty header is not JSON
    ({"t": _entry()}, b"\0" * 8, 10 ** 9, "runs past the end"),
    (b"{not json", b"", None, "not valid JSON"),
    (b"\xff\xfe", b"", None, "not valid JSON"),
    (b"[1, 2]", b"", None, "must be a JSON object"),
    ({"t": _entry(dtype="F4")}, b"\0" * 8, None, "unknown dtype 'F4'"),
    ({"t": _entry(shape=(-2,))}, b"\0" * 8, None, "non-negative integers"),
    ({"t": _entry(shape=("2",))}, b"\0" * 8, None, "non-negative integers"),
    ({"t": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "data_offsets must be"),
    ({"t": _entry(offsets=(0, 16))}, b"\0" * 8, None, "outside the 8-byte data section"),
    ({"t": _entry(offsets=(8, 0))}, b"\0" * 8, None, "outside"),
    ({"t": _entry(shape=(3,))}, b"\0" * 8, None, "8 bytes but shape \\[3\\] of F32 needs 12"),
    ({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}, b"\0" * 12, None, "overlap"),
    ({"t": _entry(), "__metadata__": {"k": 1}}, b"\0" * 8, None, "__metadata__"),
    ({"t": "x"}, b"", None, "header entry must be an object"),
])
def test_bad_headers(tmp_path, header, data, length, message):
    if header == b"":
        path = tmp_path / "short.safetensors"
        path.write_bytes(b"\x01\x02")
    else:
        path = _raw(tmp_path, header, data, length)
    with pytest.raises(CheckpointError, match=message) as e:
        read_header(path)
    assert str(path) in str(e.value)


def test_truncated_data_is_caught_from_the_header(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"w": _sample("BF16", (64, 64))})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="tensor 'w'.*outside"):
        SafetensorsFile(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        read_header(tmp_path / "absent.safetensors")


def test_dtype_table_matches_ml_dtypes():
    assert DTYPES["BF16"] == np.dtype(ml_dtypes.bfloat16)
    assert DTYPES["F8_E4M3"] == np.dtype(ml_dtypes.float8_e4m3fn)
    assert all(dt.byteorder in "=<|" for dt in DTYPES.values())
