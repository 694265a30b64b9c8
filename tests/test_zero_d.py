"""0-d tensors: `.data` and `.grad` are always arrays, never NumPy scalars (SPEC section 1, issue 18),
and tensors hold real numbers only."""
import numpy as np
import pytest

import tinyllm as tl


def test_indexing_to_one_element_then_backward():
    y = tl.tensor(np.ones((2, 3)), requires_grad=True)
    (y[0, 1] + y.sum()).backward()  # raised "tensors on different devices (cpu and cpu)"
    expected = np.ones((2, 3))
    expected[0, 1] = 2.0
    np.testing.assert_array_equal(y.grad, expected)


@pytest.mark.parametrize("make", [
    lambda s: s.exp(), lambda s: s.log(), lambda s: s.tanh(), lambda s: s.sqrt(), lambda s: s.relu(),
    lambda s: s * s, lambda s: s ** 2, lambda s: 2.0 ** s, lambda s: -s, lambda s: s + 1.5, lambda s: 1.5 - s,
    lambda s: s / 3.0, lambda s: tl.maximum(s, s * 0.5), lambda s: tl.where(s > 0, s, -s), lambda s: s.sum(),
    lambda s: s.mean(), lambda s: s.max(), lambda s: s.reshape(()), lambda s: s.T, lambda s: s[()],
    lambda s: s > 1, lambda s: s == s, lambda s: tl.stack([s, s])[1], lambda s: s.reshape(1)[0],
])
def test_every_op_on_a_0d_tensor_gives_an_array(make):
    s = tl.tensor(2.0, dtype="float64", requires_grad=True)
    y = make(s)
    assert type(y.data) is np.ndarray and y.shape == ()
    if y.requires_grad:
        (y * 1.0).backward()
        assert type(s.grad) is np.ndarray and s.grad.shape == () and s.grad.dtype == np.float64


def test_scalar_gradients_are_arrays_and_accumulate():
    s = tl.tensor(3.0, dtype="float64", requires_grad=True)
    (s * s).backward()
    (s * s).backward()
    assert type(s.grad) is np.ndarray and s.grad.shape == () and float(s.grad) == 12.0
    t = tl.tensor(1.0, dtype="float64", requires_grad=True)
    u = (t * 2.0).retain_grad()
    (u * u).backward()
    assert type(u.grad) is np.ndarray and type(t.grad) is np.ndarray


@pytest.mark.parametrize("bad", ["abc", ["a", "b"], [1j, 2], [object()], None, {"a": 1}])
def test_tensor_takes_real_numbers_only(bad):
    with pytest.raises(TypeError, match="real numbers"):
        tl.tensor(bad)


def test_string_operands_are_refused():
    x = tl.tensor([1.0, 2.0])
    with pytest.raises(TypeError):
        x + "abc"
    with pytest.raises(TypeError, match="real numbers"):
        x + np.array(["a", "b"])
    with pytest.raises(TypeError):
        x * 1j
    assert tl.tensor([True, False]).dtype == np.bool_ and tl.tensor([1, 2]).dtype == np.int64
