"""AdamW, global gradient-norm clipping and the cosine learning-rate schedule.

Everything here matches PyTorch's semantics (``torch.optim.AdamW``, ``torch.nn.utils.clip_grad_norm_``)
so that a training run can be compared step by step with a PyTorch one.

A "parameter" is any object with two attributes:

    p.data   the array of values (numpy or cupy), updated in place
    p.grad   an array of the same shape, or None when the parameter got no gradient
"""

import math

from tinyllm import threads
from tinyllm.backend import get_array_module

__all__ = [
    "AdamW",
    "clip_grad_norm_",
    "cosine_lr",
    "optimizer_state_to_flat",
    "optimizer_state_from_flat",
]


# ----------------------------------------------------------------------------------------------
# AdamW
# ----------------------------------------------------------------------------------------------


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), exactly as ``torch.optim.AdamW``.

    For each parameter ``p`` with gradient ``g``, at its step ``t = 1, 2, ...``:

        p ← p · (1 − lr·wd)                          decoupled weight decay, before the moments
        m ← β1·m + (1 − β1)·g                        first moment (mean of gradients)
        v ← β2·v + (1 − β2)·g²                       second moment (uncentred variance)
        p ← p − lr · (m / (1 − β1ᵗ)) / (√v / √(1 − β2ᵗ) + eps)

    ``params`` is an iterable of parameters, or a list of param-group dicts such as
    ``[{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]``; keys a
    group leaves out take the constructor's values. A schedule sets ``group["lr"]`` before each step.
    Parameters whose ``grad`` is None are skipped entirely: no decay, no state, their step count
    does not advance (as in PyTorch).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        self.defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        _check_hyperparameters(self.defaults)
        if hasattr(params, "data") or hasattr(params, "keys"):
            raise TypeError(
                "params must be an iterable of parameters or a list of param-group dicts, "
                f"got a single {type(params).__name__}"
            )
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = []
        # Per-parameter state, keyed by the parameter's position across all groups (0, 1, 2, ...):
        # parameters are not necessarily hashable (a Tensor with an elementwise __eq__ is not).
        self.state = {}
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group):
        """Append a group (a dict with "params"), filling missing hyperparameters from the defaults."""
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("a param group must be a dict with a 'params' entry")
        params = group["params"]
        params = [params] if hasattr(params, "data") else list(params)
        if not params:
            raise ValueError("a param group has an empty parameter list")
        for p in params:
            if not (hasattr(p, "data") and hasattr(p, "grad")):
                raise TypeError(f"a parameter needs .data and .grad attributes, got {type(p).__name__}")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params) or len({id(p) for p in params}) != len(params):
            raise ValueError("some parameters appear in more than one param group (or twice in one)")
        filled = {**self.defaults, **group, "params": params}
        filled["betas"] = tuple(filled["betas"])
        _check_hyperparameters(filled)
        self.param_groups.append(filled)

    def _indexed_params(self):
        """Yield ``(index, param, group)`` in the fixed order that numbers the state."""
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield index, p, group
                index += 1

    def zero_grad(self, set_to_none=True):
        """Forget the gradients: ``p.grad = None`` (the default, as in PyTorch), or fill them with 0."""
        for _, p, _ in self._indexed_params():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.fill(0)

    def step(self):
        """Update every parameter that has a gradient, in place."""
        update_all(self.updates())

    def updates(self):
        """[(data, grad, exp_avg, exp_avg_sq, hyperparameters)] for the parameters this step updates,
        their states created or advanced by one step; `update_all` (or `update_stretch`) applies them.
        (`step()` is the two together; tinyllm.data_parallel shares the second out over processes.)"""
        updates = []
        for index, p, group in self._indexed_params():
            if p.grad is None:
                continue
            xp = get_array_module(p.data)
            state = self.state.get(index)
            if state is None:
                state = {"step": 0, "exp_avg": xp.zeros_like(p.data), "exp_avg_sq": xp.zeros_like(p.data)}
                self.state[index] = state
            state["step"] += 1
            t = state["step"]
            # Python floats: a numpy float64 scalar would promote float32 arrays to float64.
            lr, eps, weight_decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
            beta1, beta2 = float(group["betas"][0]), float(group["betas"][1])
            hyper = (lr, beta1, beta2, eps, weight_decay, 1.0 - beta1**t, 1.0 - beta2**t)
            updates.append((p.data, p.grad, state["exp_avg"], state["exp_avg_sq"], hyper))
        return updates

    # ------------------------------------------------------------------ saving and restoring

    def state_dict(self):
        """The optimizer's state, laid out like PyTorch's::

            {"state": {index: {"step": int, "exp_avg": array, "exp_avg_sq": array}, ...},
             "param_groups": [{"lr": ..., "betas": [b1, b2], "eps": ..., "weight_decay": ...,
                               "params": [index, ...]}, ...]}

        ``index`` numbers the parameters across the groups in order. The arrays are the live state
        (not copies), on the parameters' device; save them before the next ``step()``.
        Use ``optimizer_state_to_flat`` to split this into arrays and JSON for a checkpoint.
        """
        groups = []
        index = 0
        for group in self.param_groups:
            saved = {k: v for k, v in group.items() if k != "params"}
            saved["betas"] = list(saved["betas"])
            saved["params"] = list(range(index, index + len(group["params"])))
            index += len(group["params"])
            groups.append(saved)
        return {"state": dict(self.state), "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore a ``state_dict()``: the moments and step counts, and each group's hyperparameters.

        The current optimizer must have the same number of groups and the same number of
        parameters in each group, with matching shapes. Arrays are copied onto the parameters'
        device and dtype.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"optimizer state has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}"
            )
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {i}: optimizer state has {len(saved['params'])} parameters, "
                    f"this optimizer has {len(group['params'])}"
                )

        # Saved indices -> our parameters, position by position.
        params = {}
        for saved, group in zip(saved_groups, self.param_groups):
            for saved_index, p in zip(saved["params"], group["params"]):
                params[int(saved_index)] = p
        ours = {id(p): i for i, p, _ in self._indexed_params()}

        new_state = {}
        for key, entry in state_dict["state"].items():
            saved_index = int(key)
            if saved_index not in params:
                raise ValueError(f"optimizer state has an entry for parameter {saved_index}, which no group lists")
            p = params[saved_index]
            xp = get_array_module(p.data)
            if "step" not in entry:
                raise ValueError(f"optimizer state of parameter {saved_index} lacks 'step'")
            restored = {"step": int(entry["step"])}
            for name in ("exp_avg", "exp_avg_sq"):
                if name not in entry:
                    raise ValueError(f"optimizer state of parameter {saved_index} lacks {name!r}")
                array = entry[name]
                if tuple(array.shape) != tuple(p.data.shape):
                    raise ValueError(
                        f"optimizer state {name!r} of parameter {saved_index} has shape {tuple(array.shape)}, "
                        f"the parameter has shape {tuple(p.data.shape)}"
                    )
                if xp.__name__ == "numpy" and hasattr(array, "get"):
                    array = array.get()  # cupy -> host; numpy refuses implicit device copies
                # A fresh copy on the parameter's device, in its dtype.
                restored[name] = xp.array(array, dtype=p.data.dtype, copy=True)
            new_state[ours[id(p)]] = restored

        # Hyperparameters come from the saved groups (as in PyTorch); checked before anything changes.
        updated_groups = []
        for saved, group in zip(saved_groups, self.param_groups):
            updated = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            updated["betas"] = tuple(updated["betas"])
            _check_hyperparameters(updated)
            updated_groups.append(updated)
        for group, updated in zip(self.param_groups, updated_groups):
            group.update(updated)  # in place: callers may hold references to the group dicts
        self.state = new_state


def _check_hyperparameters(h):
    if not h["lr"] >= 0.0:
        raise ValueError(f"invalid learning rate {h['lr']}")
    if len(h["betas"]) != 2 or not all(0.0 <= b < 1.0 for b in h["betas"]):
        raise ValueError(f"invalid betas {h['betas']}: each must be in [0, 1)")
    if not h["eps"] >= 0.0:
        raise ValueError(f"invalid eps {h['eps']}")
    if not h["weight_decay"] >= 0.0:
        raise ValueError(f"invalid weight_decay {h['weight_decay']}")


# ----------------------------------------------------------------------------------------------
# Flat form for checkpoints
# ----------------------------------------------------------------------------------------------


def optimizer_state_to_flat(state_dict):
    """Split an ``AdamW.state_dict()`` into ``(arrays, meta)`` for a checkpoint.

    ``arrays`` (for a safetensors file) maps ``"state.{index}.exp_avg"`` and
    ``"state.{index}.exp_avg_sq"`` to the moment arrays; ``meta`` (for JSON) is
    ``{"param_groups": [...], "steps": {"index": step, ...}}``.
    """
    arrays = {}
    steps = {}
    for index, entry in state_dict["state"].items():
        index = int(index)
        arrays[f"state.{index}.exp_avg"] = entry["exp_avg"]
        arrays[f"state.{index}.exp_avg_sq"] = entry["exp_avg_sq"]
        steps[str(index)] = int(entry["step"])
    groups = []
    for group in state_dict["param_groups"]:
        group = dict(group)
        group["betas"] = [float(b) for b in group["betas"]]
        group["params"] = [int(i) for i in group["params"]]
        groups.append(group)
    return arrays, {"param_groups": groups, "steps": steps}


def optimizer_state_from_flat(arrays, meta):
    """Inverse of ``optimizer_state_to_flat``: rebuild the dict that ``load_state_dict`` takes."""
    state = {}
    for key, step in meta["steps"].items():
        index = int(key)
        try:
            state[index] = {
                "step": int(step),
                "exp_avg": arrays[f"state.{index}.exp_avg"],
                "exp_avg_sq": arrays[f"state.{index}.exp_avg_sq"],
            }
        except KeyError as e:
            raise ValueError(f"optimizer arrays lack {e.args[0]!r}") from None
    expected = {f"state.{i}.{name}" for i in state for name in ("exp_avg", "exp_avg_sq")}
    unexpected = sorted(set(arrays) - expected)
    if unexpected:
        raise ValueError(f"optimizer arrays have entries without a step count: {unexpected[:5]}")
    return {"state": state, "param_groups": [dict(g) for g in meta["param_groups"]]}


# ----------------------------------------------------------------------------------------------
# Gradient clipping
# ----------------------------------------------------------------------------------------------


# The update makes 13 passes over its arrays. Taken this many elements at a time, the five arrays
# it touches (data, grad, both moments, a scratch array: 1.25 MiB of float32) stay in a core's L2
# cache over all 13, instead of streaming from memory 13 times for a big parameter: AdamW on the
# "char" config's parameters took 31.7 instead of 43.6 ms on one core, the "baby" one's (all small
# already) 1.51 against 1.54 ms (part 8 of scripts/bench_cpu_parts.py).
UPDATE_BLOCK = 1 << 16


def update_all(updates):
    """Apply AdamW.updates(), the elements of all the parameters cut over the CPU threads.

    The update is elementwise, so any cut works: the parameters are taken end to end as one run of
    elements, and each thread updates one contiguous stretch of it (whole parameters, or pieces of
    flattened ones), with one hand-over per step instead of one per parameter.
    """
    total = sum(data.size for data, *_ in updates)
    if total:
        threads.parallel_for(total, lambda i, j: update_stretch(updates, i, j), get_array_module(updates[0][0]),
                             size=total)


def update_stretch(updates, i, j):
    """Apply the elements i .. j of AdamW.updates(), its parameters taken end to end.

    A parameter whose arrays are not all contiguous is not cut: it is updated whole by the stretch
    that holds its first element.
    """
    for n, a, b in stretch_pieces([data.size for data, *_ in updates], i, j):
        data, grad, m, v, hyper = updates[n]
        arrays = (data, grad, m, v)
        if all(x.flags.c_contiguous for x in arrays):
            update_span([x.reshape(-1) for x in arrays], a, b, hyper)
        elif a == 0:
            _adamw_update(*arrays, *hyper)


def update_span(arrays, i, j, hyper):
    """AdamW on the elements i .. j of flat arrays (data, grad, exp_avg, exp_avg_sq), hyperparameters
    as AdamW.updates() gives them, in blocks that stay in cache over the update's passes."""
    for c, e in threads.blocks(i, j, UPDATE_BLOCK):
        _adamw_update(*(x[c:e] for x in arrays), *hyper)


def stretch_pieces(sizes, i, j):
    """[(n, a, b)]: arrays of these sizes taken end to end, the elements i .. j of them are the
    elements a .. b of array n, for each array n they reach into."""
    pieces, start = [], 0
    for n, size in enumerate(sizes):
        stop = start + size
        if start < j and stop > i:
            pieces.append((n, max(i, start) - start, min(j, stop) - start))
        start = stop
    return pieces


def _adamw_update(data, grad, m, v, lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2):
    """One AdamW update of data, m and v in place (arrays of one parameter, or matching parts of them)."""
    xp = get_array_module(data)
    # p ← p · (1 − lr·wd)
    if weight_decay != 0.0:
        data *= 1.0 - lr * weight_decay

    scratch = xp.empty_like(data)  # the one temporary this update needs

    # m ← β1·m + (1 − β1)·g
    m *= beta1
    xp.multiply(grad, 1.0 - beta1, out=scratch)
    m += scratch

    # v ← β2·v + (1 − β2)·g²
    v *= beta2
    xp.square(grad, out=scratch)
    scratch *= 1.0 - beta2
    v += scratch

    # p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + eps); with c = √(1 − β2ᵗ) that is
    # p ← p − (lr·c / (1 − β1ᵗ)) · m / (√v + eps·c): the same number, one pass fewer
    c = math.sqrt(bias_correction2)
    xp.sqrt(v, out=scratch)
    scratch += eps * c
    xp.divide(m, scratch, out=scratch)
    scratch *= lr * c / bias_correction1
    data -= scratch


def clip_grad_norm_(params, max_norm):
    """Scale all gradients in place so that their global L2 norm is at most ``max_norm``.

    The global norm is ``sqrt(Σ_p Σ_i g_pi²)`` over every parameter that has a gradient. When
    ``max_norm / (norm + 1e-6) < 1`` (PyTorch's rule) every gradient is multiplied by that factor.
    Returns the norm *before* clipping as a Python float. A non-finite norm (inf or nan) is
    returned as it is and nothing is scaled: the caller should skip that step.
    """
    if hasattr(params, "grad"):
        params = [params]
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    # Sum the squares on the arrays' own device and synchronise once, at float().
    total = None
    for g in grads:
        xp = get_array_module(g)
        if g.dtype.itemsize < 4:
            g = g.astype(xp.float32)  # a float16 sum of squares overflows at 65504
        square_sum = xp.vdot(g, g).astype(xp.float64)
        total = square_sum if total is None else total + square_sum
    norm = math.sqrt(float(total))
    if not math.isfinite(norm):
        return norm
    coefficient = float(max_norm) / (norm + 1e-6)
    if coefficient < 1.0:
        for g in grads:
            g *= coefficient
    return norm


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule
# ----------------------------------------------------------------------------------------------


def cosine_lr(step, *, max_lr, min_lr, warmup_steps, decay_steps):
    """Learning rate at ``step`` (counting from 0): linear warmup, cosine decay, then constant.

        step < warmup_steps:                 max_lr · (step + 1) / warmup_steps   (never 0)
        warmup_steps ≤ step < decay_steps:   min_lr + ½(1 + cos(π·r))·(max_lr − min_lr),
                                             r = (step − warmup_steps) / (decay_steps − warmup_steps)
        step ≥ decay_steps:                  min_lr
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / (decay_steps - warmup_steps)
    coefficient = 0.5 * (1.0 + math.cos(math.pi * ratio))  # goes from 1 down to 0
    return min_lr + coefficient * (max_lr - min_lr)
