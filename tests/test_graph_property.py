"""Random expression graphs over every public op of SPEC section 1, checked in float64.

Each graph is a small program: leaves (0-d and n-d, float64, requiring grad) and then steps that
apply a random op to random earlier nodes, so nodes are reused, operands broadcast, 0-d tensors
meet n-d ones, and indexing reads with integer arrays (repeats included). The same program runs
twice: on tinyllm tensors and on plain NumPy arrays. Every node's `.data` must be an ndarray equal
to NumPy's value, every leaf's `.grad` an ndarray, and `tl.gradcheck` (central differences) must
agree with backward. Ops whose derivative has a kink (relu, maximum, max, where's condition) are
only applied where every input is more than MARGIN away from the kink, or exactly on a tie of a
node with itself, so the finite differences never straddle one.

Seeded: the same graphs every run, a few seconds in all.
"""
import operator

import numpy as np
import pytest

import tinyllm as tl

GRAPHS = 120
STEPS = 10
MARGIN = 1e-3
LEAF_SHAPES = [(), (3,), (2, 3), (1, 3), (2, 1), (4,), (2, 2, 3)]

# Every public op of SPEC section 1 (operators, methods, module functions): the test fails if
# some op was never drawn, so a new op added here must be generated below.
PUBLIC_OPS = {"add", "sub", "mul", "div", "pow", "neg", "matmul", "compare", "getitem", "getitem_array",
              "sum", "mean", "max", "reshape", "transpose", "T", "exp", "log", "tanh", "sqrt", "relu",
              "concat", "stack", "where", "maximum", "scalar_operand", "array_operand"}


class Lib:
    """The ops a program calls, once for tinyllm and once for NumPy."""

    def __init__(self, tinyllm):
        self.tinyllm = tinyllm
        xp = tl if tinyllm else np
        self.exp, self.log, self.tanh, self.sqrt, self.maximum = xp.exp, xp.log, xp.tanh, xp.sqrt, xp.maximum
        self.where, self.stack = xp.where, xp.stack
        self.concat = tl.concat if tinyllm else np.concatenate

    def relu(self, x):
        return x.relu() if self.tinyllm else np.maximum(x, 0.0)


def _broadcastable(a, b):
    try:
        np.broadcast_shapes(a, b)
        return True
    except ValueError:
        return False


def _reduction_gap_ok(x, axis):
    """True when, in every reduced group, the maximum is MARGIN clear of any value not equal to it."""
    top = np.max(x, axis=axis, keepdims=True)
    others = np.where(x == top, -np.inf, x)
    second = np.max(others, axis=axis, keepdims=True) if x.size else top
    return bool(np.all((top - second) > MARGIN))


class Builder:
    """Draws one random program; `values` holds each node's NumPy value while drawing."""

    def __init__(self, rng):
        self.rng = rng
        self.steps = []        # (name, function(lib, nodes) -> node)
        self.values = []       # the NumPy value of every node so far
        self.used = set()

    def leaf(self, shape):
        self.values.append(self.rng.standard_normal(shape))

    def pick(self, ok=lambda v: True):
        """A random earlier node satisfying ok(value), or None."""
        choices = [i for i, v in enumerate(self.values) if ok(v)]
        return None if not choices else int(self.rng.choice(choices))

    def add(self, name, fn):
        value = np.asarray(fn(Lib(False), self.values))
        if not np.all(np.isfinite(value)) or np.abs(value).max(initial=0) > 1e3 or value.size > 64:
            return False  # keep values moderate so differences stay accurate
        self.steps.append((name, fn))
        self.values.append(value)
        self.used.add(name)
        return True

    # --- one random op ------------------------------------------------------------------------
    def step(self):
        r = self.rng
        kind = r.choice(["binary", "binary", "unary", "unary", "reduce", "shape", "index", "join",
                         "matmul", "where", "scalar"])
        return getattr(self, "_" + kind)()

    def _binary(self):
        i = self.pick()
        j = self.pick(lambda v: _broadcastable(v.shape, self.values[i].shape))
        if self.rng.random() < 0.2:
            j = i                                  # the same node on both sides
        name = self.rng.choice(["add", "sub", "mul", "div", "pow", "maximum"])
        a, b = self.values[i], self.values[j]
        if name == "add":
            return self.add(name, lambda L, n: n[i] + n[j])
        if name == "sub":
            return self.add(name, lambda L, n: n[i] - n[j])
        if name == "mul":
            return self.add(name, lambda L, n: n[i] * n[j])
        if name == "div":                          # a denominator kept away from 0
            return self.add(name, lambda L, n: n[i] / (n[j] * n[j] + 0.5))
        if name == "pow":                          # a positive base; the exponent is a node too
            return self.add(name, lambda L, n: (n[i] * n[i] + 0.5) ** n[j])
        if i == j or np.all(np.abs(a - b) > MARGIN):
            return self.add(name, lambda L, n: L.maximum(n[i], n[j]))
        return False

    def _unary(self):
        i = self.pick()
        x = self.values[i]
        name = self.rng.choice(["neg", "exp", "log", "tanh", "sqrt", "relu"])
        if name == "neg":
            return self.add(name, lambda L, n: -n[i])
        if name == "exp":
            return self.add(name, lambda L, n: L.exp(n[i]))
        if name == "log":
            return self.add(name, lambda L, n: L.log(n[i] * n[i] + 0.5))
        if name == "tanh":
            return self.add(name, lambda L, n: L.tanh(n[i]))
        if name == "sqrt":
            return self.add(name, lambda L, n: L.sqrt(n[i] * n[i] + 0.5))
        if np.all(np.abs(x) > MARGIN):
            return self.add(name, lambda L, n: L.relu(n[i]))
        return False

    def _reduce(self):
        i = self.pick()
        x = self.values[i]
        name = self.rng.choice(["sum", "mean", "max"])
        choices = [None] + list(range(-x.ndim, x.ndim))
        if x.ndim >= 2:
            choices.append((0, x.ndim - 1))
        axis = choices[self.rng.integers(len(choices))]
        keepdims = bool(self.rng.random() < 0.4)
        if name == "max" and (x.size == 0 or not _reduction_gap_ok(x, axis)):
            return False
        return self.add(name, lambda L, n: getattr(n[i], name)(axis=axis, keepdims=keepdims))

    def _shape(self):
        i = self.pick()
        x = self.values[i]
        name = self.rng.choice(["reshape", "transpose", "T"])
        if name == "reshape":
            shape = [(-1,), (1, -1), (-1, 1)][self.rng.integers(3)] if x.size != 1 else ()
            return self.add(name, lambda L, n: n[i].reshape(shape))
        if name == "T":
            return self.add(name, lambda L, n: n[i].T)
        axes = tuple(int(a) for a in self.rng.permutation(x.ndim))
        return self.add(name, lambda L, n: n[i].transpose(axes))

    def _index(self):
        i = self.pick()
        x = self.values[i]
        r = self.rng
        if x.ndim == 0:
            return self.add("getitem", lambda L, n: n[i][()])
        if r.random() < 0.5:                       # integer arrays, with repeats and negative ids
            ids = r.integers(-x.shape[0], x.shape[0], size=r.integers(1, 5))
            if x.ndim >= 2 and r.random() < 0.5:
                cols = r.integers(0, x.shape[1], size=ids.shape)
                key = (ids, cols)                  # one element per (row, column) pair
            else:
                key = ids
            return self.add("getitem_array", lambda L, n: n[i][key])
        key = r.choice(["all_ints", "int", "slice", "ellipsis"])
        if key == "all_ints":                      # down to one element: a 0-d result
            key = tuple(int(r.integers(-s, s)) for s in x.shape)
        elif key == "int":
            key = int(r.integers(-x.shape[0], x.shape[0]))
        elif key == "slice":
            key = slice(None, None, -1) if r.random() < 0.5 else slice(0, max(1, x.shape[0] - 1))
        else:
            key = (Ellipsis, int(r.integers(0, x.shape[-1])))
        return self.add("getitem", lambda L, n: n[i][key])

    def _join(self):
        i = self.pick()
        x = self.values[i]
        if self.rng.random() < 0.5:
            j = self.pick(lambda v: v.shape == x.shape)
            return self.add("stack", lambda L, n: L.stack([n[i], n[j], n[i]], axis=0))
        if x.ndim == 0:
            return False
        j = self.pick(lambda v: v.ndim == x.ndim and v.shape[1:] == x.shape[1:])
        return self.add("concat", lambda L, n: L.concat([n[i], n[j]], 0))

    def _matmul(self):
        i = self.pick(lambda v: v.ndim >= 1)
        if i is None:
            return False
        inner = self.values[i].shape[-1]
        j = self.pick(lambda v: (v.ndim == 1 and v.shape[0] == inner) or (v.ndim >= 2 and v.shape[-2] == inner))
        if j is None:
            return False
        try:
            np.matmul(self.values[i], self.values[j])
        except ValueError:
            return False                           # batch axes that do not broadcast
        return self.add("matmul", lambda L, n: n[i] @ n[j])

    def _where(self):
        i = self.pick()
        j = self.pick(lambda v: _broadcastable(v.shape, self.values[i].shape))
        a, b = self.values[i], self.values[j]
        if i == j or not np.all(np.abs(a - b) > MARGIN):
            return False
        compare = [operator.gt, operator.lt, operator.ge, operator.le][self.rng.integers(4)]
        if not self.add("where", lambda L, n: L.where(compare(n[i], n[j]), n[i], n[j] * 2.0)):
            return False
        self.used.add("compare")                   # the condition is a comparison of two nodes
        return True

    def _scalar(self):
        i = self.pick()
        if self.rng.random() < 0.5:                # Python numbers on either side
            c = float(self.rng.choice([-1.5, 0.5, 2.0]))
            self.add("scalar_operand", lambda L, n: c - n[i] * c)
            return self.add("scalar_operand", lambda L, n: 2.0 ** (n[i] * 0.5) + n[i] ** 2)
        const = self.rng.standard_normal(self.values[i].shape[-1:])  # a NumPy array operand
        return self.add("array_operand", lambda L, n: n[i] * const + const)


def draw_program(seed):
    rng = np.random.default_rng(seed)
    b = Builder(rng)
    count = int(rng.integers(1, 4))
    shapes = [LEAF_SHAPES[k] for k in rng.choice(len(LEAF_SHAPES), count)]
    if rng.random() < 0.5:
        shapes[0] = ()                             # many graphs start from a scalar
    for shape in shapes:
        b.leaf(shape)
    tries = 0
    while len(b.steps) < STEPS and tries < 100:
        tries += 1
        b.step()
    return b, [np.array(v) for v in b.values[:count]]


def run_program(steps, leaves, lib):
    nodes = list(leaves)
    for _, fn in steps:
        nodes.append(fn(lib, nodes))
    return nodes


def output(nodes, lib):
    """One output that every node feeds: the stack of each node's sum (a vector)."""
    return lib.stack([n.sum() for n in nodes])


@pytest.mark.parametrize("first", range(0, GRAPHS, 20))
def test_random_graphs_forward_and_gradients(first):
    tinyllm = Lib(True)
    for seed in range(first, first + 20):
        b, leaf_values = draw_program(seed)
        leaves = [tl.tensor(v, dtype="float64", requires_grad=True) for v in leaf_values]
        nodes = run_program(b.steps, leaves, tinyllm)
        reference = run_program(b.steps, [np.array(v) for v in leaf_values], Lib(False))
        for k, (node, ref) in enumerate(zip(nodes, reference)):
            what = f"graph {seed}, node {k} ({b.steps[k - len(leaves)][0] if k >= len(leaves) else 'leaf'})"
            assert type(node.data) is np.ndarray, what
            assert node.shape == np.shape(ref) and node.dtype == np.float64, what
            np.testing.assert_allclose(node.data, ref, rtol=1e-12, atol=1e-12, err_msg=what)
        out = output(nodes, tinyllm)
        out.backward(np.ones(out.shape))
        for leaf in leaves:
            assert type(leaf.grad) is np.ndarray and leaf.grad.shape == leaf.shape, f"graph {seed}"
            leaf.grad = None
        assert tl.gradcheck(lambda *ls: output(run_program(b.steps, ls, tinyllm), tinyllm), leaves), seed


def test_every_public_op_is_drawn():
    used = set()
    for seed in range(GRAPHS):
        used |= draw_program(seed)[0].used
    assert used == PUBLIC_OPS, PUBLIC_OPS - used
