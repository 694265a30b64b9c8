"""Gradient-check cases for the model: the RoPE op and whole one-layer GPTs of every variant.

A GPT case checks the loss with respect to EVERY parameter of the model: the inputs handed to
gradcheck are the model's own Parameter objects, which gradcheck perturbs in place, and the case
function simply runs `model(idx, targets)`. The models are tiny (n_embd 8, vocab 11, T 5, B 2) so
every element of every parameter is checked and the whole registry still runs in seconds.
"""
import numpy

from tinyllm.cases import gradcheck_cases

# Each option appears at least once: pos, norm, mlp, attention kind (MHA/GQA/MQA), bias, tying.
GPT_VARIANTS = {
    "learned/layernorm/gelu/MHA/bias/tied":
        dict(pos="learned", norm="layernorm", mlp="gelu", n_head=2, n_kv_head=None, bias=True, tie_weights=True),
    "rope/rmsnorm/swiglu/GQA/no-bias/untied":
        dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_head=4, n_kv_head=2, bias=False, tie_weights=False),
    "rope/layernorm/gelu/MQA/no-bias/tied":
        dict(pos="rope", norm="layernorm", mlp="gelu", n_head=2, n_kv_head=1, bias=False, tie_weights=True),
    "learned/rmsnorm/swiglu/MQA/bias/untied":
        dict(pos="learned", norm="rmsnorm", mlp="swiglu", n_head=2, n_kv_head=1, bias=True, tie_weights=False),
}


def tiny_gpt(device="cpu", seed=0, **options):
    """A one-layer float64 GPT (n_embd 8, vocab 11, block 5, hidden 8) for gradient checks."""
    import tinyllm as tl
    from tinyllm import rng
    settings = dict(vocab_size=11, block_size=5, n_layer=1, n_embd=8, mlp_hidden=8)
    settings.update(options)
    state = rng.get_state()
    rng.manual_seed(seed)
    try:
        model = tl.GPT(tl.GPTConfig(**settings), dtype="float64", device=device)
    finally:
        rng.set_state(state)  # building a case must not move the user's random stream
    # GPT-2 init makes every weight tiny (std 0.02), so most of the model would sit in its linear
    # regime; larger weights make the check meaningful for the nonlinear parts too.
    gen = numpy.random.default_rng(seed + 1)
    for p in model.parameters():
        values = gen.standard_normal(p.shape) * 0.5 + (1.0 if p.ndim == 1 else 0.0)  # gains near 1
        p.data[...] = _to(values, p.data)
    return model


def _to(values, like):
    """Host values as an array next to `like` (NumPy or CuPy)."""
    from tinyllm import backend
    return backend.get_array_module(like).asarray(values)


@gradcheck_cases
def rope(b):
    from tinyllm.model import RoPE, rope_tables
    cos, sin = rope_tables(5, 4, theta=10000.0, dtype="float64")
    cos, sin = b.const(cos), b.const(sin)
    yield "RoPE (2, 3, 5, 4)", lambda x: RoPE(cos, sin)(x), [b.randn(2, 3, 5, 4)]
    # a transposed (non-contiguous) input, as the attention layer hands it over
    yield "RoPE transposed view", lambda x: RoPE(cos, sin)(x.transpose(0, 2, 1, 3)), [b.randn(2, 5, 3, 4)]
    cos6, sin6 = (b.const(t) for t in rope_tables(3, 6, theta=100.0, dtype="float64"))
    yield "RoPE D=6 theta=100", lambda x: RoPE(cos6, sin6)(x), [b.randn(1, 2, 3, 6)]


@gradcheck_cases
def gpt(b):
    for label, options in GPT_VARIANTS.items():
        model = tiny_gpt(b.device, **options)
        idx = b.ints(11, 2, 5)
        targets = b.ints(11, 2, 5)
        yield (f"GPT {label} (all parameters)", lambda *params, model=model, idx=idx, targets=targets:
               model(idx, targets)[1], model.parameters())
