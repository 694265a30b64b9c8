"""Checkpoints: a directory that a crash can never leave half-written.

A checkpoint directory holds three files:

    model.safetensors       the model's state_dict (names and shapes as nanoGPT / GPT-2)
    optimizer.safetensors   the optimizer's arrays (see ``tinyllm.optim.optimizer_state_to_flat``)
    state.json              everything else, as JSON: {"format": "tinyllm-checkpoint", "version": 1,
                            "step": ..., and whatever the trainer adds (config, RNG and data-loader
                            state, best val loss, the optimizer's JSON part)}

Nothing is pickled: loading a checkpoint reads numbers and JSON, it never runs code from the file.

Saving writes a complete new directory under a temporary name next to the target, then swaps it in:

    1. write  .ckpt.tmp-XXXX/  (all three files, fsynced)
    2. rename ckpt/           -> .ckpt.old/      (only if a previous checkpoint exists)
    3. rename .ckpt.tmp-XXXX/ -> ckpt/
    4. remove .ckpt.old/

A crash before 2 leaves the old checkpoint; after 3, the new one; between 2 and 3 only ``.ckpt.old``
exists, and it is the complete previous checkpoint: ``load_checkpoint`` reads it, and
``recover_checkpoint`` (called by every save) renames it back.

Nothing that is not finite is ever written or read: ``save_checkpoint`` (every checkpoint write goes
through it) refuses arrays holding NaN or inf before it writes a byte, and ``load_checkpoint``
refuses them too. ``load_run_checkpoint`` checks the rest of what ``tinyllm train`` writes: every
key of state.json and its type, the model's tensors' names, shapes and dtype against the saved
model config; every problem is one ``CheckpointError`` line naming the file and what is wrong.
"""
import math

import json
import os
import secrets
import shutil
from pathlib import Path

import numpy

from tinyllm import backend
from tinyllm.fileio import atomic_open, fsync_dir
from tinyllm.safetensors_io import SafetensorsError, load_file, save_file

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "STATE_FILE",
    "REQUIRED_STATE_KEYS",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "load_run_checkpoint",
    "read_state",
    "recover_checkpoint",
    "RUN_STATE_KEYS",
]

CHECKPOINT_FORMAT = "tinyllm-checkpoint"
CHECKPOINT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
REQUIRED_STATE_KEYS = ("step",)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and what is wrong."""


def _aside_path(ckpt_dir):
    """Where the previous checkpoint waits while the new one is renamed into place."""
    return ckpt_dir.parent / f".{ckpt_dir.name}.old"


def _temp_prefix(ckpt_dir):
    return f".{ckpt_dir.name}.tmp-"


def recover_checkpoint(ckpt_dir):
    """Repair what an interrupted ``save_checkpoint`` left behind. Safe to call at any time
    when no save is running.

    - only the aside copy exists (crash between the two renames): rename it back into place;
    - both exist (crash after the swap): the new one is complete, drop the aside copy;
    - unfinished temporary directories: remove them.
    """
    ckpt_dir = Path(ckpt_dir)
    aside = _aside_path(ckpt_dir)
    if aside.is_dir():
        if ckpt_dir.exists():
            shutil.rmtree(aside)
        else:
            os.rename(aside, ckpt_dir)
        fsync_dir(ckpt_dir.parent)
    if ckpt_dir.parent.is_dir():
        for leftover in ckpt_dir.parent.glob(_temp_prefix(ckpt_dir) + "*"):
            shutil.rmtree(leftover, ignore_errors=True)


def first_non_finite(arrays):
    """The name of the first floating-point array (NumPy or CuPy) that holds NaN or inf, or None."""
    for name, array in arrays.items():
        if getattr(array, "dtype", numpy.dtype(object)).kind not in "fc":
            continue  # integers and booleans are always finite
        xp = backend.get_array_module(array)
        if not bool(xp.isfinite(array).all()):
            return name
    return None


def save_checkpoint(ckpt_dir, *, model_state, optimizer_flat, state):
    """Write a checkpoint to ``ckpt_dir``, replacing any previous one as a whole.

    ``model_state`` and ``optimizer_flat`` map names to arrays (NumPy or CuPy); ``state`` is a
    JSON-serialisable dict with at least ``"step"``. The format and version fields are added here.
    """
    ckpt_dir = Path(ckpt_dir)
    for key in ("format", "version"):
        if key in state:
            raise ValueError(f"state must not contain {key!r}: save_checkpoint sets it")
    missing = [key for key in REQUIRED_STATE_KEYS if key not in state]
    if missing:
        raise ValueError(f"state lacks required keys {missing}")
    for file_name, arrays in ((MODEL_FILE, model_state), (OPTIMIZER_FILE, optimizer_flat)):
        bad = first_non_finite(arrays)
        if bad is not None:
            raise CheckpointError(
                f"refusing to write a checkpoint to {ckpt_dir}: the tensor {bad!r} of {file_name} holds "
                "NaN or inf; the previous checkpoint, if any, is left as it was")
    envelope = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    try:
        state_text = json.dumps(envelope, indent=2) + "\n"  # fail before writing anything
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint state is not JSON-serialisable: {e}") from None

    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(ckpt_dir)

    # 1. The complete new checkpoint, under a temporary name in the same directory.
    temp = ckpt_dir.parent / f"{_temp_prefix(ckpt_dir)}{os.getpid()}-{secrets.token_hex(4)}"
    temp.mkdir()
    try:
        save_file(model_state, temp / MODEL_FILE)
        save_file(optimizer_flat, temp / OPTIMIZER_FILE)
        with atomic_open(temp / STATE_FILE, "w") as f:
            f.write(state_text)
        fsync_dir(temp)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise

    # 2-4. Swap it in. There is no atomic exchange of two non-empty directories in the stdlib,
    # so the old one steps aside first; recover_checkpoint handles a crash in between.
    aside = _aside_path(ckpt_dir)
    had_previous = ckpt_dir.exists()
    try:
        if had_previous:
            os.rename(ckpt_dir, aside)
        os.rename(temp, ckpt_dir)
    except BaseException:
        # Put things back as they were, if we still can.
        if had_previous and aside.exists() and not ckpt_dir.exists():
            try:
                os.rename(aside, ckpt_dir)
            except OSError:
                pass  # recover_checkpoint / load_checkpoint will find the aside copy
        shutil.rmtree(temp, ignore_errors=True)
        raise
    fsync_dir(ckpt_dir.parent)
    if had_previous:
        shutil.rmtree(aside, ignore_errors=True)


def _unusable(directory, what):
    return CheckpointError(f"checkpoint {directory} is unusable: {what}")


def load_checkpoint(ckpt_dir, required_keys=REQUIRED_STATE_KEYS, *, optimizer=True):
    """Read and validate a checkpoint: returns ``(model_state, optimizer_flat, state)``.

    The arrays are NumPy; ``state`` is the dict given to ``save_checkpoint`` (without the format
    and version fields). Every problem is raised as one ``CheckpointError``, arrays holding NaN or
    inf included. ``optimizer=False`` neither needs nor reads ``optimizer.safetensors`` (sampling
    does not use it) and gives None in its place. When a save was interrupted between its two
    renames, the previous checkpoint is read from its aside copy; nothing on disk is changed here
    (a trainer that may still be saving is left alone).
    """
    directory = checkpoint_directory(ckpt_dir)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint at {ckpt_dir}: the directory does not exist")

    def unusable(what):
        return _unusable(directory, what)

    files = (MODEL_FILE, OPTIMIZER_FILE) if optimizer else (MODEL_FILE,)
    for name in (*files, STATE_FILE):
        if not (directory / name).is_file():
            raise unusable(f"{name} is missing")

    # state.json first: its format and version say whether we can read the rest at all.
    state = _read_state(directory, required_keys)

    arrays = []
    for name in files:
        try:
            loaded = load_file(directory / name)
        except SafetensorsError as e:
            raise unusable(str(e)) from None
        except OSError as e:
            raise unusable(f"{name} cannot be read ({e})") from None
        bad = first_non_finite(loaded)
        if bad is not None:
            raise unusable(f"{name}: the tensor {bad!r} holds NaN or inf")
        arrays.append(loaded)
    model_state, optimizer_flat = arrays if optimizer else (arrays[0], None)
    return model_state, optimizer_flat, state


def read_state(ckpt_dir, required_keys=REQUIRED_STATE_KEYS):
    """Only the state.json of a checkpoint (without the format and version fields), checked as
    ``load_checkpoint`` checks it, without reading the tensors."""
    directory = checkpoint_directory(ckpt_dir)
    if not (directory / STATE_FILE).is_file():
        raise CheckpointError(f"no checkpoint at {ckpt_dir}: {STATE_FILE} does not exist")
    return _read_state(directory, required_keys)


def _read_state(directory, required_keys):
    try:
        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _unusable(directory, f"{STATE_FILE} is not valid JSON ({e}); it is truncated or corrupted") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise _unusable(directory, f"{STATE_FILE} does not describe a tinyllm checkpoint "
                                   f"(no \"format\": \"{CHECKPOINT_FORMAT}\")")
    version = state.get("version")
    if version != CHECKPOINT_VERSION:
        raise _unusable(directory, f"{STATE_FILE} has format version {version!r}; this tinyllm reads "
                                   f"version {CHECKPOINT_VERSION}")
    missing = [key for key in required_keys if key not in state]
    if missing:
        raise _unusable(directory, f"{STATE_FILE} lacks the keys {', '.join(missing)}")
    del state["format"], state["version"]
    return state


def checkpoint_directory(ckpt_dir):
    """Where a checkpoint is read from: ckpt_dir, or its aside copy after a save cut between renames."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir() and _aside_path(ckpt_dir).is_dir():
        return _aside_path(ckpt_dir)
    return ckpt_dir


# ---------------------------------------------------------------------------------------------
# The checkpoints of `tinyllm train`: what state.json holds, checked key by key

# Every key the trainer writes (tinyllm.train.Trainer.state); sampling needs only some of them.
RUN_STATE_KEYS = ("step", "best_val_loss", "last_eval_step", "config", "model_config", "rng", "loaders",
                  "optimizer", "tokenizer")
SAMPLE_STATE_KEYS = ("config", "model_config", "tokenizer")


def _is_int(value, minimum):
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _generator_state_problem(state):
    """None when `state` is a NumPy PCG64 generator state, else what is wrong with it."""
    try:
        numpy.random.PCG64().state = state
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        return f"is not a PCG64 generator state ({type(e).__name__}: {e})"
    return None


def _rng_problem(value):
    """tinyllm.rng.get_state(): seed, host generator and (since the counter-based masks) counter."""
    if not isinstance(value, dict) or not {"seed", "host"} <= set(value) <= {"seed", "host", "counter"}:
        return "must be an object with the keys seed, host and counter"
    if not _is_int(value["seed"], 0):
        return f"seed must be a whole number >= 0, got {value['seed']!r}"
    counter = value.get("counter", [0, 0])
    if not (isinstance(counter, list) and len(counter) == 2 and all(_is_int(c, 0) for c in counter)):
        return f"counter must be two whole numbers >= 0, got {counter!r}"
    problem = _generator_state_problem(value["host"])
    return None if problem is None else "host " + problem


def _loaders_problem(value):
    if not isinstance(value, dict) or not value:
        return "must be an object: loader name -> its state"
    for name, loader in value.items():
        if not isinstance(loader, dict) or set(loader) != {"split", "batch_size", "block_size", "rng"}:
            return f"{name} must be an object with the keys split, batch_size, block_size and rng"
        if loader["split"] not in ("train", "val"):
            return f"{name}: split must be \"train\" or \"val\", got {loader['split']!r}"
        for key in ("batch_size", "block_size"):
            if not _is_int(loader[key], 1):
                return f"{name}: {key} must be a whole number >= 1, got {loader[key]!r}"
        problem = _generator_state_problem(loader["rng"])
        if problem is not None:
            return f"{name}: rng {problem}"
    return None


def _optimizer_problem(value):
    if not isinstance(value, dict) or set(value) != {"param_groups", "steps"}:
        return "must be an object with the keys param_groups and steps"
    groups, steps = value["param_groups"], value["steps"]
    if not isinstance(groups, list) or not groups:
        return "param_groups must be a non-empty list"
    for i, group in enumerate(groups):
        if not isinstance(group, dict) or not {"lr", "betas", "eps", "weight_decay", "params"} <= set(group):
            return f"param group {i} must be an object with lr, betas, eps, weight_decay and params"
        for key in ("lr", "eps", "weight_decay"):
            if not (_is_number(group[key]) and group[key] >= 0):
                return f"param group {i}: {key} must be a finite number >= 0, got {group[key]!r}"
        betas = group["betas"]
        if not (isinstance(betas, list) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
            return f"param group {i}: betas must be two numbers in [0, 1), got {betas!r}"
        if not (isinstance(group["params"], list) and all(_is_int(p, 0) for p in group["params"])):
            return f"param group {i}: params must be a list of parameter numbers"
    if not isinstance(steps, dict) or not all(k.isdigit() and _is_int(v, 0) for k, v in steps.items()):
        return "steps must map parameter numbers to whole step counts >= 0"
    return None


def _tokenizer_problem(value):
    if not isinstance(value, dict) or not isinstance(value.get("file"), str) \
            or not isinstance(value.get("data_dir"), str):
        return "must be an object with the strings file and data_dir"
    return None


# key -> a function returning None when the value is right, else what is wrong with it
_RUN_STATE_CHECKS = {
    "step": lambda v: None if _is_int(v, 0) else f"must be a whole number >= 0, got {v!r}",
    "best_val_loss": lambda v: None if v is None or _is_number(v) else f"must be a finite number or null, got {v!r}",
    "last_eval_step": lambda v: None if _is_int(v, -1) else f"must be a whole number >= -1, got {v!r}",
    "config": lambda v: None if isinstance(v, dict) else f"must be an object, got {v!r}",
    "model_config": lambda v: None if isinstance(v, dict) else f"must be an object, got {v!r}",
    "rng": _rng_problem,
    "loaders": _loaders_problem,
    "optimizer": _optimizer_problem,
    "tokenizer": _tokenizer_problem,
}


def load_run_checkpoint(ckpt_dir, *, optimizer=True):
    """A checkpoint written by `tinyllm train`, checked through before anything is built from it.

    Returns ``(model_config, model_state, optimizer_flat, state)``: a GPTConfig, the model's
    arrays (their names, shapes and the dtype of ``state["config"]["dtype"]`` checked against
    the config), the optimizer's arrays (None with ``optimizer=False``: sampling neither needs nor
    reads them) and state.json, every key of it checked. Anything wrong is one CheckpointError
    naming the file and the problem.
    """
    from tinyllm.model import GPTConfig, state_dict_shapes

    keys = RUN_STATE_KEYS if optimizer else SAMPLE_STATE_KEYS
    model_state, optimizer_flat, state = load_checkpoint(ckpt_dir, keys, optimizer=optimizer)
    directory = checkpoint_directory(ckpt_dir)
    for key in keys:
        problem = _RUN_STATE_CHECKS[key](state[key])
        if problem is not None:
            raise _unusable(directory, f"{STATE_FILE}: \"{key}\" {problem}")
    try:
        config = GPTConfig.from_dict(state["model_config"])
    except (TypeError, ValueError) as e:
        raise _unusable(directory, f"{STATE_FILE}: \"model_config\" is wrong: {e}") from None
    dtype = state["config"].get("dtype", "float32")
    if dtype not in ("float32", "float64"):
        raise _unusable(directory, f"{STATE_FILE}: \"config\" has dtype {dtype!r}; expected float32 or float64")

    # Names, shapes and dtype of the model's tensors against the config, before anything is
    # allocated from it (a config saying block_size 10^12 must not reach GPT(...)).
    if config.n_layer > len(model_state):
        raise _unusable(directory, f"{MODEL_FILE} holds {len(model_state)} tensors, too few for the "
                                   f"n_layer={config.n_layer} of {STATE_FILE}'s model_config")
    expected = state_dict_shapes(config)
    missing = [name for name in expected if name not in model_state]
    unexpected = [name for name in model_state if name not in expected]
    if missing or unexpected:
        raise _unusable(directory, f"{MODEL_FILE} does not match {STATE_FILE}'s model_config: missing "
                                   f"tensors {missing[:3]}, unexpected tensors {unexpected[:3]}")
    for name, shape in expected.items():
        array = model_state[name]
        if tuple(array.shape) != shape:
            raise _unusable(directory, f"{MODEL_FILE}: the tensor {name!r} has shape {tuple(array.shape)}, "
                                       f"but {STATE_FILE}'s model_config makes it {shape}")
        if array.dtype != numpy.dtype(dtype):
            raise _unusable(directory, f"{MODEL_FILE}: the tensor {name!r} is {array.dtype}, expected {dtype}")
    return config, model_state, optimizer_flat, state
