import json
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tinyllm.safetensors_io import (
    SafetensorsError,
    load_file,
    read_header,
    read_metadata,
    save_file,
)

ALL_DTYPES = ["f8", "f4", "f2", "i8", "i4", "i2", "i1", "u8", "u4", "u2", "u1", "?"]


def sample_tensors():
    rng = np.random.default_rng(0)
    return {
        "weight": rng.standard_normal((3, 4)).astype(np.float32),
        "bias": np.arange(4, dtype=np.float64),
        "half": np.array([1.5, -2.0, 65504.0], dtype=np.float16),
        "ids": np.arange(-3, 3, dtype=np.int64).reshape(2, 3),
        "flags": np.array([True, False, True]),
        "scalar": np.array(7, dtype=np.int32),
        "empty": np.zeros((0, 5), dtype=np.float32),
        "bytes": np.arange(10, dtype=np.uint8),
    }


def write_raw(path, header, data=b"", pad=True):
    """Write a file by hand: ``header`` is a dict (dumped as JSON) or raw bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name])


# ---------------------------------------------------------------- round trips


def test_round_trip_every_dtype(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "t.safetensors", metadata={"step": "12", "note": "hi"})
    loaded = load_file(tmp_path / "t.safetensors")
    assert_same(tensors, loaded)
    assert read_metadata(tmp_path / "t.safetensors") == {"step": "12", "note": "hi"}
    for array in loaded.values():
        assert array.flags.writeable and array.flags.c_contiguous


def test_file_layout(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"b": np.ones(3, np.uint8), "a": np.zeros(2, np.float32)}, path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0  # data section starts aligned
    header = json.loads(raw[8 : 8 + n])
    assert header["a"] == {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    assert header["b"] == {"dtype": "U8", "shape": [3], "data_offsets": [8, 11]}
    assert len(raw) == 8 + n + 11
    assert "__metadata__" not in header
    assert read_metadata(path) == {}


def test_non_contiguous_and_big_endian_inputs(tmp_path):
    strided = np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2]
    big = np.arange(6, dtype=">i4")
    save_file({"strided": strided, "big": big}, tmp_path / "t.safetensors")
    loaded = load_file(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(loaded["strided"], strided)
    np.testing.assert_array_equal(loaded["big"], big)
    assert loaded["big"].dtype == np.int32


def test_read_header(tmp_path):
    save_file(sample_tensors(), tmp_path / "t.safetensors", metadata={"a": "b"})
    tensors, metadata = read_header(tmp_path / "t.safetensors")
    assert tensors["weight"] == {"dtype": np.dtype(np.float32), "shape": (3, 4)}
    assert metadata == {"a": "b"}


def test_empty_dict(tmp_path):
    save_file({}, tmp_path / "t.safetensors")
    assert load_file(tmp_path / "t.safetensors") == {}


@settings(max_examples=30, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8).filter(lambda s: s != "__metadata__"),
        st.sampled_from(ALL_DTYPES).flatmap(
            lambda d: hnp.arrays(np.dtype(d), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
        ),
        max_size=5,
    )
)
def test_round_trip_property(tmp_path_factory, tensors):
    path = tmp_path_factory.mktemp("st") / "t.safetensors"
    save_file(tensors, path)
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name in tensors:
        assert loaded[name].dtype == tensors[name].dtype
        assert loaded[name].shape == tensors[name].shape
        assert loaded[name].tobytes() == tensors[name].tobytes()  # bitwise, NaNs included


# ---------------------------------------------------------------- writer errors and atomicity


def test_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(TypeError, match="complex128"):
        save_file({"z": np.zeros(2, np.complex128)}, tmp_path / "t.safetensors")
    assert not list(tmp_path.iterdir())


def test_rejects_bad_metadata_and_names(tmp_path):
    with pytest.raises(TypeError, match="metadata"):
        save_file({}, tmp_path / "t.safetensors", metadata={"a": 1})
    with pytest.raises(ValueError, match="reserved"):
        save_file({"__metadata__": np.zeros(1)}, tmp_path / "t.safetensors")
    with pytest.raises(TypeError, match="names"):
        save_file({1: np.zeros(1)}, tmp_path / "t.safetensors")


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    save_file({"a": np.ones(3)}, path)
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save_file({"a": np.zeros(1000)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # temp file cleaned up


# ---------------------------------------------------------------- corrupted files


def expect_corrupt(path, *fragments):
    with pytest.raises(SafetensorsError) as info:
        load_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "truncated or corrupted" in message
    for fragment in fragments:
        assert fragment in message
    assert isinstance(info.value, ValueError)


def good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a": np.arange(4, dtype=np.float32), "b": np.arange(3, dtype=np.int16)}, path)
    return path


@pytest.mark.parametrize("size", [0, 1, 7])
def test_file_too_short(tmp_path, size):
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"\x01" * size)
    expect_corrupt(path, "shorter than the 8-byte header length")


def test_header_length_beyond_file(tmp_path):
    path = good_file(tmp_path)
    path.write_bytes(path.read_bytes()[:20])  # cut inside the header
    expect_corrupt(path, "beyond the end of the file")


def test_absurd_header_length(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    expect_corrupt(path, "limit")


def test_truncated_data(tmp_path):
    path = good_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-3])
    expect_corrupt(path, "beyond the")


def test_trailing_garbage(tmp_path):
    path = good_file(tmp_path)
    path.write_bytes(path.read_bytes() + b"\x00" * 8)
    expect_corrupt(path, "cover 22 data bytes but the file has 30")


def test_bad_json(tmp_path):
    expect_corrupt(write_raw(tmp_path / "t.safetensors", b'{"a": {"dtype"'), "not valid UTF-8 JSON")


def test_header_not_utf8(tmp_path):
    expect_corrupt(write_raw(tmp_path / "t.safetensors", b"\xff\xfe\xfd\xfc"), "not valid UTF-8 JSON")


def test_header_not_object(tmp_path):
    expect_corrupt(write_raw(tmp_path / "t.safetensors", b"[1, 2]"), "not a JSON object")


def test_duplicate_names(tmp_path):
    raw = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
    expect_corrupt(write_raw(tmp_path / "t.safetensors", raw, b"\x00\x00"), "duplicate")


def test_unknown_dtype(tmp_path):
    header = {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}
    expect_corrupt(write_raw(tmp_path / "t.safetensors", header, bytes(16)), "unknown dtype 'F128'")


def test_missing_field(tmp_path):
    header = {"a": {"dtype": "U8", "shape": [1]}}
    expect_corrupt(write_raw(tmp_path / "t.safetensors", header, bytes(1)), "exactly the keys")


@pytest.mark.parametrize("shape", [[-1], [1.5], "3", [True]])
def test_bad_shape(tmp_path, shape):
    header = {"a": {"dtype": "U8", "shape": shape, "data_offsets": [0, 1]}}
    expect_corrupt(write_raw(tmp_path / "t.safetensors", header, bytes(1)), "invalid shape")


@pytest.mark.parametrize("offsets", [[0], [0, 1, 2], [-1, 0], "0,1"])
def test_bad_offsets(tmp_path, offsets):
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": offsets}}
    expect_corrupt(write_raw(tmp_path / "t.safetensors", header, bytes(1)), "invalid data_offsets")


def test_offsets_reversed(tmp_path):
    header = {"a": {"dtype": "U8", "shape": [0], "data_offsets": [1, 0]}}
    expect_corrupt(write_raw(tmp_path / "t.safetensors", header, bytes(1)), "end before they begin")


def test_offsets_out_of_range(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    expect_corrupt(write_raw(tmp_path / "t.safetensors", header, bytes(8)), "beyond the 8 data bytes")


def test_shape_does_not_match_byte_length(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    expect_corrupt(write_raw(tmp_path / "t.safetensors", header, bytes(8)), "needs 12 bytes", "span 8")


def test_overlapping_tensors(tmp_path):
    header = {
        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
        "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
    }
    expect_corrupt(write_raw(tmp_path / "t.safetensors", header, bytes(6)), "overlaps")


def test_gap_between_tensors(tmp_path):
    header = {
        "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
        "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]},
    }
    expect_corrupt(write_raw(tmp_path / "t.safetensors", header, bytes(6)), "gap")


def test_bad_metadata(tmp_path):
    header = {"__metadata__": {"a": 1}}
    expect_corrupt(write_raw(tmp_path / "t.safetensors", header), "__metadata__")


def test_corruption_also_reported_by_read_metadata(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(SafetensorsError, match="truncated or corrupted"):
        read_metadata(path)


def test_bf16(tmp_path):
    header = {"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}
    # bfloat16 1.0 is 0x3F80 and -2.0 is 0xC000, little-endian.
    path = write_raw(tmp_path / "t.safetensors", header, bytes([0x80, 0x3F, 0x00, 0xC0]))
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        with pytest.raises(SafetensorsError, match="ml_dtypes"):
            load_file(path)
    else:
        loaded = load_file(path)
        np.testing.assert_array_equal(loaded["a"].astype(np.float32), [1.0, -2.0])
        save_file(loaded, tmp_path / "again.safetensors")
        assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


# ---------------------------------------------------------------- interoperability


def test_reference_library_reads_our_files(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "ours.safetensors", metadata={"k": "v"})
    assert_same(tensors, st_numpy.load_file(str(tmp_path / "ours.safetensors")))
    safe_open = pytest.importorskip("safetensors").safe_open
    with safe_open(str(tmp_path / "ours.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"k": "v"}


def test_we_read_reference_library_files(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    tensors = sample_tensors()
    st_numpy.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"k": "v"})
    assert_same(tensors, load_file(tmp_path / "theirs.safetensors"))
    assert read_metadata(tmp_path / "theirs.safetensors") == {"k": "v"}


@pytest.mark.gpu
def test_saves_cupy_arrays(tmp_path):
    cupy = pytest.importorskip("cupy")
    array = cupy.arange(12, dtype=cupy.float32).reshape(3, 4)
    save_file({"a": array}, tmp_path / "t.safetensors")
    np.testing.assert_array_equal(load_file(tmp_path / "t.safetensors")["a"], array.get())
