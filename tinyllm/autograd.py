"""The autograd engine: `Tensor`, `Function` and reverse-mode backward.

A `Tensor` wraps one array (NumPy or CuPy). Every operation on tensors is a `Function` whose
`forward` computes the result from raw arrays and whose `backward` maps the gradient of the result
to the gradients of the inputs (a vector-Jacobian product). Calling a Function records it as the
`_ctx` (creator) of its output, so the outputs point back to the inputs and form a graph:

    x --Exp--> y --Sum--> loss          loss.backward() walks it from right to left.

The graph links Functions, not tensors: each Function records, for every input that needs a
gradient, the input's creator (or the input itself when it is a leaf such as a parameter). So an
intermediate array lives only as long as someone uses it: the user, or a Function that saved it
for its backward. This is what keeps activation memory down to what backward really needs.

Memory rules (they are what keep long training runs flat):
- a Function keeps only what its backward needs, and `backward` releases it (retain_graph=False);
- tensors point to their creator, creators point to their parents' creators, nothing points forward,
  so the graph has no reference cycles and is freed by reference counting when the loss goes away;
- gradients of intermediate tensors are dropped once used, unless `retain_grad()` asked to keep them.
"""
import contextlib
import weakref

import numpy

from tinyllm import backend

# ---------------------------------------------------------------------------------------------
# Grad mode


_grad_enabled = True


def is_grad_enabled():
    return _grad_enabled


class no_grad(contextlib.ContextDecorator):
    """`with tl.no_grad():` (or `@tl.no_grad()`): operations record no graph."""

    def __enter__(self):
        global _grad_enabled
        self._previous = _grad_enabled
        _grad_enabled = False

    def __exit__(self, *exc):
        global _grad_enabled
        _grad_enabled = self._previous
        return False


# ---------------------------------------------------------------------------------------------
# Function: one differentiable operation

GRAPH_FREED = ("backward through a graph a second time: its saved arrays were freed by the first backward; "
               "pass retain_graph=True to the first call")

OPS = {}  # name -> Function subclass; `tinyllm gradcheck` and the tests walk this registry


class Function:
    """Base class of every op. Subclasses define, side by side:

        forward(self, *arrays) -> array      # raw arrays in, raw array out; save what backward needs on self
        backward(self, gy) -> grad or tuple  # one gradient (or None) per input, each shaped like that input

    Constant settings (an axis, an eps, integer ids) go to `__init__`. `backward` must not modify
    `gy` in place: the same array may be handed to several inputs. `self.needs_input_grad[i]` says
    whether input i wants a gradient, so a backward can skip work nobody asked for.
    After the call, `self.parents` holds the graph edges (see the module docstring).
    Every subclass is registered in `OPS` by its class name; pass `register=False` for helpers.
    """

    def __init_subclass__(cls, register=True, **kwargs):
        super().__init_subclass__(**kwargs)
        if register:
            OPS[cls.__name__] = cls

    def __call__(self, *inputs):
        tensors = _as_tensors(inputs)
        try:
            y = self.forward(*[t.data for t in tensors])
        except ValueError as e:  # shape problems: say which op and which shapes
            shapes = ", ".join(str(t.shape) for t in tensors)
            raise ValueError(f"{type(self).__name__} with input shapes {shapes}: {e}") from e
        needs = tuple([t.requires_grad for t in tensors])
        needs_grad = _grad_enabled and any(needs)
        out = Tensor(y, requires_grad=needs_grad)
        if needs_grad:
            # graph edges: what made each input (its creator, or the leaf itself); None: no grad needed
            self.parents = tuple([(t._ctx or t) if t.requires_grad else None for t in tensors])
            self.needs_input_grad = needs
            self.out_shape, self.out_dtype = y.shape, y.dtype
            out._ctx = self
        return out

    def forward(self, *xs):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, gy):
        raise NotImplementedError(f"{type(self).__name__}.backward")

    _retained = None  # weak reference to the output when the user called retain_grad() on it

    def release(self):
        """Drop the edges and saved arrays once backward has used them."""
        self.__dict__.clear()
        self.parents = None

    @property
    def name(self):
        return type(self).__name__


def _as_tensors(inputs):
    """Tensors pass through; Python numbers and arrays become constants.

    A Python number takes the dtype of the tensor it meets, so `x * 2.0` stays float32
    (an int tensor times a float gives float32, as in PyTorch).
    """
    like = next((x for x in inputs if isinstance(x, Tensor)), None)
    if like is None:
        raise TypeError("an op needs at least one Tensor input")
    kind = type(like.data)
    if all([isinstance(x, Tensor) and type(x.data) is kind for x in inputs]):
        return inputs                                 # the usual case: tensors on one device
    out = []
    for x in inputs:
        if isinstance(x, Tensor):
            if x is not like and type(x.data) is not type(like.data):
                raise RuntimeError(
                    f"tensors on different devices ({like.device} and {x.device}); "
                    "move one with .to(device) first: tinyllm never copies between host and GPU silently")
            out.append(x)
            continue
        xp = backend.get_array_module(like.data)
        if isinstance(x, (bool, int, float)):
            dtype = like.dtype
            if isinstance(x, float) and dtype.kind in "biu":
                dtype = numpy.float32
            out.append(Tensor(xp.asarray(x, dtype=dtype)))
        elif isinstance(x, (numpy.ndarray, numpy.generic)) or backend.get_array_module(x) is not numpy:
            if type(x) is not type(like.data) and not isinstance(x, numpy.generic):
                raise RuntimeError(
                    f"an array on {backend.device_of(x)} met a tensor on {like.device}; "
                    "move it first: tinyllm never copies between host and GPU silently")
            x = xp.asarray(x)
            _check_real(x)
            out.append(Tensor(x))
        else:
            raise TypeError(f"cannot use {type(x).__name__} as an op input; wrap it with tl.tensor(...)")
    return out


# ---------------------------------------------------------------------------------------------
# Tensor


class Tensor:
    """An array plus what autograd needs: `grad`, `requires_grad` and the Function that made it."""

    __array_ufunc__ = None  # make `ndarray + Tensor` call Tensor.__radd__ instead of NumPy's loop
    __hash__ = object.__hash__  # tensors are hashable by identity, though `==` is elementwise
    name = None  # an optional label for printing and to_dot
    # An array of the tensor's shape and dtype that backward copies its first gradient into, instead
    # of a new one: tinyllm.data_parallel keeps the gradients in memory its processes share.
    grad_home = None
    _grad_hooks = ()  # register_post_accumulate_grad_hook's functions

    def __init__(self, data, requires_grad=False):
        if isinstance(data, numpy.generic):  # NumPy gives scalars for ops on 0-d arrays: keep arrays
            data = numpy.asarray(data)
        if requires_grad and data.dtype.kind not in "fc":
            raise TypeError(f"only floating-point tensors can require grad, got dtype {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self._ctx = None      # the Function that produced this tensor (None for a leaf)

    # --- what the tensor is -------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    device = property(lambda self: backend.device_of(self.data))
    is_leaf = property(lambda self: self._ctx is None)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        dev = ", device='cuda'" if self.device == "cuda" else ""
        body = numpy.array2string(backend.to_numpy(self.data), separator=", ", prefix="tensor(")
        return f"tensor({body}, dtype={self.dtype}{dev}{grad})"

    def __bool__(self):
        return bool(self.data)

    # --- conversions --------------------------------------------------------------------------
    def numpy(self):
        """A host NumPy copy of the data (never part of the graph)."""
        return backend.to_numpy(self.data).copy()

    def item(self):
        return self.data.item()

    def tolist(self):
        return self.data.tolist()

    def detach(self):
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def to(self, device):
        """This tensor on `device` ("cpu" or "cuda"): the explicit copy, differentiable."""
        if backend.check_device(device) == self.device:
            return self
        from tinyllm.ops import ToDevice
        return ToDevice(device)(self)

    def astype(self, dtype):
        from tinyllm.ops import Cast
        dtype = backend.as_dtype(dtype)
        return self if dtype == self.dtype else Cast(dtype)(self)

    def retain_grad(self):
        """Keep this non-leaf tensor's gradient in .grad after backward (leaves always keep it)."""
        if self._ctx is not None:
            self._ctx._retained = weakref.ref(self)
        return self

    # --- backward -----------------------------------------------------------------------------
    def backward(self, grad=None, retain_graph=False):
        """Accumulate d(self)/d(leaf) · grad into every leaf's .grad (grad defaults to 1 for a scalar)."""
        backward(self, grad, retain_graph)

    def register_post_accumulate_grad_hook(self, hook):
        """Call hook(self) whenever a backward has added this leaf's gradient into .grad (the leaf's
        gradient for that backward is then complete), as PyTorch's method of this name. Returns a
        handle whose .remove() takes the hook off again."""
        if self._ctx is not None:
            raise RuntimeError("post-accumulate-grad hooks are for leaf tensors (parameters, inputs); "
                               "this tensor was made by an op")
        self._grad_hooks = self._grad_hooks + (hook,)
        return _HookHandle(self, hook)


class _HookHandle:
    """What register_post_accumulate_grad_hook returns: .remove() unregisters the hook."""

    def __init__(self, tensor, hook):
        self.tensor, self.hook = tensor, hook

    def remove(self):
        self.tensor._grad_hooks = tuple(h for h in self.tensor._grad_hooks if h is not self.hook)


def backward(root, grad=None, retain_graph=False):
    """Reverse-mode autodiff from `root`: the engine in one loop."""
    if not root.requires_grad:
        raise RuntimeError("backward() on a tensor that does not require grad: no input with "
                           "requires_grad=True went into it (or it was made under no_grad())")
    xp = backend.get_array_module(root.data)
    if grad is None:
        if root.size != 1:
            raise RuntimeError(f"backward() without a gradient needs a scalar, but this tensor has shape "
                               f"{root.shape}; reduce it first (e.g. .sum()) or pass grad= of that shape")
        grad = xp.ones_like(root.data)
    else:
        grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=root.dtype)
        if grad.shape != root.shape:
            raise ValueError(f"backward(grad=...) got shape {grad.shape}, expected {root.shape}")

    start = root._ctx or root  # graph nodes are Functions, plus the leaves at the ends
    grads = {id(start): grad}  # gradients waiting to be pushed further, keyed by node
    for node in _topological_order(start):
        g = grads.pop(id(node), None)
        if g is None:  # nothing flowed into this node (e.g. only a non-differentiable path)
            continue
        if isinstance(node, Tensor):  # a leaf: its gradient is complete
            _accumulate(node, g)
            for hook in node._grad_hooks:
                hook(node)
            continue
        fn = node
        if fn._retained is not None and fn._retained() is not None:  # the user asked to keep this grad
            _accumulate(fn._retained(), g)
        if fn.parents is None:
            raise RuntimeError(GRAPH_FREED)
        gxs = fn.backward(g)
        if not isinstance(gxs, tuple):
            gxs = (gxs,)
        for parent, gx in zip(fn.parents, gxs):
            if parent is None or gx is None:
                continue
            expected = parent.data.shape if isinstance(parent, Tensor) else parent.out_shape
            if gx.shape != expected:
                raise RuntimeError(f"{fn.name}.backward returned a gradient of shape {gx.shape} "
                                   f"for an input of shape {expected}")
            key = id(parent)
            waiting = grads.get(key)
            # a new array rather than +=: gx may be the very array another input also received
            grads[key] = gx if waiting is None else waiting + gx
        if not retain_graph:
            fn.release()


def _accumulate(t, g):
    """t.grad += g, but the first gradient is copied so no two tensors ever share a .grad array
    (copied into t.grad_home when the tensor has one)."""
    if t.grad is None:
        if t.grad_home is None:
            t.grad = g.astype(t.dtype, copy=True)
            if isinstance(t.grad, numpy.generic):  # a 0-d gradient computed as a NumPy scalar
                t.grad = numpy.asarray(t.grad)
        else:
            t.grad = t.grad_home
            t.grad[...] = g
    else:
        t.grad += g


def _topological_order(start):
    """Graph nodes reachable from start, each after every node that uses it (iterative DFS, no recursion)."""
    order, visited = [], set()
    stack = [(start, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        # leaves onto the stack first, so that they are visited last: each leaf then comes right after
        # the last op that uses it, not at the very end, and its gradient is complete (its hooks run)
        # while the rest of backward still runs. Leaves have no parents: the ops' order is unchanged.
        parents = [p for p in _parents(node) if id(p) not in visited]
        stack.extend((p, False) for p in parents if isinstance(p, Tensor))
        stack.extend((p, False) for p in parents if not isinstance(p, Tensor))
    order.reverse()  # post-order reversed: the start first, leaves last
    return order


def _parents(node):
    """The nodes a node's inputs came from (none for a leaf tensor or a freed Function)."""
    if isinstance(node, Tensor) or node.parents is None:
        return ()
    return [p for p in node.parents if p is not None]


# ---------------------------------------------------------------------------------------------
# Creating tensors


def tensor(data, requires_grad=False, dtype=None, device=None):
    """Make a tensor from a list, a number or an array (as torch.tensor: the data is copied).

    dtype=None: Python floats give float32, Python ints int64, arrays keep their dtype.
    """
    if isinstance(data, Tensor):
        data = data.data
    if isinstance(data, (list, tuple, int, float, bool)):
        data = numpy.array(data)
        if dtype is None and data.dtype.kind == "f":
            dtype = numpy.float32
    data = backend.to_device(data, device if device is not None else backend.device_of(data))
    xp = backend.get_array_module(data)
    array = xp.array(data, dtype=None if dtype is None else backend.as_dtype(dtype), copy=True)
    _check_real(array)
    return Tensor(array, requires_grad=requires_grad)


def _check_real(array):
    """Tensors hold real numbers (bool, int, float): strings, objects and complex numbers are refused."""
    if array.dtype.kind not in "biuf":
        raise TypeError(f"tensors hold real numbers (bool, int or float), got dtype {array.dtype}")


def manual_seed(seed):
    """Seed parameter initialisation and dropout (host and, when present, GPU generators)."""
    from tinyllm import rng
    rng.manual_seed(seed)


# Operators and methods are defined in ops.py, next to the Functions they call.
from tinyllm import ops  # noqa: E402,F401  (attaches Tensor.__add__, .sum, ...)
