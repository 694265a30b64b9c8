"""Generation: the KV cache gives exactly the tokens of full recomputation; sampling options; errors."""
import numpy as np
import pytest

import tinyllm as tl
from tinyllm.model import GPT, GPTConfig, _pick

VARIANTS = {
    "learned/layernorm/gelu/MHA": dict(),
    "rope/rmsnorm/swiglu/GQA": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False,
                                    tie_weights=False),
    "rope/layernorm/gelu/MQA": dict(pos="rope", n_kv_head=1),
    "learned/rmsnorm/swiglu/MQA": dict(norm="rmsnorm", mlp="swiglu", n_kv_head=1, tie_weights=False),
}


def make_model(dtype="float64", seed=0, **overrides):
    settings = dict(vocab_size=29, block_size=16, n_layer=2, n_head=4, n_embd=32)
    settings.update(overrides)
    tl.manual_seed(seed)
    model = GPT(GPTConfig(**settings), dtype=dtype)
    # sharpen the distribution a little so greedy and sampled outputs are not trivially uniform
    gen = np.random.default_rng(seed)
    for p in model.parameters():
        if p.ndim == 2:
            p.data += (gen.standard_normal(p.shape) * 0.1).astype(p.dtype)
    return model


def prompt(B, T, vocab=29, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (B, T))


def reference_greedy(model, idx, n):
    """Greedy decoding the slow, obvious way: full forward on the cropped context every step."""
    out = idx.copy()
    bs = model.config.block_size
    for _ in range(n):
        logits, _ = model(out[:, -bs:])
        out = np.concatenate([out, logits.numpy()[:, -1].argmax(-1)[:, None]], axis=1)
    return out


# ---------------------------------------------------------------------------------------------
# The KV cache: identical tokens


@pytest.mark.parametrize("label", list(VARIANTS))
@pytest.mark.parametrize("T", [1, 5, 14, 16, 20])  # 14 and 16: the cache fills up and falls back; 20 > block
def test_cache_is_identical_to_recompute_greedy(label, T):
    model = make_model(**VARIANTS[label])
    idx = prompt(2, T)
    cached = model.generate(idx, 10, temperature=0, use_cache=True)
    full = model.generate(idx, 10, temperature=0, use_cache=False)
    np.testing.assert_array_equal(cached, full)
    np.testing.assert_array_equal(full, reference_greedy(model, idx, 10))
    assert cached.shape == (2, T + 10) and cached.dtype == np.int64
    np.testing.assert_array_equal(cached[:, :T], idx)


@pytest.mark.parametrize("label", list(VARIANTS))
@pytest.mark.parametrize("T", [1, 7, 15])
def test_cache_is_identical_to_recompute_sampled(label, T):
    model = make_model(**VARIANTS[label])
    idx = prompt(3, T, seed=1)
    for options in [dict(), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8),
                    dict(top_k=10, top_p=0.9)]:
        cached = model.generate(idx, 12, seed=7, use_cache=True, **options)
        full = model.generate(idx, 12, seed=7, use_cache=False, **options)
        np.testing.assert_array_equal(cached, full, err_msg=str(options))


def test_cache_identity_in_float32():
    for overrides in VARIANTS.values():
        model = make_model(dtype="float32", **overrides)
        idx = prompt(2, 3)
        np.testing.assert_array_equal(model.generate(idx, 20, temperature=0),
                                      model.generate(idx, 20, temperature=0, use_cache=False))
        np.testing.assert_array_equal(model.generate(idx, 20, seed=3),
                                      model.generate(idx, 20, seed=3, use_cache=False))


def test_cached_logits_match_full_forward():
    """Feeding one token at a time through the cache gives the full forward's logits at every position."""
    from tinyllm.model import KVCache
    for overrides in VARIANTS.values():
        model = make_model(**overrides)
        model.eval()
        idx = prompt(2, 16)
        full = model(idx)[0].numpy()
        cache = KVCache(model.config, 2, model.dtype, np)
        with tl.no_grad():
            for t in range(16):
                step = model._last_logits(idx[:, t:t + 1], start=t, cache=cache)
                cache.length = t + 1
                np.testing.assert_allclose(step, full[:, t], rtol=0, atol=1e-12)
        assert cache.k[0].shape == (2, model.config.kv_heads, 16, 8)  # GQA/MQA cache only Hkv heads


def test_cache_feeds_one_token_per_step():
    model = make_model()
    seen = []
    original = model._hidden

    def spy(idx, start=0, cache=None):
        seen.append((idx.shape[1], start, cache is not None))
        return original(idx, start=start, cache=cache)

    model._hidden = spy
    model.generate(prompt(1, 4), 15, temperature=0)
    # prefill 4 tokens, then one token per step at positions 4..15; past block_size (16 tokens) the
    # window slides: recompute the last 16 tokens without the cache
    assert seen[0] == (4, 0, True)
    assert seen[1:13] == [(1, p, True) for p in range(4, 16)]
    assert seen[13:] == [(16, 0, False), (16, 0, False)]
    seen.clear()
    model.generate(prompt(1, 4), 3, temperature=0, use_cache=False)
    assert seen == [(4, 0, False), (5, 0, False), (6, 0, False)]


# ---------------------------------------------------------------------------------------------
# Sampling options


def test_greedy_and_degenerate_filters_agree():
    model = make_model()
    idx = prompt(2, 3)
    greedy = model.generate(idx, 8, temperature=0)
    np.testing.assert_array_equal(model.generate(idx, 8, top_k=1, seed=0), greedy)
    np.testing.assert_array_equal(model.generate(idx, 8, top_p=1e-9, seed=5), greedy)
    np.testing.assert_array_equal(model.generate(idx, 8, temperature=1e-6, seed=9), greedy)


def test_seeded_sampling_is_reproducible():
    model = make_model()
    idx = prompt(2, 3)
    a = model.generate(idx, 20, seed=1)
    np.testing.assert_array_equal(a, model.generate(idx, 20, seed=1))
    assert not np.array_equal(a, model.generate(idx, 20, seed=2))
    tl.manual_seed(5)
    b = model.generate(idx, 20)
    tl.manual_seed(5)
    np.testing.assert_array_equal(b, model.generate(idx, 20))  # seed None: tinyllm.rng


def test_pick_top_k_top_p_sets():
    logits = np.log(np.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    gen = np.random.default_rng(0)
    draws = lambda **kw: {int(_pick(logits, 1.0, gen=gen, **kw)[0]) for _ in range(400)}
    assert draws(top_k=2, top_p=None) == {1, 3}
    assert draws(top_k=None, top_p=0.7) == {1, 3}          # 0.4 + 0.3 reaches 0.7
    assert draws(top_k=None, top_p=0.71) == {1, 3, 4}      # needs the 0.15 too
    assert draws(top_k=None, top_p=0.4) == {1}             # the top token alone reaches 0.4
    assert draws(top_k=3, top_p=0.8) == {1, 3}             # top-k first: renormalised 0.4/0.85, 0.3/0.85
    assert draws(top_k=None, top_p=None) == {0, 1, 2, 3, 4}
    assert int(_pick(logits, 0, None, None, gen)[0]) == 1  # greedy


def test_pick_samples_the_filtered_distribution():
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4]] * 4000))
    gen = np.random.default_rng(0)
    tokens = _pick(logits, 1.0, 3, None, gen)
    freq = np.bincount(tokens, minlength=4) / tokens.size
    np.testing.assert_allclose(freq, [0, 2 / 9, 3 / 9, 4 / 9], atol=0.03)
    # temperature 2 flattens: p ∝ sqrt(p)
    tokens = _pick(logits, 2.0, None, None, gen)
    freq = np.bincount(tokens, minlength=4) / tokens.size
    expected = np.sqrt([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(freq, expected / expected.sum(), atol=0.03)


def test_eos_stops_rows_and_pads():
    model = make_model()
    idx = prompt(3, 2)
    free = model.generate(idx, 12, temperature=0)
    eos = int(free[0, 4])  # row 0 emits this token (at its third generated position, or earlier)
    out = model.generate(idx, 12, temperature=0, eos_id=eos)
    for row in range(3):
        gen_part = free[row, 2:]
        hits = np.flatnonzero(gen_part == eos)
        if hits.size:  # identical up to and including the first eos, eos after
            first = hits[0]
            np.testing.assert_array_equal(out[row, 2:2 + first + 1], gen_part[:first + 1])
            assert (out[row, 2 + first:] == eos).all()
        else:
            np.testing.assert_array_equal(out[row, 2:], gen_part[:out.shape[1] - 2])
    # stops early once every row is done
    one = model.generate(idx[:1], 12, temperature=0, eos_id=eos)
    first0 = np.flatnonzero(free[0, 2:] == eos)[0]
    assert one.shape == (1, 2 + first0 + 1) and one[0, -1] == eos
    assert np.array_equal(one, model.generate(idx[:1], 12, temperature=0, eos_id=eos, use_cache=False))


def test_generate_restores_mode_and_records_no_graph():
    model = make_model(dropout=0.2)
    model.train()
    idx = prompt(1, 3)
    a = model.generate(idx, 5, temperature=0)
    assert model.training and all(m.training for _, m in model.named_modules())
    np.testing.assert_array_equal(a, model.generate(idx, 5, temperature=0))  # eval: no dropout
    model.eval()
    model.generate(idx, 2)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_generate_inputs_and_float32():
    model = make_model(dtype="float32")
    out = model.generate([[1, 2, 3]], 4, temperature=0)
    assert out.shape == (1, 7) and out.dtype == np.int64
    np.testing.assert_array_equal(model.generate(np.array([[1, 2, 3]], dtype=np.int32), 4, temperature=0), out)
    np.testing.assert_array_equal(model.generate(tl.tensor(np.array([[1, 2, 3]])), 4, temperature=0), out)
    np.testing.assert_array_equal(model.generate([[1, 2, 3]], 0), [[1, 2, 3]])
    assert model.transformer.wte.weight.dtype == np.float32


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(idx=[1, 2]), ValueError, "idx\\[None\\]"),
    (dict(idx=[[0.5]]), TypeError, "integer token ids"),
    (dict(idx=[[29]]), ValueError, "outside the vocabulary"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(eos_id=29), ValueError, "eos_id"),
])
def test_generate_errors(kwargs, error, message):
    model = make_model()
    args = dict(idx=[[1, 2]], max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        model.generate(args.pop("idx"), args.pop("max_new_tokens"), **args)
