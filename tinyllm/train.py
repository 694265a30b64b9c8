"""`tinyllm train`: the training loop, its options, checkpoints and resume.

One step, as in nanoGPT:

    lr ← cosine_lr(step)                                  warmup, then cosine decay to min_lr
    for each of grad_accum micro-batches:
        loss = model(x, y) / grad_accum;  loss.backward()  gradients add up over micro-batches
    norm = clip_grad_norm_(params, grad_clip)             global L2 norm, clipped
    if loss and norm are finite: optimizer.step()         else skip the step, touching nothing
    optimizer.zero_grad()

Everything a step depends on — weights, AdamW moments, the data loaders' generators, the dropout
generator, the step counter — is in the checkpoint, so `--resume` continues bit for bit.
"""
import argparse
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy

from tinyllm import backend, rng, threads
from tinyllm.autograd import no_grad
from tinyllm.data_parallel import DataParallel
from tinyllm.fileio import atomic_open
from tinyllm.model import MLPS, NORMS, POSITIONS
from tinyllm.sample import SAMPLE_DEFAULTS

MAX_BAD_STEPS = 5  # consecutive non-finite steps before giving up


@dataclass
class TrainConfig:
    # data and run
    data: str = None                 # a prepared dataset directory; None: prepare the embedded default
    out: str = None                  # the run directory; None: the first free runs/default, runs/default-2, ...
    resume: bool = False
    seed: int = 1337
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0                 # CPU cores to use (tinyllm.threads); 0: chosen by size and batch
    parallel: str = "auto"           # what they cut: the "batch" (processes), "layers" (threads), or "auto"
    nproc: int = 1                   # processes, each with its rows of every batch (tinyllm.parallel, through
                                     # mpiexec); under mpiexec the job's size
    zero: bool = False               # with several processes: AdamW's state cut over them (ZeRO-1)
    # model (GPTConfig fields)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = None
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = False
    norm: str = "layernorm"
    mlp: str = "gelu"
    pos: str = "learned"
    tie_weights: bool = True
    # optimisation
    batch_size: int = 12
    grad_accum: int = 1
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = None       # None: max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0           # 0 disables clipping
    # evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_iters: int = 20
    ckpt_interval: int = None        # None: eval_interval
    log_interval: int = 10
    peak_flops: float = None         # for MFU; None: looked up for known GPUs, else not reported
    sample_tokens: int = SAMPLE_DEFAULTS["max_new_tokens"]   # printed at the end; 0 disables

    def finalize(self, *, machine=True):
        """Check every option (type, range, allowed values) and fill in the defaults that depend on
        others; a problem is a ValueError naming the flag. machine=False leaves out what depends on
        this machine (its core count), for a saved config that a resume may still change."""
        for f in fields(self):
            self._check_type(f)
        if self.dtype in ("bfloat16", "float16"):
            raise ValueError(f"--dtype {self.dtype}: training runs in float32 (or float64); mixed precision "
                             "(bfloat16/float16 with float32 master weights) is not implemented yet")
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed and not (name == "device" and value.startswith("cuda:")):
                raise ValueError(f"{_flag(name)} must be {_one_of(allowed)}, got {value!r}")
        if self.lr_decay_iters is None:
            self.lr_decay_iters = self.max_iters
        if self.ckpt_interval is None:
            self.ckpt_interval = self.eval_interval
        for name in ("eval_interval", "eval_iters", "ckpt_interval", "log_interval", "batch_size", "grad_accum",
                     "block_size", "n_layer", "n_head", "n_embd", "nproc"):
            self._need(getattr(self, name) >= 1, name, "at least 1")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "seed", "threads", "sample_tokens"):
            self._need(getattr(self, name) >= 0, name, "0 or more")
        self._need(self.n_kv_head is None or self.n_kv_head >= 1, "n_kv_head", "at least 1")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            self._need(math.isfinite(value) and value >= 0, name, "a finite number >= 0")
        for name in ("beta1", "beta2", "dropout"):
            self._need(0 <= getattr(self, name) < 1, name, "in [0, 1)")
        self._need(self.min_lr <= self.lr, "min_lr", f"at most --lr ({self.lr})")
        self._need(self.peak_flops is None or (math.isfinite(self.peak_flops) and self.peak_flops > 0),
                   "peak_flops", "a finite number > 0")
        cores = os.cpu_count() or 1
        if machine and self.threads > cores:
            raise ValueError(f"--threads {self.threads} is more than the {cores} CPU cores of this machine")
        try:  # the model's own rules (n_embd divisible by n_head, ...), before any data is read
            model_config(self, vocab_size=1)
        except (TypeError, ValueError) as e:
            raise ValueError(str(e)) from None
        return self

    def _check_type(self, f):
        value = getattr(self, f.name)
        if value is None and f.default is None:
            return
        kind = f.type
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(self, f.name, float(value))
        elif kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{_flag(f.name)} must be a whole number, got {value!r}")
        elif kind is float and (isinstance(value, bool) or not isinstance(value, float)):
            raise ValueError(f"{_flag(f.name)} must be a number, got {value!r}")
        elif kind in (str, bool) and not isinstance(value, kind):
            raise ValueError(f"{_flag(f.name)} must be {'true or false' if kind is bool else 'a string'}, "
                             f"got {value!r}")

    def _need(self, ok, name, what):
        if not ok:
            raise ValueError(f"{_flag(name)} must be {what}, got {getattr(self, name)!r}")


MODEL_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "dropout", "bias", "norm", "mlp",
                "pos", "tie_weights")
# The options with a fixed set of values, as `--help` shows them.
CHOICES = {"device": ("cpu", "cuda"), "dtype": ("float32", "float64"), "parallel": ("auto", "layers", "batch"),
           "norm": NORMS, "mlp": MLPS, "pos": POSITIONS}
# What a resume may change: everything else continues as the checkpoint says (a differing model
# flag or training setting is an error).
RESUME_MAY_CHANGE = ("max_iters", "eval_interval", "eval_iters", "ckpt_interval", "log_interval", "lr_decay_iters",
                     "sample_tokens", "threads", "parallel", "nproc", "zero", "device", "peak_flops")
HELP = {
    "data": "a prepared dataset directory (tinyllm prepare); default: the embedded pystdlib dataset, "
            "prepared once in ./data/pystdlib",
    "out": "the run directory: checkpoint in OUT/ckpt, metrics in OUT/metrics.jsonl; default: the first "
           "free one of runs/default, runs/default-2, ...; an OUT that holds a run needs --resume",
    "resume": "continue the run in --out with its own saved settings",
    "seed": "seed of the initial weights, dropout and batches, 0 or more",
    "device": "where to train",
    "dtype": "the parameters' dtype",
    "threads": "CPU cores to use, up to this machine's; 0: chosen by model size and batch",
    "parallel": "what the CPU cores cut: the batch over processes, the layers over threads, or auto",
    "nproc": "processes, each with its rows of every batch, started through mpiexec (under mpiexec: leave "
             "it out, mpiexec -n sets it)",
    "zero": "with several processes, AdamW's state cut over them (ZeRO-1): true or false",
    "n_layer": "transformer blocks",
    "n_head": "attention heads",
    "n_kv_head": "key/value heads (grouped-query attention), dividing --n-head; default: --n-head",
    "n_embd": "embedding width, divisible by --n-head",
    "block_size": "context length in tokens",
    "dropout": "dropout probability, in [0, 1)",
    "bias": "biases in Linear and LayerNorm: true or false",
    "norm": "normalisation layer",
    "mlp": "feed-forward layer",
    "pos": "position encoding",
    "tie_weights": "share the token embedding with the output layer: true or false",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimisation step",
    "max_iters": "optimisation steps",
    "lr": "peak learning rate, a finite number >= 0",
    "min_lr": "final learning rate, in [0, --lr]",
    "warmup_iters": "steps of linear warmup, 0 or more",
    "lr_decay_iters": "the step where the cosine reaches --min-lr; default: --max-iters",
    "weight_decay": "AdamW's decoupled weight decay, >= 0",
    "beta1": "AdamW's beta1, in [0, 1)",
    "beta2": "AdamW's beta2, in [0, 1)",
    "grad_clip": "clip the global gradient norm to this, >= 0; 0: no clipping",
    "eval_interval": "steps between evaluations",
    "eval_iters": "batches per evaluation of each split",
    "ckpt_interval": "steps between checkpoints; default: --eval-interval",
    "log_interval": "steps between log lines",
    "peak_flops": "the device's peak FLOP/s, for MFU; default: known GPUs only",
    "sample_tokens": "tokens of the sample printed at the end (as tinyllm sample); 0: none",
}


def _flag(name):
    return "--" + name.replace("_", "-")


def _one_of(allowed):
    return ", ".join(allowed[:-1]) + " or " + allowed[-1]


# ---------------------------------------------------------------------------------------------
# Options: defaults < config file (JSON or TOML) < command-line flags


def _bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser():
    from tinyllm.cli import ArgumentParser
    p = ArgumentParser(prog="tinyllm train", description="Train a GPT. With no arguments: prepare "
                       "the embedded default dataset and train a small char-level model on the CPU.")
    p.add_argument("--config", help="a JSON or TOML file of options (flags override it)")
    for f in fields(TrainConfig):
        flag = _flag(f.name)
        if f.name == "resume":
            p.add_argument(flag, action="store_true", default=None, help=HELP[f.name])
            continue
        kind = {"bool": _bool, "int": int, "float": float, "str": str}[f.type.__name__ if isinstance(f.type, type)
                                                                      else str(f.type)]
        allowed = f"; one of {', '.join(CHOICES[f.name])}" if f.name in CHOICES else ""
        default = "" if f.default is None else f" (default: {f.default!r})".replace("'", "")
        p.add_argument(flag, type=kind, default=None, help=HELP[f.name] + allowed + default)
    return p


def load_config_file(path):
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e}") from None
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:
                raise ValueError("TOML config files need Python 3.11+ (tomllib); use JSON instead") from None
            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except ValueError as e:
        raise ValueError(f"config file {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold an object of options, got {type(values).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config file {path} has unknown options {unknown}; known: {sorted(known)}")
    return values


def given_options(argv):
    """The options given explicitly: a config file's, then the flags' (the flags win)."""
    args = build_parser().parse_args(argv)
    values = load_config_file(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    return values


def parse_options(argv):
    """(TrainConfig, warnings): the options of a new run, or of a resumed one (see resume_config)."""
    given = given_options(argv)
    if given.get("resume"):
        cfg, notes = resume_config(given)
    else:
        cfg, notes = TrainConfig(**given).finalize(), []
    if cfg.warmup_iters > cfg.max_iters > 0:
        notes.append(f"--warmup-iters {cfg.warmup_iters} is longer than --max-iters {cfg.max_iters}: the learning "
                     f"rate is still rising when training ends and never reaches --lr {cfg.lr}")
    return cfg, notes


def parse_config(argv):
    return parse_options(argv)[0]


def resume_config(given):
    """The options of a resumed run: the checkpoint's own, with what a resume may change changed.

    `tinyllm train --out R --resume` alone continues R exactly as it was set up (data, model,
    optimizer, schedule). Flags given explicitly may change RESUME_MAY_CHANGE; any other flag that
    differs from the saved value is an error, a model-shape flag included.
    """
    from tinyllm.checkpoint import CheckpointError, checkpoint_directory, read_state
    if given.get("out") is None:
        raise ValueError("--resume needs --out RUN_DIR: the run directory to continue")
    out = Path(given["out"])
    ckpt = out / "ckpt"
    if not checkpoint_directory(ckpt).is_dir():
        if out.is_dir():
            RunLock(out).release()  # a trainer that has not saved yet: that is what to say
        raise ValueError(f"--resume: no checkpoint in {ckpt}; start without --resume")
    state = read_state(ckpt, ("config",))
    saved = state["config"]
    where = f"checkpoint {checkpoint_directory(ckpt)} is unusable: state.json: \"config\""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where} must be an object, got {saved!r}")
    unknown = sorted(set(saved) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise CheckpointError(f"{where} has unknown options {unknown}")
    try:
        saved = asdict(TrainConfig(**saved).finalize(machine=False))
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    changes = {}
    for name, value in given.items():
        if name in ("out", "resume") or value == saved[name]:
            continue
        if name == "data" and value is not None and saved["data"] is not None \
                and Path(value).resolve() == Path(saved["data"]).resolve():
            continue
        if name not in RESUME_MAY_CHANGE:
            what = "the model" if name in MODEL_FIELDS else "the run"
            raise ValueError(f"--resume continues {out} as it was set up, but {_flag(name)} {value} differs from "
                             f"{what}'s saved {saved[name]}; a resume may change only "
                             f"{', '.join(map(_flag, RESUME_MAY_CHANGE))}")
        changes[name] = value
    cfg = TrainConfig(**{**saved, **changes, "out": str(out), "resume": True}).finalize()
    notes = []
    if cfg.lr_decay_iters < cfg.max_iters and "max_iters" in changes and "lr_decay_iters" not in changes:
        notes.append(f"the learning rate stays at --min-lr {cfg.min_lr} from step {cfg.lr_decay_iters} "
                     f"(--lr-decay-iters) to {cfg.max_iters}; pass --lr-decay-iters to stretch the schedule")
    return cfg, notes


# ---------------------------------------------------------------------------------------------
# Building the pieces


def default_data_dir():
    """Where the embedded default dataset is prepared (once) when --data is not given."""
    return Path(os.environ.get("TINYLLM_DATA", "data")) / "pystdlib"


def ensure_data(cfg, log):
    from tinyllm.data import prepare_dataset
    if cfg.data is not None:
        return Path(cfg.data)
    path = default_data_dir()
    if not (path / "meta.json").is_file():
        log(f"preparing the embedded default dataset (Python's standard library source) in {path}")
        prepare_dataset("pystdlib", path, log=log)
    return path


def model_config(cfg, vocab_size):
    """The GPTConfig that the options and a vocabulary size make."""
    from tinyllm.model import GPTConfig
    return GPTConfig(vocab_size=vocab_size, **{k: getattr(cfg, k) for k in MODEL_FIELDS})


def build_model(cfg, vocab_size):
    from tinyllm.model import GPT
    config = model_config(cfg, vocab_size)
    rng.manual_seed(cfg.seed)
    return GPT(config, dtype=cfg.dtype, device=cfg.device)


# ---------------------------------------------------------------------------------------------
# Run directories: never two trainers in one, never a new run over an old one

DEFAULT_OUT = Path("runs") / "default"
RUN_MARKERS = ("ckpt", ".ckpt.old", "metrics.jsonl", "tokenizer.txt")  # what makes a directory a run
LOCK_FILE = ".lock"


def holds_run(path):
    """True when the directory holds (part of) a training run."""
    return any((Path(path) / name).exists() for name in RUN_MARKERS)


def check_new_out(out):
    """An explicit --out for a new run: it must not hold a run (checked before anything is written)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if holds_run(out):
        raise ValueError(f"--out {out} already holds a run: continue it with --resume, or pass another "
                         "--out (nothing was written)")
    return out


def claim_default_out():
    """Create and return the first free one of runs/default, runs/default-2, runs/default-3, ...
    (mkdir either creates a directory or fails, so two trainers never get the same one)."""
    for n in itertools.count(1):
        path = DEFAULT_OUT if n == 1 else DEFAULT_OUT.with_name(f"{DEFAULT_OUT.name}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue


class RunLock:
    """An exclusive lock on a run directory (fcntl.flock on OUT/.lock) for as long as a trainer uses it.

    The kernel drops the lock when the process ends, however it ends, so a crashed trainer never
    leaves a stale lock behind. Without fcntl (Windows) there is no lock.
    """

    def __init__(self, run_dir):
        self.file = None
        try:
            import fcntl
        except ImportError:
            return
        path = Path(run_dir) / LOCK_FILE
        handle = open(path, "a+b")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ValueError(f"another tinyllm train is running in {run_dir} (it holds the lock {path}); "
                             "wait for it to end, or pass another --out") from None
        self.file = handle

    def release(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def known_peak_flops(device, dtype):
    """Dense peak FLOP/s of known GPUs (for MFU), or None."""
    if device != "cuda":
        return None
    name = backend.xp_for("cuda").cuda.runtime.getDeviceProperties(0)["name"].decode()
    table = {"H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},  # float32 runs as TF32
             "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
             "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}}
    for key, peaks in table.items():
        if key in name:
            return peaks.get(dtype)
    return None


# ---------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """comm: a tinyllm.parallel communicator of several processes (each takes its rows of every
    batch; rank 0 alone writes the run directory and the terminal lines), or None: one process."""

    def __init__(self, cfg, log=print, comm=None):
        self.comm = comm
        self.writes = comm is None or comm.rank == 0      # rank 0 writes checkpoints, metrics, the terminal
        self.cfg, self.log = cfg, (log if self.writes else _silent)
        self.lock = None
        self.data_parallel = None
        try:
            self._setup()
        except BaseException:
            self.close()  # no worker processes or lock left behind by a failed start
            raise

    def _setup(self):
        from tinyllm.data import BatchLoader, load_meta
        cfg, log = self.cfg, self.log
        comm = self.comm
        checkpoint = None
        if cfg.resume:  # lock the run, then read its checkpoint through (every process) before building anything
            self.out = Path(cfg.out)
            if self.writes:
                self.lock = RunLock(self.out)
            checkpoint = self._read_checkpoint()
        elif self.writes:  # a new run: checked now, created once everything else is ready
            self.out = None if cfg.out is None else check_new_out(cfg.out)
        else:  # another process than rank 0: it writes nothing, the name is for its (silent) log
            self.out = Path(cfg.out or DEFAULT_OUT)
        if comm is not None and not self.writes:
            comm.barrier()                                 # rank 0 prepares the default dataset first
        data_dir = ensure_data(cfg, log)
        if comm is not None and self.writes:
            comm.barrier()
        self.meta = load_meta(data_dir)
        self.data_dir = data_dir
        if checkpoint is not None:
            self._check_model_config(checkpoint[0])
        self.model = build_model(cfg, self.meta["vocab_size"])
        self.optimizer = self.model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2))
        # "batch": each CPU core's process runs forward and backward on its own rows of each batch
        self.data_parallel = DataParallel(self.model) if cfg.parallel == "batch" and comm is None else None
        self.engine = None       # several processes: tinyllm.parallel's engine, the gradients summed over them
        if comm is not None:
            from tinyllm.parallel import DataParallel as Engine, ZeroAdamW
            self.engine = Engine(self.model, comm, zero=cfg.zero)
            if cfg.zero:
                self.optimizer = ZeroAdamW(self.optimizer, self.engine)
        B, T = cfg.batch_size, cfg.block_size
        self.loaders = {  # training batches, and separate generators for evaluation
            "train": BatchLoader(data_dir, "train", B, T, seed=cfg.seed),
            "eval_train": BatchLoader(data_dir, "train", B, T, seed=cfg.seed + 1),
            "eval_val": BatchLoader(data_dir, "val", B, T, seed=cfg.seed + 2),
        }
        self.step = 0
        self.best_val = math.inf
        self.last_eval_step = -1
        self.bad_steps = 0
        self.stop_signal = None
        self.peak_flops = cfg.peak_flops or known_peak_flops(cfg.device, cfg.dtype)
        self.flops_per_token = self.model.flops_per_token()
        if checkpoint is not None:
            self.load(checkpoint)                          # every process restores it
        elif self.writes:
            self._create_run_dir()
        if self.writes and not (self.out / "tokenizer.txt").is_file():
            shutil.copyfile(data_dir / self.meta["tokenizer_file"], self.out / "tokenizer.txt")

    @property
    def ckpt_dir(self):
        return self.out / "ckpt"

    def _create_run_dir(self):
        """Create (or take, when --out is empty) the run directory and lock it."""
        if self.out is None:
            self.out = claim_default_out()
        else:
            self.out.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.out)
        if holds_run(self.out):  # another trainer started a run there after check_new_out
            raise ValueError(f"--out {self.out} already holds a run: continue it with --resume, or pass "
                             "another --out")
        self.cfg = replace(self.cfg, out=str(self.out))

    def close(self):
        """End the worker processes and release the run directory (called when run() ends)."""
        if self.data_parallel is not None:
            self.data_parallel.close()
            self.data_parallel = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # --- checkpoints ------------------------------------------------------------------------------
    def state(self, optimizer_meta):
        return {
            "config": asdict(self.cfg),
            "model_config": self.model.config.to_dict(),
            "step": self.step,
            "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
            "last_eval_step": self.last_eval_step,
            "rng": rng.get_state(),
            "loaders": {name: loader.state_dict() for name, loader in self.loaders.items()},
            "optimizer": optimizer_meta,
            "tokenizer": {"file": "tokenizer.txt", "data_dir": str(self.data_dir)},
        }

    def save(self):
        """Write the checkpoint; save_checkpoint refuses weights or moments that are not finite."""
        from tinyllm.checkpoint import save_checkpoint
        from tinyllm.optim import optimizer_state_to_flat
        arrays, optimizer_meta = optimizer_state_to_flat(self.optimizer.state_dict())   # (ZeRO: gathered)
        if not self.writes:
            return
        arrays = {k: backend.to_numpy(v) for k, v in arrays.items()}
        save_checkpoint(self.ckpt_dir, model_state=self.model.state_dict(), optimizer_flat=arrays,
                        state=self.state(optimizer_meta))

    def _read_checkpoint(self):
        from tinyllm.checkpoint import load_run_checkpoint
        if not self.ckpt_dir.exists() and not (self.out / ".ckpt.old").exists():
            raise ValueError(f"--resume: no checkpoint in {self.ckpt_dir}; start without --resume")
        return load_run_checkpoint(self.ckpt_dir)

    def _unusable(self, what):
        from tinyllm.checkpoint import CheckpointError, checkpoint_directory
        return CheckpointError(f"checkpoint {checkpoint_directory(self.ckpt_dir)} is unusable: {what}")

    def _check_model_config(self, saved):
        """The model that the options and the dataset make must be the checkpoint's."""
        now = model_config(self.cfg, self.meta["vocab_size"]).to_dict()
        diff = {k: (v, now.get(k)) for k, v in saved.to_dict().items() if now.get(k) != v}
        if diff:
            raise ValueError(f"--resume: the checkpoint's model differs from the one its options and the "
                             f"dataset {self.data_dir} make (saved, now): {diff}")

    def load(self, checkpoint):
        """Continue from a checkpoint read by load_run_checkpoint: weights, moments, generators, step."""
        from tinyllm.optim import optimizer_state_from_flat
        _, model_state, optimizer_arrays, state = checkpoint
        self.model.load_state_dict(model_state)
        dtype = self.model.dtype
        for name, array in optimizer_arrays.items():
            if array.dtype != dtype:
                raise self._unusable(f"optimizer.safetensors: the tensor {name!r} is {array.dtype}, expected {dtype}")
        xp = backend.xp_for(self.cfg.device)
        optimizer_arrays = {k: xp.asarray(v) for k, v in optimizer_arrays.items()}
        try:
            self.optimizer.load_state_dict(optimizer_state_from_flat(optimizer_arrays, state["optimizer"]))
        except (ValueError, KeyError, TypeError) as e:
            raise self._unusable(f"optimizer.safetensors and state.json's \"optimizer\" do not fit the "
                                 f"model: {e}") from None
        if set(state["loaders"]) != set(self.loaders):
            raise self._unusable(f"state.json: \"loaders\" has {sorted(state['loaders'])}, expected "
                                 f"{sorted(self.loaders)}")
        for name, loader in self.loaders.items():
            saved = state["loaders"][name]
            if (saved["split"], saved["batch_size"], saved["block_size"]) != \
                    (loader.split, loader.batch_size, loader.block_size):
                raise self._unusable(f"state.json: the loader {name!r} is for {saved['split']} batches of "
                                     f"{saved['batch_size']} x {saved['block_size']}, the run's are "
                                     f"{loader.split} batches of {loader.batch_size} x {loader.block_size}")
            loader.load_state_dict(saved)
        rng.set_state(state["rng"])
        self.step = state["step"]
        self.best_val = math.inf if state["best_val_loss"] is None else state["best_val_loss"]
        self.last_eval_step = state["last_eval_step"]
        if self.writes:
            self._drop_metrics_after(self.step)
        self.log(f"resumed from {self.ckpt_dir} at step {self.step}")

    def _drop_metrics_after(self, step):
        """Keep the metrics of the steps up to the checkpoint's: after a resume every step is logged once."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + "\n")
        with atomic_open(path, "w") as f:
            f.write("".join(kept))

    # --- evaluation ---------------------------------------------------------------------------------
    @no_grad()
    def evaluate(self):
        """Mean loss over eval_iters batches of each split, model in eval mode (no dropout)."""
        self.model.eval()
        totals = numpy.zeros(2)
        for k, split in enumerate(("train", "val")):
            loader = self.loaders[f"eval_{split}"]
            for _ in range(self.cfg.eval_iters):
                if self.engine is not None:                # this process's rows, weighted: summed below
                    totals[k] += self.engine.partial_loss(*loader.next_batch())
                    continue
                x, y = self._batch(loader)
                _, loss = self.model(x, y)
                totals[k] += float(loss.item())
        if self.engine is not None:
            totals = self.comm.host_sum(totals)
        self.model.train()
        return {"train": float(totals[0]) / self.cfg.eval_iters, "val": float(totals[1]) / self.cfg.eval_iters}

    def _batch(self, loader):
        x, y = loader.next_batch()
        return backend.to_device(x, self.cfg.device), backend.to_device(y, self.cfg.device)

    # --- one optimisation step ----------------------------------------------------------------------
    def train_step(self):
        from tinyllm.optim import clip_grad_norm_, cosine_lr
        cfg = self.cfg
        lr = cosine_lr(self.step, max_lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_iters,
                       decay_steps=cfg.lr_decay_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for k in range(cfg.grad_accum):
            if self.engine is not None:       # whole batches on the host: each process takes its rows
                x, y = self.loaders["train"].next_batch()
                loss = self.engine.forward_backward(x, y, scale=1.0 / cfg.grad_accum, sync=k == cfg.grad_accum - 1)
                loss_sum = 0.0 if loss is None else loss   # the last, synchronised call sums them all
                continue
            x, y = self._batch(self.loaders["train"])
            if self.data_parallel is not None:
                loss = self.data_parallel.forward_backward(x, y, scale=1.0 / cfg.grad_accum)
            else:
                _, loss = self.model(x, y)
                (loss / cfg.grad_accum).backward()  # gradients of the mean over micro-batches
                loss = loss.data
            loss_sum += loss                    # stays on the device: no sync here
        params = self.model.parameters()
        clip = clip_grad_norm_ if self.engine is None else lambda _, max_norm: self.engine.clip_grad_norm_(max_norm)
        if cfg.grad_clip > 0:
            grad_norm = clip(params, cfg.grad_clip)
        else:
            grad_norm = clip(params, math.inf)  # measures only
        loss_value = float(loss_sum) / cfg.grad_accum
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            if self.data_parallel is not None:
                self.data_parallel.step(self.optimizer)    # AdamW's update shared out over the processes
            else:
                self.optimizer.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
        self.optimizer.zero_grad()
        return loss_value, lr, grad_norm, finite

    # --- the loop -------------------------------------------------------------------------------------
    def run(self):
        cfg = self.cfg
        metrics = open(self.out / "metrics.jsonl", "a", encoding="utf-8") if self.writes else _NoFile()
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
        start_time = time.perf_counter()
        start_step = self.step
        window_time, window_steps = time.perf_counter(), 0
        n = threads.get_num_threads()
        cut = (f"{n} processes, the batch cut over them" if self.data_parallel is not None and n > 1 else
               f"{n} thread(s)")
        if self.comm is not None:
            cut = (f"{self.comm.size} processes ({self.comm.name.upper()}), the batch cut over them"
                   + (", AdamW's state too (ZeRO-1)" if cfg.zero else ""))
        where = f"{cfg.device}, {cut}" if backend.check_device(cfg.device) == "cpu" else cfg.device
        self.log(f"run directory: {self.out}")
        self.log(f"model: {self.model.num_parameters():,} parameters on {where}; data: {self.data_dir} "
                 f"(vocab {self.meta['vocab_size']}); {cfg.max_iters} steps of {tokens_per_step} tokens")
        previous_handlers = {sig: signal.signal(sig, self._on_stop_signal) for sig in STOP_SIGNALS}
        try:
            while True:
                if (self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters) and self.step != self.last_eval_step:
                    self._evaluate_and_log(metrics)
                if self.step != start_step and (self.step % cfg.ckpt_interval == 0 or self.step == cfg.max_iters):
                    self.save()
                if self.step >= cfg.max_iters:
                    break
                if self.comm is not None and self.comm.any(self.stop_signal is not None) \
                        and self.stop_signal is None:  # every process stops at the same step
                    self.stop_signal = signal.SIGINT   # (a Ctrl-C reaches each; a SIGTERM maybe one)
                if self.stop_signal is not None:
                    self.save()
                    self.log(f"interrupted: checkpoint saved at step {self.step} in {self.ckpt_dir}; continue "
                             f"with: tinyllm train --out {self.out} --resume")
                    return 128 + self.stop_signal
                loss, lr, grad_norm, finite = self.train_step()
                self.step += 1
                window_steps += 1
                if not finite:
                    self._log_json(metrics, {"step": self.step, "skipped": True, "loss": loss,
                                             "grad_norm": grad_norm})
                    self.log(f"step {self.step}: non-finite loss {loss} or gradient norm {grad_norm}; "
                             "step skipped, weights and optimizer state untouched")
                    if self.bad_steps >= MAX_BAD_STEPS:
                        raise FloatingPointError(
                            f"{MAX_BAD_STEPS} steps in a row had a non-finite loss or gradient: training "
                            "diverged. Lower --lr, raise --warmup-iters, set --grad-clip, or use float32")
                    continue
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_iters:
                    now = time.perf_counter()
                    tokens_per_s = window_steps * tokens_per_step / (now - window_time)
                    window_time, window_steps = now, 0
                    record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": tokens_per_s, "mfu": self._mfu(tokens_per_s),
                              "elapsed": now - start_time}
                    self._log_json(metrics, record)
                    self._progress(record, start_step)
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            metrics.close()
            self.close()                               # the worker processes end with the run
        self.log(f"run directory: {self.out} (checkpoint in {self.ckpt_dir}, metrics in "
                 f"{self.out / 'metrics.jsonl'})")
        return 0

    def _on_stop_signal(self, signum, frame):
        if self.stop_signal is not None:  # a second Ctrl-C (or SIGTERM): stop at once
            raise KeyboardInterrupt
        self.stop_signal = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        again = "Ctrl-C again" if signum == signal.SIGINT else "signal again"
        self.log(f"\n{name}: finishing this step, then saving a checkpoint ({again} to abort)")

    def _evaluate_and_log(self, metrics):
        losses = self.evaluate()
        self.last_eval_step = self.step
        self.best_val = min(self.best_val, losses["val"])
        self._log_json(metrics, {"step": self.step, "train_loss": losses["train"], "val_loss": losses["val"],
                                 "best_val_loss": self.best_val})
        self.log(f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")

    def _mfu(self, tokens_per_s):
        return None if not self.peak_flops else self.flops_per_token * tokens_per_s / self.peak_flops

    def _log_json(self, file, record):
        """One JSON line; a number that is not finite (NaN, inf) is written as null, as JSON has none."""
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        file.write(json.dumps(record, allow_nan=False) + "\n")
        file.flush()

    def _progress(self, r, start_step):
        done = r["step"] - start_step
        left = self.cfg.max_iters - r["step"]
        eta = r["elapsed"] / max(done, 1) * left
        mfu = f", mfu {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        self.log(f"step {r['step']}/{self.cfg.max_iters}: loss {r['loss']:.4f}, lr {r['lr']:.2e}, "
                 f"grad norm {r['grad_norm']:.3f}, {r['tokens_per_s']:,.0f} tok/s{mfu}, ETA {_duration(eta)}")

    def sample(self, max_new_tokens):
        """A sample from the trained model, with `tinyllm sample`'s default settings."""
        from tinyllm.sample import generate_text
        from tinyllm.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(self.out / "tokenizer.txt")
        settings = {**SAMPLE_DEFAULTS, "max_new_tokens": max_new_tokens}
        return generate_text(self.model.eval(), tokenizer, device=self.cfg.device, **settings)[0]


# Both save a checkpoint, then stop. SIGTERM is what a job scheduler or `kill` sends, and what Open
# MPI's mpiexec hands the processes of a job on Ctrl-C (then SIGKILL a few seconds later).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _silent(*args, **kwargs):
    """The log of a process other than rank 0: nothing on the terminal."""


class _NoFile:
    """metrics.jsonl in a process other than rank 0: written nowhere."""

    def write(self, text):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def _duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    comm = None
    try:
        from tinyllm import parallel
        if parallel.under_mpiexec():  # rank 0 may still be writing the checkpoint a --resume reads next
            from tinyllm.parallel.mpi import _mpi
            _mpi().COMM_WORLD.Barrier()
        cfg, notes = parse_options(argv)
        if not parallel.under_mpiexec():
            if cfg.nproc > 1:                 # this process starts the others through mpiexec, then waits
                from tinyllm.parallel.launch import launch
                return launch(cfg.nproc, argv)
        else:
            comm = parallel.init(cfg.device)
            if cfg.nproc > 1 and cfg.nproc != comm.size:
                raise ValueError(f"--nproc {cfg.nproc}, but mpiexec started {comm.size} processes: under mpiexec "
                                 "leave --nproc out (mpiexec -n sets the number)")
            if comm.size == 1:
                comm = None
        backend.keep_freed_host_memory()  # reuse activation memory step after step (see its docstring)
        on_cpu = backend.check_device(cfg.device) == "cpu"
        if comm is not None:
            if cfg.parallel == "batch":
                raise ValueError("--parallel batch forks processes of its own; with several MPI processes each "
                                 "runs one process's rows: leave --parallel at auto")
            cfg = replace(cfg, parallel="layers", threads=1)
            if on_cpu:
                parallel.use_cores(comm)      # this machine's cores shared out over its processes' BLAS
        elif on_cpu:
            n, cut = threads.default_plan(cfg.batch_size, cfg.block_size, cfg.n_embd, cfg.threads or None)
            threads.set_num_threads(cfg.threads or n)
            if cfg.parallel == "auto":
                cfg = replace(cfg, parallel=cut)
        elif cfg.parallel == "batch":
            raise ValueError("--parallel batch cuts the batch over CPU processes; on a GPU leave it at auto")
        trainer = Trainer(cfg, comm=comm)
        for note in notes if trainer.writes else ():  # once nothing stands in the way of training
            print(f"tinyllm train: warning: {note}", file=sys.stderr)
        code = trainer.run()
        if code == 0 and cfg.sample_tokens > 0 and trainer.writes:
            print(f"\nbest val loss {trainer.best_val:.4f}; a sample ({cfg.sample_tokens} tokens, as "
                  f"tinyllm sample --ckpt {trainer.out} makes them):\n")
            print(trainer.sample(cfg.sample_tokens))
        if code == 0 and trainer.writes:
            print(f"\nnext: tinyllm sample --ckpt {trainer.out}; tinyllm plot {trainer.out}; "
                  f"tinyllm train --out {trainer.out} --resume --max-iters {cfg.max_iters * 2}")
        return code
    except (ValueError, OSError, FloatingPointError, RuntimeError, MemoryError) as e:
        reason = f"out of memory ({e})" if isinstance(e, MemoryError) else e
        if comm is not None:                  # the other processes would wait for this one forever
            comm.abort(f"tinyllm train: error: {reason}", code=2)
        if os.environ.get("TINYLLM_DEBUG"):
            raise
        print(f"tinyllm train: error: {reason}", file=sys.stderr)
        return 2
    except BaseException as e:                # an unexpected error, a second Ctrl-C: the job ends too
        if comm is not None:
            comm.abort(f"tinyllm train: {type(e).__name__}: {e}", code=2)
        raise
    finally:
        threads.set_num_threads(1)  # hand the process back as it was (main may be called from Python)
