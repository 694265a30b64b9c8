"""Shared test setup: the backends to run on, and the shared corpora (skipped when absent).

GPU tests are marked `gpu` and skip cleanly without CuPy or a GPU; `pytest -m gpu` runs only them.
"""
from pathlib import Path

import pytest

import tinyllm as tl

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CuPy and an NVIDIA GPU (skipped otherwise)")
    config.addinivalue_line("markers", "slow: a longer end-to-end test")


def pytest_collection_modifyitems(config, items):
    if tl.cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request):
    """Run a test on every available backend."""
    return request.param


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared corpora not found at {SHARED_DATA}")
    return SHARED_DATA
