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
"""

import json
import os
import secrets
import shutil
from pathlib import Path

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
    "recover_checkpoint",
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


def load_checkpoint(ckpt_dir, required_keys=REQUIRED_STATE_KEYS):
    """Read and validate a checkpoint: returns ``(model_state, optimizer_flat, state)``.

    The arrays are NumPy; ``state`` is the dict given to ``save_checkpoint`` (without the format
    and version fields). Every problem is raised as one ``CheckpointError``. When a save was
    interrupted between its two renames, the previous checkpoint is read from its aside copy;
    nothing on disk is changed here (a trainer that may still be saving is left alone).
    """
    ckpt_dir = Path(ckpt_dir)
    directory = ckpt_dir
    if not ckpt_dir.is_dir() and _aside_path(ckpt_dir).is_dir():
        directory = _aside_path(ckpt_dir)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint at {ckpt_dir}: the directory does not exist")

    def unusable(what):
        return CheckpointError(f"checkpoint {directory} is unusable: {what}")

    for name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE):
        if not (directory / name).is_file():
            raise unusable(f"{name} is missing")

    # state.json first: its format and version say whether we can read the rest at all.
    try:
        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise unusable(f"{STATE_FILE} is not valid JSON ({e}); it is truncated or corrupted") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise unusable(f"{STATE_FILE} does not describe a tinyllm checkpoint (no \"format\": \"{CHECKPOINT_FORMAT}\")")
    version = state.get("version")
    if version != CHECKPOINT_VERSION:
        raise unusable(f"{STATE_FILE} has format version {version!r}; this tinyllm reads version {CHECKPOINT_VERSION}")
    missing = [key for key in required_keys if key not in state]
    if missing:
        raise unusable(f"{STATE_FILE} lacks the keys {', '.join(missing)}")

    arrays = []
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        try:
            arrays.append(load_file(directory / name))
        except SafetensorsError as e:
            raise unusable(str(e)) from None
        except OSError as e:
            raise unusable(f"{name} cannot be read ({e})") from None
    model_state, optimizer_flat = arrays

    del state["format"], state["version"]
    return model_state, optimizer_flat, state
