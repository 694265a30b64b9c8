"""The layers of a GPT as fused ops: `import tinyllm.nn.functional as F`.

Each heavy layer is ONE `Function` whose forward and hand-derived backward sit side by side.
Composing a layer from primitive ops (tinyllm/ops.py) would give the same numbers (the tests
check exactly that, against tinyllm/nn/reference.py), but would record a dozen nodes and keep a
dozen temporaries alive; a fused op keeps only what its backward needs.

Notation, as in tinyllm/ops.py: y is the op's output, gy = dL/dy the upstream gradient, gx = dL/dx
what backward returns. Shapes: N rows (every leading axis flattened), C features, V vocabulary,
B batch, H query heads, Hkv key/value heads, T queries, S keys, D head size. The full derivations
are in docs/layers.md, under the same names as the code.

Performance notes (all of them keep the code readable):
- float32 stays float32: constants are Python floats, which take the array's dtype;
- arrays the op created itself are updated in place (`y *= ...`), the inputs never are;
- matrix products are 2-D GEMMs (linear) or plain batched matmuls (attention);
- on the CPU, the heavy ops cut their rows over tinyllm.threads (one call when there is one thread).
"""
import functools
import math

import numpy

from tinyllm import backend, rng, threads
from tinyllm.autograd import GRAPH_FREED, Function, Tensor
from tinyllm.backend import get_array_module

__all__ = ["linear", "embedding", "layer_norm", "rms_norm", "gelu", "silu", "softmax", "log_softmax",
           "cross_entropy", "dropout", "scaled_dot_product_attention", "self_attention"]


def _rows(g):
    """Sum over every axis but the last: (..., C) -> (C,). The gradient of a per-feature parameter."""
    return g.reshape(-1, g.shape[-1]).sum(axis=0)


def _rows_dot(a, b):
    """Σ_rows a ⊙ b: (..., C), (..., C) -> (C,), without the temporary a * b (einsum fuses the two)."""
    C = a.shape[-1]
    return get_array_module(a).einsum("nc,nc->c", a.reshape(-1, C), b.reshape(-1, C))


def _sum_last(a):
    """Sum over the last axis, kept as size 1: (..., C) -> (..., 1).

    As a matrix-vector product with ones: BLAS sums short rows faster than einsum, and einsum
    faster than .sum(axis=-1) (part 6 of scripts/bench_cpu_parts.py).
    """
    return (a @ _constant_vector(get_array_module(a), a.shape[-1], 1.0, a.dtype))[..., None]


def _mean_last(a):
    """Mean over the last axis, kept as size 1: (..., C) -> (..., 1): the product with (1/C, ..., 1/C)."""
    return (a @ _constant_vector(get_array_module(a), a.shape[-1], 1.0 / a.shape[-1], a.dtype))[..., None]


@functools.lru_cache(maxsize=64)
def _constant_vector(xp, n, value, dtype):
    """(value, ..., value) of length n, made once per shape and kept (read only): a step makes ~50
    row sums and means, and a new vector each time cost as much as the product on small rows."""
    return _read_only(xp.full(n, value, dtype=dtype))


def _read_only(a):
    """a, marked read only where the array library can (NumPy): for arrays made once and kept."""
    if isinstance(a, numpy.ndarray):
        a.flags.writeable = False
    return a


def _dot_last(a, b):
    """Σ_c a ⊙ b over the last axis, kept as size 1: (..., C), (..., C) -> (..., 1), no temporary.

    NumPy 2's vecdot (faster than einsum on short rows, part 6 of scripts/bench_cpu_parts.py), else einsum.
    """
    xp = get_array_module(a)
    vecdot = getattr(xp, "vecdot", None)
    return (vecdot(a, b) if vecdot is not None else xp.einsum("...c,...c->...", a, b))[..., None]


def _raw_int_array(a, like, what):
    """ids/targets given as an int Tensor, an array or a list -> a raw integer array next to `like`."""
    if isinstance(a, Tensor):
        a = a.data
    xp = get_array_module(like)
    if isinstance(a, (list, tuple, int)):
        a = xp.asarray(a)
    if not hasattr(a, "dtype"):
        raise TypeError(f"{what} must be an integer array or Tensor, got {type(a).__name__}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{what} must hold integers, got dtype {a.dtype}; convert them with .astype('int64')")
    if backend.device_of(a) != backend.device_of(like):
        raise RuntimeError(f"{what} are on {backend.device_of(a)} but the tensor is on {backend.device_of(like)}; "
                           "move them first: tinyllm never copies between host and GPU silently")
    return a


# ---------------------------------------------------------------------------------------------
# Linear: y = x Wᵀ + b


class Linear(Function):
    """x (..., in), W (out, in), b (out,) -> y (..., out), as ONE 2-D matrix product.

    Backward needs x for gW. When x's creator can rebuild x from what it keeps for its own backward
    (its `rebuild_output`: GELU, layer norm, RMSNorm) and x is big (REBUILD_MIN_NUMBERS), `linear`
    hands that creator over and x is not kept: one activation fewer per layer norm and per MLP
    until backward (docs/layers.md, "What backward keeps").
    """

    def __init__(self, input_creator=None):
        self.input_creator = input_creator        # None: keep x

    def forward(self, x, w, b=None):
        if w.ndim != 2 or x.ndim == 0 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"linear: x of shape {x.shape} (..., in) does not fit weight {w.shape} (out, in)")
        if b is not None and b.shape != (w.shape[0],):
            raise ValueError(f"linear: bias of shape {b.shape} should be ({w.shape[0]},) for weight {w.shape}")
        self.x_shape = x.shape
        x2 = x.reshape(-1, x.shape[-1])           # (N, in): every leading axis is one more row
        self.x2 = x2 if self.input_creator is None else None
        self.w = w                                # (out, in)
        y2 = threads.matmul(x2, w.T)              # (N, out); its rows split over the CPU threads, if any
        if b is not None:
            y2 += b                               # (out,) broadcast over rows
        return y2.reshape(x.shape[:-1] + (w.shape[0],))

    # y2 = x2 Wᵀ + b, row by row: y[n, o] = Σ_i x[n, i] W[o, i] + b[o]. So
    #   gx[n, i] = Σ_o gy[n, o] W[o, i]        -> gx2 = gy2 W          (N, in)
    #   gW[o, i] = Σ_n gy[n, o] x[n, i]        -> gW  = gy2ᵀ x2        (out, in)
    #   gb[o]    = Σ_n gy[n, o]                -> gb  = gy2 summed over rows
    def backward(self, gy):
        gy2 = gy.reshape(-1, gy.shape[-1])        # (N, out)
        gx = threads.matmul(gy2, self.w).reshape(self.x_shape) if self.needs_input_grad[0] else None
        gw = threads.matmul(gy2.T, self.input_rows()) if self.needs_input_grad[1] else None
        if len(self.needs_input_grad) == 2:
            return gx, gw
        gb = gy2.sum(axis=0) if self.needs_input_grad[2] else None
        return gx, gw, gb

    def input_rows(self):
        """x2, kept or rebuilt by x's creator (whose backward comes after this one: it still has its arrays)."""
        if self.input_creator is None:
            return self.x2
        if self.input_creator.parents is None:    # released by an earlier backward
            raise RuntimeError(GRAPH_FREED)
        return self.input_creator.rebuild_output().reshape(-1, self.x_shape[-1])


# Linear has x's creator rebuild x in backward (see Linear) from this many numbers in x. Rebuilding
# costs backward a pass or two over memory, keeping x costs memory until backward: on "char" of
# scripts/bench_cpu.py (x of 1024 rows of 384 or 1536 per process) rebuilding kept 78 MiB less of
# 571 for about 1% of the step's time, on "baby" (384 rows of 128 or 512) it made the step 1-3%
# slower for little memory (docs/benchmarks.md, eighth round).
REBUILD_MIN_NUMBERS = 1 << 18


def linear(x, weight, bias=None):
    """y = x @ weight.T + bias, weight (out, in) as in PyTorch; x (..., in) -> (..., out)."""
    rebuilt = isinstance(x, Tensor) and hasattr(x._ctx, "rebuild_output") and x.size >= REBUILD_MIN_NUMBERS
    creator = x._ctx if rebuilt else None
    return Linear(creator)(x, weight) if bias is None else Linear(creator)(x, weight, bias)


# ---------------------------------------------------------------------------------------------
# Embedding: y = W[ids]


class Embedding(Function):
    """Row lookup: ids (any shape) into a table W (num, dim) -> y (*ids.shape, dim)."""

    def __init__(self, ids):
        self.ids = ids                            # integer array, not differentiable

    def forward(self, w):
        self.w_shape = w.shape
        return get_array_module(w).take(w, self.ids, axis=0)   # (*ids.shape, dim)

    # y[p] = W[ids[p]] for every position p, so W's row r receives the gradient of every position
    # that read it:  gW[r] = Σ_{p: ids[p] = r} gy[p]   (a scatter-add: repeated ids add up).
    def backward(self, gy):
        xp = get_array_module(gy)
        gw = xp.zeros(self.w_shape, dtype=gy.dtype)          # (num, dim)
        ids, rows = self.ids.reshape(-1), gy.reshape(-1, self.w_shape[1])   # (N,), (N, dim)
        if xp is numpy:
            _scatter_add_rows_sorted(gw, ids, rows)
        else:
            backend.scatter_add(gw, ids, rows)               # atomic adds on the GPU
        return gw


def _scatter_add_rows_sorted(target, ids, rows):
    """target[ids] += rows with repeated ids adding up, the fast way on the CPU.

    numpy.add.at does the same, one row at a time (slow); instead sort the ids so that equal ids
    sit next to each other, sum each run of equal ids with one add.reduceat, and write every distinct
    row once. Same result, up to the order of float additions.
    """
    if ids.size == 0:
        return
    order = numpy.argsort(ids, kind="stable")                # (N,)
    sorted_ids = ids[order]
    starts = numpy.flatnonzero(numpy.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))
    target[sorted_ids[starts]] += numpy.add.reduceat(rows[order], starts, axis=0)


def embedding(ids, weight):
    """weight[ids]: ids an int array or int Tensor of any shape, weight (num_embeddings, dim)."""
    ids = _raw_int_array(ids, weight.data, "embedding ids")
    num = weight.shape[0]
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= num):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise IndexError(f"embedding: id {bad} is out of range for a table of {num} rows (ids must be in [0, {num}))")
    return Embedding(ids)(weight)


# ---------------------------------------------------------------------------------------------
# LayerNorm and RMSNorm over the last axis


class LayerNorm(Function):
    """y = (x - mean) * rstd * w + b over the last axis; rstd = 1 / sqrt(var + eps), biased var."""

    def __init__(self, eps=1e-5, has_weight=True, has_bias=True):
        self.eps, self.has_weight, self.has_bias = eps, has_weight, has_bias

    def forward(self, x, *params):
        w = params[0] if self.has_weight else None
        b = params[-1] if self.has_bias else None
        xp = get_array_module(x)
        X = x.reshape(-1, x.shape[-1])                       # (N, C) rows
        n = xp.empty(X.shape, dtype=x.dtype)                 # n = (x − mean)·rstd, saved instead of x
        rstd = xp.empty((X.shape[0], 1), dtype=x.dtype)
        y = xp.empty(X.shape, dtype=x.dtype)
        threads.parallel_for(len(X), lambda i, j: self.forward_rows(X[i:j], w, b, n[i:j], rstd[i:j], y[i:j]), xp,
                             size=X.size)
        self.n, self.rstd, self.w, self.b = n, rstd, w, b    # n, not x: backward needs only n (same memory)
        return y.reshape(x.shape)

    def rebuild_output(self):
        """y again, from the n that backward keeps (for Linear, see there): the same numbers as forward's."""
        return _scale_shift(self.n, self.w, self.b)

    def forward_rows(self, x, w, b, n, rstd, y):
        """Rows x (N, C) -> n, rstd (N, 1) and y, written into the arrays given."""
        xp = get_array_module(x)
        xp.subtract(x, _mean_last(x), out=n)                 # centred x
        var = _dot_last(n, n) / x.shape[-1]                  # (N, 1) biased variance
        xp.divide(1.0, xp.sqrt(var + self.eps), out=rstd)    # (N, 1)
        n *= rstd                                            # n = (x − mean)·rstd
        _scale_shift(n, w, b, out=y)

    # With n = (x - mean)·rstd and y = n·w + b (C features per row; means are over them):
    #   gw = Σ_rows gy·n,   gb = Σ_rows gy,   gn = gy·w.
    # n depends on x directly, through mean and through rstd:
    #   ∂n_j/∂x_i = rstd·(δ_ij − 1/C) − n_j·n_i·rstd/C
    # so gx_i = Σ_j gn_j ∂n_j/∂x_i = rstd·(gn_i − mean(gn) − n_i·mean(gn·n)).
    def backward(self, gy):
        xp = get_array_module(gy)
        GY = gy.reshape(self.n.shape)                        # (N, C) rows
        gx = xp.empty(self.n.shape, dtype=gy.dtype) if self.needs_input_grad[0] else None
        need_w = self.has_weight and self.needs_input_grad[1]
        need_b = self.has_bias and self.needs_input_grad[-1]
        rows = _block_rows(GY)

        def part(i, j):                                      # this thread's rows, in blocks that stay in cache
            return [self.backward_rows(GY[b:e], self.n[b:e], self.rstd[b:e], None if gx is None else gx[b:e],
                                       need_w, need_b) for b, e in threads.blocks(i, j, rows)]

        blocks = [block for done in threads.parallel_for(len(GY), part, xp, size=GY.size) for block in done]
        gw = sum(block[0] for block in blocks) if need_w else None   # the row sums add up over the blocks
        gb = sum(block[1] for block in blocks) if need_b else None
        if gx is not None:
            gx = gx.reshape(gy.shape)
        grads = (gx,) + ((gw,) if self.has_weight else ()) + ((gb,) if self.has_bias else ())
        return grads if len(grads) > 1 else gx

    def backward_rows(self, gy, n, rstd, gx, need_w, need_b):
        """Rows gy (N, C) -> gx written into gx (unless None); returns this part's (gw, gb) row sums."""
        gw = _rows_dot(gy, n) if need_w else None            # (C,)
        gb = _rows(gy) if need_b else None                   # (C,)
        if gx is not None:
            if self.w is not None:
                get_array_module(gy).multiply(gy, self.w, out=gx)   # gn, then gx in place
            else:
                gx[...] = gy
            gn_mean = _mean_last(gx)                         # (N, 1) mean(gn)
            gn_n_mean = _dot_last(gx, n) / n.shape[-1]       # (N, 1) mean(gn·n)
            gx -= gn_mean
            gx -= n * gn_n_mean
            gx *= rstd
        return gw, gb


def _scale_shift(n, w, b, out=None):
    """y = n·w + b (w, b: per feature, or None), into out or a new array; n itself when there is
    neither w nor b and no out (for readers only, as Linear's backward)."""
    if out is None and w is None and b is None:
        return n
    y = out if out is not None else get_array_module(n).empty_like(n)
    if w is not None:
        get_array_module(n).multiply(n, w, out=y)
    else:
        y[...] = n
    if b is not None:
        y += b
    return y


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """Normalise over the last axis to mean 0 and variance 1, then scale by weight and shift by bias."""
    params = [p for p in (weight, bias) if p is not None]
    return LayerNorm(eps, weight is not None, bias is not None)(x, *params)


class RMSNorm(Function):
    """y = x * rstd * w over the last axis; rstd = 1 / sqrt(mean(x²) + eps) (no centring, no bias)."""

    def __init__(self, eps=1e-5, has_weight=True):
        self.eps, self.has_weight = eps, has_weight

    def forward(self, x, *params):
        w = params[0] if self.has_weight else None
        xp = get_array_module(x)
        rstd = 1.0 / xp.sqrt(_dot_last(x, x) / x.shape[-1] + self.eps)   # (..., 1)
        n = x * rstd                                         # (..., C) n = x·rstd
        self.n, self.rstd, self.w = n, rstd, w               # n, not x: backward needs only n (same memory)
        return _scale_shift(n, w, None, out=xp.empty_like(n))   # y = n·w (a copy of n without w)

    def rebuild_output(self):
        """y again, from the n that backward keeps (for Linear): the same numbers as forward's."""
        return _scale_shift(self.n, self.w, None)

    # With n = x·rstd, y = n·w:  gw = Σ_rows gy·n,  gn = gy·w, and since ∂rstd/∂x_i = −rstd³·x_i/C,
    #   ∂n_j/∂x_i = rstd·δ_ij − n_j·n_i·rstd/C   so   gx = rstd·(gn − n·mean(gn·n)).
    def backward(self, gy):
        n = self.n
        gx = gw = None
        if self.has_weight and self.needs_input_grad[1]:
            gw = _rows_dot(gy, n)                            # (C,)
        if self.needs_input_grad[0]:
            gx = gy * self.w if self.w is not None else gy.copy()   # gn, then gx in place
            gn_n_mean = _dot_last(gx, n) / n.shape[-1]       # (..., 1) mean(gn·n)
            gx -= n * gn_n_mean
            gx *= self.rstd
        return (gx, gw) if self.has_weight else gx


def rms_norm(x, weight=None, eps=1e-5):
    """Divide by the root mean square over the last axis, then scale by weight."""
    return RMSNorm(eps, True)(x, weight) if weight is not None else RMSNorm(eps, False)(x)


# ---------------------------------------------------------------------------------------------
# Activations

_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


class GELU(Function):
    """GELU, tanh approximation (GPT-2): y = 0.5·x·(1 + tanh(k·(x + a·x³))), k = sqrt(2/π), a = 0.044715.

    Saves x and s = 1 + tanh(u): one more (N, 4C) array per block than saving x alone, for a
    backward of 9 passes instead of 14 with tanh recomputed (tanh alone costs about 5 passes); the
    backward takes about half the time (docs/layers.md).
    """

    def forward(self, x):
        self.x = x
        xp = get_array_module(x)
        y = xp.empty(x.shape, dtype=x.dtype)
        self.s = xp.empty(x.shape, dtype=x.dtype)
        return _elementwise(_gelu_forward, y, x, self.s)

    def rebuild_output(self):
        """y = 0.5·x·s again, from the x and s that backward keeps (for Linear): forward's numbers."""
        y = get_array_module(self.x).empty(self.x.shape, dtype=self.x.dtype)
        return _elementwise(_gelu_from_s, y, self.x, self.s)

    # dy/dx = 0.5·(1 + th) + 0.5·x·(1 − th²)·du/dx,   du/dx = k·(1 + 3a·x²).
    # With s = 1 + th, 1 − th² = s·(2 − s), so   dy/dx = s·(0.5 + p·(2 − s)),   p = 0.5·x·du/dx
    # (with s kept from forward: 9 passes over the (N, 4C) arrays).
    def backward(self, gy):
        gx = get_array_module(gy).empty(gy.shape, dtype=gy.dtype)
        return _elementwise(_gelu_backward, gx, self.x, self.s, gy)


def _gelu_forward(y, x, s):
    """y = 0.5·x·(1 + tanh u), written into y; s = 1 + tanh u into s."""
    xp = get_array_module(x)
    th = _gelu_tanh(x, xp.square(x, out=s), out=s)       # tanh(u), in place of x²
    th += 1.0                                            # s = 1 + tanh u
    _gelu_from_s(y, x, s)


def _gelu_from_s(y, x, s):
    """y = 0.5·x·s, written into y (forward's last two passes, and GELU.rebuild_output)."""
    get_array_module(x).multiply(s, x, out=y)
    y *= 0.5


def _gelu_backward(gx, x, s, gy):
    """gx = gy · dy/dx, written into gx."""
    xp = get_array_module(x)
    p = xp.square(x, out=gx)                                 # x² (square: faster than x * x)
    p *= 1.5 * _GELU_K * _GELU_A
    p += 0.5 * _GELU_K
    p *= x                                                   # p = 0.5·x·k·(1 + 3a·x²)
    p *= xp.subtract(2.0, s)
    p += 0.5
    p *= s                                                   # dy/dx
    p *= gy


def _gelu_tanh(x, x2, out=None):
    """tanh(u) = tanh(k·x·(1 + a·x²)) from x and x², into out (a fresh array by default; out=x2 is fine)."""
    th = get_array_module(x).multiply(x2, _GELU_K * _GELU_A, out=out)
    th += _GELU_K
    th *= x                                                  # u = k·x + k·a·x³
    return get_array_module(x).tanh(th, out=th)


# Elementwise kernels of several passes (GELU's 8 and 9) run over blocks of this many elements on the
# CPU, so that their arrays stay in a core's L2 cache from one pass to the next: GELU on one process's
# rows of "char" (4, 256, 1536) took 1.84 ms forward and 1.77 ms backward in blocks against 2.91 and
# 3.26 ms whole; on "baby"'s (6, 64, 512) 0.23 ms either way (part 2 of scripts/bench_cpu_parts.py).
ELEMENTWISE_BLOCK = 1 << 16


def _elementwise(kernel, out, *arrays):
    """kernel(out_part, *parts) on matching parts of the flattened arrays, cut over the CPU threads,
    each thread's part in blocks of ELEMENTWISE_BLOCK elements (one block on a GPU).

    out is a fresh contiguous array of the op's (so its flat view writes through); the inputs may
    be any views (flattening copies those that are not contiguous). Returns out.
    """
    xp = get_array_module(out)
    flat_out, flat = out.reshape(-1), [a.reshape(-1) for a in arrays]
    block = ELEMENTWISE_BLOCK if xp is numpy else out.size

    def part(i, j):
        for b, e in threads.blocks(i, j, block):
            kernel(flat_out[b:e], *(a[b:e] for a in flat))

    threads.parallel_for(out.size, part, xp, size=out.size)
    return out


def _block_rows(x):
    """Rows (N, C) per block of about ELEMENTWISE_BLOCK numbers on the CPU (all of them on a GPU).

    Layer norm's backward takes its rows in such blocks: 0.75 against 0.89 ms on one process's rows of
    "char" (1024, 384), one block either way for "baby"'s (384, 128) (part 8 of
    scripts/bench_cpu_parts.py). Its forward gains nothing from blocks and takes its rows whole.
    """
    return max(1, ELEMENTWISE_BLOCK // x.shape[-1]) if get_array_module(x) is numpy else len(x)


def gelu(x):
    """GELU with the tanh approximation, as GPT-2 (torch's approximate="tanh")."""
    return GELU()(x)


class SiLU(Function):
    """y = x·σ(x); σ(x) = 0.5·(1 + tanh(x/2)) (the same as 1/(1 + e^-x), and never overflows)."""

    def forward(self, x):
        xp = get_array_module(x)
        s = x * 0.5
        xp.tanh(s, out=s)
        s += 1.0
        s *= 0.5                                             # σ(x)
        self.x, self.s = x, s
        return x * s

    # σ' = σ·(1 − σ), so dy/dx = σ + x·σ·(1 − σ) = σ·(1 + x·(1 − σ))
    def backward(self, gy):
        d = 1.0 - self.s
        d *= self.x
        d += 1.0
        d *= self.s
        d *= gy
        return d


def silu(x):
    """SiLU (swish): x·sigmoid(x), the gate of SwiGLU."""
    return SiLU()(x)


# ---------------------------------------------------------------------------------------------
# Softmax, log-softmax, cross-entropy


# The quick path of _exp_rows: exp of numbers up to this cannot overflow float32 (its max is e^88.7)
_MAX_QUICK_EXP = 80.0
# ... and a row whose exps sum to less than this was too far below its centre: it is redone.
_MIN_ROW_SUM = math.exp(-20.0)


def _exp_rows(out, fill, mask=None):
    """out <- exp(x + mask − t) for the x that fill(out) writes; returns (t, Z), Z (..., 1) the row sums.

    So out / Z = softmax(x + mask) over the last axis, and t + log Z its logsumexp. Softmax does not
    change when a row is shifted by a constant; the shift only keeps exp in range. The textbook
    shift t is each row's max, but NumPy takes ~9x longer for a max per row of 64 numbers than for a
    sum per row (184 vs 20 us on the scores of a "baby" attention layer). So the callers' fill
    already centres each row on its mean (cheaply, see the callers), and on the CPU t = 0 when
    that is safe: when no x exceeds _MAX_QUICK_EXP (no overflow) and no row sum comes out below
    _MIN_ROW_SUM (a row whose unmasked x all lie far below its mean would lose precision). Else
    fill is called again and t is the textbook max. The GPU always takes the textbook way: a max per
    row is cheap there, and the check would make the host wait for the GPU.
    """
    xp = get_array_module(out)
    fill(out)
    if xp is numpy and out.max() <= _MAX_QUICK_EXP:         # False for nan too
        if mask is not None:
            out += mask
        xp.exp(out, out=out)
        Z = _sum_last(out)
        if Z.min() >= _MIN_ROW_SUM:
            return 0.0, Z
        fill(out)
    if mask is not None:
        out += mask
    t = out.max(axis=-1, keepdims=True)                      # (..., 1) the textbook shift
    out -= t
    xp.exp(out, out=out)
    return t, _sum_last(out)


class Softmax(Function):
    """y = exp(x − max) / Σ exp(x − max) along `axis` (subtracting the max changes nothing but overflow)."""

    def __init__(self, axis=-1):
        self.axis = axis

    def forward(self, x):
        xp = get_array_module(x)
        y = x - x.max(axis=self.axis, keepdims=True)         # an array we own: softmax in place
        xp.exp(y, out=y)
        y /= y.sum(axis=self.axis, keepdims=True)
        self.y = y
        return y

    # ∂y_j/∂x_i = y_j·(δ_ij − y_i), so gx_i = Σ_j gy_j·y_j·(δ_ij − y_i) = y_i·(gy_i − Σ_j gy_j·y_j)
    def backward(self, gy):
        gx = gy * self.y
        gx -= self.y * gx.sum(axis=self.axis, keepdims=True)
        return gx


def softmax(x, axis=-1):
    return Softmax(axis)(x)


class LogSoftmax(Function):
    """y = x − max − log Σ exp(x − max) along `axis`."""

    def __init__(self, axis=-1):
        self.axis = axis

    def forward(self, x):
        xp = get_array_module(x)
        y = x - x.max(axis=self.axis, keepdims=True)         # z = x − max (≤ 0)
        y -= xp.log(xp.exp(y).sum(axis=self.axis, keepdims=True))
        self.y = y
        return y

    # y_j = x_j − log Σ_k e^{x_k}:  ∂y_j/∂x_i = δ_ij − softmax_i, so gx = gy − softmax·Σ gy,
    # and softmax = exp(y) needs nothing but the saved output.
    def backward(self, gy):
        xp = get_array_module(gy)
        gx = xp.exp(self.y)
        gx *= -gy.sum(axis=self.axis, keepdims=True)
        gx += gy
        return gx


def log_softmax(x, axis=-1):
    return LogSoftmax(axis)(x)


class CrossEntropy(Function):
    """Mean over non-ignored rows of −log softmax(logits)[target]; logits (N, V) (or any (..., V))."""

    def __init__(self, targets, ignore_index=-100):
        self.targets, self.ignore_index = targets, ignore_index   # int array (N,) (or (...)), no grad

    def forward(self, logits):
        xp = get_array_module(logits)
        V = logits.shape[-1]
        self.shape = logits.shape
        z = logits.reshape(-1, V)                            # (N, V)
        t = self.targets.reshape(-1)                         # (N,)
        valid = t != self.ignore_index                       # (N,) rows that count
        self.count = int(valid.sum())
        t = xp.where(valid, t, 0)                            # ignored rows read column 0, then weigh 0
        rows = xp.arange(z.shape[0])
        c = _mean_last(z)                                    # (N, 1) row means: a first shift
        p = xp.empty(z.shape, dtype=z.dtype)                 # (N, V) the one big array we own
        m, s = _exp_rows(p, lambda out: xp.subtract(z, c, out=out))   # p = exp(z − c − m), s (N, 1) its row sums
        p *= 1.0 / s                                         # softmax probabilities, in place
        # −log softmax_t = log Σ exp(z − c − m) − (z_t − c − m); mean over valid rows (nan if none, as PyTorch)
        z_t = z[rows, t] - (c + m)[:, 0]                     # (N,) target logit − shift
        nll = xp.log(s[:, 0]) - z_t                          # (N,)
        loss = (nll * valid).sum() / logits.dtype.type(self.count) if self.count else \
            xp.asarray(numpy.nan, dtype=logits.dtype)
        self.p, self.t, self.valid, self.rows = p, t, valid, rows
        self.dlogits_ready = False
        return xp.asarray(loss, dtype=logits.dtype)

    # loss = (1/count)·Σ_valid n (log Σ_v e^{z_nv} − z_n,t_n), so
    #   dloss/dz_nv = (softmax_nv − [v = t_n]) / count   on valid rows, 0 on ignored ones.
    # The probabilities saved by forward are turned into that gradient in place (no one-hot, no copy),
    # once; a second backward (retain_graph=True) finds it ready.
    def backward(self, gy):
        p = self.p                                           # (N, V)
        if not self.dlogits_ready:
            p[self.rows, self.t] -= 1.0                      # softmax − onehot, without the one-hot
            p *= (self.valid / max(self.count, 1))[:, None].astype(p.dtype)   # 1/count, 0 on ignored rows
            self.dlogits_ready = True
        g = p if float(gy) == 1.0 else p * gy                # usually gy = 1 (loss.backward())
        return g.reshape(self.shape)


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean cross-entropy of logits (N, V) or (B, T, V) against int targets (N,) or (B, T).

    Rows whose target is `ignore_index` count neither in the sum nor in the mean. When every target is
    ignored the loss is nan (0/0, as PyTorch) and the gradient is zero.
    """
    targets = _raw_int_array(targets, logits.data, "cross_entropy targets")
    if logits.ndim not in (2, 3):
        raise ValueError(f"cross_entropy: logits must be (N, V) or (B, T, V), got shape {logits.shape}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets of shape {targets.shape} do not match logits {logits.shape}: "
                         f"expected targets of shape {logits.shape[:-1]}")
    V = logits.shape[-1]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        value = int(targets[bad].reshape(-1)[0])
        raise IndexError(f"cross_entropy: target {value} is out of range for {V} classes "
                         f"(targets must be in [0, {V}) or equal ignore_index={ignore_index})")
    return CrossEntropy(targets, ignore_index)(logits)


# ---------------------------------------------------------------------------------------------
# Dropout


class Dropout(Function):
    """Inverted dropout: zero each element with probability p, scale the survivors by 1/(1 − p)."""

    def __init__(self, p):
        self.p = p

    def forward(self, x):
        xp = get_array_module(x)
        keep = rng.for_array_module(xp).random(x.shape, dtype=numpy.float32) >= self.p   # (..) bool
        self.mask = keep.astype(x.dtype)                     # the mask, already scaled: 0 or 1/(1 − p)
        if self.p < 1.0:
            self.mask *= 1.0 / (1.0 - self.p)
        return x * self.mask

    def backward(self, gy):  # y = x·mask, so gx = gy·mask
        return gy * self.mask


def dropout(x, p=0.5, training=True):
    """Inverted dropout; identity (the same tensor, no op recorded) when p == 0 or not training."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    return Dropout(float(p))(x)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE)


class RoPE(Function):
    """y = x·cos + rotate_half(x)·sin over the last axis, with rotate_half(x) = concat(-x2, x1).

    With x = (x1, x2) split in halves and per-plane angles a (cos c, sin s, one value per plane):

        y1 = x1·c − x2·s
        y2 = x2·c + x1·s

    i.e. every plane (x1[i], x2[i]) is rotated by the angle a[i]. A rotation is orthogonal, so the
    vector-Jacobian product is the transposed rotation, the rotation by −a:

        gx1 =  gy1·c + gy2·s
        gx2 = −gy1·s + gy2·c

    x is (..., T, D); the tables are (T, D) (the rows for x's positions; tinyllm.model.rope_tables).
    Both halves of a table row hold the same values (angle[t, j] = angle[t, j + D/2]), so only the
    first half is read.
    """

    def __init__(self, cos, sin):
        self.cos, self.sin = cos, sin  # constants: not differentiated

    def forward(self, x):
        _check_rope_tables(x.shape, self.cos)
        self.c, self.s = _rope_halves(self.cos, self.sin)
        return _rotate(x, self.c, self.s)

    def backward(self, gy):
        return _rotate(gy, self.c, -self.s)                  # the rotation by −a


def _check_rope_tables(shape, cos):
    """RoPE needs x (..., T, D) with D even and (T, D) tables."""
    if shape[-1] % 2:
        raise ValueError(f"RoPE needs an even last dimension, got {shape[-1]}")
    if cos.shape != tuple(shape[-2:]):
        raise ValueError(f"RoPE tables have shape {cos.shape}, expected {tuple(shape[-2:])}")


def _rope_halves(cos, sin):
    """(T, D) tables -> c, s (T, D/2): one angle per plane."""
    h = cos.shape[-1] // 2
    return cos[:, :h], sin[:, :h]


def _rotate(x, c, s, out=None):
    """out = x with each plane (x1[i], x2[i]) turned by its angle: (x1·c − x2·s, x2·c + x1·s).

    out defaults to a new array laid out like x (empty_like keeps the axis order), so heads that
    are transposed views of (B, T, heads, D) rows stay in that memory order.
    """
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    y = get_array_module(x).empty_like(x) if out is None else out
    y[..., :h] = x1 * c - x2 * s
    y[..., h:] = x2 * c + x1 * s
    return y


# ---------------------------------------------------------------------------------------------
# Scaled dot-product attention


def _causal_bias(xp, T, S, dtype):
    """(T, S) additive mask: 0 where query i may see key j (j <= S − T + i), −inf elsewhere."""
    bias = xp.zeros((T, S), dtype=dtype)
    i = xp.arange(T)[:, None]
    j = xp.arange(S)[None, :]
    bias[j > S - T + i] = -numpy.inf
    return bias


@functools.lru_cache(maxsize=16)
def _group_causal_bias(xp, T, S, G, dtype):
    """_causal_bias repeated for the G query heads of a group, (G·T, S), made once per shape and
    kept (read only): making it anew took 7.9 µs per "baby" layer (4 per step, forward), 0.24 µs kept."""
    return _read_only(xp.tile(_causal_bias(xp, T, S, dtype), (G, 1)))


# Causal attention cuts its queries in two halves once T reaches this: the first half sees only the
# first half of the keys, so a quarter of the score matrix is never computed (at T = 256 the attention
# of a "char" benchmark step, forward and backward, went from 158 to 134 ms on one thread).
SPLIT_MIN_QUERIES = 128


def _query_blocks(T, S, causal, split_min):
    """[(r0, r1, s1)]: query rows r0:r1 see at most keys :s1 (the causal mask is aligned to the end)."""
    if not causal or T < split_min:
        return [(0, T, S)]
    h = T // 2
    return [(0, h, S - T + h), (h, T, S)]


class ScaledDotProductAttention(Function):
    """softmax(q kᵀ / sqrt(D) + causal mask) v, with grouped k/v heads (GQA/MQA).

    q (B, H, T, D), k and v (B, Hkv, S, D), G = H / Hkv: query head h reads k/v head h // G.
    The trick: the G query heads of one k/v head are consecutive, so q viewed as (B, Hkv, G, T, D)
    and a block of its rows stacked as (B, Hkv, G·Tb, D) lets ONE batched matmul per step serve the
    whole group without repeating k/v. Causal attention works in two query blocks from T >= split_min
    (see _query_blocks); each block is the same computation on its rows and the keys it can see.
    The batch is cut over the CPU threads (tinyllm.threads): each part runs forward_rows or
    backward_rows on its own sequences.
    """

    def __init__(self, causal=True, split_min=SPLIT_MIN_QUERIES):
        self.causal, self.split_min = causal, split_min

    def forward(self, q, k, v):
        xp = get_array_module(q)
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        G = H // Hkv
        self.scale = 1.0 / math.sqrt(D)
        self.blocks = _query_blocks(T, S, self.causal, self.split_min)
        self.q = q                                           # [:, j·G + g] is query head g of k/v head j
        # y is laid out in memory like q (empty_like keeps the axis order): when q is a transposed view
        # of (B, T, H, D) rows, as in the model, transposing y back to (B, T, H·D) is a view, not a copy
        self.y = xp.empty_like(q)
        self.P = [xp.empty((B, Hkv, G * (r1 - r0), s1), dtype=q.dtype) for r0, r1, s1 in self.blocks]
        self.k, self.v = k, v
        threads.parallel_for(B, lambda b0, b1: self.forward_rows(slice(b0, b1), q), xp, size=self.P[-1].size)
        return self.y

    def forward_rows(self, bs, q):
        """The forward for the sequences bs of the batch, into self.P and self.y."""
        xp = get_array_module(q)
        B, H, T, D = q.shape
        Hkv = self.k.shape[1]
        G = H // Hkv
        q5, y = q[bs].reshape(-1, Hkv, G, T, D), self.y[bs].reshape(-1, Hkv, G, T, D)
        for (r0, r1, s1), P in zip(self.blocks, self.P):
            Tb, P = r1 - r0, P[bs]
            qb = q5[:, :, :, r0:r1].reshape(-1, Hkv, G * Tb, D)  # the group's query rows, stacked (copied if G > 1)
            # k̃ = scale·(k − k̄), k̄ the keys' mean: the scale on the keys (D numbers per key, not s1
            # per query), and q·k̃ is each score minus its row's mean scale·q·k̄, the first shift of
            # the softmax (see _exp_rows)
            kcT = _centred_keys_transposed(self.k[bs, :, :s1], self.scale)  # (b, Hkv, D, s1), maybe a transposed view
            # row g·Tb + i of a group is query r0 + i of head g: the (Tb, s1) mask repeats G times
            mask = _group_causal_bias(xp, Tb, s1, G, P.dtype) if self.causal else None
            _, Z = _exp_rows(P, lambda out: xp.matmul(qb, kcT, out=out), mask)  # (b, Hkv, G·Tb, s1)
            P *= 1.0 / Z                                     # softmax over keys, in place: probabilities
            _matmul_into_group_rows(P, self.v[bs, :, :s1], y[:, :, :, r0:r1])    # y rows = P v

    # With S = q k̃ᵀ (+ mask), k̃ = scale·k, P = softmax(S) row by row, y = P v (per batch and k/v head,
    # the group's query rows stacked; per query block, over the keys it sees):
    #   gv = Pᵀ gy                      (B, Hkv, S, D)   the matmul sums over the G·T rows: GQA for free
    #   gP = gy vᵀ                      (B, Hkv, G·T, S)
    #   gS = P ⊙ (gP − rowsum(gP ⊙ P))  softmax backward; masked P are 0, so masked gS are 0
    #        and rowsum(gP ⊙ P)_r = Σ_s P_rs (gy_r · v_s) = gy_r · y_r  (cheap: D terms, not S)
    #   gq = gS k̃ = (scale·gS) k        (B, Hkv, G·T, D) -> (B, H, T, D)
    #   gk = scale·gSᵀ q = (scale·gS)ᵀ q (B, Hkv, S, D)  summed over the group by the matmul again
    # so both take scale·gS, which comes out of gy·scale (T·D numbers, not T·S): scale·gP = (scale·gy) vᵀ.
    # Each query block adds its share to gk and gv over the keys it saw (:s1).
    def backward(self, gy):
        xp = get_array_module(gy)
        need_q, need_k, need_v = self.needs_input_grad
        # gradients laid out like their inputs (gy is laid out like y, like q), all rows written below
        grads = (xp.empty_like(gy) if need_q else None, xp.empty_like(self.k) if need_k else None,
                 xp.empty_like(self.v) if need_v else None)
        self.backward_into(gy, *grads)
        return grads

    def backward_into(self, gy, gq, gk, gv):
        """The backward, written into gq, gk, gv (None: not wanted), the batch cut over the CPU threads."""
        threads.parallel_for(gy.shape[0], lambda b0, b1: self.backward_rows(slice(b0, b1), gy, gq, gk, gv),
                             get_array_module(gy), size=self.P[-1].size)

    def backward_rows(self, bs, gy, gq, gk, gv):
        """The backward for the sequences bs of the batch, into gq[bs], gk[bs] and gv[bs]."""
        xp = get_array_module(gy)
        B, Hkv, S, D = self.k.shape
        H, T = gy.shape[1], gy.shape[2]
        G = H // Hkv
        gy = gy[bs].reshape(-1, Hkv, G, T, D)                # a view: only the head axis is split
        y, q5 = self.y[bs].reshape(gy.shape), self.q[bs].reshape(gy.shape)
        gq5 = gq[bs].reshape(gy.shape) if gq is not None else None
        for (r0, r1, s1), P in reversed(list(zip(self.blocks, self.P))):  # the last block sees every key
            every_key = s1 == S
            rows = (slice(None), slice(None), slice(None), slice(r0, r1))
            P = P[bs]
            gyb = gy[rows].reshape(-1, Hkv, G * (r1 - r0), D)
            if gv is not None:
                _add_key_rows(gv[bs], P.swapaxes(-1, -2), gyb, every_key)            # Pᵀ gy
            if gq is not None or gk is not None:
                vT = _transposed(self.v[bs, :, :s1])                                # (b, Hkv, D, s1)
                gys = gyb * self.scale                                               # scale·gy
                gS = gys @ vT                                                        # scale·gP, (b, Hkv, G·Tb, s1)
                gS -= _dot_last(gys, y[rows].reshape(gyb.shape))                     # − scale·rowsum(gP ⊙ P), as gy·y
                gS *= P                                                              # scale·gS
                if gq is not None:
                    _matmul_into_group_rows(gS, self.k[bs, :, :s1], gq5[rows])       # gq rows = (scale·gS) k
                if gk is not None:
                    _add_key_rows(gk[bs], gS.swapaxes(-1, -2), q5[rows].reshape(gyb.shape), every_key)  # (scale·gS)ᵀ q


class SelfAttention(ScaledDotProductAttention):
    """Causal attention of a sequence over itself, from packed projections: qkv -> y.

    qkv (B, T, (H + 2·Hkv)·D) holds q, then k, then v in each row, as one matrix product (a GPT
    block's c_attn) makes them; y is (B, T, H·D), the rows the next product (c_proj) takes. The
    heads are views of qkv; q and k are rotated when RoPE tables are given; the attention is the
    ScaledDotProductAttention above. Backward writes gq, gk and gv straight into ONE packed
    gradient laid out like qkv, so c_attn's backward stays one product for gx and one for gW,
    where three separate projections took three of each plus the adds that joined them.

    rope: (cos, sin) tables (T, D) for the rows' positions, or None.
    kv_cache: (k_buffer, v_buffer, start) during generation, no gradient: the new keys/values are
    written at start .. start + T and the queries attend over the whole filled prefix.
    """

    def __init__(self, n_head, n_kv_head, rope=None, kv_cache=None, split_min=SPLIT_MIN_QUERIES):
        super().__init__(causal=True, split_min=split_min)
        self.n_head, self.n_kv_head, self.rope, self.kv_cache = n_head, n_kv_head, rope, kv_cache

    def forward(self, qkv):
        B, T, _ = qkv.shape
        q, k, v = _split_heads(qkv, self.n_head, self.n_kv_head)   # (B, heads, T, D) views
        if self.rope is not None:
            c, s = _rope_halves(*self.rope)
            q, k = _rotate(q, c, s), _rotate(k, c, s)
        if self.kv_cache is not None:
            k_buffer, v_buffer, start = self.kv_cache
            k_buffer[:, :, start:start + T] = k
            v_buffer[:, :, start:start + T] = v
            k, v = k_buffer[:, :, :start + T], v_buffer[:, :, :start + T]
        y = super().forward(q, k, v)                          # (B, H, T, D), laid out as (B, T, H, D)
        return y.transpose(0, 2, 1, 3).reshape(B, T, -1)     # (B, T, H·D): a view

    def backward(self, gy):
        if self.kv_cache is not None:
            raise RuntimeError("SelfAttention with a KV cache is for generation only (under no_grad)")
        xp = get_array_module(gy)
        B, T, _ = gy.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.k.shape[-1]
        g = xp.empty((B, T, (H + 2 * Hkv) * D), dtype=gy.dtype)   # laid out like qkv
        gq, gk, gv = _split_heads(g, H, Hkv)                      # views: written in place below
        gy = gy.reshape(B, T, H, D).transpose(0, 2, 1, 3)         # (B, H, T, D) view
        # with RoPE, the gradients of the rotated q and k first, then rotated back (by −a) into g
        gq_r, gk_r = (xp.empty_like(gq), xp.empty_like(gk)) if self.rope is not None else (gq, gk)
        self.backward_into(gy, gq_r, gk_r, gv)
        if self.rope is not None:
            c, s = _rope_halves(*self.rope)
            _rotate(gq_r, c, -s, out=gq)
            _rotate(gk_r, c, -s, out=gk)
        return g


def _split_heads(qkv, n_head, n_kv_head):
    """(B, T, (H + 2·Hkv)·D) rows of q, k, v -> q (B, H, T, D), k and v (B, Hkv, T, D), all views."""
    B, T, width = qkv.shape
    D = width // (n_head + 2 * n_kv_head)
    q, k, v = qkv[..., :n_head * D], qkv[..., n_head * D:(n_head + n_kv_head) * D], qkv[..., (n_head + n_kv_head) * D:]
    return (q.reshape(B, T, n_head, D).transpose(0, 2, 1, 3), k.reshape(B, T, n_kv_head, D).transpose(0, 2, 1, 3),
            v.reshape(B, T, n_kv_head, D).transpose(0, 2, 1, 3))


# Attention's products with a transposed right operand (q k̃ᵀ, gy vᵀ) go faster with that operand
# transposed in memory first while one head's keys hold at most this many numbers: OpenBLAS's kernels
# for small matrices are slower on a transposed operand, and transposing small arrays is cheap. On
# 2 cores (one per process), per layer: "baby" (6 sequences, 64 keys of 32) scores 90 µs with the
# copy against 112 µs without, gy vᵀ 59 against 78 µs; "char" (4 sequences, 256 keys of 64) 2.45 ms
# against 2.00 ms and 2.12 against 1.56 ms, where transposing a big array costs more than it saves.
MAX_TRANSPOSED_COPY = 4096


def _copies_transposed(k):
    """Whether a head's keys k (..., S, D) are short enough to be copied transposed (MAX_TRANSPOSED_COPY)."""
    return k.shape[-2] * k.shape[-1] <= MAX_TRANSPOSED_COPY


def _transposed(k):
    """kᵀ over the last two axes: (..., S, D) -> (..., D, S), a C-contiguous copy for short keys, else a view."""
    kT = k.swapaxes(-1, -2)
    return get_array_module(k).ascontiguousarray(kT) if _copies_transposed(k) else kT


def _centred_keys_transposed(k, scale):
    """scale·(k − k̄)ᵀ, k̄ the mean over the keys: (..., S, D) -> (..., D, S), laid out as _transposed does.

    The centring is free in the copy: the subtraction writes straight into the transposed array.
    Without the copy (long keys), the result is laid out like k, so that the subtraction runs along
    whole rows of all heads when k is a view of packed q/k/v rows.
    """
    xp = get_array_module(k)
    kT = k.swapaxes(-1, -2)                                  # (..., D, S) view
    out = xp.empty(kT.shape, dtype=k.dtype) if _copies_transposed(k) else \
        xp.empty_like(k).swapaxes(-1, -2)                    # a transposed view of an array laid out like k
    xp.subtract(kT, _mean_last(kT), out=out)                 # the mean through _sum_last's product with ones
    out *= scale                                             # D·S numbers per head, not the T·S scores
    return out


def _matmul_into_group_rows(a, b, out):
    """out[...] = a @ b: a @ b is (b, Hkv, G·Tb, D), out the same rows as (b, Hkv, G, Tb, D).

    With one query head per k/v head (G = 1) out[:, :, 0] is a view of that shape, and the product
    is written straight into it (no temporary, no copy); with G > 1 out's rows are not evenly
    spaced in memory, so the product goes through a temporary.
    """
    if out.shape[2] == 1:
        get_array_module(a).matmul(a, b, out=out[:, :, 0])
    else:
        out[...] = (a @ b).reshape(out.shape)


def _add_key_rows(total, a, b, every_key):
    """total = a @ b for the block that saw every key (it comes first), else total[..., :s1, :] += a @ b."""
    if every_key:
        get_array_module(a).matmul(a, b, out=total)          # straight into total, laid out like k or v
    else:
        total[..., :a.shape[-2], :] += a @ b


def scaled_dot_product_attention(q, k, v, causal=True):
    """Attention of q (B, H, T, D) over k, v (B, Hkv, S, D) with H % Hkv == 0 (GQA/MQA), scale 1/sqrt(D).

    causal=True lets query i see keys 0 .. S − T + i: the mask is aligned to the END, so with a KV cache
    (S > T) the new queries see every cached key and causally each other.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"scaled_dot_product_attention takes 4-D q, k, v (B, heads, length, D), got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"scaled_dot_product_attention: k {k.shape} and v {v.shape} must both be "
                         f"(B={B}, Hkv, S, D={D}) for q {q.shape}")
    if H % k.shape[1]:
        raise ValueError(f"scaled_dot_product_attention: {H} query heads cannot be shared out evenly "
                         f"over {k.shape[1]} key/value heads (H % Hkv must be 0)")
    if causal and k.shape[2] < T:
        raise ValueError(f"causal attention needs at least as many keys as queries (S={k.shape[2]} < T={T}): "
                         "the first queries would see no key at all")
    return ScaledDotProductAttention(causal)(q, k, v)


def self_attention(qkv, n_head, n_kv_head=None, rope=None, kv_cache=None):
    """Causal self-attention from packed projections: qkv (B, T, (H + 2·Hkv)·D) -> y (B, T, H·D).

    Each row of qkv holds the H query heads, then the Hkv key heads, then the Hkv value heads (a GPT
    block's c_attn output). n_kv_head defaults to n_head. rope: (cos, sin) tables (T, D) for the rows'
    positions. kv_cache: (k_buffer, v_buffer, start) with buffers (B, Hkv, capacity, D), for
    generation under no_grad (see SelfAttention). Same numbers as splitting qkv and calling
    scaled_dot_product_attention, with one packed gradient.
    """
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    if qkv.ndim != 3:
        raise ValueError(f"self_attention takes qkv of shape (B, T, (H + 2·Hkv)·D), got {qkv.shape}")
    heads = n_head + 2 * n_kv_head
    if n_kv_head < 1 or n_head % n_kv_head:
        raise ValueError(f"self_attention: {n_head} query heads cannot be shared out evenly over "
                         f"{n_kv_head} key/value heads (n_head % n_kv_head must be 0)")
    if qkv.shape[-1] % heads:
        raise ValueError(f"self_attention: a row of {qkv.shape[-1]} numbers cannot hold {n_head} + 2·{n_kv_head} "
                         f"heads of one size")
    if rope is not None:
        _check_rope_tables(qkv.shape[:2] + (qkv.shape[-1] // heads,), rope[0])
    if kv_cache is not None and kv_cache[2] + qkv.shape[1] > kv_cache[0].shape[2]:
        raise ValueError(f"self_attention: {qkv.shape[1]} new positions after {kv_cache[2]} do not fit a KV cache "
                         f"of {kv_cache[0].shape[2]}")
    return SelfAttention(n_head, n_kv_head, rope, kv_cache)(qkv)
