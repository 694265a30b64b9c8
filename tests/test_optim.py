import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyllm.optim import (
    AdamW,
    clip_grad_norm_,
    cosine_lr,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
)
from tinyllm.safetensors_io import load_file, save_file


class P:
    """The smallest parameter: values and an optional gradient."""

    def __init__(self, data):
        self.data = np.array(data)
        self.grad = None


def make_params(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return [P(rng.standard_normal(shape).astype(dtype)) for shape in [(4, 3), (3,), (2, 5), (5,)]]


def reference_adamw(params, grads, lr, betas, eps, wd, state):
    """The update written out directly, in float64, one parameter at a time."""
    b1, b2 = betas
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        s = state.setdefault(i, {"t": 0, "m": np.zeros_like(p), "v": np.zeros_like(p)})
        s["t"] += 1
        t = s["t"]
        p *= 1 - lr[i] * wd[i]
        s["m"] = b1 * s["m"] + (1 - b1) * g
        s["v"] = b2 * s["v"] + (1 - b2) * g * g
        m_hat = s["m"] / (1 - b1**t)
        v_hat = s["v"] / (1 - b2**t)
        p -= lr[i] * m_hat / (np.sqrt(v_hat) + eps)


def test_matches_formula_with_groups_lr_changes_and_missing_grads():
    params = make_params()
    decay, no_decay = params[0::2], params[1::2]
    opt = AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "eps": 1e-6}],
        lr=3e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    order = decay + no_decay  # the optimizer's parameter numbering
    ref = [p.data.copy() for p in order]
    ref_state = {"a": {}, "b": {}}
    rng = np.random.default_rng(1)
    for step in range(8):
        lr = 3e-3 * (step + 1) / 8
        for group in opt.param_groups:
            group["lr"] = lr
        grads = [rng.standard_normal(p.data.shape) for p in order]
        if step in (2, 5):
            grads[1] = None  # this parameter gets no gradient on these steps
        for p, g in zip(order, grads):
            p.grad = g
        opt.step()
        # eps differs per group, so run the reference group by group.
        reference_adamw(ref[:2], grads[:2], [lr] * 2, (0.9, 0.95), 1e-8, [0.1, 0.1], ref_state["a"])
        reference_adamw(ref[2:], grads[2:], [lr] * 2, (0.9, 0.95), 1e-6, [0.0, 0.0], ref_state["b"])
        for p, r in zip(order, ref):
            np.testing.assert_allclose(p.data, r, rtol=1e-13, atol=1e-15)
    assert opt.state[1]["step"] == 6  # skipped twice
    assert opt.state[0]["step"] == 8


def test_parameter_without_grad_gets_no_state_and_no_decay():
    a, b = P(np.ones(3)), P(np.ones(3))
    opt = AdamW([a, b], lr=0.1, weight_decay=0.5)
    a.grad = np.ones(3)
    opt.step()
    np.testing.assert_array_equal(b.data, np.ones(3))
    assert set(opt.state) == {0}


def test_updates_in_place_and_keeps_float32():
    params = make_params(np.float32)
    arrays = [p.data for p in params]
    opt = AdamW(params, lr=np.float64(1e-2))  # a float64 scalar must not promote float32 params
    for p in params:
        p.grad = np.ones_like(p.data)
    opt.param_groups[0]["lr"] = np.float64(2e-2)
    opt.step()
    for p, array in zip(params, arrays):
        assert p.data is array
        assert p.data.dtype == np.float32
        assert opt.state[0]["exp_avg"].dtype == np.float32


def test_zero_grad():
    params = make_params()
    opt = AdamW(params)
    for p in params:
        p.grad = np.ones_like(p.data)
    opt.zero_grad(set_to_none=False)
    assert all(np.all(p.grad == 0) for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_defaults_are_filled_in_like_torch():
    params = make_params()
    opt = AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], lr=0.1, betas=(0.8, 0.9))
    assert opt.param_groups[0]["lr"] == 0.1
    assert opt.param_groups[1]["lr"] == 0.5
    assert opt.param_groups[1]["betas"] == (0.8, 0.9)
    assert opt.param_groups[1]["eps"] == 1e-8
    assert opt.param_groups[1]["weight_decay"] == 0.01


def test_constructor_errors():
    params = make_params()
    with pytest.raises(ValueError, match="empty"):
        AdamW([])
    with pytest.raises(ValueError, match="more than one"):
        AdamW([{"params": params[:2]}, {"params": params[1:]}])
    with pytest.raises(ValueError, match="learning rate"):
        AdamW(params, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        AdamW(params, betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="single"):
        AdamW(params[0])
    with pytest.raises(TypeError, match=".data and .grad"):
        AdamW([np.zeros(3)])


@pytest.mark.parametrize("block", [1, 5, 7])
def test_update_in_blocks_and_stretches_is_the_whole_update(block, monkeypatch):
    """Any cut of the parameters taken end to end (blocks, stretches, non-contiguous arrays) gives the same step."""
    from tinyllm import optim
    params, cut = make_params(), make_params()
    cut[2].data = np.asfortranarray(cut[2].data)          # not contiguous: updated whole, never cut
    for ps in (params, cut):
        for i, p in enumerate(ps):
            p.grad = np.random.default_rng(10 + i).standard_normal(p.data.shape)
    whole, blocks = AdamW(params, lr=0.1, weight_decay=0.1), AdamW(cut, lr=0.1, weight_decay=0.1)
    for _ in range(2):
        whole.step()
        monkeypatch.setattr(optim, "UPDATE_BLOCK", block)
        updates = blocks.updates()
        total = sum(p.data.size for p in cut)
        for i, j in [(0, 5), (5, 20), (20, total)]:        # stretches that cut the first and third parameters
            optim.update_stretch(updates, i, j)
        monkeypatch.undo()
    for p, q in zip(params, cut):
        np.testing.assert_allclose(q.data, p.data, rtol=1e-14, atol=1e-15)


def test_matches_torch_adamw():
    torch = pytest.importorskip("torch")
    params = make_params(seed=3)
    tparams = [torch.tensor(p.data.copy(), dtype=torch.float64, requires_grad=True) for p in params]
    groups = lambda ps: [  # noqa: E731
        {"params": ps[:2], "weight_decay": 0.1},
        {"params": ps[2:], "weight_decay": 0.0, "lr": 2e-3},
    ]
    opt = AdamW(groups(params), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    topt = torch.optim.AdamW(groups(tparams), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    rng = np.random.default_rng(4)
    for step in range(10):
        for group, tgroup in zip(opt.param_groups, topt.param_groups):
            group["lr"] = tgroup["lr"] = 1e-2 * (0.9**step)
        for i, (p, tp) in enumerate(zip(params, tparams)):
            if step == 4 and i == 3:
                p.grad, tp.grad = None, None
                continue
            g = rng.standard_normal(p.data.shape) * 10.0 ** rng.integers(-3, 2)
            p.grad = g
            tp.grad = torch.tensor(g)
        opt.step()
        topt.step()
        for p, tp in zip(params, tparams):
            np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-12)


def run_steps(opt, params, rng, n):
    for _ in range(n):
        for p in params:
            p.grad = rng.standard_normal(p.data.shape).astype(p.data.dtype)
        opt.step()


def test_state_dict_round_trip_through_safetensors_continues_bit_identically(tmp_path):
    params = make_params(np.float32)
    opt = AdamW([{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}], lr=1e-2)
    rng = np.random.default_rng(5)
    run_steps(opt, params, rng, 3)
    opt.param_groups[0]["lr"] = 5e-3

    arrays, meta = optimizer_state_to_flat(opt.state_dict())
    meta = json.loads(json.dumps(meta))  # the JSON part really is JSON
    save_file(arrays, tmp_path / "opt.safetensors")
    clones = [P(p.data.copy()) for p in params]
    opt2 = AdamW([{"params": clones[:3]}, {"params": clones[3:]}], lr=1.0)
    opt2.load_state_dict(optimizer_state_from_flat(load_file(tmp_path / "opt.safetensors"), meta))
    assert opt2.param_groups[0]["lr"] == 5e-3
    assert opt2.param_groups[1]["weight_decay"] == 0.0
    assert opt2.param_groups[0]["betas"] == (0.9, 0.999)

    state = rng.bit_generator.state
    run_steps(opt, params, rng, 4)
    rng.bit_generator.state = state
    run_steps(opt2, clones, rng, 4)
    for p, c in zip(params, clones):
        assert p.data.tobytes() == c.data.tobytes()


def test_state_dict_layout():
    params = make_params()
    opt = AdamW(params[:3])
    params[1].grad = np.ones(3)
    opt.step()
    sd = opt.state_dict()
    assert list(sd["state"]) == [1]
    assert sd["state"][1]["step"] == 1
    assert sd["param_groups"][0]["params"] == [0, 1, 2]
    arrays, meta = optimizer_state_to_flat(sd)
    assert set(arrays) == {"state.1.exp_avg", "state.1.exp_avg_sq"}
    assert meta["steps"] == {"1": 1}


def test_load_state_dict_errors():
    params = make_params()
    opt = AdamW([{"params": params[:2]}, {"params": params[2:]}])
    for p in params:
        p.grad = np.ones_like(p.data)
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="2 param groups, this optimizer has 1"):
        AdamW(make_params()).load_state_dict(sd)
    other = make_params()
    with pytest.raises(ValueError, match="param group 0: optimizer state has 2 parameters, this optimizer has 1"):
        AdamW([{"params": other[:1]}, {"params": other[1:]}]).load_state_dict(sd)
    other = make_params()
    other[0].data = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"shape \(4, 3\), the parameter has shape \(3, 4\)"):
        AdamW([{"params": other[:2]}, {"params": other[2:]}]).load_state_dict(sd)
    arrays, meta = optimizer_state_to_flat(sd)
    del arrays["state.2.exp_avg"]
    with pytest.raises(ValueError, match="state.2.exp_avg"):
        optimizer_state_from_flat(arrays, meta)


# ---------------------------------------------------------------- clipping


def test_clip_grad_norm_scales_by_torch_rule():
    params = make_params()
    rng = np.random.default_rng(6)
    grads = [rng.standard_normal(p.data.shape) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.copy()
    params.append(P(np.ones(2)))  # no gradient: ignored
    norm = clip_grad_norm_(params, 1.0)
    expected = math.sqrt(sum(float((g * g).sum()) for g in grads))
    assert isinstance(norm, float)
    assert norm == pytest.approx(expected, rel=1e-12)
    for p, g in zip(params, grads):
        np.testing.assert_allclose(p.grad, g * (1.0 / (expected + 1e-6)), rtol=1e-12)


def test_clip_grad_norm_leaves_small_gradients_alone():
    p = P(np.zeros(2))
    p.grad = np.array([0.3, 0.4])
    assert clip_grad_norm_([p], 1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(p.grad, [0.3, 0.4])
    assert clip_grad_norm_([P(np.zeros(1))], 1.0) == 0.0


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_clip_grad_norm_non_finite(bad):
    a, b = P(np.zeros(2)), P(np.zeros(2))
    a.grad = np.array([1.0, bad])
    b.grad = np.array([3.0, 4.0])
    norm = clip_grad_norm_([a, b], 1.0)
    assert not math.isfinite(norm)
    np.testing.assert_array_equal(b.grad, [3.0, 4.0])  # untouched


def test_clip_grad_norm_float16_does_not_overflow():
    p = P(np.zeros(4, np.float16))
    p.grad = np.full(4, 300.0, np.float16)  # 300² overflows float16
    assert clip_grad_norm_([p], 1.0) == pytest.approx(600.0)
    assert p.grad.dtype == np.float16


def test_clip_grad_norm_matches_torch():
    torch = pytest.importorskip("torch")
    params = make_params(seed=7)
    tparams = [torch.tensor(p.data, requires_grad=True) for p in params]
    rng = np.random.default_rng(8)
    for p, tp in zip(params, tparams):
        g = rng.standard_normal(p.data.shape)
        p.grad, tp.grad = g.copy(), torch.tensor(g)
    norm = clip_grad_norm_(params, 0.5)
    tnorm = torch.nn.utils.clip_grad_norm_(tparams, 0.5)
    assert norm == pytest.approx(float(tnorm), rel=1e-12)
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-12)


# ---------------------------------------------------------------- schedule


def lr_at(step, **overrides):
    kwargs = dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110)
    kwargs.update(overrides)
    return cosine_lr(step, **kwargs)


def test_cosine_lr_boundaries():
    assert lr_at(0) == pytest.approx(1e-4)  # max_lr / warmup, never 0
    assert lr_at(4) == pytest.approx(5e-4)
    assert lr_at(9) == pytest.approx(1e-3)
    assert lr_at(10) == pytest.approx(1e-3)
    assert lr_at(60) == pytest.approx(5.5e-4)  # halfway through the cosine
    assert lr_at(110) == pytest.approx(1e-4)
    assert lr_at(10_000) == 1e-4
    assert lr_at(0, warmup_steps=0) == pytest.approx(1e-3)
    assert lr_at(5, warmup_steps=10, decay_steps=5) == pytest.approx(6e-4)  # still warming up
    assert lr_at(10, warmup_steps=10, decay_steps=5) == 1e-4
    with pytest.raises(ValueError):
        lr_at(-1)


@given(st.integers(0, 200))
def test_cosine_lr_is_bounded_and_decreasing_after_warmup(step):
    lr = lr_at(step)
    assert 0 < lr <= 1e-3 * (1 + 1e-12)
    if step >= 10:
        assert lr_at(step + 1) <= lr
        assert lr >= 1e-4


# ---------------------------------------------------------------- GPU (skipped without CuPy and a GPU)


@pytest.mark.gpu
def test_adamw_and_clipping_on_cupy_match_numpy():
    cupy = pytest.importorskip("cupy")
    host = make_params(np.float32, seed=9)
    device = [P(h.data) for h in host]
    for d in device:
        d.data = cupy.asarray(d.data)  # the same values, on the GPU
    opt_host = AdamW([{"params": host[:2]}, {"params": host[2:], "weight_decay": 0.0}], lr=1e-2)
    opt_device = AdamW([{"params": device[:2]}, {"params": device[2:], "weight_decay": 0.0}], lr=1e-2)
    rng = np.random.default_rng(10)
    for _ in range(3):
        for d, h in zip(device, host):
            h.grad = rng.standard_normal(h.data.shape).astype(np.float32) * 5
            d.grad = cupy.asarray(h.grad)
        norm_host = clip_grad_norm_(host, 1.0)
        norm_device = clip_grad_norm_(device, 1.0)
        assert norm_device == pytest.approx(norm_host, rel=1e-5)
        opt_host.step()
        opt_device.step()
    for d, h in zip(device, host):
        assert isinstance(d.data, cupy.ndarray) and d.data.dtype == cupy.float32
        np.testing.assert_allclose(d.data.get(), h.data, rtol=1e-5, atol=1e-6)
    assert isinstance(opt_device.state[0]["exp_avg"], cupy.ndarray)

    # Host arrays (as read from a checkpoint) load onto the device.
    arrays, meta = optimizer_state_to_flat(opt_device.state_dict())
    host_arrays = {k: v.get() for k, v in arrays.items()}
    opt_device.load_state_dict(optimizer_state_from_flat(host_arrays, meta))
    assert isinstance(opt_device.state[0]["exp_avg_sq"], cupy.ndarray)
