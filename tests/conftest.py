"""Shared test setup: the backends to run on, the CuPy stand-in, and the shared corpora (skipped when absent).

GPU tests are marked `gpu` (`pytest -m gpu` runs only them). With CuPy and a GPU they run on the
GPU. Without, they run on tinyllm's CuPy stand-in (tinyllm/testing/cupy_standin.py: NumPy
underneath, CuPy's rules on top), so CI runs the CuPy path on every commit. TINYLLM_TEST_GPU=skip
skips them instead.

The stand-in is plugged in for each gpu-marked test alone (as `cupy` and `cupyx` too, for tests
that import them); every other test sees the machine as it is, so "no GPU -> clear error" tests
stay meaningful. Fixtures: `cupy_standin` (the stand-in for one test, GPU or not), `no_cuda`
(CUDA switched off for one test), `train_step_syncs` (run training steps on the stand-in and get
each step's host syncs by source line), `device` ("cpu", and "cuda" marked gpu).
"""
import os
import sys
from pathlib import Path

import pytest

import tinyllm as tl
from tinyllm import backend

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# TINYLLM_CUPY=standin is for scripts; here the stand-in is plugged in test by test (below)
os.environ.pop("TINYLLM_CUPY", None)
# Real CuPy with a GPU (not the stand-in, even when TINYLLM_CUPY=standin is set for scripts)
REAL_GPU = tl.cuda_available() and not backend.cupy_is_standin()
GPU_TESTS = os.environ.get("TINYLLM_TEST_GPU", "auto").lower()   # auto | skip


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on CuPy and a GPU, or on tinyllm's CuPy stand-in without one")
    config.addinivalue_line("markers", "slow: a longer end-to-end test")


def pytest_report_header(config):
    if REAL_GPU:
        return "gpu tests: real CuPy and GPU"
    return "gpu tests: skipped (TINYLLM_TEST_GPU=skip)" if GPU_TESTS == "skip" else \
        "gpu tests: on tinyllm's CuPy stand-in (no GPU here)"


def pytest_collection_modifyitems(config, items):
    if REAL_GPU or GPU_TESTS != "skip":
        return
    skip = pytest.mark.skip(reason="TINYLLM_TEST_GPU=skip and no CuPy with a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _activate_standin(monkeypatch):
    """Plug the stand-in in for "cuda" (and as the modules `cupy`/`cupyx`) until the test ends."""
    from tinyllm.testing import cupy_standin
    cupy_standin.reset()
    before = backend.use_cupy(cupy_standin.cupy, cupy_standin.cupyx)
    monkeypatch.setitem(sys.modules, "cupy", cupy_standin.cupy)
    monkeypatch.setitem(sys.modules, "cupyx", cupy_standin.cupyx)
    return cupy_standin, before


@pytest.fixture(autouse=True)
def _gpu_backend(request, monkeypatch):
    """gpu-marked tests without a GPU run on the stand-in."""
    if REAL_GPU or request.node.get_closest_marker("gpu") is None:
        yield
        return
    standin, before = _activate_standin(monkeypatch)
    try:
        yield
    finally:
        backend.restore_cupy(before)
        standin.reset()


@pytest.fixture
def on_standin():
    """True when this test's "cuda" is the stand-in (its counts are meaningful, its times are not)."""
    return backend.cupy_is_standin() if backend.cuda_available() else False


@pytest.fixture
def cupy_standin(monkeypatch):
    """The stand-in module (tinyllm.testing.cupy_standin), plugged in for "cuda" during this test,
    on a GPU machine too: for tests of what the stand-in counts."""
    standin, before = _activate_standin(monkeypatch)
    try:
        yield standin
    finally:
        backend.restore_cupy(before)
        standin.reset()


@pytest.fixture
def no_cuda():
    """CUDA switched off for this test, as on a machine without CuPy (even where there is a GPU)."""
    with backend.cupy_module(None, reason="ModuleNotFoundError: No module named 'cupy' (switched off by the test)"):
        yield


@pytest.fixture
def train_step_syncs(cupy_standin, tmp_path):
    """run(steps=3, log_interval=2, **options) -> [Record per training step] on the stand-in.

    Each step's Record (tinyllm.testing.cupy_standin.Record) holds what happened from the start of
    that step's train_step to the start of the next one, its logging included: `.syncs` by source
    line, `.n_syncs`, `.launches`, `.summary()`. See tinyllm.testing.syncs.
    """
    from tinyllm.testing.syncs import record_train_steps

    def run(steps=3, log_interval=2, **options):
        return record_train_steps(tmp_path / "syncs", steps=steps, log_interval=log_interval, **options)
    return run


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request):
    """Run a test on every backend ("cuda": a GPU, or the stand-in)."""
    return request.param


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared corpora not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small prepared char-level dataset (Python-like lines), for the trainer's tests."""
    from tinyllm.data import prepare_dataset
    root = tmp_path_factory.mktemp("data")
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(300))
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    prepare_dataset("text", root / "prepared", input_path=root / "corpus.txt", log=lambda *a: None)
    return root / "prepared"
