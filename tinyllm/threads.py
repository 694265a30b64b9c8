"""CPU threads for the heavy layers: cut a layer's rows into one part per core.

NumPy runs elementwise math on one core; only its BLAS (the matrix products) uses them all. A
training step of the benchmark configs spends a third ("char") to a half ("baby") of its time
outside matrix products (GELU, softmax, layer norm), and that part runs on one core however
many there are.

`set_num_threads(n)` with n > 1 changes that: NumPy's BLAS goes down to one thread, tinyllm keeps
n − 1 worker threads, and the heavy fused layers (Linear, attention, GELU, layer norm) cut their
rows into n contiguous parts and run the parts at once. NumPy releases the GIL inside its loops
and BLAS calls, so the parts really do run in parallel, matrix products included. Why not leave
BLAS threaded and add threads only for the elementwise work: OpenBLAS's idle threads spin for a
while after every call and take the core from any other thread (measured in docs/benchmarks.md).

With one thread (the default for `import tinyllm`) every `parallel_for` is a plain call on the
calling thread: the NumPy of the textbook, easiest to step through in a debugger. `tinyllm train`
uses every core (its `--threads` and `--parallel` options; see default_plan), and usually cuts the
batch over processes rather than the layers over threads (tinyllm.data_parallel). CuPy arrays
never go through the threads: a GPU is parallel already.
"""
import contextlib
import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy

_workers = None         # ThreadPoolExecutor with n − 1 threads, or None: everything runs serially
_num_threads = 1
_blas_threads = None    # BLAS's own thread count before set_num_threads took it over
_inside = threading.local()   # .busy is True while a thread runs a part (parts never split again)


# A thread that sleeps between parts takes tens of microseconds to wake (more in a virtual machine),
# so cutting a layer's rows over threads pays off only for big layers: once one (B, T, C)
# activation holds this many numbers. Measured on 2 cores (scripts/bench_cpu.py), a training step
# of the "char" config (B·T·C = 786,432) took 0.93 s with its layers cut against 1.11 s on one
# thread, and the "baby" one (98,304) 47.8 ms with its layers cut against 42.8 ms on one thread.
# Cutting the batch over processes beats both (default_plan; docs/benchmarks.md).
MIN_ACTIVATION_SIZE = 1 << 18
# Below this many elements an op is not cut at all (a layer norm's weight in AdamW, for one): handing
# a part to a worker costs about 25 us, about what a few passes over 2^16 float32 numbers take.
MIN_PARALLEL_SIZE = 1 << 16


def default_plan(batch_size, block_size, n_embd, cores=None):
    """(threads, cut) as `tinyllm train` picks them: how many cores, and what they cut.

    "batch": each core runs forward and backward on its own rows of the batch, in a process of its
    own (tinyllm.data_parallel: two hand-overs per step, no interpreter lock shared). That needs a
    row for each core and `os.fork`. Otherwise "layers": every core for big layers, each layer's
    rows cut over threads; for small ones, one thread (NumPy's BLAS uses the cores on its own).
    """
    cores = cores or os.cpu_count() or 1
    if cores >= 2 and batch_size >= cores and hasattr(os, "fork"):
        return cores, "batch"
    if batch_size * block_size * n_embd >= MIN_ACTIVATION_SIZE:
        return cores, "layers"
    return 1, "layers"


def get_num_threads():
    """How many threads the heavy layers use (1: serial)."""
    return _num_threads


def set_num_threads(n):
    """Use n threads for the heavy layers; returns the number now in effect.

    n > 1 needs control over NumPy's BLAS threads (the OpenBLAS of NumPy's wheels, found on Linux);
    without it tinyllm's threads would compete with BLAS's, so it stays at 1 and says so by
    returning 1. n = 1 stops the workers and gives BLAS back its thread count.
    """
    global _workers, _num_threads, _blas_threads
    n = int(n)
    if n < 1:
        raise ValueError(f"set_num_threads needs n >= 1, got {n}")
    if n == _num_threads:
        return n
    if _workers is not None:
        _workers.shutdown()
        _workers, _num_threads = None, 1
    blas = _openblas_threads_control()
    if n == 1:
        if blas is not None and _blas_threads is not None:
            blas[0](_blas_threads)
        _blas_threads = None
        return 1
    if blas is None:
        return 1
    set_blas, get_blas = blas
    if _blas_threads is None:
        _blas_threads = get_blas()
    set_blas(1)
    _workers = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="tinyllm")
    _num_threads = n
    return n


def parallel_for(n, body, xp=numpy, size=None):
    """[body(start, stop) for each part]: n items cut into one contiguous part per thread.

    The parts run at once, the first on the calling thread; the results come back in order. One
    call body(0, n) when there is one thread, for CuPy (xp is not numpy), for fewer than 2 items,
    when `size` (how many array elements the work touches) is below MIN_PARALLEL_SIZE, and inside
    a part (no nesting, so the workers can never wait on each other).
    """
    k = min(_num_threads, n)
    small = size is not None and size < MIN_PARALLEL_SIZE
    if k < 2 or small or xp is not numpy or getattr(_inside, "busy", False):
        return [body(0, n)]
    bounds = [n * i // k for i in range(k + 1)]
    later = [_workers.submit(_run_part, body, bounds[i], bounds[i + 1]) for i in range(1, k)]
    first = _run_part(body, bounds[0], bounds[1])
    return [first] + [part.result() for part in later]


@contextlib.contextmanager
def serial():
    """`with threads.serial():` every parallel_for inside runs on the calling thread alone (other
    cores are busy: tinyllm.data_parallel's worker processes run there)."""
    before = getattr(_inside, "busy", False)
    _inside.busy = True
    try:
        yield
    finally:
        _inside.busy = before


def blocks(start, stop, size):
    """[(b, e)]: the items start .. stop in consecutive blocks of at most `size` (at least 1), for
    work that runs block by block so that its arrays stay in cache from one pass to the next."""
    size = max(size, 1)
    return [(b, min(b + size, stop)) for b in range(start, stop, size)]


def _run_part(body, start, stop):
    _inside.busy = True
    try:
        return body(start, stop)
    finally:
        _inside.busy = False


def matmul(a, b):
    """a @ b for 2-D arrays, the rows of a cut over the threads (each part one BLAS call)."""
    if _num_threads == 1 or getattr(_inside, "busy", False) or not isinstance(a, numpy.ndarray):
        return a @ b                              # one call: one thread, inside a part, or CuPy
    out = numpy.empty((a.shape[0], b.shape[1]), dtype=numpy.result_type(a, b))
    parallel_for(a.shape[0], lambda r0, r1: numpy.matmul(a[r0:r1], b, out=out[r0:r1]))
    return out


def _forget_workers_in_child():
    """A forked child has none of its parent's threads: it runs serially until told otherwise."""
    global _workers, _num_threads
    _workers, _num_threads = None, 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers_in_child)


def _openblas_threads_control():
    """(set, get) for the thread count of the OpenBLAS that NumPy loaded, or None if not found.

    NumPy's wheels bundle OpenBLAS under a prefixed name (scipy_openblas...); the library is found
    among the files this process has mapped (Linux), and its thread functions by their names.
    """
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
                    return setter, getter
    return None
