"""Fused layers (tinyllm/nn/functional.py): gradchecks, agreement with the same layers composed from
primitive ops (tinyllm/nn/reference.py), numerical stability, dtypes, error messages, PyTorch."""
import math
import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinyllm as tl
import tinyllm.cases.layers as layer_cases
import tinyllm.nn.functional as F
from tinyllm.cases import CaseBuilder
from tinyllm.gradcheck import gradcheck_report
from tinyllm.nn import reference as R

CASE_FUNCTIONS = [layer_cases.linear, layer_cases.embedding, layer_cases.norms, layer_cases.activations,
                  layer_cases.softmaxes, layer_cases.cross_entropy, layer_cases.dropout, layer_cases.attention]


def leaf(array, dtype="float64"):
    return tl.tensor(np.asarray(array), requires_grad=True, dtype=dtype)


def run(fn, arrays, upstream_seed=0, consts=()):
    """Forward fn on fresh float64 leaves, backward a random upstream gradient: (value, grads)."""
    leaves = [leaf(a) for a in arrays]
    y = fn(*leaves, *consts)
    g = np.random.default_rng(upstream_seed).standard_normal(y.shape)
    y.backward(g)
    return y.numpy(), [t.grad for t in leaves]


def assert_same(fused, composed, arrays, consts=(), tol=1e-12):
    """The fused op and its composed reference agree on values and on every input gradient."""
    y1, g1 = run(fused, arrays, consts=consts)
    y2, g2 = run(composed, arrays, consts=consts)
    np.testing.assert_allclose(y1, y2, rtol=tol, atol=tol)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


rng = np.random.default_rng(1234)


def randn(*shape):
    return rng.standard_normal(shape)


# ---------------------------------------------------------------------------------------------
# gradcheck: every registered case, worst error < 1e-6


@pytest.mark.parametrize("case_fn", CASE_FUNCTIONS, ids=lambda f: f.__name__)
def test_layer_gradcheck_cases(case_fn):
    for label, fn, inputs in case_fn(CaseBuilder()):
        result = gradcheck_report(fn, inputs)
        assert not result.failures, f"{label}: {result.failures[0]}"
        assert result.worst_error < 1e-6, label


def test_every_fused_op_has_a_case():
    ops_seen = set()
    for case_fn in CASE_FUNCTIONS:
        for label, fn, inputs in case_fn(CaseBuilder()):
            ops_seen |= gradcheck_report(fn, inputs).ops
    fused = {"Linear", "Embedding", "LayerNorm", "RMSNorm", "GELU", "SiLU", "Softmax", "LogSoftmax",
             "CrossEntropy", "Dropout", "ScaledDotProductAttention", "SelfAttention"}
    assert fused <= ops_seen
    assert fused <= set(tl.OPS)


# ---------------------------------------------------------------------------------------------
# fused == composed from primitive ops (values and gradients, float64)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("x_shape", [(5,), (4, 5), (2, 3, 5), (2, 1, 3, 5)])
def test_linear_matches_composed(x_shape, with_bias):
    arrays = [randn(*x_shape), randn(3, 5)] + ([randn(3)] if with_bias else [])
    assert_same(F.linear, R.linear, arrays)


def test_embedding_matches_composed_with_repeated_ids():
    ids = np.array([[1, 1, 3, 0], [3, 3, 3, 5]])
    assert_same(lambda w: F.embedding(ids, w), lambda w: R.embedding(ids, w), [randn(6, 4)])
    y, (g,) = run(lambda w: F.embedding(ids, w), [randn(6, 4)])
    assert y.shape == (2, 4, 4)
    up = np.random.default_rng(0).standard_normal((2, 4, 4))
    np.testing.assert_allclose(g[3], up[0, 2] + up[1, 0] + up[1, 1] + up[1, 2])
    np.testing.assert_array_equal(g[2], 0)


def test_embedding_accepts_int_tensor_and_int32():
    w = leaf(randn(5, 2))
    ids = tl.tensor(np.array([4, 0, 4], dtype=np.int32))
    np.testing.assert_array_equal(F.embedding(ids, w).numpy(), w.numpy()[[4, 0, 4]])
    np.testing.assert_array_equal(F.embedding(np.uint16(3) + np.zeros(2, np.uint16), w).numpy(), w.numpy()[[3, 3]])


@pytest.mark.parametrize("weight, bias", [(True, True), (True, False), (False, True), (False, False)])
def test_layer_norm_matches_composed(weight, bias):
    C = 6
    arrays = [randn(2, 3, C)] + ([randn(C)] if weight else []) + ([randn(C)] if bias else [])

    def call(f):
        def fn(x, *p):
            w = p[0] if weight else None
            b = p[-1] if bias else None
            return f(x, w, b)
        return fn
    assert_same(call(F.layer_norm), call(R.layer_norm), arrays)


@pytest.mark.parametrize("weight", [True, False])
def test_rms_norm_matches_composed(weight):
    arrays = [randn(3, 2, 7)] + ([randn(7)] if weight else [])
    assert_same(F.rms_norm, R.rms_norm, arrays)


@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_activations_match_composed(name):
    x = randn(4, 9) * 3
    x[0, :3] = [0.0, 30.0, -30.0]
    assert_same(getattr(F, name), getattr(R, name), [x])


@pytest.mark.parametrize("axis", [-1, 0, 1])
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmaxes_match_composed(name, axis):
    assert_same(lambda x: getattr(F, name)(x, axis=axis), lambda x: getattr(R, name)(x, axis=axis), [randn(3, 4, 5)])


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5)])
def test_cross_entropy_matches_composed(shape):
    targets = np.random.default_rng(3).integers(0, 5, shape[:-1])
    targets.reshape(-1)[[1, 4]] = -100
    assert_same(lambda z: F.cross_entropy(z, targets), lambda z: R.cross_entropy(z, targets), [randn(*shape) * 3])


def test_dropout_matches_composed_with_the_same_seed():
    def with_seed(f):
        def fn(x):
            tl.manual_seed(7)
            return f(x, 0.25)
        return fn
    assert_same(with_seed(F.dropout), with_seed(R.dropout), [randn(5, 8)])


ATTENTION_SHAPES = [  # B, H, Hkv, T, S, D
    (2, 2, 2, 4, 4, 3),   # MHA
    (1, 4, 2, 3, 3, 4),   # GQA
    (2, 3, 1, 5, 5, 2),   # MQA
    (1, 4, 2, 2, 6, 3),   # GQA, S > T (a KV cache)
    (2, 2, 1, 1, 7, 4),   # one new token against a cache
]


@pytest.mark.parametrize("split_min", [F.SPLIT_MIN_QUERIES, 2])  # 2: causal queries in two blocks from T = 2
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B, H, Hkv, T, S, D", ATTENTION_SHAPES)
def test_attention_matches_composed(B, H, Hkv, T, S, D, causal, split_min):
    arrays = [randn(B, H, T, D), randn(B, Hkv, S, D), randn(B, Hkv, S, D)]
    assert_same(lambda q, k, v: F.ScaledDotProductAttention(causal, split_min)(q, k, v),
                lambda q, k, v: R.scaled_dot_product_attention(q, k, v, causal=causal), arrays)


@pytest.mark.parametrize("Hkv", [4, 2])
def test_causal_attention_splits_long_queries_and_skips_unseen_keys(Hkv):
    B, H, T, D = 1, 4, F.SPLIT_MIN_QUERIES + 2, 3
    arrays = [randn(B, H, T, D), randn(B, Hkv, T, D), randn(B, Hkv, T, D)]
    assert_same(F.ScaledDotProductAttention(causal=True), lambda q, k, v: R.scaled_dot_product_attention(q, k, v),
                arrays)
    fn = F.ScaledDotProductAttention(causal=True)
    fn(*(leaf(a) for a in arrays))
    h = T // 2
    assert fn.blocks == [(0, h, h), (h, T, T)]  # the first half of the queries never met the last keys
    assert [P.shape for P in fn.P] == [(B, Hkv, H // Hkv * h, h), (B, Hkv, H // Hkv * (T - h), T)]


def test_attention_gradient_for_some_inputs_only():
    q, k, v = leaf(randn(1, 2, 4, 3)), tl.tensor(randn(1, 1, 4, 3)), leaf(randn(1, 1, 4, 3))
    F.scaled_dot_product_attention(q, k, v).sum().backward()
    assert q.grad is not None and v.grad is not None and k.grad is None


def test_attention_on_transposed_views_as_the_model_passes_them():
    """q, k, v as (B, T, heads, D) -> (B, heads, T, D) transposed views; the upstream gradient too."""
    B, T, H, Hkv, D = 2, 5, 4, 2, 3
    arrays = [randn(B, T, H, D), randn(B, T, Hkv, D), randn(B, T, Hkv, D)]
    up = np.random.default_rng(0).standard_normal((B, T, H, D))

    def run_with(f):
        leaves = [leaf(a) for a in arrays]
        q, k, v = (t.transpose(0, 2, 1, 3) for t in leaves)
        y = f(q, k, v).transpose(0, 2, 1, 3)   # back to (B, T, H, D): gy arrives transposed
        y.backward(up)
        return y.numpy(), [t.grad for t in leaves]
    y1, g1 = run_with(F.scaled_dot_product_attention)
    y2, g2 = run_with(R.scaled_dot_product_attention)
    np.testing.assert_allclose(y1, y2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_causal_attention_is_aligned_to_the_end_as_a_kv_cache_needs():
    """The last T queries against all S keys == the last T rows of full causal attention over S."""
    B, H, Hkv, S, D, T = 2, 4, 2, 7, 3, 3
    q = tl.tensor(randn(B, H, S, D))
    # k and v as a KV cache holds them: the filled prefix of a longer buffer (a non-contiguous view)
    k, v = (tl.Tensor(randn(B, Hkv, S + 4, D)[:, :, :S]) for _ in range(2))
    full = F.scaled_dot_product_attention(q, k, v).numpy()
    tail = F.scaled_dot_product_attention(q[:, :, S - T:], k, v).numpy()
    np.testing.assert_allclose(tail, full[:, :, S - T:], rtol=1e-12, atol=1e-12)
    # query 0 sees only key 0: its output is v's first row of its k/v head
    np.testing.assert_allclose(full[:, :, 0], np.repeat(v.numpy()[:, :, 0], H // Hkv, axis=1), rtol=1e-12)


def _composed_self_attention(qkv, H, Hkv, rope, split_min):
    """F.self_attention the long way: slice qkv, view heads, RoPE, attention, rows back."""
    B, T, width = qkv.shape
    D = width // (H + 2 * Hkv)
    heads = [(0, H), (H * D, Hkv), ((H + Hkv) * D, Hkv)]
    q, k, v = (qkv[..., start:start + n * D].reshape(B, T, n, D).transpose(0, 2, 1, 3) for start, n in heads)
    if rope is not None:
        q, k = F.RoPE(*rope)(q), F.RoPE(*rope)(k)
    y = F.ScaledDotProductAttention(True, split_min)(q, k, v)
    return y.transpose(0, 2, 1, 3).reshape(B, T, H * D)


@pytest.mark.parametrize("with_rope", [False, True])
@pytest.mark.parametrize("split_min", [F.SPLIT_MIN_QUERIES, 2])
@pytest.mark.parametrize("H, Hkv", [(2, 2), (4, 2), (3, 1)])
def test_self_attention_matches_split_heads_and_attention(H, Hkv, split_min, with_rope):
    from tinyllm.model import rope_tables
    B, T, D = 2, 5, 4
    rope = rope_tables(T, D, theta=100.0, dtype="float64") if with_rope else None
    qkv = randn(B, T, (H + 2 * Hkv) * D)
    assert_same(lambda t: F.SelfAttention(H, Hkv, rope, split_min=split_min)(t),
                lambda t: _composed_self_attention(t, H, Hkv, rope, split_min), [qkv])


def test_self_attention_with_a_kv_cache_matches_the_full_sequence():
    """Prefill 3 positions, then 2 more one at a time: the same rows as one pass over all 5."""
    from tinyllm.model import rope_tables
    B, T, H, Hkv, D = 2, 5, 4, 2, 4
    cos, sin = rope_tables(T, D, dtype="float64")
    qkv = randn(B, T, (H + 2 * Hkv) * D)
    full = F.self_attention(tl.tensor(qkv), H, Hkv, rope=(cos, sin)).numpy()
    k_buf, v_buf = np.zeros((B, Hkv, 8, D)), np.zeros((B, Hkv, 8, D))
    parts = []
    with tl.no_grad():
        for start, end in [(0, 3), (3, 4), (4, 5)]:
            parts.append(F.self_attention(tl.tensor(qkv[:, start:end]), H, Hkv, rope=(cos[start:end], sin[start:end]),
                                          kv_cache=(k_buf, v_buf, start)).numpy())
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-12, atol=1e-12)


def test_self_attention_errors():
    qkv = tl.tensor(randn(1, 3, 12))
    with pytest.raises(ValueError, match="shared out evenly"):
        F.self_attention(qkv, 3, 2)
    with pytest.raises(ValueError, match="cannot hold"):
        F.self_attention(qkv, 3, 1)          # 12 numbers in a row cannot be 3 + 2·1 = 5 heads
    with pytest.raises(ValueError, match=r"\(B, T"):
        F.self_attention(tl.tensor(randn(3, 12)), 2)
    with pytest.raises(ValueError, match="RoPE tables"):
        F.self_attention(qkv, 2, rope=(np.ones((4, 2)), np.ones((4, 2))))
    with pytest.raises(ValueError, match="do not fit a KV cache"):
        F.self_attention(qkv, 2, kv_cache=(np.zeros((1, 2, 2, 2)), np.zeros((1, 2, 2, 2)), 0))


# ---------------------------------------------------------------------------------------------
# hypothesis over shapes and axes


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_softmax_any_axis(shape, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = np.random.default_rng(len(shape)).standard_normal(shape) * 5
    y = F.softmax(tl.tensor(x), axis=axis).numpy()
    np.testing.assert_allclose(y.sum(axis=axis), 1.0, rtol=1e-12)
    assert_same(lambda t: F.softmax(t, axis=axis), lambda t: R.softmax(t, axis=axis), [x])
    assert_same(lambda t: F.log_softmax(t, axis=axis), lambda t: R.log_softmax(t, axis=axis), [x])


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=3), C=st.integers(1, 6))
def test_norms_any_leading_shape(lead, C):
    r = np.random.default_rng(C)
    x, w, b = r.standard_normal(tuple(lead) + (C,)), r.standard_normal(C), r.standard_normal(C)
    assert_same(F.layer_norm, R.layer_norm, [x, w, b], tol=1e-10)
    assert_same(F.rms_norm, R.rms_norm, [x, w], tol=1e-10)


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=3), n_in=st.integers(1, 5), n_out=st.integers(1, 5))
def test_linear_any_leading_shape(lead, n_in, n_out):
    r = np.random.default_rng(n_in * 7 + n_out)
    x, w, b = r.standard_normal(tuple(lead) + (n_in,)), r.standard_normal((n_out, n_in)), r.standard_normal(n_out)
    assert_same(F.linear, R.linear, [x, w, b])
    assert F.linear(tl.tensor(x), tl.tensor(w)).shape == tuple(lead) + (n_out,)


# ---------------------------------------------------------------------------------------------
# numerical stability


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmaxes_and_cross_entropy_are_stable_at_huge_logits(dtype):
    x = np.array([[1e4, -1e4, 0.0, 1e4], [-1e4, -1e4, -1e4, -1e4 + 1]])
    for fn in (F.softmax, F.log_softmax):
        t = leaf(x, dtype)
        y = fn(t)
        y.backward(np.ones(x.shape))
        assert np.isfinite(y.numpy()).all() and np.isfinite(t.grad).all()
    np.testing.assert_allclose(F.softmax(tl.tensor(x)).numpy()[0], [0.5, 0, 0, 0.5])
    t = leaf(x, dtype)
    loss = F.cross_entropy(t, np.array([1, 3]))
    loss.backward()
    assert np.isfinite(loss.item()) and np.isfinite(t.grad).all()
    # row 0: target -1e4 against two logits 1e4 -> loss ≈ 2e4 + log 2; row 1: log(1 + 3e^-1) - 0
    expected = (2e4 + math.log(2) + math.log(1 + 3 * math.exp(-1))) / 2
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), dtype=st.sampled_from(["float32", "float64"]),
       transpose=st.booleans(), vecdot=st.booleans())
def test_row_helpers_match_numpy(shape, dtype, transpose, vecdot):
    """_sum_last (a product with ones), _dot_last (vecdot, or einsum without it), on any view."""
    r = np.random.default_rng(len(shape))
    a, b = (r.standard_normal(shape).astype(dtype) for _ in range(2))
    if transpose and a.ndim > 1:                     # strided views, as attention passes them
        a, b = a.swapaxes(0, -1), b.swapaxes(0, -1)
    with pytest.MonkeyPatch.context() as mp:
        if not vecdot and hasattr(np, "vecdot"):
            mp.delattr(np, "vecdot")                 # NumPy < 2 has none: the einsum way
        got_sum, got_dot = F._sum_last(a), F._dot_last(a, b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    tol = 1e-5 if dtype == "float32" else 1e-12
    assert got_sum.shape == got_dot.shape == a.shape[:-1] + (1,) and got_sum.dtype == got_dot.dtype == a.dtype
    np.testing.assert_allclose(got_sum, a64.sum(-1, keepdims=True), rtol=tol, atol=tol)
    np.testing.assert_allclose(got_dot, (a64 * b64).sum(-1, keepdims=True), rtol=tol, atol=tol)


@pytest.mark.parametrize("copy", [True, False])
def test_centred_keys_come_transposed_in_memory_while_short(copy, monkeypatch):
    monkeypatch.setattr(F, "MAX_TRANSPOSED_COPY", 4 * 3 if copy else 0)
    qkv = np.random.default_rng(5).standard_normal((2, 7, 3 * 4 * 3))
    k = qkv[..., 12:24].reshape(2, 7, 4, 3).transpose(0, 2, 1, 3)   # (B, H, T, D) view of packed rows
    kcT, vT = F._centred_keys_transposed(k[:, :, :4], 0.5), F._transposed(k[:, :, :4])
    assert kcT.shape == vT.shape == (2, 4, 3, 4)
    if copy:                                                         # (B, H, D, T): plain right operands
        assert kcT.flags.c_contiguous and vT.flags.c_contiguous
    else:                                                            # views laid out like the keys
        assert kcT.swapaxes(-1, -2).transpose(0, 2, 1, 3).flags.c_contiguous and np.shares_memory(vT, k)
    np.testing.assert_allclose(kcT, 0.5 * (k[:, :, :4] - k[:, :, :4].mean(axis=-2, keepdims=True)).swapaxes(-1, -2),
                               atol=1e-14)
    np.testing.assert_array_equal(vT, k[:, :, :4].swapaxes(-1, -2))


@pytest.mark.parametrize("shape", [(3, 10), (0, 4)])
def test_gelu_in_blocks_is_gelu_whole(shape, monkeypatch):
    r = np.random.default_rng(9)
    x, gy = r.standard_normal(shape) * 3, r.standard_normal(shape)
    results = []
    for block in (10**6, 7):                    # one block, or blocks that cut rows anywhere
        monkeypatch.setattr(F, "ELEMENTWISE_BLOCK", block)
        t = tl.tensor(x, requires_grad=True)
        y = F.gelu(t)
        y.backward(gy)
        results.append((y.data, t.grad))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_layer_norm_backward_in_row_blocks_is_the_whole_backward(monkeypatch):
    r = np.random.default_rng(10)
    x, w, b, gy = r.standard_normal((7, 5)), r.standard_normal(5), r.standard_normal(5), r.standard_normal((7, 5))
    results = []
    for block in (10**6, 2 * 5):                # all rows at once, or blocks of 2 rows (the last one short)
        monkeypatch.setattr(F, "ELEMENTWISE_BLOCK", block)
        ts = [tl.tensor(a, requires_grad=True) for a in (x, w, b)]
        F.layer_norm(*ts).backward(gy)
        results.append([t.grad for t in ts])
    for whole, blocks in zip(*results):
        np.testing.assert_allclose(blocks, whole, rtol=1e-13, atol=1e-14)


def test_attention_is_the_same_with_or_without_transposed_copies(monkeypatch):
    """Long keys take the transposed products on views, short ones on copies: the same numbers."""
    r = np.random.default_rng(8)
    qkv, gy = r.standard_normal((2, 9, 3 * 2 * 4)), r.standard_normal((2, 9, 2 * 4))
    results = []
    for limit in (10**6, 0):
        monkeypatch.setattr(F, "MAX_TRANSPOSED_COPY", limit)
        x = tl.tensor(qkv, requires_grad=True)
        y = F.self_attention(x, 2)
        y.backward(gy)
        results.append((y.data, x.grad))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("G", [1, 3])
def test_matmul_into_group_rows_writes_only_its_rows(G):
    r = np.random.default_rng(6)
    a, b = r.standard_normal((2, 2, G * 4, 5)), r.standard_normal((2, 2, 5, 3))
    y = r.standard_normal((2, 6, 2 * G, 3)).transpose(0, 2, 1, 3).reshape(2, 2, G, 6, 3)  # as y (B, Hkv, G, T, D)
    before = y.copy()
    F._matmul_into_group_rows(a, b, y[:, :, :, 1:5])
    np.testing.assert_allclose(y[:, :, :, 1:5], (a @ b).reshape(2, 2, G, 4, 3), atol=1e-12)
    np.testing.assert_array_equal(y[:, :, :, [0, 5]], before[:, :, :, [0, 5]])


def _textbook_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("row, fills, textbook", [
    (None, 1, False),     # rows centred near 0, as the callers fill them: exp as it is, one fill
    (85.0, 1, True),      # a number above _MAX_QUICK_EXP: exp could overflow, the textbook shift (seen before exp)
    (-30.0, 2, True),     # a row far below 0: its sum comes out below _MIN_ROW_SUM, so all is done again
    (np.nan, 1, True),    # nan: the textbook way, and only its own row is nan
])
def test_exp_rows_shifts_only_when_needed(row, fills, textbook):
    x = np.random.default_rng(0).standard_normal((3, 4, 8)).astype(np.float32) * 3
    if row is not None:
        x[1, 2] += row
    calls = []

    def fill(out):
        calls.append(1)
        out[...] = x
    out = np.empty_like(x)
    t, Z = F._exp_rows(out, fill)
    assert len(calls) == fills
    assert np.shape(t) == ((3, 4, 1) if textbook else ())
    assert out.dtype == np.float32 and Z.shape == (3, 4, 1)
    x64 = x.astype(np.float64)
    ok = np.isfinite(x).all(axis=-1)
    np.testing.assert_allclose((out / Z)[ok], _textbook_softmax(x64)[ok], rtol=1e-6, atol=1e-30)
    assert np.isnan((out / Z)[~ok]).all()
    lse = (np.log(Z) + t)[..., 0]
    np.testing.assert_allclose(lse[ok], np.log(np.exp(x64).sum(-1))[ok], rtol=1e-6)


def test_exp_rows_with_a_mask():
    x = np.random.default_rng(1).standard_normal((2, 5, 5)).astype(np.float32)
    mask = F._causal_bias(np, 5, 5, np.float32)
    out = np.empty_like(x)
    _, Z = F._exp_rows(out, lambda o: np.copyto(o, x), mask)
    np.testing.assert_allclose(out / Z, _textbook_softmax(x.astype(np.float64) + mask), rtol=1e-6, atol=1e-30)
    assert (out[:, np.triu_indices(5, 1)[0], np.triu_indices(5, 1)[1]] == 0).all()


def test_float32_attention_and_cross_entropy_with_rows_far_apart_match_float64():
    """Scores whose rows lie 0, 30 and 200 apart: both the shared shift and the per-row redo are exact."""
    r = np.random.default_rng(3)
    for scale in (1.0, 30.0, 200.0):
        q, k, v = r.standard_normal((2, 2, 6, 4)), r.standard_normal((2, 2, 6, 4)), r.standard_normal((2, 2, 6, 4))
        q[0, 1, 3] *= scale                  # one query row with huge scores
        y32 = F.scaled_dot_product_attention(*(tl.tensor(a, dtype="float32") for a in (q, k, v))).numpy()
        y64 = R.scaled_dot_product_attention(*(tl.tensor(a) for a in (q, k, v))).numpy()
        np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-5)
        z = r.standard_normal((5, 7))
        z[2] += scale
        t = np.array([0, 3, 6, 1, 2])
        loss32 = F.cross_entropy(tl.tensor(z, dtype="float32"), t).item()
        np.testing.assert_allclose(loss32, R.cross_entropy(tl.tensor(z), t).item(), rtol=1e-6)


def test_cross_entropy_of_a_confident_correct_prediction_is_zero_not_nan():
    loss = F.cross_entropy(leaf([[1e4, 0.0, -1e4]]), [0])
    assert loss.item() == 0.0


# ---------------------------------------------------------------------------------------------
# cross-entropy details


def test_cross_entropy_value_and_gradient_formula():
    z = randn(4, 6)
    t = np.array([5, -100, 0, 2])
    logits = leaf(z)
    loss = F.cross_entropy(logits, t)
    loss.backward()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    valid = [0, 2, 3]
    np.testing.assert_allclose(loss.item(), -np.mean(np.log(p[valid, t[valid]])), rtol=1e-13)
    expected = p.copy()
    expected[valid, t[valid]] -= 1
    expected[1] = 0
    np.testing.assert_allclose(logits.grad, expected / 3, rtol=1e-12, atol=1e-15)


def test_cross_entropy_all_ignored_is_nan_with_zero_gradient_like_pytorch():
    logits = leaf(randn(3, 4))
    loss = F.cross_entropy(logits, np.full(3, -100))
    assert math.isnan(loss.item())
    loss.backward()
    np.testing.assert_array_equal(logits.grad, 0)


def test_cross_entropy_scaled_loss_and_second_backward():
    z = randn(2, 3, 5)
    t = np.array([[0, 1, 2], [3, 4, -100]])
    a = leaf(z)
    (F.cross_entropy(a, t) * 2.5).backward()
    b = leaf(z)
    F.cross_entropy(b, t).backward()
    np.testing.assert_allclose(a.grad, 2.5 * b.grad, rtol=1e-13)
    c = leaf(z)
    loss = F.cross_entropy(c, tl.tensor(t))
    loss.backward(retain_graph=True)
    loss.backward()  # retain_graph: the second backward finds the same gradient again
    np.testing.assert_allclose(c.grad, 2 * b.grad, rtol=1e-13)


def test_cross_entropy_errors():
    z = leaf(randn(2, 3, 5))
    with pytest.raises(ValueError, match="do not match"):
        F.cross_entropy(z, np.zeros((3, 2), dtype=int))
    with pytest.raises(ValueError, match="do not match"):
        F.cross_entropy(leaf(randn(6, 5)), np.zeros(5, dtype=int))
    with pytest.raises(TypeError, match="integers"):
        F.cross_entropy(z, np.zeros((2, 3)))
    with pytest.raises(IndexError, match="target 5 is out of range for 5 classes"):
        F.cross_entropy(z, np.full((2, 3), 5))
    with pytest.raises(IndexError, match="target -1"):
        F.cross_entropy(z, np.full((2, 3), -1))
    with pytest.raises(ValueError, match=r"\(N, V\) or \(B, T, V\)"):
        F.cross_entropy(leaf(randn(5)), np.zeros((), dtype=int))
    F.cross_entropy(z, np.full((2, 3), 7), ignore_index=7)  # ignore_index may lie outside [0, V)


# ---------------------------------------------------------------------------------------------
# other error messages


def test_embedding_errors():
    w = leaf(randn(4, 3))
    with pytest.raises(TypeError, match="integers"):
        F.embedding(np.array([0.0, 1.0]), w)
    with pytest.raises(IndexError, match="id 4 is out of range for a table of 4 rows"):
        F.embedding(np.array([0, 4]), w)
    with pytest.raises(IndexError, match="id -1 is out of range"):
        F.embedding(np.array([[0], [-1]]), w)
    with pytest.raises(TypeError, match="integers"):
        F.embedding(tl.tensor([0.5]), w)


def test_linear_and_attention_errors():
    with pytest.raises(ValueError, match=r"x of shape \(2, 4\) \(..., in\) does not fit weight \(3, 5\)"):
        F.linear(leaf(randn(2, 4)), leaf(randn(3, 5)))
    with pytest.raises(ValueError, match="does not fit"):
        F.linear(leaf(randn(2, 4)), leaf(randn(4)))
    with pytest.raises(ValueError, match=r"bias of shape \(4,\) should be \(3,\)"):
        F.linear(leaf(randn(2, 4)), leaf(randn(3, 4)), leaf(randn(4)))
    q, k = leaf(randn(1, 3, 2, 4)), leaf(randn(1, 2, 2, 4))
    with pytest.raises(ValueError, match="H % Hkv"):
        F.scaled_dot_product_attention(q, k, k)
    with pytest.raises(ValueError, match="must both be"):
        F.scaled_dot_product_attention(leaf(randn(1, 2, 2, 4)), leaf(randn(1, 2, 2, 3)), leaf(randn(1, 2, 2, 3)))
    with pytest.raises(ValueError, match="4-D"):
        F.scaled_dot_product_attention(leaf(randn(2, 2, 4)), leaf(randn(2, 2, 4)), leaf(randn(2, 2, 4)))
    with pytest.raises(ValueError, match="at least as many keys as queries"):
        F.scaled_dot_product_attention(leaf(randn(1, 1, 3, 2)), leaf(randn(1, 1, 2, 2)), leaf(randn(1, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        F.dropout(leaf(randn(3)), p=1.5)


# ---------------------------------------------------------------------------------------------
# dropout


def test_dropout_identity_when_off():
    x = leaf(randn(4, 5))
    assert F.dropout(x, 0.0) is x
    assert F.dropout(x, 0.5, training=False) is x


def test_dropout_mask_scale_and_repeatability():
    x = leaf(np.ones((200, 500)), "float32")
    tl.manual_seed(3)
    y = F.dropout(x, 0.2)
    assert y.dtype == np.float32
    kept = y.numpy() != 0
    assert abs(kept.mean() - 0.8) < 0.01
    np.testing.assert_allclose(y.numpy()[kept], 1 / 0.8, rtol=1e-6)
    y.backward(np.ones(x.shape, dtype=np.float32))
    np.testing.assert_array_equal(x.grad, y.numpy())  # gx = gy·mask
    tl.manual_seed(3)
    np.testing.assert_array_equal(F.dropout(x, 0.2).numpy(), y.numpy())
    assert not np.array_equal(F.dropout(x, 0.2).numpy(), y.numpy())
    np.testing.assert_array_equal(F.dropout(x, 1.0).numpy(), 0)


# ---------------------------------------------------------------------------------------------
# float32 stays float32; inputs and upstream gradients are never modified


def _all_layers(dtype):
    r = np.random.default_rng(5)
    t = lambda *s: leaf(r.standard_normal(s), dtype)  # noqa: E731
    ids = r.integers(0, 7, (2, 3))
    return [
        ("linear", F.linear, [t(2, 3, 4), t(5, 4), t(5)]),
        ("embedding", lambda w: F.embedding(ids, w), [t(7, 4)]),
        ("layer_norm", F.layer_norm, [t(2, 3, 4), t(4), t(4)]),
        ("rms_norm", F.rms_norm, [t(2, 3, 4), t(4)]),
        ("gelu", F.gelu, [t(3, 4)]),
        ("silu", F.silu, [t(3, 4)]),
        ("softmax", F.softmax, [t(3, 4)]),
        ("log_softmax", F.log_softmax, [t(3, 4)]),
        ("cross_entropy", lambda z: F.cross_entropy(z, ids), [t(2, 3, 7)]),
        ("dropout", lambda x: F.dropout(x, 0.5), [t(3, 4)]),
        ("attention", F.scaled_dot_product_attention, [t(1, 4, 3, 2), t(1, 2, 5, 2), t(1, 2, 5, 2)]),
    ]


@pytest.mark.parametrize("index", range(11))
def test_float32_stays_float32(index):
    name, fn, inputs = _all_layers("float32")[index]
    y = fn(*inputs)
    assert y.dtype == np.float32, name
    y.backward(np.ones(y.shape, dtype=np.float32))
    for x in inputs:
        assert x.grad.dtype == np.float32, name


@pytest.mark.parametrize("index", range(11))
def test_inputs_and_upstream_gradient_are_not_modified(index):
    name, fn, inputs = _all_layers("float64")[index]
    before = [x.numpy() for x in inputs]
    y = fn(*inputs)
    gy = np.random.default_rng(0).standard_normal(y.shape)
    gy_copy = gy.copy()
    y.backward(gy)  # backward hands this very array to the fused op's backward
    for x, b in zip(inputs, before):
        np.testing.assert_array_equal(x.numpy(), b, err_msg=name)
    np.testing.assert_array_equal(gy, gy_copy, err_msg=name)


LINEAR_INPUT_CREATORS = [
    ("gelu", lambda x, g, c: F.gelu(x)),
    ("layer_norm", lambda x, g, c: F.layer_norm(x, g, c)),
    ("layer_norm, no weight or bias", lambda x, g, c: F.layer_norm(x)),
    ("layer_norm, bias only", lambda x, g, c: F.layer_norm(x, None, c)),
    ("rms_norm", lambda x, g, c: F.rms_norm(x, g)),
    ("rms_norm, no weight", lambda x, g, c: F.rms_norm(x)),
]


@pytest.fixture
def rebuild_all(monkeypatch):
    """Linear has every input rebuilt that its creator can rebuild, however small."""
    monkeypatch.setattr(F, "REBUILD_MIN_NUMBERS", 0)


def test_linear_rebuilt_inputs_gradcheck(rebuild_all):
    for label, fn, inputs in layer_cases.linear(CaseBuilder()):
        if "after" in label:
            result = gradcheck_report(fn, inputs)
            assert not result.failures, f"{label}: {result.failures[0]}"
            assert result.worst_error < 1e-6, label


def test_linear_rebuilds_only_big_inputs():
    w = leaf(randn(4, 8))
    small = F.gelu(leaf(randn(2, 8)))
    big = F.gelu(leaf(np.zeros((F.REBUILD_MIN_NUMBERS // 8, 8))))
    assert F.linear(small, w)._ctx.x2 is not None
    assert F.linear(big, w)._ctx.x2 is None


@pytest.mark.parametrize("name, make", LINEAR_INPUT_CREATORS, ids=[n for n, _ in LINEAR_INPUT_CREATORS])
def test_linear_input_rebuilt_by_its_creator_is_the_kept_input_bit_for_bit(name, make, rebuild_all):
    x, g, c, w = (leaf(a, "float32") for a in (randn(2, 5, 6) * 3, randn(6), randn(6), randn(4, 6)))
    kept = make(x, g, c) * 1.0            # a Mul made it: it cannot be rebuilt, so Linear keeps it
    rebuilt = make(x, g, c)
    assert F.linear(kept, w)._ctx.x2 is not None
    assert F.linear(rebuilt, w)._ctx.x2 is None
    grads = []
    for h in (kept, rebuilt):
        for t in (x, g, c, w):
            t.grad = None
        F.linear(h, w).backward(np.random.default_rng(0).standard_normal((2, 5, 4)))
        grads.append([t.grad for t in (x, g, c, w)])
    for a, b in zip(*grads):
        if a is None:
            assert b is None
        else:
            np.testing.assert_array_equal(a, b)   # the same numbers: rebuilt as forward made them


@pytest.mark.parametrize("name, make", LINEAR_INPUT_CREATORS[:2], ids=[n for n, _ in LINEAR_INPUT_CREATORS[:2]])
def test_linear_does_not_keep_an_input_its_creator_rebuilds(name, make, rebuild_all):
    x, g, c, w = leaf(randn(3, 6)), leaf(randn(6)), leaf(randn(6)), leaf(randn(4, 6))
    for rebuildable in (False, True):
        h = make(x, g, c) if rebuildable else make(x, g, c) * 1.0
        array = weakref.ref(h.data)
        y = F.linear(h, w)
        del h
        assert (array() is None) is rebuildable   # freed once the tensor goes, or kept by Linear
        y.sum().backward()


def test_linear_input_rebuilt_after_its_creator_was_released_says_so(rebuild_all):
    x, w = leaf(randn(3, 6)), leaf(randn(4, 6))
    h = F.gelu(x)
    y = F.linear(h, w)
    h.sum().backward()                    # frees the GELU's arrays (retain_graph=False)
    with pytest.raises(RuntimeError, match="a second time"):
        y.sum().backward()


def test_no_grad_records_nothing():
    x, w = leaf(randn(2, 3)), leaf(randn(4, 3))
    with tl.no_grad():
        y = F.gelu(F.linear(x, w))
    assert not y.requires_grad and y.is_leaf


# ---------------------------------------------------------------------------------------------
# optional: PyTorch cross-checks in float64


def _torch():
    return pytest.importorskip("torch")


def _tt(torch, a):
    return torch.tensor(a, dtype=torch.float64, requires_grad=True)


def test_torch_cross_entropy():
    torch = _torch()
    z = randn(2, 4, 9) * 4
    t = np.random.default_rng(0).integers(0, 9, (2, 4))
    t[1, 2] = -100
    a, b = leaf(z), _tt(torch, z)
    la = F.cross_entropy(a, t)
    lb = torch.nn.functional.cross_entropy(b.reshape(-1, 9), torch.tensor(t).reshape(-1))
    la.backward()
    lb.backward()
    np.testing.assert_allclose(la.item(), lb.item(), rtol=1e-13)
    np.testing.assert_allclose(a.grad, b.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_torch_layer_norm_rms_norm_gelu_silu():
    torch = _torch()
    tf = torch.nn.functional
    x, w, bias, g = randn(3, 2, 8), randn(8), randn(8), randn(3, 2, 8)
    a, aw, ab = leaf(x), leaf(w), leaf(bias)
    b, bw, bb = _tt(torch, x), _tt(torch, w), _tt(torch, bias)
    F.layer_norm(a, aw, ab).backward(g)
    tf.layer_norm(b, (8,), bw, bb, eps=1e-5).backward(torch.tensor(g))
    for mine, theirs in [(a, b), (aw, bw), (ab, bb)]:
        np.testing.assert_allclose(mine.grad, theirs.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(F.layer_norm(a, aw, ab).numpy(), tf.layer_norm(b, (8,), bw, bb).detach().numpy(),
                               rtol=1e-12, atol=1e-12)
    if hasattr(tf, "rms_norm"):
        a, aw, b, bw = leaf(x), leaf(w), _tt(torch, x), _tt(torch, w)
        ya, yb = F.rms_norm(a, aw), tf.rms_norm(b, (8,), bw, eps=1e-5)
        np.testing.assert_allclose(ya.numpy(), yb.detach().numpy(), rtol=1e-12, atol=1e-12)
        ya.backward(g)
        yb.backward(torch.tensor(g))
        np.testing.assert_allclose(a.grad, b.grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(aw.grad, bw.grad.numpy(), rtol=1e-10, atol=1e-12)
    for mine, theirs in [(F.gelu, lambda t: tf.gelu(t, approximate="tanh")), (F.silu, tf.silu)]:
        a, b = leaf(x * 3), _tt(torch, x * 3)
        ya, yb = mine(a), theirs(b)
        np.testing.assert_allclose(ya.numpy(), yb.detach().numpy(), rtol=1e-13, atol=1e-14)
        ya.backward(g)
        yb.backward(torch.tensor(g))
        np.testing.assert_allclose(a.grad, b.grad.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B, H, Hkv, T, S, D", ATTENTION_SHAPES)
def test_torch_attention(B, H, Hkv, T, S, D, causal):
    torch = _torch()
    q, k, v, g = randn(B, H, T, D), randn(B, Hkv, S, D), randn(B, Hkv, S, D), randn(B, H, T, D)
    mine = [leaf(a) for a in (q, k, v)]
    theirs = [_tt(torch, a) for a in (q, k, v)]
    y = F.scaled_dot_product_attention(*mine, causal=causal)
    y.backward(g)
    mask = None
    if causal:  # aligned to the end: query i sees keys 0 .. S - T + i
        mask = torch.tensor(np.arange(S)[None, :] <= S - T + np.arange(T)[:, None])
    tk, tv = (t.repeat_interleave(H // Hkv, dim=1) for t in theirs[1:])  # each k/v head serves H/Hkv heads
    ty = torch.nn.functional.scaled_dot_product_attention(theirs[0], tk, tv, attn_mask=mask)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(y.numpy(), ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    for a, b in zip(mine, theirs):
        np.testing.assert_allclose(a.grad, b.grad.numpy(), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("index", range(11))
def test_float32_agrees_with_float64(index):
    name, fn, inputs64 = _all_layers("float64")[index]
    _, _, inputs32 = _all_layers("float32")[index]
    if name == "dropout":
        tl.manual_seed(0)
    y64 = fn(*inputs64)
    if name == "dropout":
        tl.manual_seed(0)
    y32 = fn(*inputs32)
    gy = np.random.default_rng(1).standard_normal(y64.shape)
    y64.backward(gy)
    y32.backward(gy.astype(np.float32))
    np.testing.assert_allclose(y32.numpy(), y64.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
    for a, b in zip(inputs32, inputs64):
        np.testing.assert_allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_activations_at_extreme_inputs(name):
    x = leaf(np.array([-1e4, -30.0, 0.0, 30.0, 1e4]), "float32")
    y = getattr(F, name)(x)
    y.backward(np.ones(5, dtype=np.float32))
    np.testing.assert_allclose(y.numpy(), [0, 0, 0, 30, 1e4], atol=1e-6)
    np.testing.assert_allclose(x.grad, [0, 0, 0.5, 1, 1], atol=1e-6)


def test_layer_norm_float32_with_a_large_offset():
    """Two-pass variance: an offset of 1e3 does not wipe out the variance of a float32 row."""
    x = np.random.default_rng(0).standard_normal((4, 64))
    y32 = F.layer_norm(tl.tensor(x + 1e3, dtype="float32")).numpy()
    y64 = F.layer_norm(tl.tensor(x, dtype="float64")).numpy()
    np.testing.assert_allclose(y32, y64, atol=2e-4)
