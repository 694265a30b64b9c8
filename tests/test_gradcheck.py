"""gradcheck itself: it passes correct gradients, catches wrong ones and says where."""
import numpy as np
import pytest

import tinyllm as tl
from tinyllm.autograd import Function, OPS


class WrongSquare(Function, register=False):
    """x² with a deliberately wrong derivative (3x instead of 2x)."""

    def forward(self, x):
        self.x = x
        return x * x

    def backward(self, gy):
        return gy * 3 * self.x


def test_passes_correct_gradient():
    x = tl.tensor(np.random.default_rng(0).standard_normal((3, 4)), requires_grad=True)
    assert tl.gradcheck(lambda t: (t * t).tanh(), [x])


def test_catches_wrong_gradient_and_names_it():
    x = tl.tensor(np.array([[1.0, 2.0], [3.0, 4.0]]), requires_grad=True)
    with pytest.raises(tl.GradcheckError) as info:
        tl.gradcheck(lambda t: WrongSquare()(t), [x])
    message = str(info.value)
    assert "input 0" in message and "element (0, 0)" in message
    assert "analytic" in message and "numeric" in message


def test_catches_wrong_gradient_in_large_input():
    x = tl.tensor(np.random.default_rng(1).standard_normal((40, 40)), requires_grad=True)
    with pytest.raises(tl.GradcheckError, match="input 0"):
        tl.gradcheck(lambda t: WrongSquare()(t), [x])


def test_requires_float64():
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(TypeError, match="float64"):
        tl.gradcheck(lambda t: t * 2, [x])


def test_needs_an_input_with_grad():
    with pytest.raises(ValueError, match="requires_grad"):
        tl.gradcheck(lambda t: t * 2, [tl.tensor([1.0], dtype="float64")])


def test_leaves_grad_and_data_untouched():
    x = tl.tensor([1.0, 2.0], dtype="float64", requires_grad=True)
    x.grad = np.array([7.0, 7.0])
    before = x.data.copy()
    tl.gradcheck(lambda t: t.exp(), [x])
    np.testing.assert_array_equal(x.grad, [7.0, 7.0])
    np.testing.assert_array_equal(x.data, before)


def test_checks_several_inputs_some_constant():
    a = tl.tensor(np.ones((2, 2)), dtype="float64", requires_grad=True)
    b = tl.tensor(np.full((2, 2), 3.0), dtype="float64")
    assert tl.gradcheck(lambda x, y: x * y, [a, b])


def test_wrong_class_not_registered():
    assert "WrongSquare" not in OPS
