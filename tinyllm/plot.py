"""`tinyllm plot RUN_DIR`: training and validation loss, and the learning rate, to a PNG."""
import json
from pathlib import Path


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: pass the --out directory of a training run")
    steps, evals = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{number} is not a JSON line") from None
        if "val_loss" in record:
            evals.append(record)
        elif "loss" in record and not record.get("skipped"):
            steps.append(record)
    return steps, evals


def plot_run(run_dir, output=None):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("tinyllm plot needs matplotlib: pip install 'tinyllm[plot]'") from None
    steps, evals = read_metrics(run_dir)
    if not steps and not evals:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no logged steps yet")
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    if steps:
        ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="train (step)")
        ax_lr.plot([r["step"] for r in steps], [r["lr"] for r in steps], color="tab:green")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val (eval)")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(f"tinyllm run {Path(run_dir).name}")
    output = Path(output) if output else Path(run_dir) / "loss.png"
    fig.savefig(output, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return output
