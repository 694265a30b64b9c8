"""tinyllm.threads: the CPU layers cut over threads give the same numbers as on one thread."""
import threading

import numpy as np
import pytest

import tinyllm as tl
import tinyllm.cases.layers as layer_cases
from tinyllm import threads
from tinyllm.cases import CaseBuilder
from tinyllm.gradcheck import gradcheck_report


@pytest.fixture
def two_threads(monkeypatch):
    if threads.set_num_threads(2) != 2:
        pytest.skip("no control over NumPy's BLAS threads here (not OpenBLAS on Linux)")
    monkeypatch.setattr(threads, "MIN_PARALLEL_SIZE", 0)  # cut even the tiny arrays of the tests
    yield
    threads.set_num_threads(1)


def test_small_work_is_not_cut(two_threads, monkeypatch):
    monkeypatch.setattr(threads, "MIN_PARALLEL_SIZE", 100)
    assert threads.parallel_for(8, lambda a, b: (a, b), size=99) == [(0, 8)]
    assert threads.parallel_for(8, lambda a, b: (a, b), size=100) == [(0, 4), (4, 8)]


def test_one_thread_is_the_default_and_runs_on_the_caller():
    assert threads.get_num_threads() == 1
    seen = threads.parallel_for(10, lambda a, b: (a, b, threading.current_thread().name))
    assert seen == [(0, 10, threading.current_thread().name)]


def test_parts_cover_every_item_once_in_order_on_different_threads(two_threads):
    parts = threads.parallel_for(7, lambda a, b: (a, b, threading.current_thread().name))
    assert [(a, b) for a, b, _ in parts] == [(0, 3), (3, 7)]
    assert len({name for _, _, name in parts}) == 2
    assert threads.parallel_for(1, lambda a, b: (a, b)) == [(0, 1)]  # too few items to cut


def test_a_part_never_splits_again(two_threads):
    inner = threads.parallel_for(4, lambda a, b: threads.parallel_for(b - a, lambda c, d: (c, d)))
    assert inner == [[(0, 2)], [(0, 2)]]


def test_errors_in_a_worker_reach_the_caller(two_threads):
    def body(a, b):
        if a > 0:
            raise ValueError("part failed")
        return a
    with pytest.raises(ValueError, match="part failed"):
        threads.parallel_for(4, body)


def test_blas_gets_its_threads_back(two_threads):
    set_blas, get_blas = threads._openblas_threads_control()
    assert get_blas() == 1  # BLAS is single-threaded while tinyllm cuts the work itself
    before = threads._blas_threads
    threads.set_num_threads(1)
    assert get_blas() == before


def test_bad_thread_count():
    with pytest.raises(ValueError, match=">= 1"):
        threads.set_num_threads(0)


def test_threaded_matmul_matches_numpy(two_threads):
    r = np.random.default_rng(0)
    a, b = r.standard_normal((37, 11)), r.standard_normal((11, 5))
    np.testing.assert_allclose(threads.matmul(a, b), a @ b, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(threads.matmul(a.T.copy().T, b), a @ b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("case_fn", [layer_cases.linear, layer_cases.norms, layer_cases.activations,
                                     layer_cases.attention], ids=lambda f: f.__name__)
def test_layer_gradchecks_pass_on_two_threads(case_fn, two_threads):
    for label, fn, inputs in case_fn(CaseBuilder()):
        result = gradcheck_report(fn, inputs)
        assert not result.failures, f"{label}: {result.failures[0]}"


def _gpt_step(seed=0):
    tl.manual_seed(seed)
    config = tl.GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
                          bias=True, dropout=0.0)
    model = tl.GPT(config)
    ids = np.random.default_rng(seed).integers(0, 11, (3, 16))
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return loss.item(), {name: p.grad.copy() for name, p in model.named_parameters()}


def test_a_gpt_step_on_two_threads_matches_one(two_threads):
    loss2, grads2 = _gpt_step()
    threads.set_num_threads(1)
    loss1, grads1 = _gpt_step()
    assert loss2 == pytest.approx(loss1, rel=1e-6)
    for name in grads1:
        np.testing.assert_allclose(grads2[name], grads1[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_default_plan_cuts_the_batch_over_processes_where_it_can(monkeypatch):
    assert threads.default_plan(8, 256, 384, cores=4) == (4, "batch")      # "char"
    assert threads.default_plan(12, 64, 128, cores=2) == (2, "batch")     # "baby"
    assert threads.default_plan(3, 256, 384, cores=4) == (4, "layers")    # fewer rows than cores, big layers
    assert threads.default_plan(2, 64, 128, cores=4) == (1, "layers")     # ... small ones: NumPy's BLAS alone
    assert threads.default_plan(12, 64, 128, cores=1) == (1, "layers")
    monkeypatch.delattr(threads.os, "fork")                               # no processes to fork
    assert threads.default_plan(8, 256, 384, cores=4) == (4, "layers")


def test_train_hands_the_threads_back(tmp_path):
    from tinyllm.train import main
    assert main(["--out", str(tmp_path / "x"), "--threads", "-1"]) == 2   # a clear error, nothing run
    assert threads.get_num_threads() == 1


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_runs_serially(two_threads):
    import os
    pid = os.fork()
    if pid == 0:  # the child: the parent's workers are gone, so parts must not be handed to them
        ok = threads.get_num_threads() == 1 and threads.parallel_for(4, lambda a, b: (a, b)) == [(0, 4)]
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
