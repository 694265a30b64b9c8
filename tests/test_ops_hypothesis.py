"""Property tests: forward equals NumPy and gradients pass gradcheck over random shapes,
broadcasting pairs, axes and keepdims."""
import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import tinyllm as tl

SETTINGS = settings(max_examples=25, deadline=None)


def _t(array):
    return tl.tensor(array, dtype="float64", requires_grad=True)


@st.composite
def broadcast_pair(draw):
    shapes = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=4))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal(s) for s in shapes.input_shapes)
    return a, b


@SETTINGS
@given(broadcast_pair(), st.sampled_from(["add", "sub", "mul", "div", "maximum"]))
def test_binary_broadcasting(pair, name):
    a, b = pair
    if name == "div":
        b = np.sign(b) * (np.abs(b) + 0.5)  # keep away from 0
    if name == "maximum":
        b = b + 0.05  # avoid exact ties inside the finite-difference step
    fn = getattr(tl, name)
    ref = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "maximum": np.maximum}[name]
    np.testing.assert_allclose(fn(_t(a), _t(b)).data, ref(a, b))
    assert tl.gradcheck(fn, [_t(a), _t(b)])


@st.composite
def array_and_axes(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4))
    axis = draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1),
                          st.lists(st.integers(0, len(shape) - 1), min_size=1, max_size=len(shape), unique=True)
                          .map(tuple)))
    keepdims = draw(st.booleans())
    x = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(shape)
    return x, axis, keepdims


@SETTINGS
@given(array_and_axes(), st.sampled_from(["sum", "mean", "max"]))
def test_reductions(case, name):
    x, axis, keepdims = case
    fn = getattr(tl, name)
    ref = getattr(np, name)(x, axis=axis, keepdims=keepdims)
    np.testing.assert_allclose(fn(_t(x), axis=axis, keepdims=keepdims).data, ref)
    assert tl.gradcheck(lambda t: fn(t, axis=axis, keepdims=keepdims), [_t(x)])


@SETTINGS
@given(hnp.array_shapes(min_dims=1, max_dims=4, max_side=4), st.data())
def test_transpose_and_reshape(shape, data):
    x = np.random.default_rng(0).standard_normal(shape)
    axes = data.draw(st.permutations(range(len(shape))))
    np.testing.assert_array_equal(_t(x).transpose(*axes).data, x.transpose(axes))
    assert tl.gradcheck(lambda t: t.transpose(*axes) * 2.0, [_t(x)])
    assert tl.gradcheck(lambda t: t.reshape(-1)[::2], [_t(x)])


@SETTINGS
@given(st.integers(1, 5), st.lists(st.integers(0, 4), min_size=1, max_size=8))
def test_integer_indexing_scatter_adds(rows, ids):
    ids = np.array([i % rows for i in ids])
    x = np.random.default_rng(1).standard_normal((rows, 3))
    t = _t(x)
    t[ids].sum().backward()
    expected = np.zeros_like(x)
    for i in ids:
        expected[i] += 1
    np.testing.assert_allclose(t.grad, expected)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.booleans())
def test_matmul_shapes(batch, n, k, m, broadcast_b):
    rng = np.random.default_rng(batch * 100 + n * 10 + k)
    a = rng.standard_normal((batch, n, k))
    b = rng.standard_normal((k, m) if broadcast_b else (batch, k, m))
    np.testing.assert_allclose((_t(a) @ _t(b)).data, a @ b)
    assert tl.gradcheck(tl.matmul, [_t(a), _t(b)])
