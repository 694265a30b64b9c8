"""`Module` and `Parameter`: the bookkeeping that turns layers into a model.

A Module finds its parameters by looking at its own attributes: a `Parameter`, another `Module`, or
a list/tuple of Modules (as `ModuleList`). Names join with dots, so `model.transformer.h[0].attn`'s
weight is "transformer.h.0.attn.c_attn.weight" as in PyTorch and nanoGPT.
"""
from collections import OrderedDict

import numpy

from tinyllm import backend
from tinyllm.autograd import Tensor


class Parameter(Tensor):
    """A tensor that a Module owns and an optimizer updates (requires_grad=True)."""

    def __init__(self, data, requires_grad=True):
        if isinstance(data, Tensor):
            data = data.data
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter(" + super().__repr__() + ")"


class Module:
    """Base class of layers and models (as torch.nn.Module): subclasses define `forward`."""

    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    # --- discovery ------------------------------------------------------------------------------
    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)) and value and all(isinstance(m, Module) for m in value):
                for i, m in enumerate(value):
                    yield f"{name}.{i}", m

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix=""):
        """(name, Parameter) pairs; a parameter shared by two modules (tied weights) appears once."""
        seen = set()
        for module_name, module in self.named_modules(prefix):
            for name, value in vars(module).items():
                if isinstance(value, Parameter) and id(value) not in seen:
                    seen.add(id(value))
                    yield (f"{module_name}.{name}" if module_name else name), value

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self):
        return int(sum(p.size for p in self.parameters()))

    # --- modes and devices ----------------------------------------------------------------------
    def train(self, mode=True):
        for _, m in self.named_modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def to(self, device):
        """Move every parameter (in place, keeping the Parameter objects) to "cpu" or "cuda"."""
        device = backend.check_device(device)
        for p in self.parameters():
            p.data = backend.to_device(p.data, device)
            if p.grad is not None:
                p.grad = backend.to_device(p.grad, device)
        for _, m in self.named_modules():
            if hasattr(m, "_to_device"):  # modules with non-parameter buffers (e.g. RoPE tables)
                m._to_device(device)
        return self

    @property
    def device(self):
        first = next(self.named_parameters(), None)          # the first parameter is enough
        return first[1].device if first is not None else "cpu"

    # --- state_dict -----------------------------------------------------------------------------
    def _state_entries(self):
        """(name, Parameter) for every key of the state_dict, tied parameters under every name."""
        for module_name, module in self.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, Parameter):
                    yield (f"{module_name}.{name}" if module_name else name), value

    def state_dict(self):
        """name -> host NumPy copy of each parameter."""
        return OrderedDict((name, backend.to_numpy(p.data).copy()) for name, p in self._state_entries())

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays into the parameters (keeping their device and dtype); clear errors on mismatch."""
        entries = dict(self._state_entries())
        missing = [k for k in entries if k not in state_dict]
        unexpected = [k for k in state_dict if k not in entries]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}; "
                           "the checkpoint was made for a different model configuration "
                           "(or pass strict=False to load what matches)")
        for name, p in entries.items():
            if name not in state_dict:
                continue
            value = backend.to_numpy(state_dict[name]) if not isinstance(state_dict[name], numpy.ndarray) \
                else state_dict[name]
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"load_state_dict: {name} has shape {tuple(value.shape)} in the state_dict "
                                 f"but {tuple(p.shape)} in the model")
            xp = backend.get_array_module(p.data)
            p.data = xp.asarray(value, dtype=p.dtype).copy() if xp is numpy else xp.asarray(value.astype(p.dtype))
        return missing, unexpected

    def __repr__(self):
        lines = [type(self).__name__ + "("]
        for name, child in self.named_children():
            lines.append(f"  ({name}): " + repr(child).replace("\n", "\n  "))
        lines.append(")")
        return "\n".join(lines) if len(lines) > 2 else type(self).__name__ + "()"
