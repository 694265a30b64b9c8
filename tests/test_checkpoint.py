import json
import math
import os
import shutil

import numpy as np
import pytest

from tinyllm import checkpoint
from tinyllm.checkpoint import CheckpointError, load_checkpoint, recover_checkpoint, save_checkpoint


def model_state(value=1.0):
    return {
        "transformer.wte.weight": np.full((5, 4), value, np.float32),
        "transformer.ln_f.weight": np.arange(4, dtype=np.float32) * value,
        "transformer.ln_f.bias": np.zeros(4, np.float32),
    }


def optimizer_flat(value=0.5):
    return {"state.0.exp_avg": np.full((5, 4), value, np.float32), "state.0.exp_avg_sq": np.ones((5, 4), np.float32)}


def run_state(step=10):
    rng = np.random.Generator(np.random.PCG64(1))
    return {
        "step": step,
        "best_val_loss": math.inf,  # before the first evaluation
        "config": {"n_layer": 2, "dropout": 0.0, "norm": "layernorm"},
        "data_loader": {"rng": rng.bit_generator.state},  # 128-bit integers
        "optimizer": {"steps": {"0": step}},
    }


def save(ckpt, value=1.0, step=10):
    save_checkpoint(ckpt, model_state=model_state(value), optimizer_flat=optimizer_flat(value), state=run_state(step))


def assert_checkpoint(ckpt, value, step):
    model, optim, state = load_checkpoint(ckpt)
    for name, array in model_state(value).items():
        np.testing.assert_array_equal(model[name], array)
        assert model[name].dtype == array.dtype
    assert model.keys() == model_state().keys()
    np.testing.assert_array_equal(optim["state.0.exp_avg"], optimizer_flat(value)["state.0.exp_avg"])
    assert state == run_state(step)


def expect_unusable(ckpt, *fragments):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt)
    message = str(info.value)
    assert "unusable" in message or "no checkpoint" in message
    assert "\n" not in message  # one line
    for fragment in fragments:
        assert fragment in message
    return message


# ---------------------------------------------------------------- round trip and layout


def test_round_trip(tmp_path):
    save(tmp_path / "ckpt")
    assert_checkpoint(tmp_path / "ckpt", 1.0, 10)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state["format"] == "tinyllm-checkpoint" and state["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary or aside copies left


def test_replacing_a_checkpoint(tmp_path):
    save(tmp_path / "run" / "ckpt", 1.0, 10)
    save(tmp_path / "run" / "ckpt", 2.0, 20)
    assert_checkpoint(tmp_path / "run" / "ckpt", 2.0, 20)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["ckpt"]


def test_reference_library_reads_the_model_file(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    save(tmp_path / "ckpt")
    loaded = st_numpy.load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert loaded.keys() == model_state().keys()
    np.testing.assert_array_equal(loaded["transformer.ln_f.weight"], model_state()["transformer.ln_f.weight"])


def test_state_is_checked_before_anything_is_written(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "ckpt", model_state={}, optimizer_flat={}, state={"step": 1, "x": object()})
    with pytest.raises(ValueError, match="format"):
        save_checkpoint(tmp_path / "ckpt", model_state={}, optimizer_flat={}, state={"step": 1, "format": "x"})
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path / "ckpt", model_state={}, optimizer_flat={}, state={})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- crashes while saving


def test_crash_while_writing_files_keeps_old_checkpoint(tmp_path, monkeypatch):
    save(tmp_path / "ckpt", 1.0, 10)
    real_save_file = checkpoint.save_file

    def save_file_then_crash(tensors, path, metadata=None):
        if path.name == "optimizer.safetensors":
            raise OSError("simulated crash while writing")
        real_save_file(tensors, path, metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_file_then_crash)
    with pytest.raises(OSError, match="simulated"):
        save(tmp_path / "ckpt", 2.0, 20)
    assert_checkpoint(tmp_path / "ckpt", 1.0, 10)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_failed_swap_is_rolled_back(tmp_path, monkeypatch):
    save(tmp_path / "ckpt", 1.0, 10)
    real_rename = os.rename
    calls = []

    def rename_fails_second_time(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # ckpt -> aside worked; temp -> ckpt fails
            raise OSError("simulated crash during the swap")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_fails_second_time)
    with pytest.raises(OSError, match="simulated"):
        save(tmp_path / "ckpt", 2.0, 20)
    monkeypatch.undo()
    assert_checkpoint(tmp_path / "ckpt", 1.0, 10)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_hard_crash_between_renames_is_recovered(tmp_path, monkeypatch):
    """The process dies right after moving the old checkpoint aside: nothing else runs."""
    save(tmp_path / "ckpt", 1.0, 10)
    real_rename = os.rename
    calls = []

    def die_after_first_rename(src, dst):
        calls.append((src, dst))
        if len(calls) > 1:
            raise OSError("simulated power loss")  # also blocks the in-process rollback
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", die_after_first_rename)
    with pytest.raises(OSError):
        save(tmp_path / "ckpt", 2.0, 20)
    monkeypatch.undo()
    assert not (tmp_path / "ckpt").exists()
    assert (tmp_path / ".ckpt.old").is_dir()

    assert_checkpoint(tmp_path / "ckpt", 1.0, 10)  # read from the aside copy, nothing moved
    assert not (tmp_path / "ckpt").exists()
    recover_checkpoint(tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert_checkpoint(tmp_path / "ckpt", 1.0, 10)
    save(tmp_path / "ckpt", 3.0, 30)
    assert_checkpoint(tmp_path / "ckpt", 3.0, 30)


def test_crash_after_swap_leaves_new_checkpoint(tmp_path):
    save(tmp_path / "ckpt", 1.0, 10)
    save(tmp_path / "other", 2.0, 20)
    # As if the process died after renaming the new one in but before removing the old one.
    os.rename(tmp_path / "ckpt", tmp_path / ".ckpt.old")
    os.rename(tmp_path / "other", tmp_path / "ckpt")
    assert_checkpoint(tmp_path / "ckpt", 2.0, 20)
    recover_checkpoint(tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert_checkpoint(tmp_path / "ckpt", 2.0, 20)


def test_leftover_temporary_directory_is_ignored_then_removed(tmp_path):
    save(tmp_path / "ckpt", 1.0, 10)
    (tmp_path / ".ckpt.tmp-123-abcd").mkdir()
    (tmp_path / ".ckpt.tmp-123-abcd" / "model.safetensors").write_bytes(b"half")
    assert_checkpoint(tmp_path / "ckpt", 1.0, 10)
    save(tmp_path / "ckpt", 2.0, 20)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


# ---------------------------------------------------------------- damaged checkpoints


def test_missing_directory(tmp_path):
    expect_unusable(tmp_path / "nope", "does not exist")


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "state.json"])
def test_missing_file(tmp_path, name):
    save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / name).unlink()
    expect_unusable(tmp_path / "ckpt", f"{name} is missing")


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_truncated_safetensors(tmp_path, name):
    save(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / name
    path.write_bytes(path.read_bytes()[:-5])
    expect_unusable(tmp_path / "ckpt", name, "truncated or corrupted")


def test_corrupted_safetensors_header(tmp_path):
    save(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"\x00\xff\x13#"  # garbage where the JSON header starts
    path.write_bytes(bytes(raw))
    expect_unusable(tmp_path / "ckpt", "model.safetensors", "JSON")


def test_corrupted_header_length(tmp_path):
    save(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "optimizer.safetensors"
    raw = bytearray(path.read_bytes())
    raw[0:8] = (10**6).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    expect_unusable(tmp_path / "ckpt", "optimizer.safetensors", "beyond the end of the file")


def test_truncated_state_json(tmp_path):
    save(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "state.json"
    path.write_text(path.read_text()[:30])
    expect_unusable(tmp_path / "ckpt", "state.json", "not valid JSON")


def rewrite_state(ckpt, **changes):
    path = ckpt / "state.json"
    state = json.loads(path.read_text())
    state.update(changes)
    state = {k: v for k, v in state.items() if v is not None}
    path.write_text(json.dumps(state))


def test_wrong_format_version_and_missing_keys(tmp_path):
    ckpt = tmp_path / "ckpt"
    save(ckpt)
    rewrite_state(ckpt, version=2)
    expect_unusable(ckpt, "version 2", "reads version 1")
    rewrite_state(ckpt, version=1, format="something")
    expect_unusable(ckpt, "tinyllm checkpoint")
    rewrite_state(ckpt, format="tinyllm-checkpoint", step=None)
    expect_unusable(ckpt, "lacks the keys step")
    rewrite_state(ckpt, step=3)
    with pytest.raises(CheckpointError, match="lacks the keys lr, seed"):
        load_checkpoint(ckpt, required_keys=("step", "config", "lr", "seed"))


def test_aside_copy_not_used_when_main_copy_is_damaged(tmp_path):
    """A damaged checkpoint is reported, never silently swapped for another one."""
    save(tmp_path / "ckpt")
    shutil.copytree(tmp_path / "ckpt", tmp_path / ".ckpt.old")
    (tmp_path / "ckpt" / "state.json").write_text("{")
    expect_unusable(tmp_path / "ckpt", "state.json")
