"""The standard layers as Modules (as torch.nn): each holds its Parameters and calls tinyllm.nn.functional.

Initialisation follows PyTorch's defaults, drawn from tinyllm's seeded host generator (so
`tl.manual_seed` makes a model repeatable, on either device):
- Linear: weight and bias ~ U(−1/sqrt(in), 1/sqrt(in)) (what torch.nn.Linear's kaiming_uniform gives);
- Embedding: weight ~ N(0, 1);
- LayerNorm / RMSNorm: weight 1, bias 0.
The GPT applies its own GPT-2 initialisation (N(0, 0.02), ...) on top of these.
Every layer takes `dtype=` (default float32) and `device=` ("cpu" or "cuda").
"""
import math

import numpy

from tinyllm import backend, rng
from tinyllm.nn import functional as F
from tinyllm.nn.module import Module, Parameter


def _parameter(values, dtype, device):
    """A Parameter from host float64 values, cast to dtype and moved to device."""
    array = numpy.asarray(values).astype(backend.as_dtype(dtype))
    return Parameter(backend.to_device(array, device))


class Linear(Module):
    """y = x Wᵀ + b with W (out_features, in_features) and b (out_features,) (or no bias)."""

    def __init__(self, in_features, out_features, bias=True, *, dtype="float32", device="cpu"):
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        gen = rng.host()
        self.weight = _parameter(gen.uniform(-bound, bound, (out_features, in_features)), dtype, device)
        self.bias = _parameter(gen.uniform(-bound, bound, (out_features,)), dtype, device) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def __repr__(self):
        return f"Linear(in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None})"


class Embedding(Module):
    """A table of `num` rows of size `dim`; forward(ids) looks rows up (ids: int array or Tensor, any shape)."""

    def __init__(self, num, dim, *, dtype="float32", device="cpu"):
        self.num_embeddings, self.embedding_dim = num, dim
        self.weight = _parameter(rng.host().standard_normal((num, dim)), dtype, device)

    def forward(self, ids):
        return F.embedding(ids, self.weight)

    def __repr__(self):
        return f"Embedding({self.num_embeddings}, {self.embedding_dim})"


class LayerNorm(Module):
    """Layer normalisation over the last axis of size `dim`, with a gain (and a bias unless bias=False)."""

    def __init__(self, dim, eps=1e-5, bias=True, *, dtype="float32", device="cpu"):
        self.dim, self.eps = dim, eps
        self.weight = _parameter(numpy.ones(dim), dtype, device)
        self.bias = _parameter(numpy.zeros(dim), dtype, device) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def __repr__(self):
        return f"LayerNorm({self.dim}, eps={self.eps}, bias={self.bias is not None})"


class RMSNorm(Module):
    """RMS normalisation over the last axis of size `dim`, with a gain and no bias."""

    def __init__(self, dim, eps=1e-5, *, dtype="float32", device="cpu"):
        self.dim, self.eps = dim, eps
        self.weight = _parameter(numpy.ones(dim), dtype, device)
        self.bias = None

    def forward(self, x):
        return F.rms_norm(x, self.weight, self.eps)

    def __repr__(self):
        return f"RMSNorm({self.dim}, eps={self.eps})"


class Dropout(Module):
    """Inverted dropout with probability p while training; the identity in eval mode."""

    def __init__(self, p=0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)

    def __repr__(self):
        return f"Dropout(p={self.p})"
