"""Random numbers for parameter initialisation and dropout, seeded by `tl.manual_seed`.

One NumPy generator drives everything on the host. On the GPU, dropout draws its masks from a
CuPy generator seeded from the same seed, so a run is repeatable on either device.
"""
import numpy

_seed = 0
_host = numpy.random.default_rng(0)
_device = None  # cupy generator, made on first use


def manual_seed(seed):
    global _seed, _host, _device
    _seed = int(seed)
    _host = numpy.random.default_rng(_seed)
    _device = None


def host():
    """The host generator (numpy.random.Generator)."""
    return _host


def for_array_module(xp):
    """A generator whose arrays live where `xp` puts them."""
    global _device
    if xp is numpy:
        return _host
    if _device is None:
        _device = xp.random.default_rng(_seed)
    return _device


def get_state():
    """JSON-able state for checkpoints: the seed and the host generator's position.

    The GPU generator (dropout on CuPy) is re-seeded from the seed on restore, not restored to
    its position, so a resumed GPU run with dropout is not yet bit-exact.
    """
    return {"seed": _seed, "host": _host.bit_generator.state}


def set_state(state):
    manual_seed(state["seed"])
    _host.bit_generator.state = state["host"]
