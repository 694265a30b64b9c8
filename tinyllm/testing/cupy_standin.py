"""A stand-in for the `cupy` module: NumPy underneath, CuPy's rules on top, and a record of what a GPU
would have paid for.

tinyllm's GPU path is plain `xp.` array code run by CuPy. This module lets that code run, and be
tested, where there is no GPU: `tinyllm.backend.use_cupy(cupy_standin.cupy, cupy_standin.cupyx)` (or
TINYLLM_CUPY=standin) makes `device="cuda"` use it. `cupy` and `cupyx` here are module objects named
like CuPy's; the rest of this file (record, totals, reset, configure) is the stand-in's own API.

What it keeps from CuPy (version 14.2, read in CuPy's source):

- its arrays are `cupy.ndarray` (`type(a).__module__ == "cupy"`), not numpy.ndarray;
- no silent host/device mixing: a numpy.ndarray operand of a device op is a TypeError
  ("Unsupported type ..."), `numpy.asarray(device_array)` is a TypeError ("Implicit conversion to a
  NumPy array is not allowed..."), assigning a host array into a device array is a ValueError;
- results are 0-d device arrays, never NumPy scalars (`a.sum()`, `a[0]`);
- NumPy functions called on device arrays dispatch to the CuPy function of the same name
  (`__array_function__`, `__array_ufunc__`), and fail where CuPy has none (no `vecdot`);
- `cuda.Device(n)`, `cuda.runtime.getDeviceCount/getDeviceProperties`, a current device, arrays
  that remember the device they were made on (stricter than CuPy: an op on an array of another
  device is an error, where CuPy would enable peer access with a warning);
- `random.default_rng(seed)`, `get_default_memory_pool()`, `cuda.Event`, `fuse`.

What it counts, per source line (the first frame outside this module and NumPy):
- host syncs: `.get()`, `.item()`, `.tolist()`, `float()/int()/bool()/complex()` of a device array,
  printing or formatting one, boolean-mask indexing (get and set), `nonzero`, `flatnonzero`,
  `argwhere`, one-argument `where`, `unique`, `asnumpy`, explicit synchronize calls;
- kernel launches, roughly as CuPy makes them: one per elementwise call, reduction, copy, fill,
  GEMM, random draw (an estimate: CuPy sometimes launches two for one call);
- hidden copies CuPy makes on its own: matmul operands that are not contiguous (N-d matmul makes
  both operands C-contiguous), `out=` arrays matmul cannot write into, broadcast batched matmuls'
  pointer arrays;
- uploads (host -> device: `asarray` of host data, host index arrays) and downloads.

`record()` collects them for a block of code; `totals()` since the last `reset()`.

Anything of CuPy's API this stand-in does not implement raises NotImplementedError naming it (so
`hasattr` cannot quietly take another path); a name CuPy itself lacks raises AttributeError, as
CuPy would. It cannot run CUDA C (RawKernel, ElementwiseKernel): those raise NotImplementedError.
Numbers it measures (time, memory) are NumPy's, never a GPU's.
"""
import contextlib
import os
import sys
import time
import types
import weakref
from collections import Counter

import numpy

__version__ = "14.2.0+tinyllm.standin"
__tinyllm_standin__ = True          # tinyllm.backend.cupy_is_standin() looks for this

# ---------------------------------------------------------------------------------------------
# What real CuPy has: its public top-level names and ndarray attributes (CuPy 14.2, cupy/__init__.py
# and cupy/_core/core.pyx). A name in these lists that the stand-in lacks raises NotImplementedError;
# any other name raises AttributeError, as CuPy does (e.g. `vecdot`, `ndarray.ctypes`).

CUPY_NAMES = frozenset("""
AxisError ComplexWarning DataSource ElementwiseKernel Inf Infinity ModuleDeprecationWarning NAN NINF
NZERO NaN PINF PZERO RankWarning RawKernel RawModule ReductionKernel TooHardError
VisibleDeprecationWarning abs absolute acos acosh add all allclose alltrue amax amin angle any
append apply_along_axis apply_over_axes arange arccos arccosh arcsin arcsinh arctan arctan2 arctanh
argmax argmin argpartition argsort argwhere around array array2string array_equal array_equiv
array_repr array_split array_str asanyarray asarray asarray_chkfinite ascontiguousarray asfarray
asfortranarray asin asinh asnumpy astype atan atan2 atanh atleast_1d atleast_2d atleast_3d average
bartlett base_repr binary_repr bincount bitwise_and bitwise_count bitwise_invert bitwise_left_shift
bitwise_not bitwise_or bitwise_right_shift bitwise_xor blackman bool bool_ broadcast
broadcast_arrays broadcast_shapes broadcast_to byte byte_bounds c_ can_cast cbrt cdouble ceil cfloat
choose clear_memo clip column_stack common_type complex128 complex64 complex_ complexfloating
compress concat concatenate conj conjugate convolve copy copysign copyto corrcoef correlate cos cosh
count_nonzero cov cross csingle cuda cumprod cumproduct cumsum cumulative_prod cumulative_sum
deg2rad degrees delete diag diag_indices diag_indices_from diagflat diagonal diff digitize
disable_experimental_feature_warning disp divide divmod dot double dsplit dstack dtype e ediff1d
einsum empty empty_like equal euler_gamma exceptions exp exp2 expand_dims expm1 extract eye fabs fft
fill_diagonal find_common_type finfo fix flatiter flatnonzero flip fliplr flipud float16 float32
float64 float_ float_power floating floor floor_divide fmax fmin fmod format_float_positional
format_float_scientific format_parser frexp fromDlpack from_dlpack frombuffer fromfile fromfunction
fromiter fromstring full full_like fuse gcd generic genfromtxt get_array_module get_array_wrap
get_default_memory_pool get_default_pinned_memory_pool get_printoptions gradient greater
greater_equal half hamming hanning heaviside histogram histogram2d histogramdd hsplit hstack hypot
i0 identity iinfo imag in1d index_exp indices inexact inf infty inner int16 int32 int64 int8 int_
intc integer interp intersect1d intp invert is_available isclose iscomplex iscomplexobj isdtype
isfinite isfortran isin isinf isnan isneginf isposinf isreal isrealobj isscalar issctype issubclass_
issubdtype issubsctype iterable ix_ kaiser kron lcm ldexp left_shift less less_equal lexsort linalg
linspace load loadtxt log log10 log1p log2 logaddexp logaddexp2 logical_and logical_not logical_or
logical_xor logspace long longlong make_aligned_dtype mask_indices matmul matrix_transpose max
maximum may_share_memory mean median memoize meshgrid mgrid min min_scalar_type minimum mintypecode
mod modf moveaxis msort multiply nan nan_to_num nanargmax nanargmin nancumprod nancumsum nanmax
nanmean nanmedian nanmin nanprod nanstd nansum nanvar ndarray ndim ndindex negative newaxis
nextafter nonzero not_equal number obj2sctype ogrid ones ones_like outer packbits pad partition
percentile permute_dims pi piecewise place poly poly1d polyadd polyfit polymul polynomial polysub
polyval positive pow power printoptions prod product promote_types ptp put put_along_axis putmask
quantile r_ rad2deg radians random ravel ravel_multi_index real real_if_close reciprocal remainder
repeat require reshape resize result_type right_shift rint roll rollaxis roots rot90 round round_
row_stack s_ safe_eval save savetxt savez savez_compressed sctype2char searchsorted select
set_printoptions set_string_function setdiff1d setxor1d shape shares_memory short show_config sign
signbit signedinteger sin sinc single singlecomplex sinh size sometrue sort sort_complex split sqrt
square squeeze stack std subtract sum swapaxes take take_along_axis tan tanh tensordot testing tile
trace transpose trapezoid trapz tri tril tril_indices tril_indices_from trim_zeros triu triu_indices
triu_indices_from true_divide trunc typename ubyte ufunc uint uint16 uint32 uint64 uint8 uintc uintp
ulong ulonglong union1d unique unique_all unique_counts unique_inverse unique_values unpackbits
unravel_index unsignedinteger unwrap ushort vander var vdot vectorize vsplit vstack where who zeros
zeros_like
""".split())

CUPY_NDARRAY_NAMES = frozenset("""
T all any argmax argmin argpartition argsort astype base byteswap choose clip compress conj conjugate
copy cstruct cumprod cumsum data device diagonal dot dtype dump dumps fill flags flat flatten get
imag item itemsize mT max mdspan mean min nbytes ndim nonzero partition prod ptp put ravel real
reduced_view repeat reshape round scatter_add scatter_max scatter_min searchsorted set shape size
sort squeeze std strides sum swapaxes take toDlpack tobytes tofile tolist trace transpose var view
""".split())

# ---------------------------------------------------------------------------------------------
# Recording: what happened, and which source line made it happen


class Record:
    """What the stand-in saw: Counters keyed by "path:line" of the code that caused each event.

    syncs      host syncs (the host waits for the GPU), by line; sync_events has (what, stack) each,
               the stack innermost first; sync_functions counts them by "path:function"
    launches   kernel launches (an estimate, see the module docstring)
    copies     copies CuPy makes on its own (matmul operands, matmul outputs), by line
    uploads    host -> device copies;  downloads: device -> host copies
    einsums    einsum calls (CuPy parses the subscripts on every call)
    nd_matmuls matmuls with more than 2 dimensions (CuPy's batched path: no TF32, copies operands)
    """

    def __init__(self):
        self.syncs, self.sync_functions, self.launches, self.copies = Counter(), Counter(), Counter(), Counter()
        self.uploads, self.downloads, self.einsums, self.nd_matmuls = Counter(), Counter(), Counter(), Counter()
        self.sync_events, self.copy_events = [], []

    @property
    def n_syncs(self):
        return sum(self.syncs.values())

    @property
    def n_launches(self):
        return sum(self.launches.values())

    def syncs_in(self, path):
        """Syncs caused by lines of one file (a path suffix such as "tinyllm/optim.py")."""
        return Counter({site: n for site, n in self.syncs.items() if site.rsplit(":", 1)[0].endswith(path)})

    def summary(self, top=12):
        """A short text report: syncs by line (with what synced), then the busiest launch sites."""
        lines = [f"host syncs: {self.n_syncs}"]
        whats = {}
        for what, stack in self.sync_events:
            whats.setdefault(stack[0] if stack else "?", Counter())[what] += 1
        for site, n in self.syncs.most_common():
            lines.append(f"  {n:4d}  {site}  ({', '.join(f'{w} x{k}' for w, k in whats.get(site, {}).items())})")
        lines.append(f"kernel launches (estimated): {self.n_launches}; top lines:")
        lines += [f"  {n:6d}  {site}" for site, n in self.launches.most_common(top)]
        for name in ("copies", "uploads", "downloads", "einsums", "nd_matmuls"):
            c = getattr(self, name)
            if c:
                lines.append(f"{name}: {sum(c.values())}: " + ", ".join(f"{s} x{n}" for s, n in c.most_common(top)))
        return "\n".join(lines)


_totals = Record()
_active = [_totals]      # the Records being filled: totals() and every open record()

_HERE = {os.path.abspath(__file__)}
_NUMPY_DIR = os.path.dirname(os.path.abspath(numpy.__file__)) + os.sep
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep
_names = {}            # file name -> its display name ("tinyllm/model.py"), or "" for frames to skip


def _source_name(filename):
    """The display name of a source file (relative to the repository), "" for the stand-in's own
    frames, NumPy's and contextlib's (the line that caused an event is the first frame outside them)."""
    name = _names.get(filename)
    if name is None:
        full = os.path.abspath(filename)
        if full in _HERE or full.startswith(_NUMPY_DIR) or filename.startswith("<frozen") or \
                full.endswith(os.sep + "contextlib.py"):
            name = ""
        else:
            name = full[len(_ROOT):] if full.startswith(_ROOT) else filename
        _names[filename] = name
    return name


def _stack(limit):
    """The source lines that led here, innermost first, outside this module and NumPy, as
    ("path:line", "path:function") pairs."""
    out = []
    f = sys._getframe(2)
    while f is not None and len(out) < limit:
        name = _names.get(f.f_code.co_filename)
        if name is None:
            name = _source_name(f.f_code.co_filename)
        if name:
            out.append((f"{name}:{f.f_lineno}", f"{name}:{f.f_code.co_name}"))
        f = f.f_back
    return out


def _site():
    """The first source line outside the stand-in (and NumPy) on the way here."""
    f = sys._getframe(2)
    while f is not None:
        name = _names.get(f.f_code.co_filename)
        if name is None:
            name = _source_name(f.f_code.co_filename)
        if name:
            return f"{name}:{f.f_lineno}"
        f = f.f_back
    return "?"


def _launch(n=1):
    site = _site()
    for r in _active:
        r.launches[site] += n


def _count(field, n=1):
    site = _site()
    for r in _active:
        getattr(r, field)[site] += n


def _sync(what):
    """The host waits for the device here (and, for what="get", copies back)."""
    stack = _stack(8)
    site, function = stack[0] if stack else ("?", "?")
    lines = [line for line, _ in stack]
    for r in _active:
        r.syncs[site] += 1
        r.sync_functions[function] += 1
        r.sync_events.append((what, lines))


def _copy(what):
    stack = _stack(4)
    site = stack[0][0] if stack else "?"
    for r in _active:
        r.copies[site] += 1
        r.launches[site] += 1
        r.copy_events.append((what, [line for line, _ in stack]))


@contextlib.contextmanager
def record():
    """`with record() as r:` ... r.syncs, r.launches, ... for what ran inside (nesting is fine)."""
    r = begin_record()
    try:
        yield r
    finally:
        end_record(r)


def begin_record():
    """A Record that collects from now until end_record(it)."""
    r = Record()
    _active.append(r)
    return r


def end_record(r):
    if r in _active:
        _active.remove(r)


def totals():
    """Everything since the last reset()."""
    return _totals


# ---------------------------------------------------------------------------------------------
# Devices


class _State:
    device_count = 1            # like the lent H100/H200 machines; configure(device_count=2) for cuda:1
    current = 0                 # the current device (CUDA's is per thread; one is enough here)
    device_name = "tinyllm CuPy stand-in (NumPy, no GPU)"


def configure(device_count=None, device_name=None):
    """Set how many devices the stand-in pretends to have (and their name)."""
    if device_count is not None:
        if int(device_count) < 1:
            raise ValueError("the stand-in needs at least one device")
        _State.device_count = int(device_count)
        _State.current = min(_State.current, _State.device_count - 1)
    if device_name is not None:
        _State.device_name = str(device_name)


def reset():
    """Forget the counts, go back to one device, device 0, and an empty memory pool high-water mark."""
    global _totals
    _totals = Record()
    _active[:] = [_totals]
    _State.device_count, _State.current = 1, 0
    _State.device_name = "tinyllm CuPy stand-in (NumPy, no GPU)"
    _pool._high = _pool.used_bytes()


class CUDARuntimeError(RuntimeError):
    """As cupy_backends.cuda.api.runtime.CUDARuntimeError."""


def _check_ordinal(device_id):
    if not isinstance(device_id, (int, numpy.integer)) or isinstance(device_id, bool):
        raise TypeError(f"device id must be an int, got {type(device_id).__name__}")
    if not 0 <= device_id < _State.device_count:
        raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
    return int(device_id)


class Device:
    """cupy.cuda.Device: `Device(n).use()` makes n current; `with Device(n):` for a block."""

    def __init__(self, device=None):
        self.id = _State.current if device is None else _check_ordinal(device)
        self._previous = []

    def use(self):
        _State.current = self.id

    def __enter__(self):
        self._previous.append(_State.current)
        _State.current = self.id
        return self

    def __exit__(self, *exc):
        _State.current = self._previous.pop()
        return False

    def synchronize(self):
        _sync("Device.synchronize")

    @property
    def compute_capability(self):
        return "90"

    @property
    def mem_info(self):
        return runtime.memGetInfo()

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(("Device", self.id))

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


class Event:
    """cupy.cuda.Event: record() stamps the host clock here; synchronize() is a host sync."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._time = None

    def record(self, stream=None):
        self._time = time.perf_counter()

    def synchronize(self):
        _sync("Event.synchronize")

    @property
    def done(self):
        return True


def get_elapsed_time(start_event, end_event):
    """Milliseconds between two recorded events (host clock on the stand-in)."""
    return (end_event._time - start_event._time) * 1e3


class Stream:
    """The null stream only: synchronize() is a host sync."""

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.ptr = 0

    def synchronize(self):
        _sync("Stream.synchronize")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def use(self):
        return self


Stream.null = Stream(null=True)


def get_current_stream():
    return Stream.null


class MemoryPointer:
    """Enough of cupy.cuda.MemoryPointer for arrays' `.data`: the address and the device."""

    def __init__(self, ptr, device_id):
        self.ptr, self.device_id = ptr, device_id

    @property
    def device(self):
        return Device(self.device_id)


def _runtime_namespace():
    rt = types.ModuleType("cupy.cuda.runtime")
    rt.CUDARuntimeError = CUDARuntimeError
    rt.getDeviceCount = lambda: _State.device_count
    rt.getDevice = lambda: _State.current

    def setDevice(device):
        _State.current = _check_ordinal(device)

    def getDeviceProperties(device):
        _check_ordinal(device)
        return {"name": _State.device_name.encode(), "totalGlobalMem": 80 * 2**30, "multiProcessorCount": 132,
                "major": 9, "minor": 0, "clockRate": 1_980_000, "memoryClockRate": 2_619_000,
                "memoryBusWidth": 5120, "l2CacheSize": 50 * 2**20}

    def deviceSynchronize():
        _sync("runtime.deviceSynchronize")

    def memGetInfo():
        total = 80 * 2**30
        return total - _pool.total_bytes(), total

    rt.setDevice, rt.getDeviceProperties = setDevice, getDeviceProperties
    rt.deviceSynchronize, rt.memGetInfo = deviceSynchronize, memGetInfo
    rt.runtimeGetVersion = lambda: 13000
    rt.driverGetVersion = lambda: 13000
    rt.is_hip = False
    return rt


runtime = _runtime_namespace()

# ---------------------------------------------------------------------------------------------
# Memory: a caching pool's two numbers (live arrays' bytes; the most it has held since free_all_blocks)


class MemoryPool:
    """cupy.get_default_memory_pool(): used_bytes() counts live device arrays; total_bytes() the
    high-water mark since free_all_blocks(), as a caching pool that never gives blocks back would hold."""

    def __init__(self):
        self._used = 0
        self._high = 0
        self._limit = 0

    def _alloc(self, nbytes):
        self._used += nbytes
        if self._used > self._high:
            self._high = self._used
            if self._limit and self._used > self._limit:
                self._used -= nbytes
                raise MemoryError(f"Out of memory allocating {nbytes:,} bytes (stand-in pool limit {self._limit:,})")

    def _free(self, nbytes):
        self._used -= nbytes

    def used_bytes(self):
        return self._used

    def total_bytes(self):
        return self._high

    def free_bytes(self):
        return self._high - self._used

    def free_all_blocks(self, stream=None):
        self._high = self._used

    def n_free_blocks(self):
        return 0

    def set_limit(self, size=None, fraction=None):
        self._limit = int(size or 0)

    def get_limit(self):
        return self._limit


class PinnedMemoryPool:
    def free_all_blocks(self):
        pass

    def n_free_blocks(self):
        return 0


_pool = MemoryPool()
_pinned_pool = PinnedMemoryPool()


def get_default_memory_pool():
    return _pool


def get_default_pinned_memory_pool():
    return _pinned_pool


_live = {}     # id(weak reference) -> (weak reference, bytes) of the arrays the pool counts


def _track(a):
    """Count a new array that owns its memory in the pool until it is freed."""
    if a.flags.owndata and a.nbytes:
        nbytes = a.nbytes
        _pool._alloc(nbytes)
        ref = weakref.ref(a, _untrack)
        _live[id(ref)] = (ref, nbytes)


def _untrack(ref):
    entry = _live.pop(id(ref), None)
    if entry is not None:
        _pool._free(entry[1])


# ---------------------------------------------------------------------------------------------
# The array type


_SCALARS = (bool, int, float, complex)


def _wrap(a, device=None):
    """A device array around the NumPy array a (a 0-d array for a NumPy scalar)."""
    if not isinstance(a, numpy.ndarray):
        a = numpy.asarray(a)
    out = object.__new__(ndarray)
    out._a = a
    out._dev = _State.current if device is None else device
    return out


def _new(a):
    """_wrap for an array this module just allocated (counted in the memory pool)."""
    if isinstance(a, numpy.ndarray):
        _track(a)
    return _wrap(a)


def _unsupported(x):
    return TypeError(f"Unsupported type {type(x)}")


def _device_array(x, what="argument"):
    """The NumPy array inside a device array on the current device; anything else is refused."""
    if type(x) is ndarray:
        if x._dev != _State.current:
            raise ValueError(f"The device where the array resides ({x._dev}) is different from the current "
                             f"device ({_State.current}). (The stand-in refuses what CuPy would run through "
                             "peer access with a PerformanceWarning.)")
        return x._a
    if isinstance(x, numpy.ndarray):
        raise TypeError(f"Unsupported type {type(x)}: a host numpy.ndarray where CuPy needs a cupy.ndarray "
                        f"({what}); move it with cupy.asarray first")
    raise TypeError(f"Unsupported type {type(x)} ({what}): CuPy needs a cupy.ndarray here")


def _operand(x):
    """An elementwise operand: a device array, or a Python/NumPy scalar (as CuPy's kernels take them)."""
    if type(x) is ndarray:
        return _device_array(x)
    if isinstance(x, _SCALARS) or isinstance(x, numpy.generic):
        return x
    if isinstance(x, numpy.ndarray):
        raise TypeError(f"Unsupported type {type(x)}: a host numpy.ndarray met a cupy.ndarray "
                        "(CuPy never copies between host and device silently)")
    raise _unsupported(x)


def _result(r):
    """A NumPy result as device arrays: arrays and scalars become device arrays, tuples stay tuples."""
    if isinstance(r, (numpy.ndarray, numpy.generic)):
        return _new(r if isinstance(r, numpy.ndarray) else numpy.asarray(r))
    if isinstance(r, tuple):
        return tuple(_result(x) for x in r)
    if isinstance(r, list):
        return [_result(x) for x in r]
    return r


def _defers_to(other):
    """True for types that handle the operator themselves (tinyllm.Tensor: `ndarray + Tensor`)."""
    return getattr(type(other), "__array_ufunc__", False) is None


class _Flags:
    """CuPy's flags: c_contiguous, f_contiguous, owndata (no `writeable`: CuPy has none)."""

    __slots__ = ("c_contiguous", "f_contiguous", "owndata")

    def __init__(self, a):
        f = a.flags
        self.c_contiguous, self.f_contiguous, self.owndata = f.c_contiguous, f.f_contiguous, f.owndata

    def __getitem__(self, key):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous, "OWNDATA": self.owndata}[key]

    def __repr__(self):
        return f"  C_CONTIGUOUS : {self.c_contiguous}\n  F_CONTIGUOUS : {self.f_contiguous}\n  OWNDATA : {self.owndata}"


def _binary(name, reflected=False):
    def op(self, other):
        if _defers_to(other):
            return NotImplemented
        u = _UFUNCS[name]
        return u(other, self) if reflected else u(self, other)
    op.__name__ = f"__{'r' if reflected else ''}{name}__"
    return op


def _inplace(name):
    def op(self, other):
        if _defers_to(other):
            return NotImplemented
        _UFUNCS[name](self, other, out=self)
        return self
    return op


def _compare(name):
    def op(self, other):
        if _defers_to(other):
            return NotImplemented
        if other is None or (not isinstance(other, (ndarray, numpy.ndarray, numpy.generic) + _SCALARS)):
            if name in ("equal", "not_equal"):
                return _new(numpy.full(self.shape, name == "not_equal"))
            return NotImplemented
        return _UFUNCS[name](self, other)
    return op


class ndarray:
    """A device array: a NumPy array that CuPy's rules keep on its side of the bus."""

    __slots__ = ("_a", "_dev", "__weakref__")
    __hash__ = None                      # as CuPy (and NumPy): arrays are not hashable
    __array_priority__ = 100

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("cupy stand-in: ndarray(memptr=..., strides=...) is not implemented")
        self._a = numpy.empty(shape, dtype=dtype, order=order)
        self._dev = _State.current
        _track(self._a)

    # --- what the array is (no device work) -------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: _Flags(self._a))
    device = property(lambda self: Device(self._dev))
    data = property(lambda self: MemoryPointer(self._a.__array_interface__["data"][0], self._dev))

    def __len__(self):
        if self._a.ndim == 0:
            raise TypeError("len() of unsized object")
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self._a)))

    def __getattr__(self, name):   # only for names not defined here
        if name in CUPY_NDARRAY_NAMES:
            raise NotImplementedError(f"cupy stand-in: cupy.ndarray.{name} exists in CuPy but the stand-in does "
                                      "not implement it (tinyllm/testing/cupy_standin.py)")
        hint = " (a NumPy-only attribute: CuPy arrays lack it)" if hasattr(numpy.ndarray, name) else ""
        raise AttributeError(f"'cupy.ndarray' object has no attribute '{name}'{hint}")

    # --- no implicit trips to the host --------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def get(self, stream=None, order="C", out=None, blocking=True):
        """The explicit device -> host copy (the host waits for the device)."""
        _sync("get")
        _count("downloads")
        a = numpy.array(self._a, order=order)
        if out is not None:
            out[...] = a
            return out
        return a

    def set(self, arr, stream=None):
        """Host -> device copy into this array (same shape and dtype, as CuPy asks)."""
        if not isinstance(arr, numpy.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError("Shape or dtype mismatch in ndarray.set")
        _count("uploads")
        self._a[...] = arr

    def item(self):
        if self._a.size != 1:
            raise ValueError("can only convert an array of size 1 to a Python scalar")
        _sync("item")
        return self._a.item()

    def tolist(self):
        _sync("tolist")
        return self._a.tolist()

    def tobytes(self, order="C"):
        _sync("tobytes")
        return self._a.tobytes(order)

    def __float__(self):
        _sync("float()")
        return float(self._a)

    def __int__(self):
        _sync("int()")
        return int(self._a)

    def __complex__(self):
        _sync("complex()")
        return complex(self._a)

    def __bool__(self):
        if self._a.size == 1:
            _sync("bool()")
            return bool(self._a)
        if self._a.size == 0:
            return False
        raise ValueError("The truth value of an array with more than one element is ambiguous. "
                         "Use a.any() or a.all()")

    def __repr__(self):
        _sync("repr()")
        return repr(self._a)

    def __str__(self):
        _sync("str()")
        return str(self._a)

    def __format__(self, spec):
        _sync("format()")
        return format(self._a if self._a.ndim else self._a[()], spec)

    # --- NumPy's protocols: dispatch to this module, as CuPy's arrays do ----------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        mine = _UFUNCS.get(ufunc.__name__)
        if mine is None:
            return NotImplemented
        if "out" in kwargs:
            out = kwargs["out"]
            if isinstance(out, tuple):
                if len(out) != 1:
                    raise ValueError("The 'out' parameter must have exactly one array value")
                kwargs["out"] = out[0]
        for x in inputs + ((kwargs["out"],) if kwargs.get("out") is not None else ()):
            if not isinstance(x, (ndarray, numpy.ndarray, numpy.generic) + _SCALARS):
                return NotImplemented
        func = mine if method == "__call__" else getattr(mine, method, None)
        if func is None:
            return NotImplemented
        return func(*inputs, **kwargs)

    def __array_function__(self, func, arg_types, args, kwargs):
        target = cupy
        for part in func.__module__.split(".")[1:]:       # numpy.linalg.norm -> cupy.linalg.norm
            target = target.__dict__.get(part)
            if target is None:
                return NotImplemented
        mine = target.__dict__.get(func.__name__)
        if mine is None:
            if target is cupy and func.__name__ in CUPY_NAMES:
                raise NotImplementedError(f"cupy stand-in: numpy.{func.__name__} on a cupy.ndarray dispatches to "
                                          f"cupy.{func.__name__}, which the stand-in does not implement")
            return NotImplemented                          # NumPy then raises TypeError, as with CuPy
        return mine(*args, **kwargs)

    # --- operators ----------------------------------------------------------------------------
    __add__, __radd__, __iadd__ = _binary("add"), _binary("add", True), _inplace("add")
    __sub__, __rsub__, __isub__ = _binary("subtract"), _binary("subtract", True), _inplace("subtract")
    __mul__, __rmul__, __imul__ = _binary("multiply"), _binary("multiply", True), _inplace("multiply")
    __truediv__, __rtruediv__, __itruediv__ = _binary("true_divide"), _binary("true_divide", True), \
        _inplace("true_divide")
    __floordiv__, __rfloordiv__, __ifloordiv__ = _binary("floor_divide"), _binary("floor_divide", True), \
        _inplace("floor_divide")
    __mod__, __rmod__, __imod__ = _binary("remainder"), _binary("remainder", True), _inplace("remainder")
    __pow__, __rpow__, __ipow__ = _binary("power"), _binary("power", True), _inplace("power")
    __and__, __rand__, __iand__ = _binary("bitwise_and"), _binary("bitwise_and", True), _inplace("bitwise_and")
    __or__, __ror__, __ior__ = _binary("bitwise_or"), _binary("bitwise_or", True), _inplace("bitwise_or")
    __xor__, __rxor__, __ixor__ = _binary("bitwise_xor"), _binary("bitwise_xor", True), _inplace("bitwise_xor")
    __lshift__, __rshift__ = _binary("left_shift"), _binary("right_shift")
    __ilshift__, __irshift__ = _inplace("left_shift"), _inplace("right_shift")
    __lt__, __le__, __gt__, __ge__ = _compare("less"), _compare("less_equal"), _compare("greater"), \
        _compare("greater_equal")
    __eq__, __ne__ = _compare("equal"), _compare("not_equal")

    def __matmul__(self, other):
        return NotImplemented if _defers_to(other) else matmul(self, other)

    def __rmatmul__(self, other):
        return NotImplemented if _defers_to(other) else matmul(other, self)

    def __neg__(self):
        return _UFUNCS["negative"](self)

    def __pos__(self):
        return _UFUNCS["positive"](self)

    def __abs__(self):
        return _UFUNCS["absolute"](self)

    def __invert__(self):
        return _UFUNCS["invert"](self)

    # --- indexing ------------------------------------------------------------------------------
    def __getitem__(self, key):
        a = _device_array(self)
        key, kind = _index_key(key)
        if kind == "mask":
            _sync("boolean-mask indexing")       # CuPy counts the True entries on the host first
            _launch(3)
            return _new(a[key])
        if kind == "advanced":
            _launch()
            return _new(a[key])
        return _wrap(a[key], self._dev)          # basic indexing: a view (0-d for single elements)

    def __setitem__(self, key, value):
        a = _device_array(self)
        key, kind = _index_key(key)
        if type(value) is ndarray:
            value = _device_array(value)
        elif isinstance(value, numpy.ndarray):
            if value.ndim:
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
            value = value[()]
        elif not (isinstance(value, _SCALARS) or isinstance(value, numpy.generic)):
            raise _unsupported(value)
        if kind == "mask":
            _sync("boolean-mask assignment")
            _launch(3)
        else:
            _launch()
        a[key] = value

    # --- methods ---------------------------------------------------------------------------------
    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        a = _device_array(self)
        if not copy and numpy.dtype(dtype) == a.dtype:
            return self
        _launch()
        return _new(a.astype(dtype, order=order, casting=casting or "unsafe"))

    def copy(self, order="C"):
        _launch()
        return _new(_device_array(self).copy(order=order))

    def view(self, dtype=None):
        a = _device_array(self)
        return _wrap(a.view() if dtype is None else a.view(dtype), self._dev)

    def fill(self, value):
        _device_array(self)
        if type(value) is ndarray:
            value = value.item()                # CuPy compares the value with 0 on the host: a sync
        _launch()
        self._a.fill(value)

    def reshape(self, *shape, order="C"):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return _maybe_view(self, _device_array(self).reshape(shape, order=order))

    def ravel(self, order="C"):
        return _maybe_view(self, _device_array(self).ravel(order))

    def flatten(self, order="C"):
        return self.copy(order).reshape(-1)

    def transpose(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return _wrap(_device_array(self).transpose(*axes), self._dev)

    T = property(lambda self: self.transpose())
    mT = property(lambda self: self.swapaxes(-1, -2))

    def swapaxes(self, axis1, axis2):
        return _wrap(_device_array(self).swapaxes(axis1, axis2), self._dev)

    def squeeze(self, axis=None):
        return _wrap(_device_array(self).squeeze(axis), self._dev)

    def nonzero(self):
        _sync("nonzero")
        _launch(2)
        return tuple(_new(i) for i in _device_array(self).nonzero())

    def dot(self, b, out=None):
        return dot(self, b, out=out)

    def take(self, indices, axis=None, out=None):
        return take(self, indices, axis=axis, out=out)

    def __reduce__(self):
        raise TypeError("cupy stand-in arrays are not pickled (tinyllm never unpickles)")


def _method(name, launches=1):
    """An ndarray method that runs NumPy's method of that name as one device kernel."""
    def method(self, *args, **kwargs):
        a = _device_array(self)
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = _device_array(out, "out")
        args = [_device_array(x) if type(x) is ndarray else x for x in args]
        _launch(launches)
        r = getattr(a, name)(*args, **kwargs)
        return out if out is not None else _result(r)
    method.__name__ = name
    return method


for _name in ("sum", "prod", "mean", "var", "std", "max", "min", "argmax", "argmin", "all", "any", "cumsum",
              "cumprod", "clip", "round", "repeat", "sort", "argsort", "trace", "ptp", "conj", "conjugate"):
    setattr(ndarray, _name, _method(_name))
ndarray.__module__ = "cupy"      # what tinyllm (and CuPy users) test: type(a).__module__ == "cupy"


def _maybe_view(source, result):
    """reshape/ravel: a view when NumPy could make one, else a copy (one launch), as in CuPy."""
    if numpy.may_share_memory(result, source._a):
        return _wrap(result, source._dev)
    _launch()
    return _new(result)


def _index_key(key, keep_scalars=False):
    """A key with device index arrays unwrapped (host ones uploaded), as a tuple, and its kind:
    "basic" (a view), "advanced" (a gather kernel) or "mask" (boolean: a host sync). Basic keys get
    a trailing Ellipsis (so a[0] is a 0-d view, as in CuPy) unless keep_scalars."""
    parts = key if isinstance(key, tuple) else (key,)
    out, kind = [], "basic"
    for k in parts:
        if isinstance(k, (list, numpy.ndarray)):
            _count("uploads")               # CuPy copies host index arrays to the device
            k = numpy.asarray(k)
        elif type(k) is ndarray:
            k = _device_array(k, "index")
        elif isinstance(k, numpy.generic) or isinstance(k, bool):
            k = k.item() if isinstance(k, numpy.generic) else k
        if isinstance(k, numpy.ndarray):
            kind = "mask" if k.dtype == bool else ("advanced" if kind == "basic" else kind)
        elif isinstance(k, bool):
            kind = "mask"
        out.append(k)
    if kind == "basic" and not keep_scalars and not any(k is Ellipsis for k in out):
        out.append(Ellipsis)                # a[0] is a 0-d view in CuPy, not a NumPy scalar
    return tuple(out), kind


# ---------------------------------------------------------------------------------------------
# The public API: everything below goes into `_api`, the namespace of the `cupy` module object made
# at the end (kept out of this file's globals, where `sum`, `max`, `all`, ... would hide Python's)

_api = {}


def _public(func, name=None):
    _api[name or func.__name__] = func
    return func


# ---------------------------------------------------------------------------------------------
# Ufuncs (elementwise kernels)


class ufunc:
    """A CuPy ufunc: one kernel per call; `.at` (scatter), `.reduce`/`.accumulate` for add and
    multiply, `.reduceat` for add, `.outer`."""

    def __init__(self, np_ufunc):
        self._u = np_ufunc
        self.__name__ = np_ufunc.__name__
        self.nin, self.nout = np_ufunc.nin, np_ufunc.nout

    def __repr__(self):
        return f"<ufunc '{self.__name__}'>"

    def __call__(self, *args, out=None, dtype=None, **kwargs):
        if len(args) > self.nin:
            args, out = args[:self.nin], args[self.nin]
        device_arrays = 0
        xs = []
        for x in args:
            if type(x) is ndarray:
                device_arrays += 1
                xs.append(x._a if x._dev == _State.current else _device_array(x))
            else:
                xs.append(_operand(x))
        if not device_arrays and out is None:
            raise TypeError(f"cupy.{self.__name__}: no cupy.ndarray among the arguments "
                            f"({', '.join(type(x).__name__ for x in args)})")
        if kwargs and set(kwargs) - {"casting"}:
            raise NotImplementedError(f"cupy stand-in: {self.__name__}(..., {', '.join(kwargs)}=...) is not "
                                      "implemented")
        _launch()
        if out is not None:
            if isinstance(out, tuple):
                out = out[0]
            self._u(*xs, out=_device_array(out, "out"), dtype=dtype, **kwargs)
            return out
        r = self._u(*xs, dtype=dtype, **kwargs)
        return _new(r if type(r) is numpy.ndarray else numpy.asarray(r))

    def at(self, a, indices, b=None):
        """a[indices] op= b with repeated indices applied each time (atomics on a GPU)."""
        if self.__name__ not in ("add", "subtract", "maximum", "minimum", "bitwise_and", "bitwise_or",
                                 "bitwise_xor"):
            raise NotImplementedError(f"`{self.__name__}.at` is not supported yet")
        key, kind = _index_key(indices, keep_scalars=True)
        if kind == "mask":
            _sync("boolean-mask scatter")
        _launch()
        self._u.at(_device_array(a), key[0] if len(key) == 1 else key, _operand(b) if b is not None else None)

    def reduce(self, array, axis=0, dtype=None, out=None, keepdims=False):
        if self.__name__ == "add":
            return array.sum(axis=axis, dtype=dtype, out=out, keepdims=keepdims)
        if self.__name__ == "multiply":
            return array.prod(axis=axis, dtype=dtype, out=out, keepdims=keepdims)
        raise NotImplementedError(f"`{self.__name__}.reduce` is not supported yet")

    def accumulate(self, array, axis=0, dtype=None, out=None):
        if self.__name__ == "add":
            return array.cumsum(axis=axis, dtype=dtype, out=out)
        if self.__name__ == "multiply":
            return array.cumprod(axis=axis, dtype=dtype, out=out)
        raise NotImplementedError(f"`{self.__name__}.accumulate` is not supported yet")

    def reduceat(self, array, indices, axis=0, dtype=None, out=None):
        if self.__name__ != "add":
            raise NotImplementedError(f"`{self.__name__}.reduceat` is not supported yet")
        if type(indices) is ndarray:
            idx = _device_array(indices, "indices")
        else:
            _count("uploads")
            idx = numpy.asarray(indices)
        _launch()
        r = numpy.add.reduceat(_device_array(array), idx, axis=axis, dtype=dtype)
        if out is not None:
            _device_array(out, "out")[...] = r
            return out
        return _new(r)

    def outer(self, a, b, **kwargs):
        _launch()
        return _result(self._u.outer(_operand(a), _operand(b), **kwargs))


_UFUNC_NAMES = """
add subtract multiply divide true_divide floor_divide remainder mod fmod power float_power negative positive
absolute fabs sign reciprocal exp exp2 expm1 log log2 log10 log1p sqrt cbrt square sin cos tan arcsin arccos
arctan arctan2 sinh cosh tanh arcsinh arccosh arctanh hypot maximum minimum fmax fmin floor ceil trunc rint
isfinite isinf isnan signbit copysign nextafter logaddexp logaddexp2 equal not_equal less less_equal greater
greater_equal logical_and logical_or logical_xor logical_not bitwise_and bitwise_or bitwise_xor invert
left_shift right_shift ldexp heaviside deg2rad rad2deg degrees radians conjugate
""".split()
_UFUNCS = {name: ufunc(getattr(numpy, name)) for name in _UFUNC_NAMES}
_UFUNCS.update(abs=_UFUNCS["absolute"], bitwise_not=_UFUNCS["invert"], pow=_UFUNCS["power"], conj=_UFUNCS["conjugate"])
_api.update(_UFUNCS)


# ---------------------------------------------------------------------------------------------
# Making arrays, and the copies between host and device


def _host_to_device(obj, dtype=None, order="K"):
    """cupy.asarray/array of host data: one upload (CuPy stages it through pinned memory, no sync)."""
    if isinstance(obj, (list, tuple)) and any(type(x) is ndarray for x in obj):
        raise NotImplementedError("cupy stand-in: array() of a list of cupy arrays is not implemented; use stack")
    _count("uploads")
    return _new(numpy.array(obj, dtype=dtype, order="C" if order in ("K", "A", None) else order))


@_public
def asarray(a, dtype=None, order=None, *, blocking=False):
    if type(a) is ndarray:
        return a if dtype is None or numpy.dtype(dtype) == a.dtype else a.astype(dtype)
    return _host_to_device(a, dtype)


@_public
def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if ndmin:
        raise NotImplementedError("cupy stand-in: array(..., ndmin=) is not implemented")
    if type(obj) is ndarray:
        same = dtype is None or numpy.dtype(dtype) == obj.dtype
        if copy is False or (copy is None and same):
            return obj if same else obj.astype(dtype)
        _launch()
        return _new(numpy.array(_device_array(obj), dtype=dtype, order=order))
    return _host_to_device(obj, dtype, order)


_api["asanyarray"] = asarray


@_public
def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    """Device -> host copy (a host sync); a host array passes through as numpy.asarray would."""
    if type(a) is ndarray:
        return a.get(order=order, out=out)
    return numpy.asarray(a, order=order)


@_public
def ascontiguousarray(a, dtype=None):
    x = _device_array(a)
    if x.flags.c_contiguous and (dtype is None or numpy.dtype(dtype) == x.dtype):
        return a
    _launch()
    return _new(numpy.ascontiguousarray(x, dtype=dtype))


def _creation(np_func, launches):
    def create(*args, **kwargs):
        if "like" in kwargs:
            raise NotImplementedError("cupy stand-in: like= is not implemented")
        if any(isinstance(x, numpy.ndarray) for x in args):
            raise TypeError(f"cupy.{np_func.__name__}: Unsupported type {numpy.ndarray} (a host array)")
        args = [_device_array(x) if type(x) is ndarray else x for x in args]
        if launches:
            _launch(launches)
        return _new(np_func(*args, **kwargs))
    create.__name__ = np_func.__name__
    return create


for _name in ("empty", "empty_like"):
    _api[_name] = _creation(getattr(numpy, _name), 0)
for _name in ("zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "arange", "linspace", "eye",
              "identity", "tri"):
    _api[_name] = _creation(getattr(numpy, _name), 1)


# ---------------------------------------------------------------------------------------------
# Functions of device arrays


def _device_function(name, launches=1, sequence=False, view=False, sync=None):
    """cupy.<name> for device arrays: NumPy's function of that name, as `launches` kernels.

    sequence: the first argument is a list of device arrays (concatenate, stack).
    view: the result may be a view of the first argument (then no launch).
    sync: the result's size depends on the data, so CuPy reads a count back first (a host sync).
    """
    np_func = getattr(numpy, name)

    def function(*args, **kwargs):
        if not args:
            raise TypeError(f"cupy.{name} needs an array argument")
        first = args[0]
        if sequence:
            if not isinstance(first, (list, tuple)) or not first:
                raise TypeError(f"cupy.{name} takes a sequence of cupy.ndarray")
            args = ([_device_array(x) for x in first],) + tuple(args[1:])
            device = first[0]._dev
        else:
            args = (_device_array(first),) + tuple(_device_array(x) if type(x) is ndarray else x for x in args[1:])
            device = first._dev
        if any(isinstance(x, numpy.ndarray) for x in args[1:]):
            raise TypeError(f"cupy.{name}: Unsupported type {numpy.ndarray} (a host array argument)")
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = _device_array(out, "out")
        if sync:
            _sync(sync)
        r = np_func(*args, **kwargs)
        if out is not None:
            _launch(launches)
            return out
        if view and isinstance(r, numpy.ndarray) and numpy.may_share_memory(r, args[0]):
            return _wrap(r, device)
        if view and isinstance(r, (list, tuple)):
            return type(r)(_wrap(x, device) for x in r)
        _launch(launches)
        return _result(r)
    function.__name__ = name
    return function


for _name in ("sum", "prod", "mean", "var", "std", "max", "min", "amax", "amin", "argmax", "argmin", "all", "any",
              "cumsum", "cumprod", "count_nonzero", "clip", "round", "around", "sort", "argsort", "repeat", "tile",
              "flip", "roll", "triu", "tril", "diff", "isclose", "nan_to_num", "take_along_axis", "trace",
              "diagonal", "broadcast_arrays"):
    _api[_name] = _device_function(_name)
for _name in ("reshape", "transpose", "swapaxes", "moveaxis", "expand_dims", "squeeze", "broadcast_to", "ravel",
              "split", "array_split", "atleast_1d", "atleast_2d", "atleast_3d"):
    _api[_name] = _device_function(_name, view=True)
for _name in ("concatenate", "stack", "vstack", "hstack", "column_stack"):
    _api[_name] = _device_function(_name, sequence=True)
_api["concat"] = _api["concatenate"]
for _name in ("flatnonzero", "argwhere", "unique"):
    _api[_name] = _device_function(_name, launches=3, sync=_name)


@_public
def nonzero(a):
    return a.nonzero()


@_public
def where(condition, x=None, y=None):
    """where(c, x, y): one kernel; where(c) is nonzero(c): a host sync."""
    if x is None and y is None:
        return nonzero(condition)
    c = _device_array(condition, "condition")
    _launch()
    return _new(numpy.where(c, _operand(x), _operand(y)))


@_public
def take(a, indices, axis=None, out=None):
    if type(indices) is ndarray:
        key = _device_array(indices, "indices")
    elif isinstance(indices, (int, numpy.integer)):
        key = indices
    else:
        _count("uploads")
        key = numpy.asarray(indices)
    _launch()
    r = numpy.take(_device_array(a), key, axis=axis)
    if out is not None:
        _device_array(out, "out")[...] = r
        return out
    return _result(r)


@_public
def copyto(dst, src, casting="same_kind", where=None):
    if where is not None:
        raise NotImplementedError("cupy stand-in: copyto(where=) is not implemented")
    _launch()
    numpy.copyto(_device_array(dst, "dst"), _operand(src), casting=casting)


@_public
def copy(a, order="K"):
    return a.copy(order="C" if order == "K" else order)


@_public
def allclose(a, b, rtol=1e-05, atol=1e-08, equal_nan=False):
    """A 0-d device bool array, as CuPy's (bool() of it is the host sync)."""
    _launch(2)
    return _new(numpy.asarray(numpy.allclose(_device_array(a), _operand(b), rtol, atol, equal_nan)))


@_public
def array_equal(a1, a2, equal_nan=False):
    _launch(2)
    return _new(numpy.asarray(numpy.array_equal(_device_array(a1), _device_array(a2), equal_nan=equal_nan)))


def _gemm_operand_2d(x, name):
    """CuPy's 2-D GEMM takes C- or F-contiguous operands as they are (a transpose flag), copies others."""
    if x.ndim == 2 and not (x.flags.c_contiguous or x.flags.f_contiguous):
        _copy(f"2-D matmul: operand {name} of shape {x.shape}, strides {x.strides} is neither C- nor "
              "F-contiguous: copied")


@_public
def matmul(a, b, out=None, **kwargs):
    """As CuPy's matmul: the 2-D case is one GEMM (transposed views pass as flags); with more than two
    dimensions CuPy makes both operands C-contiguous (copies), uses pointer arrays when a batch axis
    broadcasts, and computes into a temporary when `out` is not a C-contiguous array of the result
    dtype that shares no memory with the operands."""
    if kwargs:
        raise NotImplementedError(f"cupy stand-in: matmul({', '.join(kwargs)}=...) is not implemented")
    A, B = _device_array(a, "matmul operand"), _device_array(b, "matmul operand")
    if A.ndim == 0 or B.ndim == 0:
        raise ValueError("Scalar operands are not allowed, use '*' instead")
    O = _device_array(out, "out") if out is not None else None
    result_dtype = numpy.promote_types(A.dtype, B.dtype)
    if max(A.ndim, B.ndim) <= 2:
        _gemm_operand_2d(A, "a")
        _gemm_operand_2d(B, "b")
        if O is not None and not (O.flags.c_contiguous and O.dtype == result_dtype):
            _copy(f"2-D matmul: out of shape {O.shape} is not a C-contiguous {result_dtype} array: computed "
                  "into a temporary, then copied")
    else:
        _count("nd_matmuls")
        for x, name in ((A, "a"), (B, "b")):
            if not x.flags.c_contiguous:
                _copy(f"N-d matmul: operand {name} of shape {x.shape}, strides {x.strides} is not C-contiguous: "
                      "copied")
        ndim = max(A.ndim, B.ndim)
        batch_a = (1,) * (ndim - A.ndim) + A.shape[:-2]
        batch_b = (1,) * (ndim - B.ndim) + B.shape[:-2]
        if batch_a != batch_b:
            _launch(3)                               # pointer arrays for a broadcast batch (sgemmBatched)
        if O is not None and not (O.flags.c_contiguous and O.dtype == result_dtype
                                  and not numpy.may_share_memory(O, A) and not numpy.may_share_memory(O, B)):
            _copy(f"N-d matmul: out of shape {O.shape}, strides {O.strides} is not a C-contiguous {result_dtype} "
                  "array: computed into a temporary, then copied")
    _launch()
    if O is not None:
        numpy.matmul(A, B, out=O)
        return out
    return _new(numpy.matmul(A, B))


@_public
def dot(a, b, out=None):
    if a.ndim == 0 or b.ndim == 0:
        return _UFUNCS["multiply"](a, b, out=out)
    if a.ndim <= 2 and b.ndim <= 2:
        return matmul(a, b, out=out)
    _launch()
    return _new(numpy.dot(_device_array(a), _device_array(b)))


@_public
def vdot(a, b):
    """The dot product of the flattened arrays, as a 0-d device array."""
    A, B = _device_array(a), _device_array(b)
    for x in (A, B):
        if not x.flags.c_contiguous:
            _copy("vdot: operand is not contiguous: flattened by a copy")
    _launch()
    return _new(numpy.asarray(numpy.vdot(A, B)))


@_public
def einsum(subscripts, *operands, **kwargs):
    """CuPy's einsum parses the subscripts in Python on every call, then runs GEMMs or reductions."""
    arrays = [_device_array(x, "einsum operand") for x in operands]
    _count("einsums")
    _launch()
    return _result(numpy.einsum(subscripts, *arrays, **kwargs))


@_public
def tensordot(a, b, axes=2):
    _launch()
    return _new(numpy.tensordot(_device_array(a), _device_array(b), axes=axes))


@_public
def inner(a, b):
    _launch()
    return _result(numpy.inner(_device_array(a), _device_array(b)))


@_public
def outer(a, b, out=None):
    return _UFUNCS["multiply"].outer(a.ravel(), b.ravel())


@_public
def get_array_module(*args):
    return cupy if any(type(x) is ndarray for x in args) else numpy


@_public
def is_available():
    return True


@_public
def shares_memory(a, b, max_work=None):
    return bool(numpy.shares_memory(_device_array(a), _device_array(b)))


@_public
def may_share_memory(a, b, max_work=None):
    return bool(numpy.may_share_memory(_device_array(a), _device_array(b)))


_api["ndim"] = lambda a: a.ndim
_api["shape"] = lambda a: a.shape
_api["size"] = lambda a, axis=None: a.size if axis is None else a.shape[axis]


@_public
def fuse(*args, **kwargs):
    """cupy.fuse: one kernel for an elementwise function. The stand-in runs the function's array code
    as it is, and counts one launch for the whole call."""
    def decorate(func):
        def fused(*xs, **kw):
            saved = _active[:]
            _active[:] = []
            try:
                r = func(*xs, **kw)
            finally:
                _active[:] = saved
            _launch()
            return r
        fused.__name__ = getattr(func, "__name__", "fused")
        return fused
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return decorate(args[0])
    return decorate


class _NoCuda:
    """RawKernel, RawModule, ElementwiseKernel, ReductionKernel: CUDA C, which the stand-in cannot run."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"cupy stand-in: {type(self).__name__} compiles CUDA C, which the stand-in "
                                  "cannot run; on the stand-in use the kernel's array-code twin")


for _name in ("RawKernel", "RawModule", "ElementwiseKernel", "ReductionKernel"):
    _api[_name] = type(_name, (_NoCuda,), {})

# dtypes and constants are NumPy's own, as in CuPy
for _name in ("bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
              "float64", "complex64", "complex128", "intp", "uintp", "dtype", "finfo", "iinfo", "result_type",
              "promote_types", "can_cast", "issubdtype", "newaxis", "inf", "nan", "pi", "e", "integer", "floating",
              "number", "generic", "signedinteger", "unsignedinteger", "inexact", "complexfloating", "isscalar",
              "broadcast_shapes"):
    _api[_name] = getattr(numpy, _name)
_api.update(bool=numpy.bool_, half=numpy.float16, single=numpy.float32, double=numpy.float64)
_api.update(ndarray=ndarray, ufunc=ufunc, get_default_memory_pool=get_default_memory_pool,
            get_default_pinned_memory_pool=get_default_pinned_memory_pool)


# ---------------------------------------------------------------------------------------------
# Random numbers: cupy.random.default_rng(seed) -> Generator (a NumPy PCG64 underneath: CuPy's API,
# another stream than CuPy's XORWOW)


class Generator:
    def __init__(self, seed=None):
        self._g = numpy.random.default_rng(seed)

    def _draw(self, host, out=None):
        _launch()
        if out is not None:
            _device_array(out, "out")[...] = host
            return out
        return _new(numpy.asarray(host))

    def random(self, size=None, dtype=numpy.float64, out=None):
        return self._draw(self._g.random(size, dtype=dtype), out)

    def standard_normal(self, size=None, dtype=numpy.float64, out=None):
        return self._draw(self._g.standard_normal(size, dtype=dtype), out)

    def uniform(self, low=0.0, high=1.0, size=None, dtype=numpy.float64):
        return self._draw(self._g.uniform(low, high, size).astype(dtype))

    def integers(self, low, high=None, size=None, dtype=numpy.int64, endpoint=False):
        return self._draw(self._g.integers(low, high, size, dtype=dtype, endpoint=endpoint))


def _namespace(name, members, lacks):
    """A module object named like CuPy's; a missing attribute raises NotImplementedError."""
    m = types.ModuleType(name)
    m.__dict__.update(members)

    def missing(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise NotImplementedError(f"cupy stand-in: {name}.{attr} is not implemented{lacks}")
    m.__getattr__ = missing
    return m


_api["random"] = _namespace("cupy.random", {"default_rng": lambda seed=None: Generator(seed),
                                            "Generator": Generator}, " (default_rng is)")
_api["cuda"] = _namespace("cupy.cuda", {
    "Device": Device, "Event": Event, "Stream": Stream, "MemoryPointer": MemoryPointer, "runtime": runtime,
    "get_elapsed_time": get_elapsed_time, "get_current_stream": get_current_stream, "MemoryPool": MemoryPool,
    "PinnedMemoryPool": PinnedMemoryPool, "is_available": lambda: True, "CUDARuntimeError": CUDARuntimeError}, "")


def _cupy_missing(name):
    if name in CUPY_NAMES:
        raise NotImplementedError(f"cupy stand-in: cupy.{name} exists in CuPy but the stand-in does not implement it "
                                  "(tinyllm/testing/cupy_standin.py)")
    raise AttributeError(f"module 'cupy' has no attribute '{name}'")


cupy = types.ModuleType("cupy", "tinyllm's CuPy stand-in (NumPy underneath): see tinyllm.testing.cupy_standin")
cupy.__dict__.update(_api, __version__=__version__, __tinyllm_standin__=True, __getattr__=_cupy_missing)


# ---------------------------------------------------------------------------------------------
# cupyx: scatter_add (the embedding's and indexing's backward on a GPU) and pinned host arrays


def _scatter(op):
    def scatter(a, slices, value):
        """a[slices] op= value with repeated indices each applied (atomic adds on a GPU: the order of the
        float additions, so the result's last bits, change from run to run)."""
        key, kind = _index_key(slices, keep_scalars=True)
        if kind == "mask":
            _sync(f"scatter_{op} with a boolean mask")
        _launch()
        getattr(numpy, {"add": "add", "max": "maximum", "min": "minimum"}[op]).at(
            _device_array(a), key[0] if len(key) == 1 else key, _operand(value))
    scatter.__name__ = f"scatter_{op}"
    return scatter


CUPYX_NAMES = frozenset("""scatter_add scatter_max scatter_min empty_pinned empty_like_pinned zeros_pinned
zeros_like_pinned rsqrt seterr geterr errstate profiler jit scipy optimizing time lapack linalg distributed cusolver
cusparse cutensor signal""".split())


def _cupyx_missing(name):
    if name in CUPYX_NAMES:
        raise NotImplementedError(f"cupy stand-in: cupyx.{name} is not implemented")
    raise AttributeError(f"module 'cupyx' has no attribute '{name}'")


cupyx = types.ModuleType("cupyx", "tinyllm's stand-in for cupyx")
cupyx.__dict__.update(scatter_add=_scatter("add"), scatter_max=_scatter("max"), scatter_min=_scatter("min"),
                      empty_pinned=lambda shape, dtype=float, order="C": numpy.empty(shape, dtype, order),
                      zeros_pinned=lambda shape, dtype=float, order="C": numpy.zeros(shape, dtype, order),
                      __tinyllm_standin__=True, __getattr__=_cupyx_missing)
