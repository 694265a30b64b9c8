"""Reading and writing the safetensors file format, with nothing but NumPy and the stdlib.

A safetensors file is three things back to back:

    [8 bytes]  N, the length of the header, an unsigned 64-bit little-endian integer
    [N bytes]  the header: a UTF-8 JSON object, padded with spaces so that 8 + N is a multiple of 8
    [rest]     the tensor bytes, raw and little-endian, one tensor after the other

The header maps each tensor name to ``{"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}``
where the offsets count bytes from the start of the data section. An optional ``"__metadata__"``
entry holds a flat ``str -> str`` dictionary. The tensors must tile the data section exactly: no gaps,
no overlaps, nothing left over.

Why this format and not pickle: loading a pickle runs arbitrary code from the file; loading a
safetensors file only ever reads numbers. The ``safetensors`` library (Hugging Face) reads the files
written here and we read its files.
"""

import json
import math
import os
import struct

import numpy as np

from tinyllm.fileio import atomic_open

__all__ = [
    "SafetensorsError",
    "save_file",
    "load_file",
    "read_metadata",
    "read_header",
]

# The header of a sane file is a few kilobytes; a huge length means a corrupted first 8 bytes.
# (The reference implementation uses the same 100 MB limit.)
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype name -> little-endian NumPy dtype.
_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def _bfloat16():
    """NumPy has no bfloat16; the ``ml_dtypes`` package adds one. None when it is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


class SafetensorsError(ValueError):
    """A file that is not a valid safetensors file (truncated, corrupted, or not safetensors at all)."""


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _to_host_little_endian(name, value):
    """A C-contiguous, little-endian NumPy copy or view of ``value`` (which may live on the GPU)."""
    if type(value).__module__.startswith("cupy"):
        value = value.get()  # device -> host copy
    array = np.asarray(value)
    dtype = array.dtype
    if dtype.byteorder == ">":
        dtype = dtype.newbyteorder("<")
    return np.asarray(array, dtype=dtype, order="C")  # keeps 0-d arrays 0-d, unlike ascontiguousarray


def _dtype_name(name, dtype):
    for st_name, np_dtype in _DTYPES.items():
        if dtype == np_dtype:
            return st_name
    bf16 = _bfloat16()
    if bf16 is not None and dtype == bf16:
        return "BF16"
    raise TypeError(
        f"tensor {name!r} has dtype {dtype}, which safetensors_io cannot store "
        f"(supported: {', '.join(_DTYPES)}, and BF16 when ml_dtypes is installed)"
    )


def save_file(tensors, path, metadata=None):
    """Write ``tensors`` (a dict ``name -> array``) to ``path`` in the safetensors format.

    Arrays may be NumPy or CuPy (copied to the host). ``metadata`` is an optional ``str -> str``
    dict stored as the header's ``"__metadata__"``. The file is replaced atomically.
    """
    header = {}
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise TypeError("safetensors metadata must be a dict of str -> str")
        header["__metadata__"] = dict(metadata)

    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved and cannot be a tensor name")
        arrays[name] = _to_host_little_endian(name, value)

    # Order as the reference library does: widest dtype first, then by name. The data section starts
    # 8-aligned, every tensor's size is a multiple of its itemsize, so each tensor starts aligned.
    order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
    offset = 0
    for name in order:
        array = arrays[name]
        header[name] = {
            "dtype": _dtype_name(name, array.dtype),
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes

    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # pad so the data section starts 8-aligned

    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name in order:
            array = arrays[name]
            if array.nbytes:
                f.write(array.reshape(-1).view(np.uint8))  # raw bytes, no extra copy


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _fail(path, what):
    raise SafetensorsError(f"{path}: {what}; the file is truncated or corrupted (not a valid safetensors file)")


def _reject_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate header keys {duplicates}")
    return dict(pairs)


def _read_and_check_header(path, f, file_size):
    """Parse and validate the header. Returns ``(entries, metadata, data_start)``.

    ``entries`` maps each name to ``(numpy dtype, shape tuple, begin, end)`` with absolute file offsets.
    """
    if file_size < 8:
        _fail(path, f"file is only {file_size} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > MAX_HEADER_BYTES:
        _fail(path, f"header length {header_len} is larger than the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_len > file_size:
        _fail(path, f"header length {header_len} goes beyond the end of the file ({file_size} bytes)")
    raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        _fail(path, f"header is not valid UTF-8 JSON ({e})")
    if not isinstance(header, dict):
        _fail(path, "header is not a JSON object")

    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        _fail(path, "'__metadata__' is not a dict of str -> str")

    data_start = 8 + header_len
    data_len = file_size - data_start
    entries = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            _fail(path, f"tensor {name!r} must have exactly the keys dtype, shape, data_offsets")
        dtype = _parse_dtype(path, name, info["dtype"])
        shape = info["shape"]
        offsets = info["data_offsets"]
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            _fail(path, f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            _fail(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if begin > end:
            _fail(path, f"tensor {name!r} has data_offsets {offsets} that end before they begin")
        if end > data_len:
            _fail(path, f"tensor {name!r} has data_offsets {offsets} beyond the {data_len} data bytes in the file")
        expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        if end - begin != expected:
            _fail(
                path,
                f"tensor {name!r} of shape {shape} and dtype {info['dtype']} needs {expected} bytes "
                f"but its data_offsets {offsets} span {end - begin}",
            )
        entries[name] = (dtype, tuple(shape), data_start + begin, data_start + end)

    # The tensors must tile the data section: sorted by offset, each begins where the previous ended.
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin - data_start != position:
            relation = "overlaps the previous tensor" if begin - data_start < position else "leaves a gap before it"
            _fail(path, f"tensor {name!r} {relation} (data_offsets begin at {begin - data_start}, expected {position})")
        position = end - data_start
    if position != data_len:
        _fail(path, f"the tensors cover {position} data bytes but the file has {data_len}")
    return entries, metadata, data_start


def _is_count(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _parse_dtype(path, name, dtype_name):
    if dtype_name in _DTYPES:
        return _DTYPES[dtype_name]
    if dtype_name == "BF16":
        bf16 = _bfloat16()
        if bf16 is None:
            raise SafetensorsError(
                f"{path}: tensor {name!r} is bfloat16 (BF16); reading it needs the ml_dtypes package "
                "(pip install ml_dtypes)"
            )
        return bf16
    _fail(path, f"tensor {name!r} has unknown dtype {dtype_name!r}")


def _file_size(f):
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    return size


def read_header(path):
    """The validated header of a safetensors file, without reading the tensor data.

    Returns ``(tensors, metadata)``: ``tensors`` maps each name to ``{"dtype": numpy dtype,
    "shape": tuple}``; ``metadata`` is the ``"__metadata__"`` dict, or ``{}`` when there is none.
    """
    with open(path, "rb") as f:
        entries, metadata, _ = _read_and_check_header(path, f, _file_size(f))
    tensors = {name: {"dtype": dtype, "shape": shape} for name, (dtype, shape, _, _) in entries.items()}
    return tensors, dict(metadata or {})


def read_metadata(path):
    """The ``"__metadata__"`` dict (``str -> str``) of a safetensors file, ``{}`` when absent."""
    return read_header(path)[1]


def load_file(path):
    """Read every tensor of a safetensors file into a dict ``name -> numpy.ndarray``.

    Each array is a fresh, writable, native-byte-order array in the order the header lists them.
    Raises ``SafetensorsError`` (a ``ValueError``) naming the file and the problem when the file is
    truncated or corrupted.
    """
    tensors = {}
    with open(path, "rb") as f:
        entries, _, _ = _read_and_check_header(path, f, _file_size(f))
        for name, (dtype, shape, begin, end) in entries.items():
            count = (end - begin) // dtype.itemsize
            f.seek(begin)
            array = np.fromfile(f, dtype=dtype, count=count)
            if array.size != count:  # the file shrank while we were reading it
                _fail(path, f"tensor {name!r} could not be read completely")
            tensors[name] = array.astype(dtype.newbyteorder("="), copy=False).reshape(shape)
    return tensors
