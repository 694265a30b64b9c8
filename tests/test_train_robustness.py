"""Issue 18's trainer behaviours: no NaN ever saved, no run destroyed by a new one, one trainer per
run, --resume alone continues with the checkpoint's settings, metrics once per step, SIGTERM saves,
the sample at the end as `tinyllm sample` makes it, and the help text. (Bad inputs that get one
line are in docs/errors.md, checked by test_errors_table.py.)"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinyllm import sample as sample_module
from tinyllm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinyllm.cli import main as cli_main
from tinyllm.optim import AdamW
from tinyllm.safetensors_io import load_file, save_file
from tinyllm.train import RunLock, build_parser

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "2",
        "--eval-iters", "2", "--log-interval", "1", "--sample-tokens", "0", "--warmup-iters", "2", "--threads", "1"]


def train(*args, data=None):
    data = ["--data", str(data)] if data is not None else []
    return cli_main(["train", *data, *TINY, *args])


def files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ item 3: NaN is never saved


def test_save_checkpoint_refuses_non_finite_arrays(tmp_path):
    good = {"w": np.ones((2, 2), np.float32)}
    save_checkpoint(tmp_path / "ckpt", model_state=good, optimizer_flat=good, state={"step": 1})
    before = files(tmp_path)
    for model, optimizer, name in [({"w": np.array([1.0, np.nan], np.float32)}, good, "model"),
                                   (good, {"m": np.array([np.inf])}, "optimizer")]:
        with pytest.raises(CheckpointError, match=f"of {name}.safetensors holds NaN or inf"):
            save_checkpoint(tmp_path / "ckpt", model_state=model, optimizer_flat=optimizer, state={"step": 2})
    assert files(tmp_path) == before  # not a byte written, the old checkpoint intact
    assert load_checkpoint(tmp_path / "ckpt")[2]["step"] == 1


def test_an_update_that_makes_nan_is_never_saved(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train("--out", str(out), "--max-iters", "2", "--lr-decay-iters", "4", "--eval-interval", "2",
                 data=data_dir) == 0
    saved = files(out / "ckpt")
    real_step = AdamW.step

    def step_then_poison(self):  # an update that makes a weight NaN (as --lr inf once did)
        real_step(self)
        self.param_groups[0]["params"][0].data[0, 0] = np.nan
    monkeypatch.setattr(AdamW, "step", step_then_poison)
    capsys.readouterr()
    assert train("--out", str(out), "--resume", "--max-iters", "4", "--ckpt-interval", "1", data=data_dir) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to write a checkpoint" in err[0] and "NaN" in err[0], err
    assert files(out / "ckpt") == saved  # the good checkpoint of step 2 is still there


# ------------------------------------------------------------------ item 4: runs never destroyed


def test_default_out_takes_the_next_free_directory(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train("--max-iters", "1", "--eval-interval", "1", data=data_dir) == 0
    first = files(tmp_path / "runs" / "default")
    out = capsys.readouterr().out
    assert out.count("run directory: runs/default") == 2  # when training starts and when it ends
    assert train("--max-iters", "1", "--eval-interval", "1", data=data_dir) == 0
    assert files(tmp_path / "runs" / "default") == first
    assert "run directory: runs/default-2" in capsys.readouterr().out
    assert (tmp_path / "runs" / "default-2" / "ckpt" / "state.json").is_file()
    (tmp_path / "runs" / "default-3").mkdir()  # taken, even empty
    assert train("--max-iters", "1", "--eval-interval", "1", data=data_dir) == 0
    assert (tmp_path / "runs" / "default-4" / "ckpt").is_dir() and not any((tmp_path / "runs" / "default-3").iterdir())


def test_explicit_out_holding_a_run_is_refused_and_untouched(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--out", str(out), "--max-iters", "1", "--eval-interval", "1", data=data_dir) == 0
    before = files(tmp_path)
    capsys.readouterr()
    assert train("--out", str(out), "--max-iters", "1", data=data_dir) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert files(tmp_path) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train("--out", str(empty), "--max-iters", "1", "--eval-interval", "1", data=data_dir) == 0


def test_one_trainer_per_run_directory(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--out", str(out), "--max-iters", "1", "--eval-interval", "1", data=data_dir) == 0
    held = RunLock(out)  # as a running trainer holds it (flock: another open file is refused)
    try:
        capsys.readouterr()
        assert train("--out", str(out), "--resume", "--max-iters", "2") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another tinyllm train is running in" in err[0], err
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        RunLock(fresh)  # taken and dropped at once: a crashed trainer leaves no stale lock
        other = RunLock(fresh)
        assert train("--out", str(fresh), "--max-iters", "1", data=data_dir) == 2
        assert "another tinyllm train is running" in capsys.readouterr().err
        other.release()
    finally:
        held.release()
    assert train("--out", str(out), "--resume", "--max-iters", "2") == 0


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_two_trainer_processes_on_one_out(data_dir, tmp_path):
    """The lock between two real processes: the second one stops with one line."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tinyllm", "train", "--data", str(data_dir), "--out", str(out), *TINY]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first = subprocess.Popen(cmd + ["--max-iters", "100000", "--eval-interval", "100000", "--ckpt-interval", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in first.stdout:
            if line.startswith("step 2/"):  # a checkpoint is there: a second trainer could resume it
                break
        second = subprocess.run(cmd + ["--resume", "--max-iters", "5"], capture_output=True, text=True,
                                env=env, timeout=60)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert "another tinyllm train is running" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)


# ------------------------------------------------------------------ item 6: resume with its own settings


def test_resume_alone_continues_with_the_checkpoints_settings(data_dir, tmp_path):
    settings = ["--lr", "0.003", "--min-lr", "0.0002", "--n-embd", "24", "--n-head", "3", "--pos", "rope",
                "--dropout", "0.1", "--lr-decay-iters", "6", "--eval-interval", "3"]
    assert train("--out", str(tmp_path / "straight"), "--max-iters", "6", *settings, data=data_dir) == 0
    assert train("--out", str(tmp_path / "resumed"), "--max-iters", "3", *settings, data=data_dir) == 0
    # no --data, no model or optimizer flags: everything comes from the checkpoint
    assert cli_main(["train", "--out", str(tmp_path / "resumed"), "--resume", "--max-iters", "6"]) == 0
    a = load_file(tmp_path / "straight" / "ckpt" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "ckpt" / "model.safetensors")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    state = json.loads((tmp_path / "resumed" / "ckpt" / "state.json").read_text())
    assert state["step"] == 6 and state["config"]["lr"] == 0.003 and state["model_config"]["pos"] == "rope"


def test_resume_may_change_the_schedule_and_warns_when_it_outruns_it(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--out", str(out), "--max-iters", "2", "--eval-interval", "2", data=data_dir) == 0
    capsys.readouterr()
    assert cli_main(["train", "--out", str(out), "--resume", "--max-iters", "4", "--log-interval", "2"]) == 0
    err = capsys.readouterr().err
    assert "warning: the learning rate stays at --min-lr" in err and "--lr-decay-iters" in err
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 4]
    assert cli_main(["train", "--out", str(out), "--resume", "--max-iters", "6", "--lr-decay-iters", "6"]) == 0
    assert json.loads((out / "ckpt" / "state.json").read_text())["config"]["lr_decay_iters"] == 6


# ------------------------------------------------------------------ item 7: smaller things


def test_metrics_hold_each_step_once_after_a_resume(data_dir, tmp_path):
    out = tmp_path / "run"
    assert train("--out", str(out), "--max-iters", "2", "--eval-interval", "2", data=data_dir) == 0
    shutil.copytree(out / "ckpt", tmp_path / "step2")
    assert cli_main(["train", "--out", str(out), "--resume", "--max-iters", "4"]) == 0
    # the checkpoint of step 4 is lost (say the disk was restored): the run resumes from step 2
    shutil.rmtree(out / "ckpt")
    shutil.copytree(tmp_path / "step2", out / "ckpt")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line cut short by a crash
    assert cli_main(["train", "--out", str(out), "--resume", "--max-iters", "4"]) == 0
    records = metrics(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4]


def test_non_finite_values_are_written_as_null(data_dir, tmp_path):
    from tinyllm.train import Trainer, parse_config
    cfg = parse_config(["--data", str(data_dir), "--out", str(tmp_path / "run"), *TINY, "--max-iters", "3",
                        "--eval-interval", "100"])
    trainer = Trainer(cfg, log=lambda *a: None)
    real_forward = trainer.model.forward
    trainer.model.forward = lambda idx, targets=None: (lambda lg, loss: (lg, loss * float("nan")))(
        *real_forward(idx, targets))
    assert trainer.run() == 0
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    for line in text.splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in {line}"))
    skipped = [json.loads(line) for line in text.splitlines() if "skipped" in line]
    assert len(skipped) == 3 and all(r["loss"] is None for r in skipped)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_saves_a_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tinyllm", "train", "--data", str(data_dir), "--out", str(out), *TINY,
           "--max-iters", "100000", "--eval-interval", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, rest
    assert "SIGTERM" in rest and "--resume" in rest
    assert json.loads((out / "ckpt" / "state.json").read_text())["step"] >= 3


def test_warmup_longer_than_the_run_warns(data_dir, tmp_path, capsys):
    assert train("--out", str(tmp_path / "run"), "--max-iters", "2", "--warmup-iters", "10",
                 "--eval-interval", "2", data=data_dir) == 0
    assert "warning: --warmup-iters 10 is longer than --max-iters 2" in capsys.readouterr().err


def test_end_of_training_sample_uses_the_sample_commands_defaults(data_dir, tmp_path, monkeypatch, capsys):
    calls = []
    real = sample_module.generate_text

    def spy(model, tokenizer, **settings):
        calls.append(settings)
        return real(model, tokenizer, **settings)
    monkeypatch.setattr(sample_module, "generate_text", spy)
    args = [a for a in TINY if a not in ("--sample-tokens", "0")]
    assert cli_main(["train", "--data", str(data_dir), "--out", str(tmp_path / "run"), *args,
                     "--max-iters", "1", "--eval-interval", "1"]) == 0
    assert cli_main(["sample", "--ckpt", str(tmp_path / "run")]) == 0
    assert len(calls) == 2
    trained, sampled = calls
    for key in ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "num_samples"):
        assert trained.get(key, 1) == sampled[key], key


def test_sample_needs_no_optimizer_file(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--out", str(out), "--max-iters", "1", "--eval-interval", "1", data=data_dir) == 0
    (out / "ckpt" / "optimizer.safetensors").write_bytes(b"damaged")
    capsys.readouterr()
    assert cli_main(["sample", "--ckpt", str(out), "--max-new-tokens", "5", "--seed", "1"]) == 0
    (out / "ckpt" / "optimizer.safetensors").unlink()
    assert cli_main(["sample", "--ckpt", str(out), "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert train("--out", str(out), "--resume", "--max-iters", "2") == 2
    assert "optimizer.safetensors is missing" in capsys.readouterr().err


def help_entries():
    """{flag: its help text} from `tinyllm train --help` (an entry starts at a line "  --flag")."""
    entries, flag = {}, None
    for line in build_parser().format_help().split("options:")[1].splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = " ".join(line.split()[2:])
        elif flag is not None:
            entries[flag] += " " + " ".join(line.split())
    return entries


def test_help_gives_the_allowed_values():
    entries = help_entries()
    for flag, allowed in [("--norm", "layernorm, rmsnorm"), ("--mlp", "gelu, swiglu"), ("--pos", "learned, rope"),
                          ("--parallel", "auto, layers, batch"), ("--dtype", "float32, float64"),
                          ("--device", "cpu, cuda")]:
        assert f"one of {allowed}" in entries[flag], entries[flag]
    for flag in ("--lr", "--min-lr", "--grad-clip", "--warmup-iters", "--out", "--seed"):
        assert not entries[flag].startswith("(default"), entries[flag]  # more than "(default: X)"


def test_saved_options_and_values_round_trip_as_json(data_dir, tmp_path):
    out = tmp_path / "run"
    assert train("--out", str(out), "--max-iters", "1", "--eval-interval", "1", data=data_dir) == 0
    state = json.loads((out / "ckpt" / "state.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"bare {c} in state.json"))
    assert state["config"]["out"] == str(out) and math.isfinite(state["best_val_loss"])


# ------------------------------------------------------------------ item 5: checkpoint contents


@pytest.mark.parametrize("options", [
    {}, {"bias": False}, {"norm": "rmsnorm"}, {"mlp": "swiglu", "bias": False}, {"pos": "rope"},
    {"tie_weights": False}, {"n_kv_head": 1}, {"n_kv_head": 2, "norm": "rmsnorm", "mlp": "swiglu", "pos": "rope"},
])
def test_state_dict_shapes_match_real_models(options):
    from tinyllm.model import GPT, GPTConfig, state_dict_shapes
    config = GPTConfig(**{"vocab_size": 11, "block_size": 8, "n_layer": 2, "n_head": 4, "n_embd": 16, **options})
    assert {k: v.shape for k, v in GPT(config).state_dict().items()} == state_dict_shapes(config)


def test_optimizer_arrays_and_loaders_must_fit_the_run(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--out", str(out), "--max-iters", "1", "--eval-interval", "1", data=data_dir) == 0
    path = out / "ckpt" / "optimizer.safetensors"
    good = path.read_bytes()
    arrays = load_file(path)
    arrays["state.0.exp_avg"] = arrays["state.0.exp_avg"].astype(np.float64)
    save_file(arrays, path)
    capsys.readouterr()
    assert train("--out", str(out), "--resume", "--max-iters", "2") == 2
    assert "'state.0.exp_avg' is float64, expected float32" in capsys.readouterr().err
    arrays = load_file(out / "ckpt" / "optimizer.safetensors")
    arrays["state.0.exp_avg"] = arrays["state.0.exp_avg"][:1].astype(np.float32)
    save_file(arrays, path)
    assert train("--out", str(out), "--resume", "--max-iters", "2") == 2
    assert "do not fit the model" in capsys.readouterr().err
    path.write_bytes(good)
    state_path = out / "ckpt" / "state.json"
    state = json.loads(state_path.read_text())
    state["loaders"]["train"]["batch_size"] = 5
    state_path.write_text(json.dumps(state))
    assert train("--out", str(out), "--resume", "--max-iters", "2") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the loader 'train' is for train batches of 5 x 8" in err
