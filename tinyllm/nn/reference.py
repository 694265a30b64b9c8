"""The fused layers again, composed from primitive ops only: slow, obvious, and the tests' yardstick.

Every function here computes what its namesake in tinyllm/nn/functional.py computes, but builds
the graph out of `+ - * / exp log tanh sqrt sum mean max @ reshape getitem`, so autograd derives
the backward by the chain rule through each small step. The tests check that the hand-derived
fused backward gives the same gradients. Read these side by side with the fused ops and
docs/layers.md: the formula here is the forward line the derivation starts from.
"""
import math

import numpy

from tinyllm import ops, rng
from tinyllm.autograd import Tensor
from tinyllm.backend import get_array_module


def linear(x, weight, bias=None):
    y = x @ weight.T
    return y + bias if bias is not None else y


def embedding(ids, weight):
    ids = ids.data if isinstance(ids, Tensor) else ids
    return weight[ids]


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)
    y = xc / ops.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def rms_norm(x, weight=None, eps=1e-5):
    y = x / ops.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    return y * weight if weight is not None else y


def gelu(x):
    return 0.5 * x * (1.0 + ops.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def silu(x):
    return x / (1.0 + ops.exp(-x))


def softmax(x, axis=-1):
    e = ops.exp(x - x.max(axis=axis, keepdims=True).detach())  # the shift is a constant: it cancels
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    z = x - x.max(axis=axis, keepdims=True).detach()
    return z - ops.log(ops.exp(z).sum(axis=axis, keepdims=True))


def cross_entropy(logits, targets, ignore_index=-100):
    targets = targets.data if isinstance(targets, Tensor) else targets
    xp = get_array_module(logits.data)
    V = logits.shape[-1]
    logp = log_softmax(logits.reshape(-1, V))                 # (N, V)
    t = targets.reshape(-1)
    valid = t != ignore_index
    picked = logp[xp.arange(t.shape[0])[valid], t[valid]]     # (number of valid rows,)
    return -picked.sum() / float(valid.sum())


def dropout(x, p=0.5, training=True):
    """Draws the same mask as F.dropout from the same generator state."""
    if not training or p == 0.0:
        return x
    xp = get_array_module(x.data)
    keep = rng.for_array_module(xp).random(x.shape, dtype=numpy.float32) >= p
    return x * keep.astype(x.dtype) * (1.0 / (1.0 - p) if p < 1.0 else 1.0)


def scaled_dot_product_attention(q, k, v, causal=True):
    """Repeats each k/v head for its group of query heads, then plain softmax(q kᵀ/sqrt(D)) v."""
    xp = get_array_module(q.data)
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    heads = xp.arange(H) // (H // Hkv)                        # k/v head of each query head
    k, v = k[:, heads], v[:, heads]                           # (B, H, S, D)
    scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(D))   # (B, H, T, S)
    if causal:
        i = xp.arange(T)[:, None]
        j = xp.arange(S)[None, :]
        scores = ops.where(j <= S - T + i, scores, -numpy.inf)
    return softmax(scores, axis=-1) @ v
