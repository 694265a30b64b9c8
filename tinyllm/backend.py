"""Which array library runs the math: NumPy on the CPU, CuPy on an NVIDIA GPU.

Op code never imports numpy directly; it asks for the module that owns its arrays:

    xp = get_array_module(x)      # numpy or cupy
    y = xp.exp(x)

so the same readable line runs on both devices. Nothing here copies between host and device
behind the user's back: `to_device` is the one explicit place where that happens.

Devices are "cpu" and "cuda", as tensors report them. "cuda:N" picks GPU N: the first CUDA device
named in a process is the one it computes on (`cuda_device_index()`), and "cuda" means that one
afterwards. A process uses one GPU, as data-parallel training runs one process per GPU.

Which module "cuda" means is pluggable: real CuPy by default, or, for tests and `--smoke` runs on
machines without a GPU, the NumPy-backed stand-in of tinyllm.testing.cupy_standin
(`use_cupy(...)`, or the environment variable TINYLLM_CUPY=standin).
"""
import contextlib
import os

import numpy

_cupy = None          # the cupy module in use, once imported successfully (or plugged in)
_cupyx = None         # its cupyx companion (scatter_add)
_cupy_error = None    # why importing/using cupy failed, for the error message
_cuda_index = None    # the GPU this process computes on, once a "cuda" device was named


def _load_cupy():
    """Import CuPy lazily and check that a GPU is visible; remember the outcome."""
    global _cupy, _cupyx, _cupy_error
    if _cupy is not None or _cupy_error is not None:
        return _cupy
    if os.environ.get("TINYLLM_CUPY", "").lower() == "standin":
        from tinyllm.testing import cupy_standin
        _cupy, _cupyx = cupy_standin.cupy, cupy_standin.cupyx
        return _cupy
    try:
        import cupy
        import cupyx
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("CuPy is installed but sees no CUDA device")
        _cupy, _cupyx = cupy, cupyx
    except Exception as e:  # ImportError, CUDA driver errors, no device...
        _cupy_error = f"{type(e).__name__}: {e}"
    return _cupy


def use_cupy(cupy, cupyx=None, reason="CuPy was switched off (backend.use_cupy(None))"):
    """Use `cupy` (a module: real CuPy or tinyllm.testing's stand-in) for device="cuda" from now on;
    None makes "cuda" unavailable, with `reason` in the error. Returns what was in use before, for
    `restore_cupy`. The GPU choice of "cuda:N" starts afresh."""
    global _cupy, _cupyx, _cupy_error, _cuda_index
    before = (_cupy, _cupyx, _cupy_error, _cuda_index)
    if cupy is not None and cupyx is None:
        raise ValueError("use_cupy needs the cupyx module that goes with cupy")
    _cupy, _cupyx, _cupy_error, _cuda_index = cupy, cupyx, (None if cupy is not None else reason), None
    return before


def restore_cupy(before):
    """Undo use_cupy: `before` is what it returned."""
    global _cupy, _cupyx, _cupy_error, _cuda_index
    _cupy, _cupyx, _cupy_error, _cuda_index = before


@contextlib.contextmanager
def cupy_module(cupy, cupyx=None, reason="CuPy was switched off (backend.cupy_module(None))"):
    """`with cupy_module(module, cupyx):` use_cupy for a block (None: no CUDA inside it)."""
    before = use_cupy(cupy, cupyx, reason)
    try:
        yield
    finally:
        restore_cupy(before)


def cuda_available():
    """True when CuPy imports and a GPU is present (or a stand-in is plugged in)."""
    return _load_cupy() is not None


def cupy_is_standin():
    """True when "cuda" runs on tinyllm.testing's NumPy stand-in: whatever it measures is no GPU figure."""
    return getattr(_load_cupy(), "__tinyllm_standin__", False)


def cuda_device_index():
    """The GPU this process computes on (None until a "cuda" device was named)."""
    return _cuda_index


def check_device(device):
    """Normalise a device name ("cpu", "cuda", "cuda:N" -> "cuda") and fail clearly if unusable.

    "cuda:N" makes GPU N the process's device (CuPy's current device) the first time; naming
    another GPU later is an error (one GPU per process), "cuda" means the chosen one.
    """
    if device is None:
        return "cpu"
    name = str(device).lower()
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        index = _parse_cuda_index(device, name)
        if _load_cupy() is None:
            raise RuntimeError(
                f"device={str(device)!r} needs CuPy and an NVIDIA GPU, but {_cupy_error}. "
                "Install the GPU extra (pip install 'tinyllm[gpu]') on a machine with a GPU, "
                "or use device='cpu'.")
        _select_gpu(index)
        return "cuda"
    raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")


def _parse_cuda_index(device, name):
    if name == "cuda":
        return None
    text = name[len("cuda:"):]
    if not text.isdigit():
        raise ValueError(f"unknown device {device!r}: the GPU number after 'cuda:' must be 0, 1, ...")
    return int(text)


def _select_gpu(index):
    """Make GPU `index` (None: the current one) the device this process computes on."""
    global _cuda_index
    if index is None:
        if _cuda_index is None:
            _cuda_index = int(_cupy.cuda.runtime.getDevice())
        return
    if _cuda_index is not None and index != _cuda_index:
        raise RuntimeError(f"device 'cuda:{index}': this process already computes on cuda:{_cuda_index}; tinyllm "
                           "uses one GPU per process (run another process for another GPU, or pick it with "
                           "CUDA_VISIBLE_DEVICES)")
    count = int(_cupy.cuda.runtime.getDeviceCount())
    if index >= count:
        raise ValueError(f"device 'cuda:{index}': CuPy sees {count} CUDA device(s), "
                         f"{'cuda:0' if count == 1 else f'cuda:0 .. cuda:{count - 1}'}")
    if _cuda_index is None:
        _cupy.cuda.Device(index).use()
        _cuda_index = index


def xp_for(device):
    """The array module for a device name."""
    return _load_cupy() if check_device(device) == "cuda" else numpy


def get_array_module(*arrays):
    """numpy or cupy, whichever owns the given arrays (numpy for Python scalars)."""
    for a in arrays:
        if type(a) is not numpy.ndarray and type(a).__module__.startswith("cupy"):  # works before cupy was imported
            return _load_cupy() or _raise_no_cupy()
    return numpy


def _raise_no_cupy():
    raise RuntimeError(f"got a CuPy array but CuPy cannot run here: {_cupy_error}")


def device_of(array):
    """"cuda" for a CuPy array, "cpu" otherwise."""
    return "cuda" if get_array_module(array) is not numpy else "cpu"


def to_device(array, device):
    """The one explicit host<->device copy; a no-op when the array is already there."""
    device = check_device(device)
    if device == device_of(array):
        return array
    if device == "cuda":
        return _cupy.asarray(array)
    return array.get()


def to_numpy(array):
    """A host (NumPy) copy of any backend's array."""
    return array.get() if device_of(array) == "cuda" else numpy.asarray(array)


def as_dtype(dtype):
    """Accept a NumPy dtype, a type or a name such as "float32"."""
    try:
        return numpy.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"unknown dtype {dtype!r}: use a NumPy dtype or a name like 'float32'") from e


def scatter_add(target, index, values):
    """target[index] += values, where repeated indices add up (unlike plain fancy assignment).

    On a GPU, rows picked by one 1-D integer array (the embedding's backward: target (num, dim),
    index (N,), values (N, dim)) are summed deterministically (_scatter_add_rows_deterministic);
    other keys use CuPy's atomic scatter-add, whose float sums may differ from run to run.
    """
    xp = get_array_module(target)
    if xp is numpy:
        numpy.add.at(target, index, values)
    elif (getattr(index, "ndim", None) == 1 and index.dtype.kind in "iu" and get_array_module(index) is xp
          and values.shape == index.shape + target.shape[1:]):
        _scatter_add_rows_deterministic(xp, target, index, values)
    else:
        _cupyx.scatter_add(target, index, values)


def _scatter_add_rows_deterministic(xp, target, ids, rows):
    """target[ids] += rows on a GPU, the same bits on every run, and no wait for the GPU.

    Atomic adds sum a row's contributions in whatever order the threads arrive: the result's
    last bits change from run to run. Instead:
    1. sort the ids (a stable sort), so that the contributions to one row lie next to each other;
    2. sum each run of equal ids by a segmented scan: at distance s = 1, 2, 4, ... every position
       adds the value s places before it when that one has the same id (log2 N passes; a fixed
       order of additions, a tree, so no error grows with the run's length);
    3. the last position of each run now holds the run's sum: add it to its row, and zeros from
       every other position. A row then receives exactly one number that is not zero, so the
       order in which the (still atomic) adds land cannot change the result.
    No step needs the number of distinct ids on the host (a boolean mask would: a sync).
    """
    n = ids.shape[0]
    if n == 0:
        return
    order = xp.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    run = xp.take(rows, order, axis=0)                     # (N, dim) contributions, ids sorted
    width = run.reshape(n, -1).shape[1] if run.ndim > 1 else 1
    flat = run.reshape(n, width)
    shift = 1
    while shift < n:
        same = (sorted_ids[shift:] == sorted_ids[:-shift])[:, None]      # (N - s, 1)
        carried = xp.where(same, flat[:-shift], 0)         # a new array: no read of what this pass writes
        flat[shift:] += carried
        shift *= 2
    last = xp.empty(n, dtype=bool)
    last[:-1] = sorted_ids[1:] != sorted_ids[:-1]
    last[-1] = True
    flat *= last[:, None]                                  # run sums at run ends, zeros elsewhere
    _cupyx.scatter_add(target, sorted_ids, flat.reshape(run.shape))


def keep_freed_host_memory(threshold_bytes=1 << 30):
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the kernel.

    A training step allocates and frees the same activation sizes every step. By default glibc
    maps big arrays fresh and trims the freed top of its heap, so every step the kernel hands the
    memory back in zeroed 4 KiB pages, one page fault each: about 130,000 faults and a tenth of a
    step for the "char" config of scripts/bench_cpu.py, none after this call. The setting is
    process-wide, so `tinyllm train` and the benchmarks call it, never `import tinyllm`; call it
    yourself at the top of your own training script. Returns False where it does not apply.
    """
    import ctypes
    import ctypes.util
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold_bytes))) and \
        bool(mallopt(M_TRIM_THRESHOLD, 2 * int(threshold_bytes)))

