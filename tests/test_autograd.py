"""The engine: graph building, backward order, accumulation, memory, dtypes and errors."""
import gc
import weakref

import numpy as np
import pytest

import tinyllm as tl
from tinyllm.autograd import OPS


def test_simple_backward():
    x = tl.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = (x * x + 3 * x).sum()
    y.backward()
    np.testing.assert_allclose(x.grad, 2 * np.array([1, 2, 3]) + 3)


def test_tensor_properties_and_defaults():
    x = tl.tensor([[1.0, 2.0]], requires_grad=True)
    assert x.dtype == np.float32 and x.shape == (1, 2) and x.ndim == 2
    assert x.device == "cpu" and x.is_leaf and x.requires_grad
    assert tl.tensor([1, 2]).dtype == np.int64
    assert tl.tensor(np.zeros(2)).dtype == np.float64  # arrays keep their dtype, as torch.tensor
    assert tl.tensor([1.0], dtype="float64").dtype == np.float64
    y = x * 2
    assert not y.is_leaf
    assert tl.tensor(3.5).item() == 3.5


def test_tensor_copies_its_data():
    a = np.ones(3, dtype=np.float32)
    x = tl.tensor(a)
    a[0] = 5
    assert x.data[0] == 1


def test_python_scalars_keep_float32():
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    for y in [x * 2.5, 2.5 * x, x + 1, x / 3.0, 1.0 - x, x ** 2, 2.0 ** x, tl.maximum(x, 0.0)]:
        assert y.dtype == np.float32, y
    (x * 2.5).sum().backward()
    assert x.grad.dtype == np.float32


def test_long_chain_no_recursion_limit():
    x = tl.tensor([1.0], requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [1.0001 ** 10_000], rtol=1e-3)


def test_diamond_graph_accumulates():
    x = tl.tensor([2.0], requires_grad=True, dtype="float64")
    a = x * 3
    b = x * x
    (a + b + a).sum().backward()  # d/dx (6x + x²) = 6 + 2x
    np.testing.assert_allclose(x.grad, [10.0])


def test_shared_gradient_array_is_not_aliased():
    # Add.backward hands the very same gy array to both inputs: mutating one .grad must not touch the other
    a = tl.tensor([1.0, 2.0], requires_grad=True)
    b = tl.tensor([3.0, 4.0], requires_grad=True)
    (a + b).sum().backward()
    assert a.grad is not b.grad
    a.grad *= 10
    np.testing.assert_array_equal(b.grad, [1.0, 1.0])


def test_same_tensor_twice_in_one_op():
    x = tl.tensor([3.0], requires_grad=True, dtype="float64")
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, [6.0])
    x.grad = None
    (x + x).sum().backward()
    np.testing.assert_allclose(x.grad, [2.0])


def test_grad_accumulates_across_backward_calls():
    x = tl.tensor([1.0, 1.0], requires_grad=True)
    (x * 2).sum().backward()
    (x * 3).sum().backward()
    np.testing.assert_allclose(x.grad, [5.0, 5.0])


def test_first_gradient_goes_into_grad_home():
    """A leaf with a grad_home gets its first gradient copied there (no new array), later ones added."""
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    home = np.full(2, np.nan, dtype=x.dtype)
    x.grad_home = home
    (x * 2).sum().backward()
    assert x.grad is home
    (x * 3).sum().backward()
    np.testing.assert_allclose(home, [5.0, 5.0])
    y = tl.tensor([1.0, 2.0], requires_grad=True)      # others still get new arrays
    (y * 2).sum().backward()
    assert y.grad is not home and y.grad_home is None


def test_post_accumulate_grad_hook_sees_each_leaf_gradient_once_complete():
    """As PyTorch's: called once per backward, after every path's gradient has been added (x is used
    twice here), with the tensor; a removed hook is not called again."""
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    seen = []
    handle = x.register_post_accumulate_grad_hook(lambda t: seen.append((t, t.grad.copy())))
    (x * x + x * 3).sum().backward()                    # d/dx = 2x + 3
    assert len(seen) == 1 and seen[0][0] is x
    np.testing.assert_allclose(seen[0][1], [5.0, 7.0])
    (x * 2).sum().backward()                           # accumulated: 5 + 2, 7 + 2
    np.testing.assert_allclose(seen[1][1], [7.0, 9.0])
    handle.remove()
    (x * 2).sum().backward()
    assert len(seen) == 2
    with pytest.raises(RuntimeError, match="leaf"):
        (x * 2).register_post_accumulate_grad_hook(print)


def test_intermediate_grads_freed_unless_retained():
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    h = x * 2
    k = (x * 3).retain_grad()
    (h * k).sum().backward()
    assert h.grad is None
    np.testing.assert_allclose(k.grad, 2 * np.array([1.0, 2.0]))


def test_second_backward_needs_retain_graph():
    x = tl.tensor([1.0], requires_grad=True)
    y = (x.exp() * 2).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()
    x.grad = None
    z = (x.exp() * 2).sum()
    z.backward(retain_graph=True)
    z.backward()
    np.testing.assert_allclose(x.grad, [4 * np.e], rtol=1e-6)


def test_graph_and_arrays_freed_after_backward():
    gc.collect()
    gc.disable()  # prove reference counting alone frees everything: no cycles
    try:
        x = tl.tensor(np.ones((64, 64)), requires_grad=True)
        h = (x * 2).exp()
        saved = weakref.ref(h.data)
        fn = weakref.ref(h._ctx)
        loss = (h * h).sum()
        del h
        loss.backward()
        del loss
        assert saved() is None, "an intermediate array outlived backward"
        assert fn() is None, "a Function outlived its graph"
    finally:
        gc.enable()


def test_graph_freed_without_backward():
    gc.disable()
    try:
        x = tl.tensor(np.ones(10), requires_grad=True)
        y = (x * 3).tanh()
        saved = weakref.ref(y.data)
        z = y.sum()
        del y, z
        assert saved() is None
    finally:
        gc.enable()


def test_no_grad_records_nothing():
    x = tl.tensor([1.0], requires_grad=True)
    with tl.no_grad():
        y = x * 2
    assert not y.requires_grad and y._ctx is None

    @tl.no_grad()
    def f(t):
        return t * 3
    assert f(x)._ctx is None
    assert tl.is_grad_enabled()


def test_no_grad_restored_after_exception():
    with pytest.raises(ZeroDivisionError):
        with tl.no_grad():
            1 / 0
    assert tl.is_grad_enabled()


def test_backward_non_scalar_needs_grad():
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    y = x * 2
    with pytest.raises(RuntimeError, match="scalar"):
        y.backward()
    y.backward(np.array([1.0, 10.0], dtype=np.float32))
    np.testing.assert_allclose(x.grad, [2.0, 20.0])


def test_backward_grad_shape_checked():
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(ValueError, match="shape"):
        (x * 2).backward(np.ones(3))


def test_backward_without_requires_grad():
    with pytest.raises(RuntimeError, match="does not require grad"):
        tl.tensor([1.0]).sum().backward()


def test_integer_tensor_cannot_require_grad():
    with pytest.raises(TypeError, match="floating"):
        tl.tensor([1, 2], requires_grad=True)


def test_broadcast_error_is_clear():
    with pytest.raises(ValueError, match=r"Add with input shapes \(2, 3\), \(4,\)"):
        tl.tensor(np.ones((2, 3))) + tl.tensor(np.ones(4))


def test_matmul_error_is_clear():
    with pytest.raises(ValueError, match="last dimension"):
        tl.tensor(np.ones((2, 3))) @ tl.tensor(np.ones((4, 5)))


def test_float_index_rejected():
    x = tl.tensor(np.ones((3, 2)), requires_grad=True)
    with pytest.raises(TypeError, match="integers or booleans"):
        x[np.array([0.0, 1.0])]


def test_cuda_without_gpu_is_clear():
    if tl.cuda_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CuPy"):
        tl.tensor([1.0], device="cuda")
    with pytest.raises(RuntimeError, match="CuPy"):
        tl.tensor([1.0]).to("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        tl.tensor([1.0], device="tpu")


def test_scatter_add_with_repeated_indices():
    x = tl.tensor(np.arange(6.0).reshape(3, 2), requires_grad=True)
    idx = np.array([0, 0, 2, 0])
    x[idx].sum().backward()
    np.testing.assert_allclose(x.grad, [[3, 3], [0, 0], [1, 1]])


def test_comparisons_give_bool_without_grad():
    x = tl.tensor([1.0, 2.0, 3.0], requires_grad=True)
    m = x > 1.5
    assert m.dtype == bool and not m.requires_grad
    np.testing.assert_array_equal(m.data, [False, True, True])
    assert (x == x).data.all()
    assert {x: 1}[x] == 1  # still hashable


def test_where_and_maximum_gradients():
    x = tl.tensor([-1.0, 2.0], requires_grad=True)
    tl.where(x > 0, x, x * 0.1).sum().backward()
    np.testing.assert_allclose(x.grad, [0.1, 1.0])
    y = tl.tensor([1.0, 1.0], requires_grad=True)
    tl.maximum(y, tl.tensor([1.0, 0.0])).sum().backward()
    np.testing.assert_allclose(y.grad, [0.5, 1.0])  # a tie splits the gradient


def test_max_ties_share_gradient():
    x = tl.tensor([3.0, 1.0, 3.0], requires_grad=True)
    x.max().backward()
    np.testing.assert_allclose(x.grad, [0.5, 0.0, 0.5])


def test_numpy_array_on_the_left():
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    y = np.array([3.0, 4.0], dtype=np.float32) * x
    assert isinstance(y, tl.Tensor)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [3.0, 4.0])


def test_detach_and_numpy():
    x = tl.tensor([1.0], requires_grad=True)
    d = (x * 2).detach()
    assert not d.requires_grad and d.is_leaf
    n = x.numpy()
    n[0] = 7
    assert x.data[0] == 1


def test_astype_gradient_returns_to_source_dtype():
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    (x.astype("float64") * 3).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_allclose(x.grad, [3, 3])


def test_registry_lists_primitive_ops():
    for name in ["Add", "Mul", "MatMul", "GetItem", "Sum", "Exp", "Concat", "Where"]:
        assert name in OPS


def test_to_dot():
    x = tl.tensor(np.ones((2, 3)), requires_grad=True)
    y = (x.exp() @ tl.tensor(np.ones((3, 4)))).sum()
    dot = tl.to_dot(y)
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    for name in ["Exp", "MatMul", "Sum", "(2, 3)", "(2, 4)"]:
        assert name in dot
    assert dot.count("->") == 4  # x -> Exp -> MatMul -> Sum -> out (the constant matrix needs no grad)
    with pytest.raises(TypeError):
        tl.to_dot(np.ones(3))


def test_graph_keeps_only_what_backward_saved():
    # Add saves no array, so the intermediate `a` is freed as soon as the user drops it, long before
    # backward: the graph links creators, not tensors
    x = tl.tensor(np.ones(1000), requires_grad=True)
    a = x * 2.0
    b = a + 1.0
    data = weakref.ref(a.data)
    del a
    assert data() is None
    (b * b).sum().backward()
    np.testing.assert_allclose(x.grad, 4 * (2 * np.ones(1000) + 1))


def test_retain_grad_on_intermediate_the_user_keeps():
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    a = (x * 3.0).retain_grad()
    b = (a * a).sum()
    b.backward()
    np.testing.assert_allclose(a.grad, 2 * 3 * np.array([1.0, 2.0]))
    np.testing.assert_allclose(x.grad, 18 * np.array([1.0, 2.0]))
