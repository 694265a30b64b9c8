"""Random numbers for parameter initialisation and dropout, seeded by `tl.manual_seed`.

One NumPy generator drives everything on the host. On the GPU, dropout draws its masks from a
CuPy generator seeded from the same seed (one per array module), so a run is repeatable on
either device.

Dropout masks can also come from a counter-based hash (`uniform`, `dropout_mask`): each number is
a pure function of (seed, step, call, element index), with no generator state to carry. The same
numbers come out on NumPy and on CuPy, and a resumed run draws exactly the masks it would have
drawn, knowing only its seed and step. The counter (step, call) lives here: `begin_step(step)` at
the start of each training step, and every mask drawn takes the next call number.
"""
import numpy

_seed = 0
_host = numpy.random.default_rng(0)
_device = None        # (array module, its generator), made on first use
_step, _call = 0, 0   # the counter of the hash-based dropout masks


def manual_seed(seed):
    global _seed, _host, _device, _step, _call
    _seed = int(seed)
    _host = numpy.random.default_rng(_seed)
    _device = None
    _step, _call = 0, 0


def host():
    """The host generator (numpy.random.Generator)."""
    return _host


def for_array_module(xp):
    """A generator whose arrays live where `xp` puts them."""
    global _device
    if xp is numpy:
        return _host
    if _device is None or _device[0] is not xp:
        _device = (xp, xp.random.default_rng(_seed))
    return _device[1]


def get_state():
    """JSON-able state for checkpoints: the seed, the host generator's position and the mask counter.

    The GPU generator (dropout on CuPy through for_array_module) is re-seeded from the seed on
    restore, not restored to its position, so a resumed GPU run with that dropout is not bit-exact;
    masks from `dropout_mask` are (they depend on the seed and the counter alone).
    """
    return {"seed": _seed, "host": _host.bit_generator.state, "counter": [_step, _call]}


def set_state(state):
    global _step, _call
    manual_seed(state["seed"])
    _host.bit_generator.state = state["host"]
    _step, _call = (int(c) for c in state.get("counter", (0, 0)))


# ---------------------------------------------------------------------------------------------
# Counter-based random numbers (SplitMix64: a 64-bit counter through a mixing function)
#
# SplitMix64 (Steele, Lea and Flood, 2014; the finaliser constants are Stafford's "Mix13") turns
# the counter x_i = key + (i + 1)·γ into bits by two xor-shift-multiply rounds. Every output is a
# function of (key, i) alone, so any element can be computed on its own, by any thread, in any
# order: what a GPU kernel needs, and what makes the masks reproducible without saved state.
# The key mixes seed, step and call the same way, so nearby counters give unrelated streams.

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15          # 2^64 / golden ratio, odd: i·γ visits every 64-bit value
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix64(z):
    """The SplitMix64 finaliser on a Python int (mod 2^64)."""
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def stream_key(seed, step, call):
    """The 64-bit key of the numbers drawn at (seed, step, call)."""
    key = _mix64((int(seed) * _GAMMA + 1) & _MASK64)
    key = _mix64(key ^ ((int(step) * _GAMMA + 2) & _MASK64))
    return _mix64(key ^ ((int(call) * _GAMMA + 3) & _MASK64))


def random_bits(xp, n, key):
    """n 64-bit words (uint64), word i = mix(key + (i + 1)·γ): array code that NumPy and CuPy run alike."""
    u64 = xp.uint64
    x = xp.arange(1, n + 1, dtype=u64)
    x *= u64(_GAMMA)                                   # unsigned arithmetic wraps mod 2^64, as intended
    x += u64(key)
    x ^= x >> u64(30)
    x *= u64(_MIX1)
    x ^= x >> u64(27)
    x *= u64(_MIX2)
    x ^= x >> u64(31)
    return x


def uniform(xp, shape, seed, step, call):
    """float32 numbers in [0, 1) of the given shape: the top 24 bits of each word, times 2^-24."""
    n = int(numpy.prod(shape, dtype=numpy.int64))
    bits = random_bits(xp, n, stream_key(seed, step, call))
    u = (bits >> xp.uint64(40)).astype(xp.float32)
    u *= numpy.float32(2.0 ** -24)
    return u.reshape(shape)


def dropout_mask(xp, shape, p, dtype=numpy.float32, seed=None, step=None, call=None):
    """Inverted dropout's mask: 0 with probability p, else 1/(1 − p), as an array of `dtype`.

    Each element is kept when its uniform number is >= p. (seed, step, call) default to the
    manual seed, the current step and the next call number (the counter advances); pass them all
    to compute a given mask again (a backward that recomputes instead of keeping it).
    """
    global _call
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_mask needs 0 <= p < 1, got {p}")
    if seed is None and step is None and call is None:
        seed, step, call = _seed, _step, _call
        _call += 1
    elif seed is None or step is None or call is None:
        raise ValueError("dropout_mask: pass all of seed, step and call, or none of them")
    mask = (uniform(xp, shape, seed, step, call) >= numpy.float32(p)).astype(dtype)
    mask *= 1.0 / (1.0 - p)                            # a Python float keeps the mask's dtype
    return mask


def begin_step(step):
    """Start the masks of training step `step`: calls count from 0 again (the trainer calls this)."""
    global _step, _call
    _step, _call = int(step), 0


def counter():
    """(step, call): the counter the next dropout_mask will use."""
    return _step, _call
