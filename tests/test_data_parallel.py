"""tinyllm.data_parallel: the batch cut over worker processes gives the whole batch's loss and
gradients, and AdamW's step shared out over them gives the one-process step."""
import os
import signal
import time

import numpy as np
import pytest

import tinyllm as tl
from tinyllm import threads
from tinyllm.data_parallel import DataParallel
from tinyllm.optim import AdamW


@pytest.fixture
def cores(request):
    """tinyllm.threads set to 2 (or the parametrized count): DataParallel then runs that many processes."""
    n = getattr(request, "param", 2)
    if not hasattr(os, "fork"):
        pytest.skip("no os.fork on this system")
    if threads.set_num_threads(n) != n:
        pytest.skip("no control over NumPy's BLAS threads here (not OpenBLAS on Linux)")
    yield n
    threads.set_num_threads(1)


def _gpt(dtype="float64", dropout=0.0, seed=0):
    tl.manual_seed(seed)
    config = tl.GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
                          bias=True, dropout=dropout)
    model = tl.GPT(config)
    for p in model.parameters():
        p.data = p.data.astype(dtype)
    return model


def _batch(rows, seed=1):
    ids = np.random.default_rng(seed).integers(0, 11, (rows, 9))
    return ids[:, :-1], ids[:, 1:]


def _assert_same_grads(model, other, rtol=1e-10):
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        np.testing.assert_allclose(q.grad, p.grad, rtol=rtol, atol=1e-13, err_msg=name)


@pytest.mark.parametrize("cores", [2, 3], indirect=True)
@pytest.mark.parametrize("rows", [2, 3, 5])       # 3 and 5: parts of different sizes weigh differently
@pytest.mark.parametrize("overlap", [True, False])
def test_cut_batch_gives_the_whole_batch_loss_and_gradients(cores, rows, overlap):
    x, y = _batch(rows)
    whole, cut = _gpt(), _gpt()
    _, loss = whole(x, y)
    (loss * 0.5).backward()
    with DataParallel(cut, overlap=overlap) as data_parallel:
        assert len(data_parallel.worker_pids) == cores - 1
        got = data_parallel.forward_backward(x, y, scale=0.5)
    assert got.dtype == np.float64 and float(got) == pytest.approx(loss.item(), rel=1e-12)
    _assert_same_grads(whole, cut)


def test_ignored_targets_weigh_nothing(cores):
    """The loss is a mean over counted targets: a part with fewer of them weighs less, one with none nothing."""
    x, y = _batch(4)
    y = y.copy()
    y[0, :5] = -100              # the main process's part counts fewer targets
    y[2:] = -100                 # the worker's part counts none
    whole, cut = _gpt(), _gpt()
    _, loss = whole(x, y)
    loss.backward()
    with DataParallel(cut) as data_parallel:
        got = data_parallel.forward_backward(x, y)
        assert float(got) == pytest.approx(loss.item(), rel=1e-12)
        _assert_same_grads(whole, cut)
        y[:] = -100              # nothing counts: nan, as one process gives it, and zero gradients
        cut.zero_grad()
        assert np.isnan(data_parallel.forward_backward(x, y))
        assert all(not p.grad.any() for p in cut.parameters())


@pytest.mark.parametrize("cores", [3], indirect=True)
@pytest.mark.parametrize("ignored", [[2], [1], [0, 1]])
def test_parts_without_counted_targets_add_nothing(cores, ignored):
    """Rows of a part that count no target: that process gives no gradient this call (a worker's
    gradients of an earlier call are not added again); with this process's part among them, its
    gradients come from the workers' alone."""
    x, y = _batch(3)
    model = _gpt()
    with DataParallel(model) as data_parallel:
        data_parallel.forward_backward(x, y)              # every process gives gradients once
        model.zero_grad()
        y = y.copy()
        y[ignored] = -100
        got = data_parallel.forward_backward(x, y)
    reference = _gpt()
    _, loss = reference(x, y)
    loss.backward()
    assert float(got) == pytest.approx(loss.item(), rel=1e-12)
    _assert_same_grads(reference, model)


@pytest.mark.parametrize("overlap", [True, False])
def test_gradients_add_to_what_is_there(cores, overlap):
    """As backward() does: a second micro-batch adds to the gradients of the first."""
    x, y = _batch(4)
    whole, cut = _gpt(), _gpt()
    with DataParallel(cut, overlap=overlap) as data_parallel:
        for rows in (slice(0, 2), slice(2, 4)):
            _, loss = whole(x[rows], y[rows])
            loss.backward()
            data_parallel.forward_backward(x[rows], y[rows])
    _assert_same_grads(whole, cut)


def test_gradients_in_arrays_of_their_own_are_added_to(cores):
    """A .grad the caller put there (not in shared memory) stays that array and gets the sum."""
    x, y = _batch(4)
    whole, cut = _gpt(), _gpt()
    _, loss = whole(x, y)
    loss.backward()
    own = [np.ones_like(p.data) for p in cut.parameters()]
    for p, g in zip(cut.parameters(), own):
        p.grad = g
    with DataParallel(cut) as data_parallel:
        data_parallel.forward_backward(x, y)
    assert all(p.grad is g for p, g in zip(cut.parameters(), own))
    for (name, p), q in zip(whole.named_parameters(), cut.parameters()):
        np.testing.assert_allclose(q.grad, p.grad + 1, rtol=1e-10, err_msg=name)


def test_shared_step_matches_adamw_step(cores):
    """Three training steps: the step shared out over the processes gives AdamW's own step, moments too."""
    x, y = _batch(4)
    plain, shared = _gpt(), _gpt()
    plain_opt, shared_opt = (m.configure_optimizers(0.1, 1e-2, (0.9, 0.95)) for m in (plain, shared))
    with DataParallel(shared) as data_parallel:
        for _ in range(3):
            _, loss = plain(x, y)
            loss.backward()
            plain_opt.step()
            plain_opt.zero_grad()
            data_parallel.forward_backward(x, y)
            data_parallel.step(shared_opt)
            shared_opt.zero_grad()
    for (name, p), q in zip(plain.named_parameters(), shared.parameters()):
        np.testing.assert_allclose(q.data, p.data, rtol=1e-10, atol=1e-13, err_msg=name)
    for i, state in plain_opt.state.items():
        assert shared_opt.state[i]["step"] == state["step"] == 3
        for name in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_allclose(shared_opt.state[i][name], state[name], rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("lrs, whole", [((1e-2, 1e-2), True), ((1e-2, 3e-3), False)])
def test_shared_step_is_adamw_step_bit_for_bit(cores, lrs, whole, monkeypatch):
    """float32, the gradients given: the shared step writes exactly AdamW's numbers, with the blocks
    updated whole (the groups differ only in weight decay) or parameter by parameter (they do not)."""
    plain, shared = _gpt("float32"), _gpt("float32")
    plain_opt, shared_opt = (m.configure_optimizers(0.1, lrs[0], (0.9, 0.95)) for m in (plain, shared))
    for optimizer in (plain_opt, shared_opt):
        optimizer.param_groups[1]["lr"] = lrs[1]
    r = np.random.default_rng(3)
    with DataParallel(shared) as data_parallel:
        calls = []
        update_whole = DataParallel._update_whole
        monkeypatch.setattr(DataParallel, "_update_whole", lambda *a: calls.append(1) or update_whole(*a))
        for _ in range(2):
            for i, (p, q) in enumerate(zip(plain.parameters(), shared.parameters())):
                p.grad = r.standard_normal(p.shape).astype("float32")
                q.grad = data_parallel.grads.arrays[i]       # where backward would have written it
                q.grad[...] = p.grad
            plain_opt.step()
            data_parallel.step(shared_opt)
        assert bool(calls) == whole
    for (name, p), q in zip(plain.named_parameters(), shared.parameters()):
        np.testing.assert_array_equal(q.data, p.data, err_msg=name)
    for i, state in plain_opt.state.items():
        for name in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(shared_opt.state[i][name], state[name])


def test_replaced_arrays_come_back_into_shared_memory(cores):
    """load_state_dict replaces the weights' and the moments' arrays: the next calls use the new values."""
    x, y = _batch(4)
    model, reference = _gpt(seed=0), _gpt(seed=1)
    optimizer, reference_opt = (m.configure_optimizers(0.1, 1e-2, (0.9, 0.95)) for m in (model, reference))
    _, loss = reference(x, y)
    loss.backward()
    reference_opt.step()                     # a state to load
    reference_opt.zero_grad()
    with DataParallel(model) as data_parallel:
        data_parallel.forward_backward(x, y)
        data_parallel.step(optimizer)
        optimizer.zero_grad()
        model.load_state_dict(reference.state_dict())
        optimizer.load_state_dict(reference_opt.state_dict())
        data_parallel.forward_backward(x, y)
        data_parallel.step(optimizer)
        shared = data_parallel.weights.arrays
        assert all(p.data is a for p, a in zip(model.parameters(), shared))
    _, loss = reference(x, y)
    loss.backward()
    reference_opt.step()
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        np.testing.assert_allclose(q.data, p.data, rtol=1e-10, atol=1e-13, err_msg=name)


def test_dropout_runs_are_repeatable(cores):
    x, y = _batch(4)
    runs = []
    for _ in range(2):
        model = _gpt(dropout=0.5)
        with DataParallel(model) as data_parallel:
            loss = data_parallel.forward_backward(x, y)
        runs.append((float(loss), [p.grad.copy() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(a, b)
    whole = _gpt(dropout=0.0)
    _, loss = whole(x, y)
    assert runs[0][0] != pytest.approx(loss.item(), rel=1e-6)      # the masks did drop something


def test_one_process_is_a_plain_step():
    x, y = _batch(3)
    whole, cut = _gpt("float32"), _gpt("float32")
    _, loss = whole(x, y)
    loss.backward()
    data_parallel = DataParallel(cut)
    assert data_parallel.worker_pids == []
    got = data_parallel.forward_backward(x, y)
    assert float(got) == loss.item()
    for p, q in zip(whole.parameters(), cut.parameters()):
        np.testing.assert_array_equal(q.grad, p.grad)


def test_a_worker_error_reaches_the_caller_and_the_workers_go_on(cores):
    x, y = _batch(4)
    bad = x.copy()
    bad[3, 0] = 99                           # out of range, in the worker's rows
    with DataParallel(_gpt()) as data_parallel:
        with pytest.raises(ValueError, match=r"worker process \d+: GPT: idx holds the id 99"):
            data_parallel.forward_backward(bad, y)
        data_parallel.model.zero_grad()
        assert np.isfinite(data_parallel.forward_backward(x, y))   # the next call is served as usual


def test_bad_input_is_refused_with_a_reason(cores):
    x, y = _batch(4)
    with DataParallel(_gpt()) as data_parallel:
        with pytest.raises(ValueError, match="one shape"):
            data_parallel.forward_backward(x, y[:, :3])
        with pytest.raises(TypeError, match="integers"):
            data_parallel.forward_backward(x.astype(float), y)
    mixed = _gpt()
    mixed.lm_head.weight.data = mixed.lm_head.weight.data.astype("float32")
    with pytest.raises(TypeError, match="one NumPy array dtype"):
        DataParallel(mixed)


def test_gradients_are_written_into_shared_memory(cores):
    """Backward writes this process's gradients into the shared block the workers read (no copy),
    until close() gives the parameters new arrays again."""
    x, y = _batch(4)
    model = _gpt()
    data_parallel = DataParallel(model)
    data_parallel.forward_backward(x, y)
    assert all(p.grad is home for p, home in zip(model.parameters(), data_parallel.grads.arrays))
    data_parallel.close()
    assert all(not p._grad_hooks for p in model.parameters())   # close() took its hooks off
    model.zero_grad()
    _, loss = model(x, y)
    loss.backward()
    assert all(p.grad_home is None and p.grad is not home for p, home in zip(model.parameters(),
                                                                             data_parallel.grads.arrays))


def test_close_ends_the_workers(cores):
    data_parallel = DataParallel(_gpt())
    (pid,) = data_parallel.worker_pids
    data_parallel.close()
    with pytest.raises(ChildProcessError):   # reaped: no such child any more
        os.waitpid(pid, os.WNOHANG)
    data_parallel.close()                    # a second close does nothing


def test_a_dead_worker_is_reported(cores):
    x, y = _batch(4)
    data_parallel = DataParallel(_gpt())
    (pid,) = data_parallel.worker_pids
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.1)
    with pytest.raises(RuntimeError, match=f"worker process {pid} died"):
        data_parallel.forward_backward(x, y)
    data_parallel.close()


@pytest.mark.parametrize("poll_seconds", [0.0, 1.0])
def test_reads_wait_for_late_data_and_see_a_closed_pipe(monkeypatch, poll_seconds):
    """_read polls a non-blocking pipe for a while, then sleeps: either way it gets bytes written later,
    in pieces, and None once the pipe closes."""
    import threading

    from tinyllm import data_parallel
    monkeypatch.setattr(data_parallel, "POLL_SECONDS", poll_seconds)
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)

    def write_late():
        for piece in (b"abc", b"defg"):
            time.sleep(0.02)
            os.write(write_end, piece)
        os.close(write_end)
    writer = threading.Thread(target=write_late)
    writer.start()
    assert data_parallel._read(read_end, 7) == b"abcdefg"
    assert data_parallel._read(read_end, 1) is None
    writer.join()
    os.close(read_end)
