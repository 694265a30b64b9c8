"""Gradient-check cases for the fused layers in tinyllm/nn/functional.py (float64, small shapes)."""
import numpy

from tinyllm import rng
from tinyllm.cases import gradcheck_cases
from tinyllm.nn import functional as F


@gradcheck_cases
def linear(b):
    yield "linear 2-D with bias", F.linear, [b.randn(4, 3), b.randn(5, 3), b.randn(5)]
    yield "linear 3-D input with bias", F.linear, [b.randn(2, 3, 4), b.randn(5, 4), b.randn(5)]
    yield "linear 3-D input, no bias", F.linear, [b.randn(2, 3, 4), b.randn(5, 4)]
    yield "linear 1-D input", F.linear, [b.randn(4), b.randn(3, 4), b.randn(3)]
    x, w = b.randn(2, 4), b.randn(3, 4)
    x.requires_grad = False
    yield "linear, constant input", F.linear, [x, w]
    # inputs whose creator can rebuild them for Linear's backward (rebuilt when big, see F.REBUILD_MIN_NUMBERS)
    yield "linear after gelu", lambda h, w: F.linear(F.gelu(h), w), [b.randn(2, 3, 4), b.randn(5, 4)]
    yield "linear after layer_norm", lambda x, g, c, w, bias: F.linear(F.layer_norm(x, g, c), w, bias), \
        [b.randn(2, 3, 4), b.randn(4), b.randn(4), b.randn(5, 4), b.randn(5)]
    yield "linear after rms_norm", lambda x, g, w: F.linear(F.rms_norm(x, g), w), [b.randn(3, 4), b.randn(4), b.randn(2, 4)]


@gradcheck_cases
def embedding(b):
    ids = b.const(numpy.array([[0, 2, 2], [4, 0, 0]]))  # repeated ids add up
    yield "embedding (B, T) with repeats", lambda w: F.embedding(ids, w), [b.randn(5, 3)]
    ids1 = b.ints(6, 7)
    yield "embedding 1-D ids", lambda w: F.embedding(ids1, w), [b.randn(6, 2)]


@gradcheck_cases
def norms(b):
    yield "layer_norm weight and bias", F.layer_norm, [b.randn(2, 3, 5), b.randn(5), b.randn(5)]
    yield "layer_norm no weight, no bias", F.layer_norm, [b.randn(4, 6)]
    yield "layer_norm weight only", F.layer_norm, [b.randn(3, 5), b.randn(5)]
    yield "layer_norm bias only", lambda x, bias: F.layer_norm(x, None, bias), [b.randn(3, 5), b.randn(5)]
    yield "layer_norm eps=0.1, 1-D", lambda x, w: F.layer_norm(x, w, eps=0.1), [b.randn(7), b.randn(7)]
    yield "rms_norm with weight", F.rms_norm, [b.randn(2, 3, 5), b.randn(5)]
    yield "rms_norm no weight", F.rms_norm, [b.randn(4, 6)]


@gradcheck_cases
def activations(b):
    yield "gelu", F.gelu, [b.randn(3, 5, scale=2.0)]
    yield "silu", F.silu, [b.randn(3, 5, scale=2.0)]


@gradcheck_cases
def softmaxes(b):
    yield "softmax last axis", F.softmax, [b.randn(3, 5)]
    yield "softmax axis 0", lambda x: F.softmax(x, axis=0), [b.randn(4, 3)]
    yield "softmax axis 1 of 3-D", lambda x: F.softmax(x, axis=1), [b.randn(2, 3, 4)]
    yield "log_softmax last axis", F.log_softmax, [b.randn(3, 5)]
    yield "log_softmax axis 0", lambda x: F.log_softmax(x, axis=0), [b.randn(4, 3)]


@gradcheck_cases
def cross_entropy(b):
    t = b.ints(7, 6)
    yield "cross_entropy (N, V)", lambda z: F.cross_entropy(z, t), [b.randn(6, 7)]
    t3 = b.const(numpy.array([[1, -100, 3], [0, 4, -100]]))
    yield "cross_entropy (B, T, V) with ignored targets", lambda z: F.cross_entropy(z, t3), [b.randn(2, 3, 5)]
    t1 = b.const(numpy.array([2, 2, 0, 9]))
    yield "cross_entropy ignore_index=9", lambda z: F.cross_entropy(z, t1, ignore_index=9), [b.randn(4, 3)]
    yield "cross_entropy large logits", lambda z: F.cross_entropy(z * 50.0, t), [b.randn(6, 7)]


@gradcheck_cases
def dropout(b):
    def fn(x):
        rng.manual_seed(1234)  # the same mask at every evaluation
        return F.dropout(x, 0.3)
    yield "dropout p=0.3 (fixed seed)", fn, [b.randn(4, 6)]


@gradcheck_cases
def attention(b):
    sdpa = F.scaled_dot_product_attention
    yield "attention MHA causal", sdpa, [b.randn(2, 2, 4, 3), b.randn(2, 2, 4, 3), b.randn(2, 2, 4, 3)]
    yield "attention MHA not causal", lambda q, k, v: sdpa(q, k, v, causal=False), \
        [b.randn(1, 2, 3, 4), b.randn(1, 2, 5, 4), b.randn(1, 2, 5, 4)]
    yield "attention GQA causal, S > T", sdpa, [b.randn(1, 4, 2, 3), b.randn(1, 2, 5, 3), b.randn(1, 2, 5, 3)]
    yield "attention MQA causal", sdpa, [b.randn(2, 3, 3, 2), b.randn(2, 1, 3, 2), b.randn(2, 1, 3, 2)]
    yield "attention GQA not causal", lambda q, k, v: sdpa(q, k, v, causal=False), \
        [b.randn(1, 4, 3, 2), b.randn(1, 2, 4, 2), b.randn(1, 2, 4, 2)]
    split = F.ScaledDotProductAttention  # causal queries in two blocks (normally from T = 128 on)
    yield "attention MHA causal, two query blocks", lambda q, k, v: split(True, split_min=2)(q, k, v), \
        [b.randn(1, 2, 5, 3), b.randn(1, 2, 5, 3), b.randn(1, 2, 5, 3)]
    yield "attention GQA causal, S > T, two query blocks", lambda q, k, v: split(True, split_min=2)(q, k, v), \
        [b.randn(1, 4, 4, 2), b.randn(1, 2, 6, 2), b.randn(1, 2, 6, 2)]
    # self-attention from packed qkv (B, T, (H + 2·Hkv)·D), as the model calls it
    from tinyllm.model import rope_tables
    yield "self-attention MHA, packed qkv", lambda qkv: F.self_attention(qkv, 2), [b.randn(2, 4, 2 * 2 * 3 + 2 * 3)]
    rope = tuple(b.const(t) for t in rope_tables(3, 2, theta=10.0, dtype="float64"))
    yield "self-attention GQA with RoPE", lambda qkv: F.self_attention(qkv, 4, 2, rope=rope), \
        [b.randn(1, 3, (4 + 2 * 2) * 2)]
    yield "self-attention MQA, two query blocks", lambda qkv: F.SelfAttention(2, 1, split_min=2)(qkv), \
        [b.randn(2, 5, (2 + 2 * 1) * 3)]
