"""The GPT model: config validation, parameter names and shapes, init, forward/backward, errors."""
import dataclasses
import math

import numpy as np
import pytest

import tinyllm as tl
from tinyllm.cases.model import GPT_VARIANTS, tiny_gpt
from tinyllm.gradcheck import gradcheck_report
from tinyllm.model import GPT, GPTConfig, RoPE, rope_tables


def small_config(**overrides):
    settings = dict(vocab_size=13, block_size=8, n_layer=2, n_head=4, n_embd=16)
    settings.update(overrides)
    return GPTConfig(**settings)


def batch(vocab, B=2, T=8, seed=0):
    gen = np.random.default_rng(seed)
    return gen.integers(0, vocab, (B, T)), gen.integers(0, vocab, (B, T))


# ---------------------------------------------------------------------------------------------
# GPTConfig


def test_config_fields_and_defaults_are_the_spec():
    fields = [(f.name, f.default) for f in dataclasses.fields(GPTConfig)]
    MISSING = dataclasses.MISSING
    assert fields == [
        ("vocab_size", MISSING), ("block_size", MISSING), ("n_layer", MISSING), ("n_head", MISSING),
        ("n_embd", MISSING), ("n_kv_head", None), ("dropout", 0.0), ("bias", True), ("norm", "layernorm"),
        ("mlp", "gelu"), ("pos", "learned"), ("rope_theta", 10000.0), ("tie_weights", True),
        ("norm_eps", 1e-5), ("mlp_hidden", None)]
    cfg = small_config()
    assert cfg.kv_heads == 4 and cfg.head_dim == 4 and cfg.hidden == 64
    assert small_config(mlp_hidden=24, n_kv_head=2).hidden == 24
    assert tl.GPTConfig is GPTConfig and tl.GPT is GPT


@pytest.mark.parametrize("overrides,error,message", [
    (dict(n_embd=18), ValueError, "divisible by n_head"),
    (dict(n_kv_head=3), ValueError, "divisible by n_kv_head"),
    (dict(norm="batchnorm"), ValueError, "unknown norm='batchnorm'"),
    (dict(mlp="relu"), ValueError, "unknown mlp='relu'"),
    (dict(pos="alibi"), ValueError, "unknown pos='alibi'"),
    (dict(pos="rope", n_embd=12, n_head=4), ValueError, "even head size"),
    (dict(vocab_size=0), ValueError, "vocab_size must be positive"),
    (dict(n_layer=-1), ValueError, "n_layer must be positive"),
    (dict(block_size=8.0), TypeError, "block_size must be an integer"),
    (dict(n_head=True), TypeError, "n_head must be an integer"),
    (dict(n_kv_head=0), ValueError, "n_kv_head must be positive"),
    (dict(mlp_hidden=0), ValueError, "mlp_hidden must be positive"),
    (dict(dropout=1.0), ValueError, "dropout must be in [0, 1)"),
    (dict(dropout="0.1"), TypeError, "dropout must be a number"),
    (dict(rope_theta=0.0), ValueError, "rope_theta must be positive"),
    (dict(norm_eps=0.0), ValueError, "norm_eps must be positive"),
    (dict(bias=1), TypeError, "bias must be True or False"),
])
def test_config_validation(overrides, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        small_config(**overrides)


def test_config_dict_round_trip_and_errors():
    cfg = small_config(n_kv_head=2, pos="rope", norm="rmsnorm", mlp="swiglu", tie_weights=False)
    d = cfg.to_dict()
    assert d["n_kv_head"] == 2 and d["mlp_hidden"] is None and d["pos"] == "rope"
    assert GPTConfig.from_dict(d) == cfg
    import json
    assert GPTConfig.from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(ValueError, match=r"unknown keys \['n_embed'\]"):
        GPTConfig.from_dict({**d, "n_embed": 16})
    d.pop("vocab_size")
    with pytest.raises(ValueError, match=r"missing required keys \['vocab_size'\]"):
        GPTConfig.from_dict(d)


# ---------------------------------------------------------------------------------------------
# Parameter names and shapes: exactly SPEC section 3's table


def spec_table(cfg):
    """The state_dict keys and shapes SPEC section 3 prescribes, built from its table."""
    V, C, L = cfg.vocab_size, cfg.n_embd, cfg.n_layer
    H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.n_embd // cfg.n_head
    hidden = cfg.mlp_hidden or 4 * C
    norm_bias = cfg.norm == "layernorm" and cfg.bias
    table = {"transformer.wte.weight": (V, C)}
    if cfg.pos == "learned":
        table["transformer.wpe.weight"] = (cfg.block_size, C)

    def norm(name):
        table[name + ".weight"] = (C,)
        if norm_bias:
            table[name + ".bias"] = (C,)

    def linear(name, out, inp):
        table[name + ".weight"] = (out, inp)
        if cfg.bias:
            table[name + ".bias"] = (out,)

    for i in range(L):
        p = f"transformer.h.{i}."
        norm(p + "ln_1")
        linear(p + "attn.c_attn", (H + 2 * Hkv) * D, C)
        linear(p + "attn.c_proj", C, C)
        norm(p + "ln_2")
        linear(p + "mlp.c_fc", hidden, C)
        if cfg.mlp == "swiglu":
            linear(p + "mlp.c_gate", hidden, C)
        linear(p + "mlp.c_proj", C, hidden)
    norm("transformer.ln_f")
    table["lm_head.weight"] = (V, C)
    return table


STRUCTURE_VARIANTS = [
    dict(),
    dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_weights=False),
    dict(n_kv_head=1, bias=False),                          # MQA, layernorm without bias
    dict(norm="rmsnorm", mlp="swiglu", mlp_hidden=24, n_layer=3),
    dict(pos="rope", n_kv_head=1, tie_weights=False),
]


@pytest.mark.parametrize("overrides", STRUCTURE_VARIANTS)
def test_state_dict_keys_and_shapes_match_the_spec(overrides):
    cfg = small_config(**overrides)
    model = GPT(cfg)
    sd = model.state_dict()
    expected = spec_table(cfg)
    assert set(sd) == set(expected)
    assert {k: v.shape for k, v in sd.items()} == expected
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in sd.values())
    # tied: one Parameter under both names, counted once
    wte, head = model.transformer.wte.weight, model.lm_head.weight
    assert (wte is head) == cfg.tie_weights
    assert len(model.parameters()) == len(expected) - (1 if cfg.tie_weights else 0)
    assert model.num_parameters() == sum(math.prod(s) for s in expected.values()) - \
        (cfg.vocab_size * cfg.n_embd if cfg.tie_weights else 0)


def test_c_attn_rows_are_q_then_k_then_v():
    """Zeroing the k and v rows of c_attn must leave q's; making q zero gives uniform attention."""
    cfg = small_config(n_kv_head=2, n_layer=1, bias=False)
    model = GPT(cfg, dtype="float64")
    H, Hkv, D, C = 4, 2, 4, 16
    W = model.transformer.h[0].attn.c_attn.weight
    assert W.shape == ((H + 2 * Hkv) * D, C)
    # With q = 0 every query attends uniformly: output at t = mean of v over 0..t, independent of k.
    idx, _ = batch(13, B=1)
    W.data[:H * D] = 0
    base = model(idx)[0].numpy()
    W.data[H * D:(H + Hkv) * D] = np.random.default_rng(0).standard_normal((Hkv * D, C))  # new k rows
    np.testing.assert_allclose(model(idx)[0].numpy(), base, atol=1e-12)
    W.data[(H + Hkv) * D:] *= 2.0  # v rows do matter
    assert not np.allclose(model(idx)[0].numpy(), base)


# ---------------------------------------------------------------------------------------------
# Initialisation


def test_gpt2_init_statistics():
    tl.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128)
    model = GPT(cfg)
    residual = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, p in model.named_parameters():
        a = p.numpy()
        if name.endswith(".bias"):
            assert (a == 0).all(), name
        elif ".ln_" in name:
            assert (a == 1).all(), name
        else:
            std = residual if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")) else 0.02
            assert abs(a.mean()) < 4 * std / math.sqrt(a.size), name
            assert abs(a.std() / std - 1) < 0.05, (name, a.std(), std)


def test_init_is_seeded_and_dtype_independent():
    cfg = small_config()
    tl.manual_seed(123)
    a = GPT(cfg).state_dict()
    tl.manual_seed(123)
    b = GPT(cfg, dtype="float64").state_dict()
    tl.manual_seed(124)
    c = GPT(cfg).state_dict()
    for k in a:
        assert b[k].dtype == np.float64
        np.testing.assert_array_equal(a[k], b[k].astype(np.float32))
    assert not np.array_equal(a["transformer.wte.weight"], c["transformer.wte.weight"])


def test_initial_loss_is_near_log_vocab():
    tl.manual_seed(0)
    cfg = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64)
    for overrides in [{}, dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2)]:
        model = GPT(dataclasses.replace(cfg, **overrides))
        gen = np.random.default_rng(0)
        idx, targets = gen.integers(0, 65, (8, 32)), gen.integers(0, 65, (8, 32))
        _, loss = model(idx, targets)
        assert abs(loss.item() - math.log(65)) < 0.1, loss.item()


# ---------------------------------------------------------------------------------------------
# Forward and backward


def test_forward_shapes_dtypes_and_float32_end_to_end():
    model = GPT(small_config(pos="rope", mlp="swiglu", n_kv_head=2))
    idx, targets = batch(13)
    logits, loss = model(idx)
    assert logits.shape == (2, 8, 13) and logits.dtype == np.float32 and loss is None
    logits, loss = model(idx[:, :3], targets[:, :3])
    assert logits.shape == (2, 3, 13) and loss.shape == () and loss.dtype == np.float32
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == np.float32 and p.grad.shape == p.shape, name
    # an int Tensor and int32 ids work too
    logits2, _ = model(tl.tensor(idx[:, :3]), targets[:, :3].astype(np.int32))
    np.testing.assert_array_equal(logits2.numpy(), logits.numpy())


def test_causality_future_tokens_do_not_change_earlier_logits():
    for overrides in [{}, dict(pos="rope", n_kv_head=1)]:
        model = GPT(small_config(**overrides), dtype="float64")
        idx, _ = batch(13, B=1)
        other = idx.copy()
        other[0, 5:] = (other[0, 5:] + 1) % 13
        a, b = model(idx)[0].numpy(), model(other)[0].numpy()
        np.testing.assert_allclose(a[:, :5], b[:, :5], rtol=0, atol=1e-13)
        assert not np.allclose(a[:, 5:], b[:, 5:])


def test_ignore_index_targets():
    model = GPT(small_config(), dtype="float64")
    idx, targets = batch(13)
    masked = targets.copy()
    masked[:, :4] = -100
    logits, loss = model(idx, masked)
    lp = logits.numpy() - np.log(np.exp(logits.numpy()).sum(-1, keepdims=True))
    expected = -np.take_along_axis(lp, targets[..., None], -1)[:, 4:].mean()
    assert abs(loss.item() - expected) < 1e-12


def test_dropout_train_vs_eval():
    idx, targets = batch(13)
    tl.manual_seed(0)
    plain = GPT(small_config())
    tl.manual_seed(0)
    model = GPT(small_config(dropout=0.3))
    model.train()
    a, b = model(idx)[0].numpy(), model(idx)[0].numpy()
    assert not np.allclose(a, b)                   # fresh masks each call
    model.eval()
    np.testing.assert_array_equal(model(idx)[0].numpy(), plain(idx)[0].numpy())
    model.train()
    _, loss = model(idx, targets)
    loss.backward()                                # dropout's backward runs inside the model


@pytest.mark.parametrize("label", list(GPT_VARIANTS))
def test_whole_gpt_gradcheck(label):
    model = tiny_gpt(**GPT_VARIANTS[label])
    gen = np.random.default_rng(1)
    idx, targets = gen.integers(0, 11, (2, 5)), gen.integers(0, 11, (2, 5))
    result = gradcheck_report(lambda *ps: model(idx, targets)[1], model.parameters())
    assert not result.failures, result.failures[0]
    assert result.worst_error < 1e-6, result.worst_error
    assert result.checks >= sum(p.size for p in model.parameters())  # every element was checked


def test_gradcheck_of_a_two_layer_gqa_model_with_bias_and_ignored_targets():
    model = tiny_gpt(pos="rope", norm="layernorm", mlp="swiglu", n_head=4, n_kv_head=2, bias=True,
                     tie_weights=True, n_layer=2)
    gen = np.random.default_rng(2)
    idx, targets = gen.integers(0, 11, (2, 4)), gen.integers(0, 11, (2, 4))
    targets[0, 1] = -100
    result = gradcheck_report(lambda *ps: model(idx, targets)[1], model.parameters())
    assert not result.failures, result.failures[0]
    assert result.worst_error < 1e-6


def test_tied_gradient_is_the_sum_of_both_uses():
    cfg = small_config(n_layer=1)
    tied = GPT(cfg, dtype="float64")
    untied = GPT(dataclasses.replace(cfg, tie_weights=False), dtype="float64")
    untied.load_state_dict(tied.state_dict())  # wte and lm_head start as the same values
    idx, targets = batch(13)
    for model in (tied, untied):
        model(idx, targets)[1].backward()
    w = tied.transformer.wte.weight
    assert w is tied.lm_head.weight
    expected = untied.transformer.wte.weight.grad + untied.lm_head.weight.grad
    np.testing.assert_allclose(w.grad, expected, rtol=1e-12, atol=1e-15)
    # and both paths really contribute
    assert np.abs(untied.transformer.wte.weight.grad).max() > 0 and np.abs(untied.lm_head.weight.grad).max() > 0


def test_load_state_dict_round_trip():
    cfg = small_config(pos="rope", mlp="swiglu", n_kv_head=2, tie_weights=False)
    tl.manual_seed(1)
    a = GPT(cfg)
    tl.manual_seed(2)
    b = GPT(cfg)
    idx, _ = batch(13)
    assert not np.allclose(a(idx)[0].numpy(), b(idx)[0].numpy())
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a(idx)[0].numpy(), b(idx)[0].numpy())
    sd = a.state_dict()
    sd["transformer.wte.weight"][:] = 0  # a copy: the model is untouched
    assert np.abs(a.transformer.wte.weight.data).max() > 0
    with pytest.raises(KeyError, match="missing keys"):
        GPT(small_config()).load_state_dict(sd)


def test_overfits_one_batch():
    from tinyllm.optim import AdamW
    tl.manual_seed(0)
    cfg = GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32, pos="rope", mlp="swiglu")
    model = GPT(cfg)
    idx, targets = batch(16, B=4, T=16, seed=3)
    opt = model.configure_optimizers(weight_decay=0.0, learning_rate=1e-2, betas=(0.9, 0.99))
    assert isinstance(opt, AdamW)
    for step in range(200):
        _, loss = model(idx, targets)
        model.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05, loss.item()


def test_configure_optimizers_groups():
    model = GPT(small_config(tie_weights=False))
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-4, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(model.parameters())
    assert decay["lr"] == 3e-4 and tuple(decay["betas"]) == (0.9, 0.95)
    # tied: the shared matrix appears once
    tied = GPT(small_config())
    opt = tied.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(tied.parameters())


def test_num_parameters_and_flops():
    cfg = small_config()
    C, L, V, T = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.block_size
    per_block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    small = GPT(cfg)
    n = small.num_parameters()
    assert n == V * C + T * C + L * per_block + 2 * C == sum(p.size for p in small.parameters())
    assert small.num_parameters(exclude_embeddings=True) == n - 8 * 16  # wpe only (wte is the tied head)
    untied = GPT(small_config(tie_weights=False, pos="rope"))
    assert untied.num_parameters(exclude_embeddings=True) == untied.num_parameters() - 13 * 16
    c = small.config
    assert small.flops_per_token() == 6 * (n - 8 * 16) + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size


# ---------------------------------------------------------------------------------------------
# Errors


def test_forward_errors():
    model = GPT(small_config())
    idx, targets = batch(13)
    with pytest.raises(ValueError, match="sequence length 9 exceeds block_size 8"):
        model(np.zeros((1, 9), dtype=np.int64))
    with pytest.raises(TypeError, match="integer token ids, got dtype float64"):
        model(idx.astype(np.float64))
    with pytest.raises(ValueError, match=r"id 13, outside the vocabulary \[0, 13\)"):
        model(np.full((1, 3), 13))
    with pytest.raises(ValueError, match=r"id -1, outside the vocabulary"):
        model(np.full((1, 3), -1))
    with pytest.raises(ValueError, match=r"targets have shape \(2, 7\) but idx has shape \(2, 8\)"):
        model(idx, targets[:, :7])
    with pytest.raises(ValueError, match="targets holds the id 13"):
        model(idx, np.full_like(targets, 13))
    with pytest.raises(ValueError, match=r"shape \(batch, time\)"):
        model(idx[0])
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT(dict(vocab_size=3))
    with pytest.raises(TypeError, match="floating point"):
        GPT(small_config(), dtype="int32")


# ---------------------------------------------------------------------------------------------
# RoPE


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def test_rope_tables_and_op_follow_the_spec_formula():
    T, D, theta = 6, 8, 500.0
    cos, sin = rope_tables(T, D, theta, dtype="float64")
    inv_freq = np.array([theta ** (-2 * i / D) for i in range(D // 2)])
    angle = np.array([[t * inv_freq[j % (D // 2)] for j in range(D)] for t in range(T)])
    np.testing.assert_allclose(cos, np.cos(angle), rtol=0, atol=1e-15)
    np.testing.assert_allclose(sin, np.sin(angle), rtol=0, atol=1e-15)
    x = np.random.default_rng(0).standard_normal((2, 3, T, D))
    y = RoPE(cos, sin)(tl.tensor(x)).numpy()
    np.testing.assert_allclose(y, x * cos + rotate_half(x) * sin, rtol=0, atol=1e-14)
    assert rope_tables(4, 4)[0].dtype == np.float32


def test_rope_scores_depend_only_on_relative_position():
    D = 8
    cos, sin = rope_tables(16, D, dtype="float64")
    gen = np.random.default_rng(0)
    q, k = gen.standard_normal(D), gen.standard_normal(D)

    def rotated(v, t):
        return RoPE(cos[t:t + 1], sin[t:t + 1])(tl.tensor(v[None])).numpy()[0]

    s1 = rotated(q, 7) @ rotated(k, 3)
    s2 = rotated(q, 12) @ rotated(k, 8)
    assert abs(s1 - s2) < 1e-12
    assert abs(np.linalg.norm(rotated(q, 5)) - np.linalg.norm(q)) < 1e-12  # a rotation keeps norms


def test_rope_backward_is_the_inverse_rotation():
    cos, sin = rope_tables(5, 4, dtype="float64")
    x = tl.tensor(np.random.default_rng(0).standard_normal((1, 2, 5, 4)), requires_grad=True)
    g = np.random.default_rng(1).standard_normal((1, 2, 5, 4))
    RoPE(cos, sin)(x).backward(g)
    # rotating by -angle: cos stays, sin flips sign
    np.testing.assert_allclose(x.grad, g * cos + rotate_half(g) * (-sin), rtol=0, atol=1e-14)
    assert tl.gradcheck(lambda t: RoPE(cos, sin)(t), [tl.tensor(x.data, requires_grad=True)])


def test_rope_tables_move_with_the_model_and_dtype():
    model = GPT(small_config(pos="rope"), dtype="float64")
    assert model._rope[0].dtype == np.float64
    model.to("cpu")
    idx, _ = batch(13)
    assert model(idx)[0].dtype == np.float64


# ---------------------------------------------------------------------------------------------
# PyTorch cross-check (optional)


def torch_reference(cfg, params, idx, targets):
    """A nanoGPT-style forward written directly in PyTorch, on our parameter names."""
    import torch
    import torch.nn.functional as TF
    B, T = idx.shape
    C, H, Hkv = cfg.n_embd, cfg.n_head, cfg.kv_heads
    D = C // H
    idx_t, targets_t = torch.from_numpy(idx), torch.from_numpy(targets)

    def norm(x, name):
        w, b = params[name + ".weight"], params.get(name + ".bias")
        if cfg.norm == "layernorm":
            return TF.layer_norm(x, (C,), w, b, cfg.norm_eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def lin(x, name):
        return TF.linear(x, params[name + ".weight"], params.get(name + ".bias"))

    x = params["transformer.wte.weight"][idx_t]
    if cfg.pos == "learned":
        x = x + params["transformer.wpe.weight"][:T]
    else:  # HF Llama: inv_freq = theta^(-2i/D), emb = cat(freqs, freqs), q*cos + rotate_half(q)*sin
        inv_freq = cfg.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)

        def rope(t):
            return t * cos + torch.cat([-t[..., D // 2:], t[..., :D // 2]], dim=-1) * sin
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        q, k, v = lin(norm(x, p + "ln_1"), p + "attn.c_attn").split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, Hkv, D).transpose(1, 2)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if cfg.pos == "rope":
            q, k = rope(q), rope(k)
        k = k.repeat_interleave(H // Hkv, dim=1)  # k/v head j serves query heads j·G .. j·G + G - 1
        v = v.repeat_interleave(H // Hkv, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + lin(y, p + "attn.c_proj")
        h = norm(x, p + "ln_2")
        if cfg.mlp == "gelu":
            h = TF.gelu(lin(h, p + "mlp.c_fc"), approximate="tanh")
        else:
            h = TF.silu(lin(h, p + "mlp.c_gate")) * lin(h, p + "mlp.c_fc")
        x = x + lin(h, p + "mlp.c_proj")
    logits = TF.linear(norm(x, "transformer.ln_f"), params["lm_head.weight"])
    loss = TF.cross_entropy(logits.view(-1, logits.size(-1)), targets_t.view(-1))
    return logits, loss


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
@pytest.mark.parametrize("overrides", [
    dict(),                                                                          # GPT-2 style
    dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_weights=False),
])
def test_matches_pytorch(overrides, dtype, tol):
    torch = pytest.importorskip("torch")
    cfg = GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=32, **overrides)
    tl.manual_seed(0)
    model = GPT(cfg, dtype=dtype)
    gen = np.random.default_rng(0)
    for p in model.parameters():  # move off the init so biases and gains matter
        p.data += (gen.standard_normal(p.shape) * 0.1).astype(p.dtype)
    idx, targets = gen.integers(0, 37, (3, 16)), gen.integers(0, 37, (3, 16))
    logits, loss = model(idx, targets)
    loss.backward()

    params = {}
    by_id = {}
    for name, p in model._state_entries():
        if id(p) not in by_id:
            by_id[id(p)] = torch.tensor(p.numpy(), requires_grad=True)
        params[name] = by_id[id(p)]
    t_logits, t_loss = torch_reference(cfg, params, idx, targets)
    t_loss.backward()
    scale = max(1.0, float(np.abs(t_logits.detach().numpy()).max()))
    np.testing.assert_allclose(logits.numpy(), t_logits.detach().numpy(), rtol=0, atol=tol * scale)
    assert abs(loss.item() - t_loss.item()) < tol * max(1.0, t_loss.item())
    for name, p in model.named_parameters():
        g, tg = p.grad, params[name].grad.numpy()
        assert g.dtype == np.dtype(dtype)
        np.testing.assert_allclose(g, tg, rtol=0, atol=tol * max(1e-3, np.abs(tg).max()), err_msg=name)
