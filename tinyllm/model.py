"""The GPT model: `GPTConfig`, `GPT`, rotary position embeddings and generation with a KV cache.

Architecture (GPT-2 / nanoGPT, with the Llama-style options switched on by the config):

    x = wte[idx] (+ wpe[positions] when pos="learned")      token (+ position) embeddings
    x = dropout(x)
    for each block:                                           pre-norm residual blocks
        x = x + attn(ln_1(x))                                 causal self-attention (MHA/GQA/MQA, RoPE)
        x = x + mlp(ln_2(x))                                  GELU or SwiGLU feed-forward
    logits = lm_head(ln_f(x))                                 no bias; tied to wte by default

Parameter names follow nanoGPT exactly (see `GPT.state_dict()` and docs/model.md), so checkpoints
map one to one onto GPT-2 / nanoGPT tensors.

The layers are the fused ops of `tinyllm.nn.functional`; this file adds one op of its own, `RoPE`
(rotary position embedding), whose backward is the rotation by the opposite angle.
"""
import dataclasses
import math

import numpy

from tinyllm import backend, rng
from tinyllm.autograd import Tensor, no_grad
from tinyllm import nn
from tinyllm.nn import functional as F
from tinyllm.nn.functional import RoPE
from tinyllm.nn.module import Module, Parameter

__all__ = ["GPTConfig", "GPT", "RoPE", "rope_tables", "apply_rope", "state_dict_shapes"]

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "rope")


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class GPTConfig:
    """Every size and switch of a GPT. Validated on construction; `to_dict`/`from_dict` for checkpoints.

    n_kv_head=None means n_head (multi-head attention); 1 is multi-query attention; anything in
    between that divides n_head is grouped-query attention. mlp_hidden=None means 4 * n_embd.
    """

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    n_kv_head: int = None
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layernorm"
    mlp: str = "gelu"
    pos: str = "learned"
    rope_theta: float = 10000.0
    tie_weights: bool = True
    norm_eps: float = 1e-5
    mlp_hidden: int = None

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            self._check_positive_int(name)
        if self.n_kv_head is not None:
            self._check_positive_int("n_kv_head")
        if self.mlp_hidden is not None:
            self._check_positive_int("mlp_hidden")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                             f"the head size is n_embd / n_head")
        if self.n_head % self.kv_heads:
            raise ValueError(f"GPTConfig: n_head ({self.n_head}) must be divisible by n_kv_head "
                             f"({self.n_kv_head}): each key/value head serves n_head / n_kv_head query heads")
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("pos", POSITIONS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"GPTConfig: unknown {name}={value!r}; choose one of {', '.join(map(repr, allowed))}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"GPTConfig: pos='rope' needs an even head size, but n_embd / n_head = "
                             f"{self.n_embd} / {self.n_head} = {self.head_dim}")
        for name in ("dropout", "rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"GPTConfig: {name} must be a number, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0:
            raise ValueError(f"GPTConfig: rope_theta must be positive, got {self.rope_theta}")
        if self.norm_eps <= 0:
            raise ValueError(f"GPTConfig: norm_eps must be positive, got {self.norm_eps}")
        for name in ("bias", "tie_weights"):
            if not isinstance(getattr(self, name), (bool, numpy.bool_)):
                raise TypeError(f"GPTConfig: {name} must be True or False, got {getattr(self, name)!r}")
            setattr(self, name, bool(getattr(self, name)))

    def _check_positive_int(self, name):
        value = getattr(self, name)
        if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, (int, numpy.integer)):
            raise TypeError(f"GPTConfig: {name} must be an integer, got {value!r}")
        if value <= 0:
            raise ValueError(f"GPTConfig: {name} must be positive, got {value}")
        setattr(self, name, int(value))

    # --- derived sizes --------------------------------------------------------------------------
    @property
    def kv_heads(self):
        """The number of key/value heads actually used (n_kv_head, or n_head when None)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def hidden(self):
        """The MLP's hidden width (mlp_hidden, or 4 * n_embd when None)."""
        return 4 * self.n_embd if self.mlp_hidden is None else self.mlp_hidden

    # --- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self):
        """A JSON-able dict of the fields (as given: n_kv_head / mlp_hidden may be None)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """The config saved by `to_dict`; unknown or missing keys are errors, not silently dropped."""
        if not isinstance(d, dict):
            raise TypeError(f"GPTConfig.from_dict needs a dict, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"GPTConfig.from_dict: unknown keys {unknown}; known keys are {sorted(fields)}")
        missing = [name for name, f in fields.items()
                   if name not in d and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"GPTConfig.from_dict: missing required keys {missing}")
        return cls(**d)


def state_dict_shapes(config):
    """{name: shape} of every key of `GPT(config).state_dict()`, without building the model.

    Loading a checkpoint compares its tensors with these before anything is allocated (a damaged
    config saying block_size 10^12 must be an error, not an attempt to allocate). Tests compare it
    with the state_dict of real models of every kind, so it cannot drift from the layers.
    """
    C, V, H, D = config.n_embd, config.vocab_size, config.hidden, config.head_dim
    shapes = {"transformer.wte.weight": (V, C)}
    if config.pos == "learned":
        shapes["transformer.wpe.weight"] = (config.block_size, C)

    def linear(name, n_in, n_out):
        shapes[name + ".weight"] = (n_out, n_in)
        if config.bias:
            shapes[name + ".bias"] = (n_out,)

    def norm(name):
        shapes[name + ".weight"] = (C,)
        if config.norm == "layernorm" and config.bias:
            shapes[name + ".bias"] = (C,)

    for i in range(config.n_layer):
        block = f"transformer.h.{i}."
        norm(block + "ln_1")
        linear(block + "attn.c_attn", C, (config.n_head + 2 * config.kv_heads) * D)
        linear(block + "attn.c_proj", config.n_head * D, C)
        norm(block + "ln_2")
        linear(block + "mlp.c_fc", C, H)
        if config.mlp == "swiglu":
            linear(block + "mlp.c_gate", C, H)
        linear(block + "mlp.c_proj", H, C)
    norm("transformer.ln_f")
    shapes["lm_head.weight"] = (V, C)  # tied or not, the state_dict has it under its own name
    return shapes


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE)


def rope_tables(block_size, head_dim, theta=10000.0, dtype="float32"):
    """cos and sin tables, each (block_size, head_dim), in the HF-Llama "rotate_half" layout.

    inv_freq[i] = theta^(-2i/D) for i < D/2, angle[t, j] = t * inv_freq[j mod D/2]: the two halves
    of a head vector hold the two coordinates of D/2 planes, plane i turning at frequency inv_freq[i].
    Computed in float64 and rounded once to `dtype`, so float32 and float64 models agree closely.
    """
    half = head_dim // 2
    inv_freq = theta ** (-numpy.arange(half, dtype=numpy.float64) * 2.0 / head_dim)
    angle = numpy.arange(block_size, dtype=numpy.float64)[:, None] * inv_freq[None, :]   # (T, D/2)
    angle = numpy.concatenate([angle, angle], axis=1)                                      # (T, D)
    dtype = backend.as_dtype(dtype)
    return numpy.cos(angle).astype(dtype), numpy.sin(angle).astype(dtype)


def apply_rope(x, cos, sin):
    """RoPE of a (..., T, D) tensor with (T, D) cos/sin tables (raw arrays on x's device)."""
    return RoPE(cos, sin)(x)


# ---------------------------------------------------------------------------------------------
# Layers


class KVCache:
    """Per-layer key/value buffers for generation, preallocated to the full context and filled in place.

    k[l] and v[l] are (B, Hkv, block_size, D): with grouped-query attention only the Hkv key/value
    heads are stored. `length` is how many positions are filled (the same for every layer).
    """

    def __init__(self, config, batch, dtype, xp):
        shape = (batch, config.kv_heads, config.block_size, config.head_dim)
        self.k = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0
        self.capacity = config.block_size


class CausalSelfAttention(Module):
    def __init__(self, config):
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        qkv_rows = (config.n_head + 2 * config.kv_heads) * config.head_dim  # rows: q, then k, then v
        self.c_attn = nn.Linear(config.n_embd, qkv_rows, bias=config.bias)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, cache=None, layer=0):
        """x (B, T, C) -> (B, T, C). rope: (cos, sin) rows for x's positions or None.

        cache: a KVCache whose first `cache.length` positions hold earlier keys/values; the new
        keys/values are written after them and attention runs over the whole filled prefix.
        """
        # q, k and v in ONE matrix product, (B, T, C) -> (B, T, (H + 2·Hkv)·D); the attention op
        # views its heads and hands back one packed gradient (F.self_attention)
        qkv = F.linear(x, self.c_attn.weight, self.c_attn.bias)
        kv_cache = None if cache is None else (cache.k[layer], cache.v[layer], cache.length)
        y = F.self_attention(qkv, self.n_head, self.n_kv_head, rope=rope, kv_cache=kv_cache)   # (B, T, H·D)
        y = F.linear(y, self.c_proj.weight, self.c_proj.bias)
        return self.resid_dropout(y)  # the identity in eval mode or with p = 0


class MLP(Module):
    def __init__(self, config):
        self.kind = config.mlp
        self.c_fc = nn.Linear(config.n_embd, config.hidden, bias=config.bias)
        if config.mlp == "swiglu":
            self.c_gate = nn.Linear(config.n_embd, config.hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = F.linear(x, self.c_fc.weight, self.c_fc.bias)
        if self.kind == "gelu":
            h = F.gelu(h)
        else:  # SwiGLU: silu(gate(x)) * up(x)
            h = F.silu(F.linear(x, self.c_gate.weight, self.c_gate.bias)) * h
        y = F.linear(h, self.c_proj.weight, self.c_proj.bias)
        return self.dropout(y)


def _norm(config):
    if config.norm == "layernorm":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
    return nn.RMSNorm(config.n_embd, eps=config.norm_eps)


class Block(Module):
    def __init__(self, config):
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), rope=rope, cache=cache, layer=layer)
        return x + self.mlp(self.ln_2(x))


class Transformer(Module):
    """The container nanoGPT calls `transformer`: embeddings, blocks `h`, final norm `ln_f`."""

    def __init__(self, config):
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = [Block(config) for _ in range(config.n_layer)]
        self.ln_f = _norm(config)


# ---------------------------------------------------------------------------------------------
# The model


class GPT(Module):
    """A GPT language model (`tl.GPT`): `logits, loss = model(idx, targets)`; `model.generate(...)`.

    dtype (default float32) and device ("cpu" or "cuda") say where the parameters live.
    Parameters are initialised as GPT-2 from `tinyllm.rng` (seed it with `tl.manual_seed`).
    """

    def __init__(self, config, dtype="float32", device="cpu"):
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT needs a GPTConfig, got {type(config).__name__}")
        self.config = config
        dtype = backend.as_dtype(dtype)
        if dtype.kind != "f":
            raise TypeError(f"GPT parameters must be floating point, got dtype {dtype}")
        device = backend.check_device(device)
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:  # one Parameter under both names: its grad sums both uses
            self.lm_head.weight = self.transformer.wte.weight
        self._init_weights(dtype, device)
        self._rope = None
        if config.pos == "rope":
            self._rope = rope_tables(config.block_size, config.head_dim, config.rope_theta, dtype)
            self._to_device(device)

    # --- construction ---------------------------------------------------------------------------
    def _init_weights(self, dtype, device):
        """GPT-2 init: weights N(0, 0.02), residual projections N(0, 0.02/sqrt(2·n_layer)), biases 0, gains 1.

        Values are drawn in float64 from the host generator of `tinyllm.rng`, in parameter order,
        then rounded to `dtype`: the same seed gives the same model in float32 and float64.
        """
        gen = rng.host()
        xp = backend.xp_for(device)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        norms = {id(m) for _, m in self.named_modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))}
        owner = {}
        for module_name, module in self.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, Parameter):
                    owner.setdefault(id(value), (module_name, module, name))
        for full_name, p in self.named_parameters():
            module_name, module, name = owner[id(p)]
            if name == "bias":
                values = numpy.zeros(p.shape)
            elif id(module) in norms:
                values = numpy.ones(p.shape)
            else:
                std = residual_std if module_name.endswith(("attn.c_proj", "mlp.c_proj")) else 0.02
                values = gen.standard_normal(p.shape) * std
            p.data = xp.asarray(values.astype(dtype))
            p.grad = None

    def _to_device(self, device):
        """Move the RoPE tables with the parameters (called by Module.to)."""
        if self._rope is not None:
            self._rope = tuple(backend.to_device(t, device) for t in self._rope)

    # --- sizes ----------------------------------------------------------------------------------
    @property
    def dtype(self):
        return self.transformer.wte.weight.dtype

    def num_parameters(self, exclude_embeddings=False):
        """Parameter count (tied weights once). exclude_embeddings drops the lookup-only tables.

        As nanoGPT's get_num_params(non_embedding=True): the position table wpe is subtracted; the
        token table wte is subtracted only when untied (tied, it is also the head's matmul weight).
        """
        n = super().num_parameters()
        if exclude_embeddings:
            if self.config.pos == "learned":
                n -= self.transformer.wpe.weight.size
            if not self.config.tie_weights:
                n -= self.transformer.wte.weight.size
        return int(n)

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward), nanoGPT's estimate_mfu formula.

        6·N for the matmuls with the N non-embedding parameters (2 forward, 4 backward per weight),
        plus 12·L·H·Q·T for the attention scores and the weighted sum (Q the head size, T block_size).
        """
        c = self.config
        n = self.num_parameters(exclude_embeddings=True)
        return int(6 * n + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size)

    def configure_optimizers(self, weight_decay, learning_rate, betas, eps=1e-8):
        """AdamW with two groups: 2-D+ tensors (matmul weights, embeddings) decayed; biases and gains not."""
        from tinyllm.optim import AdamW
        params = self.parameters()
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return AdamW(groups, lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay)

    # --- forward --------------------------------------------------------------------------------
    def _check_ids(self, ids, what, allow_ignore=False):
        """ids as a raw integer array on the model's device, with clear errors."""
        if isinstance(ids, Tensor):
            ids = ids.data
        elif isinstance(ids, (list, tuple)):
            ids = numpy.asarray(ids)
        if not hasattr(ids, "dtype") or not hasattr(ids, "shape"):
            raise TypeError(f"GPT: {what} must be an integer array or Tensor, got {type(ids).__name__}")
        if ids.dtype.kind not in "iu":
            raise TypeError(f"GPT: {what} must hold integer token ids, got dtype {ids.dtype}")
        if ids.ndim != 2:
            raise ValueError(f"GPT: {what} must have shape (batch, time), got shape {tuple(ids.shape)}")
        device = self.device
        if backend.device_of(ids) != device:
            raise RuntimeError(f"GPT: {what} is on {backend.device_of(ids)} but the model is on {device}; "
                               f"move it first (tinyllm.backend.to_device(ids, {device!r}))")
        if ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            V = self.config.vocab_size
            if allow_ignore and lo < 0:  # ignore_index (-100) targets are allowed
                valid = ids[ids != -100]
                lo = int(valid.min()) if valid.size else 0
            if lo < 0 or hi >= V:
                bad = lo if lo < 0 else hi
                raise ValueError(f"GPT: {what} holds the id {bad}, outside the vocabulary [0, {V})")
        return ids

    def _hidden(self, idx, start=0, cache=None):
        """Token ids (B, T) at positions start..start+T-1 -> final hidden states (B, T, C) before ln_f."""
        T = idx.shape[1]
        t = self.transformer
        x = F.embedding(idx, t.wte.weight)
        if self.config.pos == "learned":
            x = x + t.wpe.weight[start:start + T]
        x = t.drop(x)
        rope = None
        if self._rope is not None:
            cos, sin = self._rope
            if cos.dtype != x.dtype:
                cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
            rope = (cos[start:start + T], sin[start:start + T])
        for i, block in enumerate(t.h):
            x = block(x, rope=rope, cache=cache, layer=i)
        return x

    def forward(self, idx, targets=None):
        """idx (B, T) integer ids -> (logits (B, T, V) Tensor, mean cross-entropy loss or None)."""
        idx = self._check_ids(idx, "idx")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"GPT: sequence length {T} exceeds block_size {self.config.block_size}; "
                             f"crop the input to the last {self.config.block_size} tokens")
        if T == 0:
            raise ValueError("GPT: idx has no tokens (time dimension 0)")
        x = self.transformer.ln_f(self._hidden(idx))
        logits = F.linear(x, self.lm_head.weight)
        if targets is None:
            return logits, None
        targets = self._check_ids(targets, "targets", allow_ignore=True)
        if targets.shape != idx.shape:
            raise ValueError(f"GPT: targets have shape {tuple(targets.shape)} but idx has shape {(B, T)}; "
                             "they must match (one target per input position)")
        return logits, F.cross_entropy(logits, targets)

    # --- generation -------------------------------------------------------------------------------
    def _last_logits(self, idx, start=0, cache=None):
        """Logits of the last position only, as a host float64 (B, V) array (inference)."""
        x = self._hidden(idx, start=start, cache=cache)
        x = self.transformer.ln_f(x[:, -1:, :])
        logits = F.linear(x, self.lm_head.weight)
        return backend.to_numpy(logits.data[:, -1, :]).astype(numpy.float64)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                 use_cache=True, seed=None):
        """Continue each row of idx (B, T) by up to max_new_tokens sampled tokens -> int64 numpy (B, T + new).

        temperature 0 picks the most likely token (greedy); otherwise logits / temperature are
        filtered by top_k (keep the k largest) and then top_p (keep the smallest set of most likely
        tokens whose probability sums to at least top_p) and sampled with numpy.random.Generator(seed)
        (seed None: the generator of tinyllm.rng, seeded by tl.manual_seed).
        eos_id: a row that emits it is finished and padded with eos_id; generation stops early once
        every row is finished, so fewer than max_new_tokens columns may be added.
        use_cache=True keeps each layer's keys/values instead of recomputing the whole context; the
        tokens are the same as with use_cache=False. The context is cropped to the last block_size
        tokens; once it would exceed block_size the cache is dropped and each step recomputes the
        cropped window (positions shift, so cached keys would be stale).
        Runs under no_grad with the model in eval mode (the previous mode is restored).
        """
        c = self.config
        if isinstance(idx, Tensor):
            idx = idx.data
        idx = backend.to_numpy(numpy.asarray(idx) if isinstance(idx, (list, tuple)) else idx)
        if idx.ndim == 1:
            raise ValueError(f"generate: idx must have shape (batch, time), got a 1-D array of length "
                             f"{len(idx)}; use idx[None] for a single sequence")
        if idx.ndim != 2 or idx.shape[1] == 0 or idx.shape[0] == 0:
            raise ValueError(f"generate: idx must have shape (batch, time) with time >= 1, got {idx.shape}")
        if idx.dtype.kind not in "iu":
            raise TypeError(f"generate: idx must hold integer token ids, got dtype {idx.dtype}")
        if idx.min() < 0 or idx.max() >= c.vocab_size:
            raise ValueError(f"generate: idx holds ids outside the vocabulary [0, {c.vocab_size})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, numpy.integer)) \
                or max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if not temperature >= 0 or not math.isfinite(temperature):
            raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, numpy.integer))
                                  or top_k < 1):
            raise ValueError(f"generate: top_k must be a positive integer or None, got {top_k!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"generate: top_p must be in (0, 1] or None, got {top_p!r}")
        if eos_id is not None and not 0 <= eos_id < c.vocab_size:
            raise ValueError(f"generate: eos_id {eos_id} is outside the vocabulary [0, {c.vocab_size})")

        out = idx.astype(numpy.int64)
        B = out.shape[0]
        gen = numpy.random.default_rng(seed) if seed is not None else rng.host()
        xp = backend.xp_for(self.device)
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                cache = KVCache(c, B, self.dtype, xp) if use_cache else None
                done = numpy.zeros(B, dtype=bool)
                for _ in range(int(max_new_tokens)):
                    L = out.shape[1]
                    if cache is not None and L <= c.block_size:
                        # feed only what the cache has not seen (the whole prompt on the first step)
                        new = xp.asarray(out[:, cache.length:])
                        logits = self._last_logits(new, start=cache.length, cache=cache)
                        cache.length = L
                    else:
                        window = xp.asarray(out[:, -c.block_size:])
                        logits = self._last_logits(window)
                    token = _pick(logits, temperature, top_k, top_p, gen)
                    if eos_id is not None:
                        token[done] = eos_id
                        done |= token == eos_id
                    out = numpy.concatenate([out, token[:, None]], axis=1)
                    if eos_id is not None and done.all():
                        break
        finally:
            self.train(was_training)
        return out


def _pick(logits, temperature, top_k, top_p, gen):
    """One token per row from host float64 logits (B, V): greedy, or filtered sampling."""
    if temperature == 0:
        return numpy.argmax(logits, axis=-1).astype(numpy.int64)
    B, V = logits.shape
    logits = logits / temperature
    if top_k is not None and top_k < V:
        kth = numpy.partition(logits, V - top_k, axis=-1)[:, V - top_k][:, None]
        logits = numpy.where(logits < kth, -numpy.inf, logits)
    probs = numpy.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = numpy.argsort(-probs, axis=-1, kind="stable")
        sorted_p = numpy.take_along_axis(probs, order, axis=-1)
        before = numpy.cumsum(sorted_p, axis=-1) - sorted_p   # probability mass ranked above each token
        drop_sorted = before >= top_p                          # the set already reached top_p without it
        drop_sorted[:, 0] = False                              # always keep the most likely token
        drop = numpy.zeros_like(drop_sorted)
        numpy.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = numpy.where(drop, 0.0, probs)
    # inverse-CDF sampling: one uniform per row, so every path consumes the generator identically
    cdf = numpy.cumsum(probs, axis=-1)
    u = gen.random(B) * cdf[:, -1]
    token = (cdf <= u[:, None]).sum(axis=-1)
    return numpy.minimum(token, V - 1).astype(numpy.int64)
