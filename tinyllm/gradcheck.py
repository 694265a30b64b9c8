"""Finite-difference gradient checks: the test every op and layer must pass.

For inputs x and a random upstream gradient u (fixed by `seed`), the scalar f(x) = Σ u ⊙ fn(x)
has gradient ∇f = the vector-Jacobian product that backward computes. The check compares it with
central differences, which are accurate to O(eps²):

    ∂f/∂x_i ≈ (f(x + eps·e_i) − f(x − eps·e_i)) / (2·eps)           (small inputs: every element)
    ∇f · d  ≈ (f(x + eps·d) − f(x − eps·d)) / (2·eps)                (large inputs: random directions d)

The error measure is |analytic − numeric| / max(|analytic|, |numeric|, 1): relative for gradients
of size ≥ 1 and absolute below that, where float64 rounding in f (about 1e-16·|f| / eps) would
otherwise make a correct tiny gradient look wrong.
"""
from dataclasses import dataclass, field

import numpy

from tinyllm import backend
from tinyllm.autograd import Tensor, _topological_order, no_grad

MAX_ELEMENTWISE = 256   # inputs up to this size are checked element by element
DIRECTIONS = 3          # random directions for larger inputs ...
SAMPLED_ELEMENTS = 8    # ... plus this many randomly chosen single elements


class GradcheckError(AssertionError):
    """The analytic gradient of some input disagrees with finite differences."""


@dataclass
class GradcheckResult:
    worst_error: float = 0.0      # the largest error measure seen over all inputs
    checks: int = 0               # how many numeric derivatives were compared
    ops: set = field(default_factory=set)  # names of the ops in fn's graph (what was checked)
    failures: list = field(default_factory=list)


def _error(analytic, numeric):
    return abs(analytic - numeric) / max(abs(analytic), abs(numeric), 1.0)


def _op_names(y):
    """Names of the Functions in the graph that produced y."""
    if y._ctx is None:
        return set()
    return {node.name for node in _topological_order(y._ctx) if not isinstance(node, Tensor)}


def gradcheck(fn, inputs, *, eps=1e-6, atol=1e-5, rtol=1e-4, seed=0):
    """Check backward of `fn` at `inputs` against central differences; True or GradcheckError."""
    result = gradcheck_report(fn, inputs, eps=eps, atol=atol, rtol=rtol, seed=seed)
    if result.failures:
        raise GradcheckError(result.failures[0])
    return True


def gradcheck_report(fn, inputs, *, eps=1e-6, atol=1e-5, rtol=1e-4, seed=0):
    """Like gradcheck, but returns a GradcheckResult with the worst error instead of raising."""
    inputs = list(inputs)
    checked = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and x.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input has requires_grad=True, so there is nothing to check")
    for i in checked:
        if inputs[i].dtype != numpy.float64:
            raise TypeError(f"gradcheck: input {i} is {inputs[i].dtype}; finite differences need float64 "
                            "inputs (make them with dtype='float64')")
    rng = numpy.random.default_rng(seed)
    xp = backend.get_array_module(inputs[checked[0]].data)

    # analytic: one backward pass with a random upstream gradient u
    saved_grads = [inputs[i].grad for i in checked]
    for i in checked:
        inputs[i].grad = None
    y = fn(*inputs)
    if not isinstance(y, Tensor) or not y.requires_grad:
        raise ValueError("gradcheck: fn must return a Tensor that depends on the inputs")
    ops_in_graph = _op_names(y)
    u = xp.asarray(rng.standard_normal(y.shape))
    y.backward(u.astype(y.dtype))
    analytic = {}
    for i, saved in zip(checked, saved_grads):
        g = inputs[i].grad
        analytic[i] = backend.to_numpy(g).astype(numpy.float64) if g is not None else numpy.zeros(inputs[i].shape)
        inputs[i].grad = saved

    def f():
        with no_grad():
            return float((fn(*inputs).data.astype(numpy.float64) * u).sum())

    result = GradcheckResult(ops=ops_in_graph)

    def compare(i, what, a, n):
        err = _error(a, n)
        result.checks += 1
        result.worst_error = max(result.worst_error, err)
        if abs(a - n) > atol + rtol * abs(n):
            result.failures.append(
                f"gradcheck failed for input {i} (shape {inputs[i].shape}) at {what}: "
                f"analytic {a:.10g} vs numeric {n:.10g} (difference {abs(a - n):.3g}, "
                f"allowed {atol + rtol * abs(n):.3g}). Check the backward of the op that uses this input.")

    for i in checked:
        x = inputs[i].data
        original = x.copy()

        def along(direction):  # numeric derivative of f along a direction, x restored afterwards
            x[...] = original + eps * direction
            f_plus = f()
            x[...] = original - eps * direction
            f_minus = f()
            x[...] = original
            return (f_plus - f_minus) / (2 * eps)

        flat_indices = range(x.size) if x.size <= MAX_ELEMENTWISE else rng.choice(x.size, SAMPLED_ELEMENTS, replace=False)
        for flat in flat_indices:
            e = numpy.zeros(x.size)
            e[flat] = 1.0
            index = numpy.unravel_index(flat, x.shape)
            compare(i, f"element {tuple(int(k) for k in index)}", analytic[i].flat[flat],
                    along(xp.asarray(e.reshape(x.shape))))
        if x.size > MAX_ELEMENTWISE:
            for k in range(DIRECTIONS):
                d = rng.standard_normal(x.shape)
                compare(i, f"random direction {k}", float((analytic[i] * d).sum()), along(xp.asarray(d)))
    return result

