"""Fused layers (tinyllm/nn/functional.py): gradchecks, agreement with composed references, stability."""
import numpy as np
import pytest

import tinyllm as tl
from tinyllm.cases import CaseBuilder
from tinyllm.gradcheck import gradcheck_report
import tinyllm.cases.layers as layer_cases

CASE_FUNCTIONS = [layer_cases.linear, layer_cases.embedding, layer_cases.norms, layer_cases.activations,
                  layer_cases.softmaxes, layer_cases.cross_entropy, layer_cases.dropout, layer_cases.attention]


@pytest.mark.parametrize("case_fn", CASE_FUNCTIONS, ids=lambda f: f.__name__)
def test_layer_gradcheck_cases(case_fn):
    for label, fn, inputs in case_fn(CaseBuilder()):
        result = gradcheck_report(fn, inputs)
        assert not result.failures, f"{label}: {result.failures[0]}"
        assert result.worst_error < 1e-6, label
