"""tinyllm.rng: the counter-based numbers of dropout masks (a pure function of seed, step, call and
element index), their distribution, and the same bits on NumPy and on the CuPy stand-in; and the
deterministic GPU scatter-add of tinyllm.backend."""
import math

import numpy as np
import pytest

from tinyllm import backend, rng


def test_uniform_is_a_pure_function_of_seed_step_call_and_index():
    a = rng.uniform(np, (3, 1000), seed=5, step=7, call=2)
    assert a.dtype == np.float32 and a.shape == (3, 1000)
    np.testing.assert_array_equal(a, rng.uniform(np, (3, 1000), seed=5, step=7, call=2))
    # element i does not depend on the shape asked for: a longer draw starts with the shorter one
    np.testing.assert_array_equal(rng.uniform(np, (3000,), 5, 7, 2)[:1000], a.reshape(-1)[:1000])
    for other in [(6, 7, 2), (5, 8, 2), (5, 7, 3), (5, 2, 7)]:
        assert not np.array_equal(a, rng.uniform(np, (3, 1000), *other)), other


def test_uniform_known_values():
    """Pinned bits: a GPU kernel twin of this hash must give exactly these."""
    key = rng.stream_key(0, 0, 0)
    assert key == rng._mix64(rng._mix64(rng._mix64(1) ^ 2) ^ 3)
    bits = rng.random_bits(np, 3, 12345)
    expected = [rng._mix64((12345 + (i + 1) * rng._GAMMA) % 2**64) for i in range(3)]
    assert [int(b) for b in bits] == expected


def test_uniform_distribution():
    n = 1 << 20
    u = rng.uniform(np, (n,), seed=1, step=0, call=0).astype(np.float64)
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    counts = np.bincount((u * 64).astype(int), minlength=64)
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum()
    assert chi2 < 130                           # 63 degrees of freedom: p < 1e-6 above ~125
    lag = np.corrcoef(u[:-1], u[1:])[0, 1]      # neighbours (what a mask row sees) are uncorrelated
    assert abs(lag) < 5 / math.sqrt(n)
    v = rng.uniform(np, (n,), seed=1, step=0, call=1).astype(np.float64)
    assert abs(np.corrcoef(u, v)[0, 1]) < 5 / math.sqrt(n)    # consecutive calls: unrelated streams


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_keeps_one_minus_p_scaled(p):
    rng.manual_seed(3)
    mask = rng.dropout_mask(np, (256, 1024), p)
    kept = mask != 0
    assert abs(kept.mean() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / mask.size)
    np.testing.assert_allclose(mask[kept], 1.0 / (1.0 - p), rtol=1e-6)
    assert mask.dtype == np.float32


def test_dropout_counter_advances_and_restarts_per_step():
    rng.manual_seed(9)
    rng.begin_step(4)
    first, second = rng.dropout_mask(np, (100,), 0.5), rng.dropout_mask(np, (100,), 0.5)
    assert rng.counter() == (4, 2) and not np.array_equal(first, second)
    np.testing.assert_array_equal(first, rng.dropout_mask(np, (100,), 0.5, seed=9, step=4, call=0))
    state = rng.get_state()
    third = rng.dropout_mask(np, (100,), 0.5)
    rng.manual_seed(0)
    rng.set_state(state)                        # a checkpoint restores the counter with the seed
    np.testing.assert_array_equal(rng.dropout_mask(np, (100,), 0.5), third)
    rng.begin_step(4)
    np.testing.assert_array_equal(rng.dropout_mask(np, (100,), 0.5), first)
    with pytest.raises(ValueError, match="all of seed, step and call"):
        rng.dropout_mask(np, (3,), 0.5, seed=1)
    rng.set_state({"seed": 2, "host": np.random.default_rng(2).bit_generator.state})   # an older checkpoint
    assert rng.counter() == (0, 0)


def test_counter_based_numbers_are_the_same_on_the_cupy_stand_in(cupy_standin):
    cp = cupy_standin.cupy
    with cupy_standin.record() as r:
        on_device = rng.uniform(cp, (64, 33), seed=11, step=3, call=1)
        mask = rng.dropout_mask(cp, (64, 33), 0.25, seed=11, step=3, call=1)
    assert type(on_device) is cp.ndarray and r.n_syncs == 0        # drawn on the device, no wait
    np.testing.assert_array_equal(on_device.get(), rng.uniform(np, (64, 33), seed=11, step=3, call=1))
    np.testing.assert_array_equal(mask.get(), rng.dropout_mask(np, (64, 33), 0.25, seed=11, step=3, call=1))


def test_device_generator_follows_the_array_module(cupy_standin):
    rng.manual_seed(1)
    g = rng.for_array_module(cupy_standin.cupy)
    assert rng.for_array_module(cupy_standin.cupy) is g
    assert rng.for_array_module(np) is rng.host()


# ---------------------------------------------------------------------------------------------
# backend.scatter_add on a GPU: sums of repeated rows in a fixed order


def test_gpu_scatter_add_of_rows_matches_numpy_and_gives_each_row_one_number(cupy_standin, monkeypatch):
    cp = cupy_standin.cupy
    r = np.random.default_rng(0)
    ids = r.integers(0, 9, 300)
    ids[:40] = 4                                # a long run of one id
    rows = r.standard_normal((300, 6)).astype(np.float32)
    expected = np.zeros((11, 6), np.float32)
    np.add.at(expected, ids, rows)
    seen = []
    real_scatter = cupy_standin.cupyx.scatter_add

    def spy(target, index, values):             # what reaches the (atomic, on a GPU) scatter-add
        seen.append((index.copy(), values.copy()))
        real_scatter(target, index, values)
    monkeypatch.setattr(cupy_standin.cupyx, "scatter_add", spy)
    target = cp.zeros((11, 6), dtype=cp.float32)
    with cupy_standin.record() as rec:
        backend.scatter_add(target, cp.asarray(ids), cp.asarray(rows))
    assert rec.n_syncs == 0
    np.testing.assert_allclose(target.get(), expected, rtol=1e-5, atol=1e-5)
    (index, values), = [(i.get(), v.get()) for i, v in seen]
    nonzero_rows = np.abs(values).sum(axis=1) != 0
    # every row of the target receives at most one non-zero addend: the atomic adds' order cannot matter
    assert np.bincount(index[nonzero_rows], minlength=11).max() <= 1
    again = cp.zeros((11, 6), dtype=cp.float32)
    backend.scatter_add(again, cp.asarray(ids), cp.asarray(rows))
    np.testing.assert_array_equal(again.get(), target.get())


def test_gpu_scatter_add_other_keys_still_add_up(cupy_standin):
    cp = cupy_standin.cupy
    target = cp.zeros((3, 4), dtype=cp.float32)
    backend.scatter_add(target, (cp.asarray([0, 0, 2]), cp.asarray([1, 1, 3])), cp.ones(3, dtype=cp.float32))
    expected = np.zeros((3, 4), np.float32)
    expected[0, 1], expected[2, 3] = 2, 1
    np.testing.assert_array_equal(target.get(), expected)
