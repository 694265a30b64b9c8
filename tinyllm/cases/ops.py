"""Gradient-check cases for the primitive ops in tinyllm/ops.py, broadcasting included."""
import numpy

from tinyllm import ops
from tinyllm.cases import gradcheck_cases


def _away_from_zero(b, *shape):
    """Inputs with |x| >= 0.1, so kinks at 0 (relu) stay out of the finite-difference step."""
    x = b.randn(*shape)
    x.data[abs(x.data) < 0.1] += 0.3
    return x


@gradcheck_cases
def arithmetic(b):
    for name, fn in [("add", ops.add), ("sub", ops.sub), ("mul", ops.mul), ("div", ops.div)]:
        yield f"{name} same shape", fn, [b.randn(3, 4), b.positive(3, 4)]
        yield f"{name} broadcast (2,3,4)·(3,1)", fn, [b.randn(2, 3, 4), b.positive(3, 1)]
        yield f"{name} broadcast (4,)·(2,1,4)", fn, [b.positive(4), b.positive(2, 1, 4)]
        yield f"{name} scalar constant", (lambda x, fn=fn: fn(x, 2.5)), [b.randn(5)]
        yield f"{name} reflected scalar", (lambda x, fn=fn: fn(1.5, x)), [b.positive(5)]


@gradcheck_cases
def power(b):
    yield "x ** 3", lambda x: x ** 3, [b.randn(3, 4)]
    yield "x ** 0.5", lambda x: x ** 0.5, [b.positive(6)]
    yield "a ** b (both tensors, broadcast)", ops.pow, [b.positive(2, 3), b.randn(3)]


@gradcheck_cases
def unary(b):
    yield "neg", ops.neg, [b.randn(3, 4)]
    yield "exp", ops.exp, [b.randn(3, 4)]
    yield "log", ops.log, [b.positive(3, 4)]
    yield "tanh", ops.tanh, [b.randn(3, 4)]
    yield "sqrt", ops.sqrt, [b.positive(3, 4)]
    yield "relu", ops.relu, [_away_from_zero(b, 3, 4)]


@gradcheck_cases
def maximum(b):
    yield "maximum broadcast", ops.maximum, [b.randn(3, 4), b.randn(4)]
    yield "maximum with scalar", lambda x: ops.maximum(x, 0.0), [_away_from_zero(b, 6)]


@gradcheck_cases
def where(b):
    condition = b.const(numpy.random.default_rng(1).random((3, 4)) > 0.5)
    yield "where", lambda x, y: ops.where(condition, x, y), [b.randn(3, 4), b.randn(3, 4)]
    yield "where broadcast", lambda x, y: ops.where(condition, x, y), [b.randn(4), b.randn(3, 1)]


@gradcheck_cases
def conversions(b):
    yield "cast float64 -> float64", lambda x: ops.Cast(numpy.dtype("float64"))(x), [b.randn(3)]
    yield "to same device", lambda x: ops.ToDevice(b.device)(x), [b.randn(3)]


@gradcheck_cases
def reductions(b):
    for name, fn in [("sum", ops.sum), ("mean", ops.mean), ("max", ops.max)]:
        yield f"{name} all", fn, [b.randn(3, 4)]
        yield f"{name} axis=1", lambda x, fn=fn: fn(x, axis=1), [b.randn(2, 3, 4)]
        yield f"{name} axis=(0,2) keepdims", lambda x, fn=fn: fn(x, axis=(0, 2), keepdims=True), [b.randn(2, 3, 4)]
        yield f"{name} axis=-1", lambda x, fn=fn: fn(x, axis=-1), [b.randn(3, 5)]


@gradcheck_cases
def shapes(b):
    yield "reshape", lambda x: x.reshape(4, 3), [b.randn(2, 6)]
    yield "reshape -1", lambda x: x.reshape(-1), [b.randn(2, 3)]
    yield "transpose (1,2,0)", lambda x: x.transpose(1, 2, 0), [b.randn(2, 3, 4)]
    yield ".T", lambda x: x.T, [b.randn(2, 3)]


@gradcheck_cases
def indexing(b):
    ids = b.const(numpy.array([0, 2, 2, 1, 0]))
    mask = b.const(numpy.array([True, False, True]))
    yield "slice", lambda x: x[1:, ::2], [b.randn(3, 4)]
    yield "integer array with repeats", lambda x: x[ids], [b.randn(3, 4)]
    yield "mixed slice and array", lambda x: x[:, ids], [b.randn(2, 3)]
    yield "2-D integer arrays", lambda x: x[ids[:3], ids[2:]], [b.randn(3, 3)]
    yield "boolean mask", lambda x: x[mask], [b.randn(3, 2)]


@gradcheck_cases
def joins(b):
    yield "concat axis 0", lambda x, y: ops.concat([x, y], axis=0), [b.randn(2, 3), b.randn(4, 3)]
    yield "concat axis -1", lambda x, y, z: ops.concat([x, y, z], axis=-1), [b.randn(2, 1), b.randn(2, 3), b.randn(2, 2)]
    yield "stack axis 1", lambda x, y: ops.stack([x, y], axis=1), [b.randn(2, 3), b.randn(2, 3)]


@gradcheck_cases
def matmul(b):
    yield "2-D", ops.matmul, [b.randn(3, 4), b.randn(4, 5)]
    yield "batched", ops.matmul, [b.randn(2, 3, 4), b.randn(2, 4, 5)]
    yield "broadcast batch (2,3,4)@(4,5)", ops.matmul, [b.randn(2, 3, 4), b.randn(4, 5)]
    yield "broadcast batch (2,1,3,4)@(3,4,2)", ops.matmul, [b.randn(2, 1, 3, 4), b.randn(3, 4, 2)]
    yield "1-D vector @ matrix", ops.matmul, [b.randn(4), b.randn(4, 3)]
    yield "matrix @ 1-D vector", ops.matmul, [b.randn(3, 4), b.randn(4)]
