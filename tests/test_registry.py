"""Every registered op is exercised by a gradient-check case, and every case passes in float64."""
import importlib

import pytest

import tinyllm as tl
from tinyllm.autograd import OPS
from tinyllm.cases import CASE_MODULES, iter_cases
from tinyllm.gradcheck import gradcheck_report


def _import_everything():
    # importing the layers and the model registers their fused ops too
    for name in ["tinyllm.nn", "tinyllm.model"]:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _all_cases():
    _import_everything()
    return list(iter_cases("cpu"))


CASE_LIST = _all_cases()


@pytest.mark.parametrize("label,fn,inputs", CASE_LIST, ids=[c[0] for c in CASE_LIST])
def test_case_passes(label, fn, inputs):
    result = gradcheck_report(fn, inputs)
    assert not result.failures, result.failures[0]
    assert result.worst_error < 1e-6, f"{label}: worst relative error {result.worst_error:.2e}"


def test_every_op_has_a_case():
    covered = set()
    for label, fn, inputs in _all_cases():
        covered |= gradcheck_report(fn, inputs).ops
    missing = sorted(set(OPS) - covered)
    assert not missing, f"ops with no gradient-check case (add one in {CASE_MODULES}): {missing}"


def test_a_new_op_without_case_is_caught():
    class Cube(tl.Function):
        def forward(self, x):
            return x ** 3

        def backward(self, gy):
            return gy * 3

    try:
        covered = set()
        for label, fn, inputs in _all_cases():
            covered |= gradcheck_report(fn, inputs).ops
        assert "Cube" in set(OPS) - covered
    finally:
        del OPS["Cube"]
