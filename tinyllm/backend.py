"""Which array library runs the math: NumPy on the CPU, CuPy on an NVIDIA GPU.

Op code never imports numpy directly; it asks for the module that owns its arrays:

    xp = get_array_module(x)      # numpy or cupy
    y = xp.exp(x)

so the same readable line runs on both devices. Nothing here copies between host and device
behind the user's back: `to_device` is the one explicit place where that happens.
"""
import numpy

_cupy = None          # the cupy module once imported successfully
_cupy_error = None    # why importing/using cupy failed, for the error message


def _load_cupy():
    """Import CuPy lazily and check that a GPU is visible; remember the outcome."""
    global _cupy, _cupy_error
    if _cupy is not None or _cupy_error is not None:
        return _cupy
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("CuPy is installed but sees no CUDA device")
        _cupy = cupy
    except Exception as e:  # ImportError, CUDA driver errors, no device...
        _cupy_error = f"{type(e).__name__}: {e}"
    return _cupy


def cuda_available():
    """True when CuPy imports and a GPU is present."""
    return _load_cupy() is not None


def check_device(device):
    """Normalise a device name ("cpu", "cuda", "cuda:0" -> "cuda") and fail clearly if unusable."""
    if device is None:
        return "cpu"
    name = str(device).lower()
    if name.startswith("cuda"):
        if _load_cupy() is None:
            raise RuntimeError(
                f"device='cuda' needs CuPy and an NVIDIA GPU, but {_cupy_error}. "
                "Install the GPU extra (pip install 'tinyllm[gpu]') on a machine with a GPU, "
                "or use device='cpu'.")
        return "cuda"
    if name == "cpu":
        return "cpu"
    raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda'")


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
    """target[index] += values, where repeated indices add up (unlike plain fancy assignment)."""
    xp = get_array_module(target)
    if xp is numpy:
        numpy.add.at(target, index, values)
    else:
        import cupyx
        cupyx.scatter_add(target, index, values)


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

