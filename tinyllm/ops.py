"""Primitive ops: each a Function with its forward and its hand-derived backward side by side.

Notation in the derivative comments: y is the op's output, gy = dL/dy the upstream gradient,
gx = dL/dx what backward returns. Every elementwise op broadcasts like NumPy; `sum_to_shape`
folds a broadcast gradient back to its input's shape (the one place that rule lives).
"""
import builtins

import numpy

from tinyllm import backend
from tinyllm.autograd import Function, Tensor, _as_tensors, is_grad_enabled
from tinyllm.backend import get_array_module


def sum_to_shape(g, shape):
    """Undo broadcasting: sum g over the axes that broadcasting added or stretched from 1."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)  # axes broadcasting prepended
    stretched = tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    return g.sum(axis=tuple(range(lead)) + stretched, keepdims=True).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Elementwise arithmetic (broadcasting)


class Add(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, gy):  # d(a+b)/da = 1, d(a+b)/db = 1
        return sum_to_shape(gy, self.shapes[0]), sum_to_shape(gy, self.shapes[1])


class Sub(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, gy):  # d(a-b)/da = 1, d(a-b)/db = -1
        return sum_to_shape(gy, self.shapes[0]), sum_to_shape(-gy, self.shapes[1])


class Mul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, gy):  # d(ab)/da = b, d(ab)/db = a
        ga = sum_to_shape(gy * self.b, self.a.shape) if self.needs_input_grad[0] else None
        gb = sum_to_shape(gy * self.a, self.b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, gy):  # d(a/b)/da = 1/b, d(a/b)/db = -a/b²
        ga = sum_to_shape(gy / self.b, self.a.shape) if self.needs_input_grad[0] else None
        gb = sum_to_shape(-gy * self.a / (self.b * self.b), self.b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Pow(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        self.y = a ** b
        return self.y

    def backward(self, gy):  # d(a^b)/da = b·a^(b-1), d(a^b)/db = a^b·ln a
        xp = get_array_module(gy)
        ga = sum_to_shape(gy * self.b * self.a ** (self.b - 1), self.a.shape) if self.needs_input_grad[0] else None
        gb = sum_to_shape(gy * self.y * xp.log(self.a), self.b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, gy):  # d(-x)/dx = -1
        return -gy


class Maximum(Function):
    def forward(self, a, b):
        xp = get_array_module(a)
        self.a, self.b = a, b
        return xp.maximum(a, b)

    def backward(self, gy):  # 1 to the larger input; a tie splits the gradient in half (as PyTorch)
        a_wins = (self.a > self.b) + 0.5 * (self.a == self.b)
        ga = sum_to_shape(gy * a_wins, self.a.shape) if self.needs_input_grad[0] else None
        gb = sum_to_shape(gy * (1 - a_wins), self.b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Where(Function):
    def __init__(self, condition):
        self.condition = condition  # bool array: not differentiable

    def forward(self, a, b):
        xp = get_array_module(a)
        self.shapes = a.shape, b.shape
        return xp.where(self.condition, a, b)

    def backward(self, gy):  # gy flows to a where the condition holds, to b elsewhere
        zero = gy.dtype.type(0)
        ga = sum_to_shape(get_array_module(gy).where(self.condition, gy, zero), self.shapes[0])
        gb = sum_to_shape(get_array_module(gy).where(self.condition, zero, gy), self.shapes[1])
        return ga, gb


# ---------------------------------------------------------------------------------------------
# Elementwise functions


class Exp(Function):
    def forward(self, x):
        self.y = get_array_module(x).exp(x)
        return self.y

    def backward(self, gy):  # d exp(x)/dx = exp(x) = y
        return gy * self.y


class Log(Function):
    def forward(self, x):
        self.x = x
        return get_array_module(x).log(x)

    def backward(self, gy):  # d ln(x)/dx = 1/x
        return gy / self.x


class Tanh(Function):
    def forward(self, x):
        self.y = get_array_module(x).tanh(x)
        return self.y

    def backward(self, gy):  # d tanh(x)/dx = 1 - tanh²(x) = 1 - y²
        return gy * (1 - self.y * self.y)


class Sqrt(Function):
    def forward(self, x):
        self.y = get_array_module(x).sqrt(x)
        return self.y

    def backward(self, gy):  # d sqrt(x)/dx = 1/(2 sqrt(x)) = 1/(2y)
        return gy / (2 * self.y)


class Relu(Function):
    def forward(self, x):
        self.positive = x > 0
        return x * self.positive

    def backward(self, gy):  # d relu(x)/dx = 1 where x > 0, else 0
        return gy * self.positive


class Cast(Function):
    def __init__(self, dtype):
        self.dtype = dtype

    def forward(self, x):
        self.source = x.dtype
        return x.astype(self.dtype)

    def backward(self, gy):  # identity, back in the input's dtype
        return gy.astype(self.source)


class ToDevice(Function):
    def __init__(self, device):
        self.device = device

    def forward(self, x):
        self.source = backend.device_of(x)
        return backend.to_device(x, self.device)

    def backward(self, gy):  # identity, back on the input's device
        return backend.to_device(gy, self.source)


# ---------------------------------------------------------------------------------------------
# Reductions


def _normalize_axes(axis, ndim):
    """axis=None/int/tuple -> a sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
        if not -ndim <= a < builtins.max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
    return tuple(sorted(a % builtins.max(ndim, 1) for a in axes))


def _expand_reduced(g, in_shape, axes):
    """Broadcast a reduced gradient back over the reduced axes: shape (.., 1, ..) -> in_shape."""
    kept = tuple(1 if i in axes else n for i, n in enumerate(in_shape))
    return get_array_module(g).broadcast_to(g.reshape(kept), in_shape)


class Sum(Function):
    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.in_shape = x.shape
        self.axes = _normalize_axes(self.axis, x.ndim)
        return get_array_module(x).asarray(x.sum(axis=self.axes, keepdims=self.keepdims))

    def backward(self, gy):  # d(sum x)/dx_i = 1: copy gy to every summed element
        return _expand_reduced(gy, self.in_shape, self.axes)


class Mean(Function):
    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.in_shape = x.shape
        self.axes = _normalize_axes(self.axis, x.ndim)
        self.count = int(numpy.prod([x.shape[a] for a in self.axes]))
        return get_array_module(x).asarray(x.mean(axis=self.axes, keepdims=self.keepdims))

    def backward(self, gy):  # d(mean x)/dx_i = 1/n
        return _expand_reduced(gy / self.count, self.in_shape, self.axes)


class Max(Function):
    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.axes = _normalize_axes(self.axis, x.ndim)
        if x.size == 0:
            raise ValueError("max of an empty tensor")
        self.x = x
        self.y = x.max(axis=self.axes, keepdims=True)
        y = self.y if self.keepdims else self.y.reshape([n for i, n in enumerate(x.shape) if i not in self.axes])
        return get_array_module(x).asarray(y)

    def backward(self, gy):  # 1 at the maximum; tied maxima share it equally (as torch.amax)
        is_max = self.x == self.y
        share = is_max / is_max.sum(axis=self.axes, keepdims=True)
        return _expand_reduced(gy, self.x.shape, self.axes) * share


# ---------------------------------------------------------------------------------------------
# Shape and indexing


class Reshape(Function):
    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.in_shape = x.shape
        return x.reshape(self.shape)

    def backward(self, gy):  # reshaping moves no values: reshape the gradient back
        return gy.reshape(self.in_shape)


class Transpose(Function):
    def __init__(self, axes=None):
        self.axes = axes

    def forward(self, x):
        axes = tuple(range(x.ndim))[::-1] if self.axes is None else tuple(a % x.ndim for a in self.axes)
        if sorted(axes) != list(range(x.ndim)):
            raise ValueError(f"transpose axes {self.axes} are not a permutation of {x.ndim} axes")
        self.inverse = tuple(numpy.argsort(axes))
        return x.transpose(axes)

    def backward(self, gy):  # permute the gradient back with the inverse permutation
        return gy.transpose(self.inverse)


def _is_advanced_index(key):
    """True when key holds index arrays (scatter-add backward); floats get a clear error."""
    parts = key if isinstance(key, tuple) else (key,)
    advanced = False
    for k in parts:
        if isinstance(k, list):
            k = numpy.asarray(k)
        if hasattr(k, "dtype") and hasattr(k, "ndim"):  # an index array, not a slice, int or None
            if k.dtype.kind not in "biu":
                raise TypeError(f"index arrays must hold integers or booleans, got dtype {k.dtype}; "
                                "convert them with .astype('int64')")
            advanced = True
    return advanced


class GetItem(Function):
    def __init__(self, key):
        self.key = key
        self.advanced = _is_advanced_index(key)

    def forward(self, x):
        self.in_shape, self.dtype = x.shape, x.dtype
        return x[self.key]

    def backward(self, gy):  # route gy back to where each element was read; repeated ids add up
        xp = get_array_module(gy)
        gx = xp.zeros(self.in_shape, dtype=self.dtype)
        if self.advanced:
            backend.scatter_add(gx, self.key, gy)  # x[[0, 0]] reads x[0] twice: its grad is the sum
        else:
            gx[self.key] = gy  # basic indexing reads each element at most once
        return gx


class Concat(Function):
    def __init__(self, axis=0):
        self.axis = axis

    def forward(self, *xs):
        self.sizes = [x.shape[self.axis] for x in xs]
        return get_array_module(*xs).concatenate(xs, axis=self.axis)

    def backward(self, gy):  # cut gy into the pieces that were glued together
        xp = get_array_module(gy)
        return tuple(xp.split(gy, numpy.cumsum(self.sizes)[:-1].tolist(), axis=self.axis))


class Stack(Function):
    def __init__(self, axis=0):
        self.axis = axis

    def forward(self, *xs):
        self.count = len(xs)
        return get_array_module(*xs).stack(xs, axis=self.axis)

    def backward(self, gy):  # unstack: slice i of gy along the new axis goes to input i
        xp = get_array_module(gy)
        return tuple(xp.take(gy, i, axis=self.axis) for i in range(self.count))


class MatMul(Function):
    def forward(self, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError("MatMul takes arrays of at least 2 dimensions (tl.matmul handles 1-D)")
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(f"matmul needs a's last dimension ({a.shape[-1]}) to equal b's "
                             f"second-to-last ({b.shape[-2]}): a {a.shape} @ b {b.shape}")
        self.a, self.b = a, b
        return get_array_module(a).matmul(a, b)

    def backward(self, gy):  # y = a b:  ga = gy bᵀ,  gb = aᵀ gy  (summed over broadcast batch axes)
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = sum_to_shape(gy @ self.b.swapaxes(-1, -2), self.a.shape)
        if self.needs_input_grad[1]:
            gb = sum_to_shape(self.a.swapaxes(-1, -2) @ gy, self.b.shape)
        return ga, gb


# ---------------------------------------------------------------------------------------------
# Functional API (what users call) and Tensor operators


def add(a, b): return Add()(a, b)
def sub(a, b): return Sub()(a, b)
def mul(a, b): return Mul()(a, b)
def div(a, b): return Div()(a, b)
def pow(a, b): return Pow()(a, b)  # noqa: A001  (tensor power, as tl.pow)
def neg(x): return Neg()(x)
def exp(x): return Exp()(x)
def log(x): return Log()(x)
def tanh(x): return Tanh()(x)
def sqrt(x): return Sqrt()(x)
def relu(x): return Relu()(x)
def maximum(a, b): return Maximum()(a, b)
def reshape(x, *shape): return Reshape(shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)(x)
def concat(tensors, axis=0): return Concat(axis)(*tensors)
def stack(tensors, axis=0): return Stack(axis)(*tensors)
def sum(x, axis=None, keepdims=False): return Sum(axis, keepdims)(x)  # noqa: A001
def mean(x, axis=None, keepdims=False): return Mean(axis, keepdims)(x)
def max(x, axis=None, keepdims=False): return Max(axis, keepdims)(x)  # noqa: A001


def where(condition, a, b):
    """Elementwise `a if condition else b`; the condition gets no gradient."""
    if isinstance(condition, Tensor):
        condition = condition.data
    return Where(condition.astype(bool))(a, b)


def transpose(x, *axes):
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    return Transpose(axes or None)(x)


def matmul(a, b):
    """a @ b with NumPy's rules, 1-D operands included (lifted to 2-D and squeezed back)."""
    a, b = _as_tensors((a, b))
    if a.ndim == 1 and b.ndim == 1:
        return (a.reshape(1, -1) @ b.reshape(-1, 1)).reshape(())
    if a.ndim == 1:
        return matmul(a.reshape(1, -1), b).reshape(b.shape[:-2] + (b.shape[-1],))
    if b.ndim == 1:
        return matmul(a, b.reshape(-1, 1)).reshape(a.shape[:-1])
    return MatMul()(a, b)


def getitem(x, key):
    if isinstance(key, Tensor):
        key = key.data
    elif isinstance(key, tuple):
        key = tuple(k.data if isinstance(k, Tensor) else k for k in key)
    return GetItem(key)(x)


def _compare(op):
    def compare(self, other):  # comparisons give bool tensors and carry no gradient
        other = other.data if isinstance(other, Tensor) else other
        return Tensor(op(self.data, other))
    return compare


def _reflected(fn):
    return lambda self, other: fn(other, self)


Tensor.__add__, Tensor.__radd__ = add, _reflected(add)
Tensor.__sub__, Tensor.__rsub__ = sub, _reflected(sub)
Tensor.__mul__, Tensor.__rmul__ = mul, _reflected(mul)
Tensor.__truediv__, Tensor.__rtruediv__ = div, _reflected(div)
Tensor.__pow__, Tensor.__rpow__ = pow, _reflected(pow)
Tensor.__matmul__, Tensor.__rmatmul__ = matmul, _reflected(matmul)
Tensor.__neg__ = neg
Tensor.__getitem__ = getitem
Tensor.__lt__ = _compare(lambda a, b: a < b)
Tensor.__le__ = _compare(lambda a, b: a <= b)
Tensor.__gt__ = _compare(lambda a, b: a > b)
Tensor.__ge__ = _compare(lambda a, b: a >= b)
Tensor.__eq__ = _compare(lambda a, b: a == b)
Tensor.__ne__ = _compare(lambda a, b: a != b)
Tensor.exp, Tensor.log, Tensor.tanh, Tensor.sqrt, Tensor.relu = exp, log, tanh, sqrt, relu
Tensor.sum, Tensor.mean, Tensor.max = sum, mean, max
Tensor.reshape, Tensor.transpose = reshape, transpose
Tensor.T = property(lambda self: transpose(self))

__all__ = ["add", "sub", "mul", "div", "pow", "neg", "exp", "log", "tanh", "sqrt", "relu", "maximum",
           "reshape", "transpose", "concat", "stack", "where", "matmul", "sum", "mean", "max", "getitem",
           "sum_to_shape", "is_grad_enabled"]
