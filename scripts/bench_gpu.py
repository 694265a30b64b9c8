"""tinyllm's training step on a GPU (CuPy) against the same model in PyTorch eager, at the same precision.

    python scripts/bench_gpu.py                                  # both configs, fp32, tf32 and bf16
    python scripts/bench_gpu.py --config gpt2 --precision tf32 --steps 20 --json out.json
    TINYLLM_CUPY=standin python scripts/bench_gpu.py --smoke     # runs end to end without a GPU

One process, one GPU, one config and precision at a time: tinyllm first (its own trainer's step,
tinyllm.train.Trainer.train_step, on a synthetic dataset of random tokens: batch, upload, forward,
backward, clipping, AdamW and the trainer's own host syncs), then PyTorch (nanoGPT's loop: a pinned
batch uploaded without blocking, forward, backward, clipping, AdamW, no host sync). Both start from
tinyllm's initial weights; their losses on one batch must agree before anything is timed.

Configs: "gpt2" is GPT-2 124M as nanoGPT trains it (12 layers, 12 heads, 768, block 1024, vocab
50304, batch 12, no bias, no dropout); "shakespeare_char" is nanoGPT's config/train_shakespeare_char.py
(6 layers, 6 heads, 384, block 256, vocab 65, batch 64, dropout 0.2).

Precisions, the same on both sides:
  fp32  plain float32 matmuls (TF32 off)
  tf32  float32 weights, TF32 matmuls
  bf16  PyTorch: autocast to bfloat16, F.scaled_dot_product_attention picks its fused (flash) kernel
tinyllm runs a precision when its TrainConfig can express it: a `tf32` field for TF32, dtype
"bfloat16" for bf16 (both added by issue 23's part 2); until then its row says "n/a" and only
PyTorch is measured. Nothing here needs changing when they land.

Reported per run: median step time (CUDA events around each step), tokens/s, peak GPU memory
(CuPy's pool total / PyTorch's max reserved, both "held by the allocator"), MFU (nanoGPT's
6N + 12·L·H·Q·T FLOPs per token over the GPU's dense peak for the precision), and the ratios
tinyllm/PyTorch. On the CuPy stand-in (TINYLLM_CUPY=standin) the numbers are NumPy's, not a
GPU's: the script says so, and --smoke exists only to prove it runs.
"""
import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

CONFIGS = {
    "gpt2": dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, batch_size=12,
                 dropout=0.0, lr=6e-4, beta2=0.95),
    "shakespeare_char": dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, batch_size=64,
                             dropout=0.2, lr=1e-3, beta2=0.99),
    "smoke": dict(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32, batch_size=4,
                  dropout=0.1, lr=1e-3, beta2=0.99),
}
PRECISIONS = ("fp32", "tf32", "bf16")
# Dense peak FLOP/s by GPU and precision (the vendors' datasheets, SXM parts, no sparsity); "fp32"
# is the plain float32 pipeline (no tensor cores). Matched by substring of the device's name.
PEAK_FLOPS = {
    "H100": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12},
    "H200": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12},
    "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12},
}
# How far the two frameworks' first losses may differ (relative), by precision
LOSS_RTOL = {"fp32": 1e-4, "tf32": 2e-3, "bf16": 3e-2}


# ---------------------------------------------------------------------------------------------- data

def synthetic_dataset(directory, vocab_size, tokens=1 << 20, seed=0):
    """A prepared dataset of random tokens (train.bin, val.bin, meta.json) that tinyllm's trainer reads."""
    from tinyllm.data import META_FORMAT, META_VERSION, TOKENIZER_FILE
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if vocab_size <= 65535 else np.uint32
    r = np.random.default_rng(seed)
    for split, n in (("train", tokens), ("val", tokens // 8)):
        r.integers(0, vocab_size, n).astype(dtype).tofile(directory / f"{split}.bin")
    (directory / TOKENIZER_FILE).write_text("synthetic: random tokens, no tokenizer\n", encoding="utf-8")
    meta = {"format": META_FORMAT, "version": META_VERSION, "dataset": "synthetic", "tokenizer": "none",
            "tokenizer_file": TOKENIZER_FILE, "vocab_size": vocab_size, "dtype": np.dtype(dtype).name,
            "train_tokens": tokens, "val_tokens": tokens // 8}
    (directory / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return directory


# ---------------------------------------------------------------------------------------------- tinyllm

def tinyllm_options(precision):
    """TrainConfig fields for a precision, or None where tinyllm cannot run it yet (with why)."""
    from tinyllm.train import TrainConfig
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if precision == "bf16":
        try:
            TrainConfig(dtype="bfloat16").finalize()
        except ValueError as e:
            return None, f"tinyllm: {e}"
        return dict(dtype="bfloat16", **({"tf32": True} if "tf32" in fields else {})), None
    if "tf32" in fields:
        return dict(dtype="float32", tf32=precision == "tf32"), None
    if precision == "tf32":
        return None, "tinyllm has no TF32 switch yet (TrainConfig.tf32, issue 23 part 2)"
    if os.environ.get("CUPY_TF32", "0") not in ("", "0"):
        return None, "CUPY_TF32 is set: CuPy's float32 matmuls would run as TF32; unset it for fp32"
    return dict(dtype="float32"), None


def build_trainer(cfg, options, workdir, device):
    from tinyllm.train import Trainer, TrainConfig
    data = synthetic_dataset(Path(workdir) / "data", cfg["vocab_size"])
    tcfg = TrainConfig(data=str(data), out=str(Path(workdir) / f"run-{time.monotonic_ns()}"), device=device,
                       n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                       block_size=cfg["block_size"], batch_size=cfg["batch_size"], dropout=cfg["dropout"],
                       bias=False, lr=cfg["lr"], beta2=cfg["beta2"], weight_decay=0.1, grad_clip=1.0,
                       warmup_iters=10, max_iters=10**6, sample_tokens=0, **options)
    return Trainer(tcfg.finalize(), log=lambda *a: None)


def tinyllm_eval_loss(trainer, x, y):
    from tinyllm.autograd import no_grad
    trainer.model.eval()
    with no_grad():
        _, loss = trainer.model(x, y)
    trainer.model.train()
    return float(loss.item())


def run_tinyllm(cfg, precision, steps, warmup, workdir):
    options, why = tinyllm_options(precision)
    if options is None:
        return {"status": "n/a", "why": why}
    from tinyllm import backend
    xp = backend.xp_for("cuda")
    pool = xp.get_default_memory_pool()
    pool.free_all_blocks()
    trainer = build_trainer(cfg, options, workdir, "cuda")
    x, y = trainer.loaders["eval_val"].next_batch()
    state = trainer.model.state_dict()            # host copies: the PyTorch model starts from these
    loss0 = tinyllm_eval_loss(trainer, backend.to_device(x, "cuda"), backend.to_device(y, "cuda"))
    start, end = xp.cuda.Event(), xp.cuda.Event()
    times = []
    for i in range(warmup + steps):
        start.record()
        trainer.train_step()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(xp.cuda.get_elapsed_time(start, end) / 1e3)
    result = {"status": "ok", "loss0": loss0, "step_s": statistics.median(times), "steps": len(times),
              "peak_bytes": int(pool.total_bytes()), "flops_per_token": trainer.model.flops_per_token(),
              "options": options}
    del trainer
    gc.collect()
    pool.free_all_blocks()
    return result, state, (x, y)


# ---------------------------------------------------------------------------------------------- PyTorch

def torch_gpt(torch, cfg, device):
    """nanoGPT's GPT (no bias, tied head, dropout as configured), written out for this benchmark."""
    nn, F = torch.nn, torch.nn.functional
    C, H, p = cfg["n_embd"], cfg["n_head"], cfg["dropout"]

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C, bias=False), nn.Linear(C, C, bias=False)
            self.resid_dropout = nn.Dropout(p)

        def forward(self, x):
            B, T, _ = x.shape
            heads = [t.view(B, T, H, C // H).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2)]
            y = F.scaled_dot_product_attention(*heads, dropout_p=p if self.training else 0.0, is_causal=True)
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))

    class FeedForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj = nn.Linear(C, 4 * C, bias=False), nn.Linear(4 * C, C, bias=False)
            self.dropout = nn.Dropout(p)

        def forward(self, x):
            return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn = nn.LayerNorm(C, bias=False), SelfAttention()
            self.ln_2, self.mlp = nn.LayerNorm(C, bias=False), FeedForward()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(cfg["vocab_size"], C), wpe=nn.Embedding(cfg["block_size"], C), drop=nn.Dropout(p),
                h=nn.ModuleList(Layer() for _ in range(cfg["n_layer"])), ln_f=nn.LayerNorm(C, bias=False)))
            self.lm_head = nn.Linear(C, cfg["vocab_size"], bias=False)
            self.lm_head.weight = self.transformer.wte.weight

        def forward(self, idx, targets):
            t = self.transformer
            x = t.drop(t.wte(idx) + t.wpe(torch.arange(idx.shape[1], device=idx.device)))
            for layer in t.h:
                x = layer(x)
            logits = self.lm_head(t.ln_f(x))
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))

    return Model().to(device)


def torch_precision(torch, precision, device):
    """Set PyTorch's TF32 switches; the autocast context for the forward pass."""
    import contextlib
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext


def run_torch(cfg, precision, steps, warmup, state, batch, device, loader):
    import torch
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    autocast = torch_precision(torch, precision, device)
    model = torch_gpt(torch, cfg, device)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg["lr"], betas=(0.9, cfg["beta2"]), **({"fused": True} if on_gpu else {}))

    def upload(a):
        t = torch.from_numpy(a.astype(np.int64))
        return t.pin_memory().to(device, non_blocking=True) if on_gpu else t

    model.eval()
    with torch.no_grad(), autocast():
        loss0 = float(model(upload(batch[0]), upload(batch[1])).item())
    model.train()

    def step():
        x, y = loader.next_batch()
        with autocast():
            loss = model(upload(x), upload(y))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for i in range(warmup + steps):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            step()
            seconds = time.perf_counter() - t0
        if i >= warmup:
            times.append(seconds)
    result = {"status": "ok", "loss0": loss0, "step_s": statistics.median(times), "steps": len(times),
              "peak_bytes": int(torch.cuda.max_memory_reserved()) if on_gpu else None,
              "peak_allocated_bytes": int(torch.cuda.max_memory_allocated()) if on_gpu else None,
              "device": device}
    del model, optimizer
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------------------- runs

def gpu_name():
    from tinyllm import backend
    xp = backend.xp_for("cuda")
    index = backend.cuda_device_index() or 0
    return xp.cuda.runtime.getDeviceProperties(index)["name"].decode()


def peak_flops(name, precision):
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks[precision]
    return None


def bench(name, precision, steps, warmup, torch_device, workdir, gpu):
    cfg = CONFIGS[name]
    tokens = cfg["batch_size"] * cfg["block_size"]
    row = {"config": name, "precision": precision, "tokens_per_step": tokens, "gpu": gpu}
    ran = run_tinyllm(cfg, precision, steps, warmup, workdir)
    if isinstance(ran, dict):                     # tinyllm cannot run this precision yet: the same start on the host
        row["tinyllm"] = ran
        trainer = build_trainer(cfg, {}, workdir, "cpu")
        state, flops = trainer.model.state_dict(), trainer.model.flops_per_token()
        batch = trainer.loaders["eval_val"].next_batch()
        del trainer
    else:
        row["tinyllm"], state, batch = ran
        flops = row["tinyllm"]["flops_per_token"]
    peak = peak_flops(gpu, precision)
    row["peak_flops"] = peak
    if torch_device is None:
        row["torch"] = {"status": "n/a", "why": "PyTorch is not installed, or --no-torch"}
    else:
        from tinyllm.data import BatchLoader
        loader = BatchLoader(synthetic_dataset(Path(workdir) / "data", cfg["vocab_size"]), "train",
                             cfg["batch_size"], cfg["block_size"], seed=2)
        row["torch"] = run_torch(cfg, precision, steps, warmup, state, batch, torch_device, loader)
    for side in ("tinyllm", "torch"):
        r = row[side]
        if r["status"] == "ok":
            r["tokens_per_s"] = tokens / r["step_s"]
            r["mfu"] = flops * r["tokens_per_s"] / peak if peak else None
    a, b = row["tinyllm"], row["torch"]
    if a["status"] == b["status"] == "ok":
        row["loss_rel_diff"] = abs(a["loss0"] - b["loss0"]) / abs(b["loss0"])
        row["losses_agree"] = row["loss_rel_diff"] <= LOSS_RTOL[precision]
        row["speed_ratio"] = a["tokens_per_s"] / b["tokens_per_s"]
        if a.get("peak_bytes") and b.get("peak_bytes"):
            row["memory_ratio"] = a["peak_bytes"] / b["peak_bytes"]
    return row


def _fmt(r, key, scale=1.0, spec=".1f", unit=""):
    v = r.get(key)
    return "-" if v is None else f"{v * scale:{spec}}{unit}"


def print_row(row):
    print(f"\n== {row['config']} {row['precision']} on {row['gpu']} ({row['tokens_per_step']} tokens per step)")
    for side in ("tinyllm", "torch"):
        r = row[side]
        if r["status"] != "ok":
            print(f"  {side:<8} n/a: {r['why']}")
            continue
        print(f"  {side:<8} step {r['step_s'] * 1e3:9.2f} ms  {r['tokens_per_s']:>12,.0f} tok/s  "
              f"peak {_fmt(r, 'peak_bytes', 2**-30, '.2f', ' GiB'):>10}  MFU {_fmt(r, 'mfu', 100, '.1f', '%'):>6}  "
              f"first loss {r['loss0']:.5f}")
    if "speed_ratio" in row:
        agree = "agree" if row["losses_agree"] else "DISAGREE: not the same computation?"
        print(f"  tinyllm/PyTorch: speed {row['speed_ratio']:.3f}x, memory {_fmt(row, 'memory_ratio', 1, '.2f', 'x')}; "
              f"first losses {agree} (rel. diff {row['loss_rel_diff']:.1e}, allowed {LOSS_RTOL[row['precision']]:.0e})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), action="append")
    p.add_argument("--precision", choices=PRECISIONS, action="append")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernels compile, pools fill)")
    p.add_argument("--json", help="write the results to this file too")
    p.add_argument("--no-torch", action="store_true", help="time tinyllm alone")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny config, 2 steps, PyTorch on the CPU when there is no GPU: proves the script runs")
    args = p.parse_args(argv)
    from tinyllm import backend
    if not backend.cuda_available():
        raise SystemExit("bench_gpu: no CuPy with a GPU here (for a dry run: TINYLLM_CUPY=standin ... --smoke)")
    configs = args.config or (["smoke"] if args.smoke else ["gpt2", "shakespeare_char"])
    precisions = args.precision or list(PRECISIONS)
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    standin = backend.cupy_is_standin()
    gpu = gpu_name()
    torch_device, torch_version = None, None
    if not args.no_torch:
        try:
            import torch
            torch_device = "cuda" if torch.cuda.is_available() else "cpu"
            torch_version = torch.__version__
        except ImportError:
            pass
    if standin:
        print("CuPy STAND-IN (NumPy): every number below is the CPU's, not a GPU's; this run only proves the "
              "script executes")
    xp = backend.xp_for("cuda")
    print(f"GPU {gpu}; CuPy {xp.__version__}; NumPy {np.__version__}; PyTorch {torch_version} on {torch_device}; "
          f"CUPY_TF32={os.environ.get('CUPY_TF32', '(unset)')}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_gpu-") as workdir:
        for name in configs:
            for precision in precisions:
                row = bench(name, precision, steps, warmup, torch_device, workdir, gpu)
                row["standin"] = standin
                print_row(row)
                rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str) + "\n", encoding="utf-8")
    bad = [r for r in rows if r.get("losses_agree") is False]
    if bad:
        print(f"\n{len(bad)} run(s) where the two frameworks' first losses disagree: see above")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
