"""The trainer end to end on tiny configs: logs, checkpoints, bit-exact resume, NaN skips,
Ctrl-C, config files, sampling and plotting."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinyllm.cli import main as cli_main
from tinyllm.safetensors_io import load_file
from tinyllm.train import Trainer, parse_config

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "2",
        "--eval-iters", "2", "--log-interval", "1", "--sample-tokens", "0", "--warmup-iters", "2"]


def run(args, data_dir, out):
    return cli_main(["train", "--data", str(data_dir), "--out", str(out), *TINY, *args])


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_logs_and_checkpoint(data_dir, tmp_path):
    assert run(["--max-iters", "6", "--eval-interval", "3"], data_dir, tmp_path / "run") == 0
    records = metrics(tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [0, 3, 6]
    for r in steps:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed"} <= set(r)
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    assert steps[0]["lr"] == pytest.approx(1e-3 * 1 / 2)  # warmup: lr·(step+1)/warmup, never 0
    ckpt = tmp_path / "run" / "ckpt"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "optimizer.safetensors", "state.json"}
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 6 and state["best_val_loss"] == min(r["val_loss"] for r in evals)
    weights = load_file(ckpt / "model.safetensors")
    assert "transformer.wte.weight" in weights and weights["transformer.wte.weight"].dtype == np.float32


@pytest.mark.parametrize("threads, parallel, dropout", [
    ("1", "layers", "0.1"),
    ("2", "layers", "0.1"),    # the layers cut over tinyllm.threads (a fixed cut)
    ("2", "batch", "0.1"),     # the batch cut over two processes (tinyllm.data_parallel), with dropout
])
def test_resume_is_bit_exact(data_dir, tmp_path, threads, parallel, dropout, monkeypatch):
    monkeypatch.setattr("tinyllm.threads.MIN_PARALLEL_SIZE", 0)  # cut even this tiny model's arrays
    common = ["--max-iters", "8", "--lr-decay-iters", "8", "--eval-interval", "4", "--dropout", dropout,
              "--grad-accum", "2", "--threads", threads, "--parallel", parallel]
    assert run(common, data_dir, tmp_path / "straight") == 0
    # the same run, stopped after step 4 and resumed
    first = [a if a != "8" or i != 1 else "4" for i, a in enumerate(common)]
    assert first[:2] == ["--max-iters", "4"]
    assert run(first, data_dir, tmp_path / "resumed") == 0
    assert run(common + ["--resume"], data_dir, tmp_path / "resumed") == 0
    a = load_file(tmp_path / "straight" / "ckpt" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "ckpt" / "model.safetensors")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    oa = load_file(tmp_path / "straight" / "ckpt" / "optimizer.safetensors")
    ob = load_file(tmp_path / "resumed" / "ckpt" / "optimizer.safetensors")
    for key in oa:
        np.testing.assert_array_equal(oa[key], ob[key], err_msg=key)
    losses_a = [r["loss"] for r in metrics(tmp_path / "straight") if "loss" in r]
    losses_b = [r["loss"] for r in metrics(tmp_path / "resumed") if "loss" in r]
    assert losses_a == losses_b  # 1-4 from the first run, 5-8 after the resume


def test_non_finite_steps_are_skipped_then_stop(data_dir, tmp_path):
    cfg = parse_config(["--data", str(data_dir), "--out", str(tmp_path / "nan"), *TINY, "--max-iters", "20",
                        "--eval-interval", "100"])
    trainer = Trainer(cfg, log=lambda *a: None)
    trainer.train_step()  # one good step creates the optimizer state
    before = {k: v.copy() for k, v in trainer.model.state_dict().items()}
    moments = {i: s["exp_avg"].copy() for i, s in trainer.optimizer.state.items()}
    real_forward = trainer.model.forward

    def poisoned(idx, targets=None):
        logits, loss = real_forward(idx, targets)
        return logits, loss * float("nan")
    trainer.model.forward = poisoned
    loss, _, _, finite = trainer.train_step()
    assert not finite and math.isnan(loss)
    for k, v in trainer.model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    for i, s in trainer.optimizer.state.items():
        np.testing.assert_array_equal(s["exp_avg"], moments[i])
    assert all(p.grad is None for p in trainer.model.parameters())
    with pytest.raises(FloatingPointError, match="in a row"):
        trainer.run()
    skipped = [r for r in metrics(tmp_path / "nan") if r.get("skipped")]
    assert len(skipped) == 4  # the fifth bad step in a row was the direct train_step() call above


def test_config_file_and_flag_override(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"n_layer": 3, "lr": 0.01, "max-iters": 7}))
    cfg = parse_config(["--config", str(tmp_path / "c.json"), "--lr", "0.02"])
    assert (cfg.n_layer, cfg.lr, cfg.max_iters, cfg.lr_decay_iters) == (3, 0.02, 7, 7)
    (tmp_path / "c.toml").write_text('n_layer = 2\nbias = true\neval_interval = 5\n')
    cfg = parse_config(["--config", str(tmp_path / "c.toml")])
    assert (cfg.n_layer, cfg.bias, cfg.ckpt_interval) == (2, True, 5)
    (tmp_path / "bad.json").write_text(json.dumps({"n_layers": 3}))
    with pytest.raises(ValueError, match="unknown options"):
        parse_config(["--config", str(tmp_path / "bad.json")])
    with pytest.raises(ValueError, match="mixed precision"):
        parse_config(["--dtype", "bfloat16"])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_config(["--config", str(tmp_path / "broken.json")])


def test_corrupted_checkpoint_gives_one_clear_line(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["--max-iters", "2", "--eval-interval", "2"], data_dir, out) == 0
    model_file = out / "ckpt" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])  # truncated
    capsys.readouterr()
    assert run(["--max-iters", "4", "--eval-interval", "2", "--resume"], data_dir, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors" in err[0], err


def test_resume_without_checkpoint_and_missing_data(data_dir, tmp_path, capsys):
    assert run(["--max-iters", "2", "--resume"], data_dir, tmp_path / "none") == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert cli_main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "tinyllm prepare" in capsys.readouterr().err


def test_sample_and_plot(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["--max-iters", "3", "--eval-interval", "3"], data_dir, out) == 0
    capsys.readouterr()
    assert cli_main(["sample", "--ckpt", str(out), "--prompt", "def ", "--max-new-tokens", "12",
                     "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def ") and len(text.rstrip("\n")) >= 4
    assert cli_main(["sample", "--ckpt", str(out / "ckpt"), "--prompt", "def ", "--max-new-tokens", "12",
                     "--seed", "1"]) == 0
    assert capsys.readouterr().out == text  # same seed, same text; a ckpt dir works too
    assert cli_main(["sample", "--ckpt", str(tmp_path), "--prompt", "x"]) == 2
    pytest.importorskip("matplotlib")
    assert cli_main(["plot", str(out)]) == 0
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_saves_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tinyllm", "train", "--data", str(data_dir), "--out", str(out), *TINY,
           "--max-iters", "100000", "--eval-interval", "100000"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    lines = []
    for line in proc.stdout:  # wait until a few steps have run
        lines.append(line)
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "--resume" in rest
    state = json.loads((out / "ckpt" / "state.json").read_text())
    assert state["step"] >= 3


def test_prepare_offline_is_one_clear_line(tmp_path, capsys, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert cli_main(["prepare", "shakespeare_char", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--input" in err[0], err


def test_parallel_option_errors_are_clear(data_dir, tmp_path, capsys):
    assert run(["--parallel", "rows"], data_dir, tmp_path / "a") == 2
    assert "--parallel must be auto, layers or batch" in capsys.readouterr().err


def test_small_model_cuts_the_batch_by_default(data_dir, tmp_path, capsys):
    if os.cpu_count() < 2:
        pytest.skip("one core: nothing to cut")
    assert run(["--max-iters", "2", "--eval-interval", "2"], data_dir, tmp_path / "run") == 0
    assert "2 processes, the batch cut over them" in capsys.readouterr().out
    state = json.loads((tmp_path / "run" / "ckpt" / "state.json").read_text())
    assert state["config"]["parallel"] == "batch"
