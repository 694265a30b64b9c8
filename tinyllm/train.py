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

MAX_BAD_STEPS = 5  # consecutive non-finite steps before giving up


@dataclass
class TrainConfig:
    # data and run
    data: str = None                 # a prepared dataset directory; None: prepare the embedded default
    out: str = "runs/default"
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
    sample_tokens: int = 300         # printed at the end; 0 disables

    def finalize(self):
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"--dtype {self.dtype}: training runs in float32 (or float64); mixed precision "
                             "(bfloat16/float16 with float32 master weights) is not implemented yet")
        if self.threads < 0:
            raise ValueError(f"--threads must be 0 (chosen by model size) or more, got {self.threads}")
        if self.nproc < 1:
            raise ValueError(f"--nproc must be at least 1, got {self.nproc}")
        if self.parallel not in ("auto", "layers", "batch"):
            raise ValueError(f"--parallel must be auto, layers or batch, got {self.parallel!r}")
        if self.lr_decay_iters is None:
            self.lr_decay_iters = self.max_iters
        if self.ckpt_interval is None:
            self.ckpt_interval = self.eval_interval
        for name in ("max_iters", "eval_interval", "eval_iters", "ckpt_interval", "log_interval",
                     "batch_size", "grad_accum", "block_size"):
            if getattr(self, name) <= 0 and not (name == "max_iters" and self.max_iters == 0):
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        return self


MODEL_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "dropout", "bias", "norm", "mlp",
                "pos", "tie_weights")


# ---------------------------------------------------------------------------------------------
# Options: defaults < config file (JSON or TOML) < command-line flags


def _bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser():
    p = argparse.ArgumentParser(prog="tinyllm train", description="Train a GPT. With no arguments: prepare "
                                "the embedded default dataset and train a small char-level model on the CPU.")
    p.add_argument("--config", help="a JSON or TOML file of options (flags override it)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "resume":
            p.add_argument(flag, action="store_true", default=None, help="continue from the checkpoint in --out")
            continue
        kind = {"bool": _bool, "int": int, "float": float, "str": str}[f.type.__name__ if isinstance(f.type, type)
                                                                      else str(f.type)]
        p.add_argument(flag, type=kind, default=None, help=f"(default: {f.default})")
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
    known = {f.name for f in fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config file {path} has unknown options {unknown}; known: {sorted(known)}")
    return values


def parse_config(argv):
    args = build_parser().parse_args(argv)
    values = load_config_file(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    return TrainConfig(**values).finalize()


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


def build_model(cfg, vocab_size):
    from tinyllm.model import GPT, GPTConfig
    model_cfg = GPTConfig(vocab_size=vocab_size, **{k: getattr(cfg, k) for k in MODEL_FIELDS})
    rng.manual_seed(cfg.seed)
    return GPT(model_cfg, dtype=cfg.dtype, device=cfg.device)


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
        from tinyllm.data import BatchLoader, load_meta
        self.comm = comm
        self.writes = comm is None or comm.rank == 0      # rank 0 writes checkpoints, metrics, the terminal
        self.cfg, self.log = cfg, (log if self.writes else _silent)
        log = self.log
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "ckpt"
        if comm is not None and not self.writes:
            comm.barrier()                                 # rank 0 prepares the default dataset first
        data_dir = ensure_data(cfg, log)
        if comm is not None and self.writes:
            comm.barrier()
        self.meta = load_meta(data_dir)
        self.data_dir = data_dir
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
        self.stop_requested = False
        self.peak_flops = cfg.peak_flops or known_peak_flops(cfg.device, cfg.dtype)
        self.flops_per_token = self.model.flops_per_token()
        if cfg.resume:
            self.load()                                    # every process reads the checkpoint
        elif self.writes:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.writes:
            shutil.copyfile(data_dir / self.meta["tokenizer_file"], self.out / "tokenizer.txt")

    # --- checkpoints ------------------------------------------------------------------------------
    def state(self, optimizer_meta):
        return {
            "config": asdict(self.cfg),
            "model_config": self.model.config.to_dict(),
            "step": self.step,
            "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
            "last_eval_step": self.last_eval_step,
            "rng": rng.get_state(),
            "loaders": {name: loader.state_dict() for name, loader in self.loaders.items()},
            "optimizer": optimizer_meta,
            "tokenizer": {"file": "tokenizer.txt", "data_dir": str(self.data_dir)},
        }

    def save(self):
        from tinyllm.checkpoint import save_checkpoint
        from tinyllm.optim import optimizer_state_to_flat
        arrays, optimizer_meta = optimizer_state_to_flat(self.optimizer.state_dict())   # (ZeRO: gathered)
        if not self.writes:
            return
        arrays = {k: backend.to_numpy(v) for k, v in arrays.items()}
        save_checkpoint(self.ckpt_dir, model_state=self.model.state_dict(), optimizer_flat=arrays,
                        state=self.state(optimizer_meta))

    def load(self):
        from tinyllm.checkpoint import load_checkpoint
        from tinyllm.optim import optimizer_state_from_flat
        if not self.ckpt_dir.exists():
            raise ValueError(f"--resume: no checkpoint in {self.ckpt_dir}; start without --resume")
        model_state, optimizer_arrays, state = load_checkpoint(self.ckpt_dir)
        saved_model = state["model_config"]
        if saved_model != self.model.config.to_dict():
            diff = {k: (v, self.model.config.to_dict().get(k)) for k, v in saved_model.items()
                    if self.model.config.to_dict().get(k) != v}
            raise ValueError(f"--resume: the checkpoint's model differs from the options (saved, now): {diff}")
        self.model.load_state_dict(model_state)
        xp = backend.xp_for(self.cfg.device)
        optimizer_arrays = {k: xp.asarray(v) for k, v in optimizer_arrays.items()}
        self.optimizer.load_state_dict(optimizer_state_from_flat(optimizer_arrays, state["optimizer"]))
        for name, loader in self.loaders.items():
            loader.load_state_dict(state["loaders"][name])
        rng.set_state(state["rng"])
        self.step = state["step"]
        self.best_val = math.inf if state["best_val_loss"] is None else state["best_val_loss"]
        self.last_eval_step = state["last_eval_step"]
        self.log(f"resumed from {self.ckpt_dir} at step {self.step}")

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
        self.log(f"model: {self.model.num_parameters():,} parameters on {where}; data: {self.data_dir} "
                 f"(vocab {self.meta['vocab_size']}); {cfg.max_iters} steps of {tokens_per_step} tokens")
        previous_handler = signal.signal(signal.SIGINT, self._on_interrupt)
        # under mpiexec a Ctrl-C reaches the processes as SIGTERM (Open MPI's mpiexec sends it, then
        # SIGKILL a few seconds later): it saves as Ctrl-C does
        previous_term = signal.signal(signal.SIGTERM, self._on_interrupt) if self.comm is not None else None
        try:
            while True:
                if (self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters) and self.step != self.last_eval_step:
                    self._evaluate_and_log(metrics)
                if self.step != start_step and (self.step % cfg.ckpt_interval == 0 or self.step == cfg.max_iters):
                    self.save()
                if self.step >= cfg.max_iters:
                    break
                if self.comm is not None:     # every process stops at the same step (a Ctrl-C reaches each)
                    self.stop_requested = self.comm.any(self.stop_requested)
                if self.stop_requested:
                    self.save()
                    self.log(f"interrupted: checkpoint saved at step {self.step} in {self.ckpt_dir}; "
                             "continue with --resume")
                    return 130
                loss, lr, grad_norm, finite = self.train_step()
                self.step += 1
                window_steps += 1
                if not finite:
                    self._log_json(metrics, {"step": self.step, "skipped": True, "loss": _json_float(loss),
                                             "grad_norm": _json_float(grad_norm)})
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
            signal.signal(signal.SIGINT, previous_handler)
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
            metrics.close()
            if self.data_parallel is not None:
                self.data_parallel.close()             # the worker processes end with the run
        return 0

    def _on_interrupt(self, signum, frame):
        if self.stop_requested:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.stop_requested = True
        self.log("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")

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
        file.write(json.dumps(record) + "\n")
        file.flush()

    def _progress(self, r, start_step):
        done = r["step"] - start_step
        left = self.cfg.max_iters - r["step"]
        eta = r["elapsed"] / max(done, 1) * left
        mfu = f", mfu {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        self.log(f"step {r['step']}/{self.cfg.max_iters}: loss {r['loss']:.4f}, lr {r['lr']:.2e}, "
                 f"grad norm {r['grad_norm']:.3f}, {r['tokens_per_s']:,.0f} tok/s{mfu}, ETA {_duration(eta)}")

    def sample(self, max_new_tokens):
        from tinyllm.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(self.out / "tokenizer.txt")
        start = numpy.array([[tokenizer.encode("\n")[0]]], dtype=numpy.int64)
        ids = self.model.generate(backend.to_device(start, self.cfg.device), max_new_tokens,
                                  temperature=0.8, top_k=50, seed=self.cfg.seed)
        return tokenizer.decode(backend.to_numpy(ids)[0].tolist())


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


def _json_float(x):
    return x if math.isfinite(x) else str(x)


def _duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    comm = None
    try:
        cfg = parse_config(argv)
        from tinyllm import parallel
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
        code = trainer.run()
        if code == 0 and cfg.sample_tokens > 0 and trainer.writes:
            print(f"\nbest val loss {trainer.best_val:.4f}; a sample ({cfg.sample_tokens} tokens):\n")
            print(trainer.sample(cfg.sample_tokens))
        return code
    except (ValueError, FileNotFoundError, FloatingPointError, RuntimeError) as e:
        if comm is not None:                  # the other processes would wait for this one forever
            comm.abort(f"tinyllm train: error: {e}", code=2)
        if os.environ.get("TINYLLM_DEBUG"):
            raise
        print(f"tinyllm train: error: {e}", file=sys.stderr)
        return 2
    except BaseException as e:                # an unexpected error, a second Ctrl-C: the job ends too
        if comm is not None:
            comm.abort(f"tinyllm train: {type(e).__name__}: {e}", code=2)
        raise
    finally:
        threads.set_num_threads(1)  # hand the process back as it was (main may be called from Python)
