"""Host syncs of a training step, line by line, counted on the CuPy stand-in.

A GPU runs ahead of the Python that feeds it, as long as Python never waits for a result. Each
host sync (`float(x)`, `.item()`, `int(ids.max())`, a boolean mask...) drains that queue: the GPU
idles while Python catches up. A training step should wait at most once, when it logs.

    python -m tinyllm.testing.syncs [--steps 3] [--log-interval 2] [--dropout 0.1] ...

trains a tiny GPT through the real trainer (tinyllm.train.Trainer.run) on the stand-in and prints
each step's syncs by source line, then its kernel launches, hidden copies and uploads. Tests get
the same numbers from `record_train_steps` (the `train_step_syncs` fixture of tests/conftest.py).
"""
import argparse
import sys
from pathlib import Path

TINY_MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4)


def _tiny_dataset(directory):
    """A small char-level dataset (prepared once per directory)."""
    from tinyllm.data import prepare_dataset
    directory = Path(directory)
    if not (directory / "meta.json").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(200))
        (directory / "corpus.txt").write_text(text, encoding="utf-8")
        prepare_dataset("text", directory, input_path=directory / "corpus.txt", log=lambda *a: None)
    return directory


def record_train_steps(workdir, steps=3, log_interval=2, data=None, **options):
    """Train `steps` steps on the stand-in ("cuda" must be the stand-in) and return one Record per step.

    A step's Record covers the trainer's loop from the start of that step's train_step to the start
    of the next one (or to the final evaluation/checkpoint): the step and its logging. The first
    evaluation (step 0) and the last evaluation and checkpoint are left out. `options` are
    TrainConfig fields (dropout=0.1, grad_accum=2, ...) over a tiny model.
    """
    from tinyllm import backend
    from tinyllm.testing import cupy_standin
    from tinyllm.train import Trainer, TrainConfig
    if not (backend.cuda_available() and backend.cupy_is_standin()):
        raise RuntimeError("record_train_steps counts on the CuPy stand-in: plug it in first "
                           "(tinyllm.backend.use_cupy(cupy_standin.cupy, cupy_standin.cupyx))")
    workdir = Path(workdir)
    settings = dict(TINY_MODEL, device="cuda", max_iters=steps, eval_interval=max(steps, 1), eval_iters=1,
                    log_interval=log_interval, warmup_iters=1, sample_tokens=0)
    settings.update(options)
    cfg = TrainConfig(data=str(data or _tiny_dataset(workdir / "data")), out=str(workdir / "run"), **settings)
    trainer = Trainer(cfg.finalize(), log=lambda *a: None)
    records, current = [], []

    def close():
        if current:
            cupy_standin.end_record(current.pop())

    def wrap(method, opens):
        def wrapped(*args, **kwargs):
            close()
            if opens:
                current.append(cupy_standin.begin_record())
                records.append(current[-1])
            return method(*args, **kwargs)
        return wrapped

    trainer.train_step = wrap(trainer.train_step, True)
    trainer._evaluate_and_log = wrap(trainer._evaluate_and_log, False)
    trainer.save = wrap(trainer.save, False)
    try:
        trainer.run()
    finally:
        close()
    return records


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tinyllm.testing.syncs", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--log-interval", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--workdir", default=None, help="where the tiny dataset and run go (default: a temporary one)")
    args = p.parse_args(argv)
    import tempfile
    from tinyllm import backend
    from tinyllm.testing import cupy_standin
    backend.use_cupy(cupy_standin.cupy, cupy_standin.cupyx)
    with tempfile.TemporaryDirectory() as tmp:
        records = record_train_steps(args.workdir or tmp, steps=args.steps, log_interval=args.log_interval,
                                     dropout=args.dropout, grad_accum=args.grad_accum)
    for step, r in enumerate(records, start=1):
        logged = step % args.log_interval == 0 or step == args.steps
        print(f"=== step {step}{' (a logging step)' if logged else ''}: CuPy stand-in, tiny GPT {TINY_MODEL}")
        print(r.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
