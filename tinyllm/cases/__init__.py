"""The gradient-check cases of every registered op, layer and model: what `tinyllm gradcheck` runs.

A case function takes a `CaseBuilder` and yields `(label, fn, inputs)`: `tl.gradcheck(fn, inputs)`
must pass. A case counts for every op that appears in the graph it builds, so the coverage test
(every op in `tinyllm.autograd.OPS` is exercised by some case) checks what really ran, not a label.
"""
import importlib
import importlib.util
import time

import numpy

from tinyllm import backend
from tinyllm.autograd import OPS, Tensor
from tinyllm.gradcheck import gradcheck_report

CASES = []  # case functions, in registration order
CASE_MODULES = ["tinyllm.cases.ops", "tinyllm.cases.layers", "tinyllm.cases.model"]


def gradcheck_cases(fn):
    """Decorator: register a case function."""
    CASES.append(fn)
    return fn


class CaseBuilder:
    """Makes float64 inputs for a case on one device, from one seeded generator."""

    def __init__(self, device="cpu", seed=0):
        self.device = backend.check_device(device)
        self.xp = backend.xp_for(self.device)
        self.rng = numpy.random.default_rng(seed)

    def _tensor(self, array, requires_grad=True):
        return Tensor(self.xp.asarray(array), requires_grad=requires_grad)

    def randn(self, *shape, scale=1.0):
        """A float64 input that requires grad, entries ~ N(0, scale²)."""
        return self._tensor(scale * self.rng.standard_normal(shape))

    def positive(self, *shape, low=0.5, high=2.0):
        """A float64 input that requires grad, entries in [low, high) (for log, sqrt, pow)."""
        return self._tensor(self.rng.uniform(low, high, shape))

    def const(self, array):
        """A constant (no grad) on the builder's device."""
        return self.xp.asarray(array)

    def ints(self, high, *shape):
        """Integer ids in [0, high) as a constant array on the builder's device."""
        return self.xp.asarray(self.rng.integers(0, high, shape))


def load_all():
    """Import every case module (layers and model may add ops of their own)."""
    for name in CASE_MODULES:
        if importlib.util.find_spec(name) is not None:  # a part not yet written has no cases to run
            importlib.import_module(name)
    return CASES


def iter_cases(device="cpu"):
    """Every (label, fn, inputs) of every registered case function."""
    load_all()
    for case_fn in CASES:
        yield from case_fn(CaseBuilder(device))


def run_all(device="cpu", only=None):
    """Run every case; one row per op: (op, cases, checks, worst error, seconds, first failure or None).

    An op's row gathers every case whose graph contains it; `only` keeps the rows of those ops.
    """
    stats = {name: [0, 0, 0.0, 0.0, None] for name in OPS}
    for label, fn, inputs in iter_cases(device):
        start = time.perf_counter()
        result = gradcheck_report(fn, inputs)
        seconds = time.perf_counter() - start
        for name in result.ops:
            row = stats.setdefault(name, [0, 0, 0.0, 0.0, None])
            row[0] += 1
            row[1] += result.checks
            row[2] = max(row[2], result.worst_error)
            row[3] += seconds
            if result.failures and row[4] is None:
                row[4] = f"{label}: {result.failures[0]}"
    return [(name, *row) for name, row in sorted(stats.items()) if not only or name in only]
