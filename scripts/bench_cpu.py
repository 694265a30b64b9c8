"""One full training step (forward, loss, backward, AdamW) of tinyllm vs the same model in PyTorch.

    python scripts/bench_cpu.py                   # both configs
    python scripts/bench_cpu.py --config baby --steps 30 --profile

Both models get tinyllm's exact initial weights, the same batch, float32, dropout 0, the same
number of threads; the first step's losses must agree (proof that the same computation is timed).
Timing alternates A/B turns after a warm-up (see PAUSE and TURN) and reports medians and the ratio
tinyllm/PyTorch. Threads: BENCH_THREADS for both (default: every core); tinyllm picks how to use
them as `tinyllm train` does (tinyllm.threads.default_plan: how many, and whether they cut the batch
over processes or each layer over threads) unless BENCH_TINYLLM_THREADS or BENCH_TINYLLM_PARALLEL ("layers" or "batch") is set.
Peak memory is measured in fresh subprocesses (one per framework): the rise of the peak resident
set size during the steps over the resident size just before them (weights and batch built); with
tinyllm's worker processes, the rise of their summed proportional set sizes (see memory_child).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

CONFIGS = {
    "baby": dict(vocab_size=65, block_size=64, batch_size=12, n_layer=4, n_head=4, n_embd=128),
    "char": dict(vocab_size=65, block_size=256, batch_size=8, n_layer=6, n_head=6, n_embd=384),
}
LR, BETAS, WEIGHT_DECAY = 1e-3, (0.9, 0.99), 0.1
# Seconds of rest before each timed step. Both frameworks share this process, and the idle threads
# of one keep spinning for a while after its step (OpenBLAS's and OpenMP's, about 0.1 s), taking a
# core from the other: without the rest PyTorch's "baby" step took 74 ms instead of 36 ms.
PAUSE = 0.25
TURN = 4  # steps per turn of a framework, the first one untimed


def take_turn(step):
    """Rest, then TURN steps: ([seconds of the timed ones], page faults during them)."""
    time.sleep(PAUSE)
    step()
    f0, times = _page_faults(), []
    for _ in range(TURN - 1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times, _page_faults() - f0


def make_batch(cfg, seed=0):
    r = np.random.default_rng(seed)
    x = r.integers(0, cfg["vocab_size"], (cfg["batch_size"], cfg["block_size"]))
    y = r.integers(0, cfg["vocab_size"], (cfg["batch_size"], cfg["block_size"]))
    return x, y


# ----------------------------------------------------------------------------------------------- tinyllm

def build_tinyllm(cfg, seed=0):
    import tinyllm as tl
    tl.manual_seed(seed)
    model_cfg = tl.GPTConfig(vocab_size=cfg["vocab_size"], block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                             n_head=cfg["n_head"], n_embd=cfg["n_embd"], bias=False, dropout=0.0)
    model = tl.GPT(model_cfg)
    optimizer = model.configure_optimizers(WEIGHT_DECAY, LR, BETAS)
    return model, optimizer


def use_threads(cfg, cores):
    """tinyllm's CPU cores as `tinyllm train` picks them (tinyllm.threads.default_plan): (count, what
    they cut: "batch", over processes, or "layers", over threads). BENCH_TINYLLM_THREADS forces the
    count, BENCH_TINYLLM_PARALLEL the cut."""
    from tinyllm import threads
    n, cut = threads.default_plan(cfg["batch_size"], cfg["block_size"], cfg["n_embd"], cores)
    n = threads.set_num_threads(int(os.environ.get("BENCH_TINYLLM_THREADS", 0)) or n)
    blas = threads._openblas_threads_control()
    if n == 1 and cores is not None and blas is not None:
        blas[0](cores)               # BLAS on the cores given (its own default is every core of the machine)
    return n, os.environ.get("BENCH_TINYLLM_PARALLEL", cut)


def tinyllm_stepper(model, optimizer, cut):
    """step(x, y) -> loss: one training step as `tinyllm train` takes it (the batch cut over worker
    processes by tinyllm.data_parallel when cut is "batch"). step.worker_pids lists those processes."""
    from tinyllm.data_parallel import DataParallel
    data_parallel = DataParallel(model) if cut == "batch" else None

    def step(x, y):
        if data_parallel is not None:
            loss = data_parallel.forward_backward(x, y)
        else:
            _, loss = model(x, y)
            loss.backward()
            loss = loss.data
        if data_parallel is not None:
            data_parallel.step(optimizer)
        else:
            optimizer.step()
        optimizer.zero_grad()
        return float(loss)
    step.worker_pids = data_parallel.worker_pids if data_parallel is not None else []
    return step


# ----------------------------------------------------------------------------------------------- PyTorch

def build_torch(cfg, state_dict):
    """nanoGPT's model, written out here; loaded with tinyllm's exact weights."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    C, H = cfg["n_embd"], cfg["n_head"]

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(C, 3 * C, bias=False)
            self.c_proj = nn.Linear(C, C, bias=False)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(C, 4 * C, bias=False)
            self.c_proj = nn.Linear(4 * C, C, bias=False)

        def forward(self, x):
            return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(C, bias=False)
            self.attn = Attention()
            self.ln_2 = nn.LayerNorm(C, bias=False)
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(cfg["vocab_size"], C), wpe=nn.Embedding(cfg["block_size"], C),
                h=nn.ModuleList([Block() for _ in range(cfg["n_layer"])]), ln_f=nn.LayerNorm(C, bias=False)))
            self.lm_head = nn.Linear(C, cfg["vocab_size"], bias=False)
            self.lm_head.weight = self.transformer.wte.weight  # tied

        def forward(self, idx, targets):
            pos = torch.arange(idx.shape[1])
            x = self.transformer.wte(idx) + self.transformer.wpe(pos)
            for block in self.transformer.h:
                x = block(x)
            logits = self.lm_head(self.transformer.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    model = GPT()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state_dict.items()})
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=BETAS)
    return model, optimizer


def torch_step(model, optimizer, x, y):
    loss = model(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.item())


# ----------------------------------------------------------------------------------------------- runs

def memory_child(framework, name, steps):
    """Run in a subprocess: print the peak RSS rise (MiB) during `steps` training steps."""
    cfg = CONFIGS[name]
    x, y = make_batch(cfg)
    model, optimizer = build_tinyllm(cfg)
    _, cut = use_threads(cfg, int(os.environ.get("BENCH_THREADS", os.cpu_count())))
    if framework == "torch":
        import torch
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count())))
        model, optimizer = build_torch(cfg, model.state_dict())
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        step = lambda x, y: torch_step(model, optimizer, x, y)   # noqa: E731
    else:
        step = tinyllm_stepper(model, optimizer, cut)
    import gc
    gc.collect()
    # tinyllm's worker processes (data parallelism) count too. Their memory is told apart from the main
    # process's by the proportional set size (PSS: a page that k processes share counts 1/k in each);
    # summing each process's own rise of peak RSS instead would count every shared page once per process.
    pids = ["self"] + [str(pid) for pid in getattr(step, "worker_pids", [])]
    rss, pss = [_status_mib(pid, "VmRSS") for pid in pids], [_pss_mib(pid) for pid in pids]
    for _ in range(steps):
        step(x, y)
    peak, rss_after = [_status_mib(pid, "VmHWM") for pid in pids], [_status_mib(pid, "VmRSS") for pid in pids]
    result = {"before_mib": rss[0], "peak_mib": peak[0], "processes": len(pids),
              "rss_sum_rise_mib": sum(p - b for p, b in zip(peak, rss))}
    if len(pids) == 1:
        result["rise_mib"] = peak[0] - rss[0]
    elif all(p - r < 1.0 for p, r in zip(peak, rss_after)):
        # no process gave memory back (each one's RSS is still at its peak), so the PSS now is the peak
        result["rise_mib"] = sum(_pss_mib(pid) for pid in pids) - sum(pss)
    else:
        result["rise_mib"] = result["rss_sum_rise_mib"]      # peaks at different times: the overestimate
    print(json.dumps(result))


def _pss_mib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return int(next(line for line in f if line.startswith("Pss:")).split()[1]) / 1024


def _status_mib(pid, field):
    """VmRSS (resident now) or VmHWM (peak resident) of a process, in MiB. VmHWM is the process's own
    high-water mark; ru_maxrss would include the parent's RSS at fork."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _page_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure_memory(framework, name, default_malloc, steps=3):
    extra = ["--default-malloc"] if default_malloc else []
    out = subprocess.run([sys.executable, __file__, "--memory-child", framework, "--config", name,
                          "--steps", str(steps), *extra], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_op_times(step, steps=30, warmup=5):
    """ms per step in each tinyllm op's forward and backward, and in AdamW.step: timers wrapped around them.

    Self time: when one timed method calls another (SelfAttention.forward calls
    ScaledDotProductAttention.forward), the inner call's time counts for the inner one only. Each
    op's time is summed per step, and the median over the steps is printed: a slow spell of the
    machine in one step does not move it. With the batch cut over processes, only this process's
    ops are timed (its rows, and its share of AdamW).
    """
    import collections

    from tinyllm.autograd import OPS
    from tinyllm.optim import AdamW
    totals, originals = collections.Counter(), []
    inner = []  # per open timed call: the time spent in timed calls inside it

    def wrap(cls, name):
        original = getattr(cls, name)

        def timed(self, *args):
            inner.append(0.0)
            t0 = time.perf_counter()
            try:
                return original(self, *args)
            finally:
                elapsed = time.perf_counter() - t0
                totals[f"{cls.__name__}.{name}"] += elapsed - inner.pop()
                if inner:
                    inner[-1] += elapsed
        setattr(cls, name, timed)
        originals.append((cls, name, original))
    for cls in list(OPS.values()) + [AdamW]:
        for name in ("forward", "backward", "step"):
            if name in vars(cls):
                wrap(cls, name)
    per_step, step_times = collections.defaultdict(list), []
    try:
        for i in range(warmup + steps):
            totals.clear()
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                step_times.append(time.perf_counter() - t0)
                for key, seconds in totals.items():
                    per_step[key].append(seconds)
    finally:
        for cls, name, original in originals:
            setattr(cls, name, original)
    ms = {key: statistics.median(times + [0.0] * (steps - len(times))) * 1e3 for key, times in per_step.items()}
    print(f"tinyllm, self ms per step (medians of {steps} steps; the step itself {statistics.median(step_times) * 1e3:.1f} ms, "
          f"the ops {sum(ms.values()):.1f}):")
    for key in sorted(ms, key=ms.get, reverse=True)[:int(os.environ.get("BENCH_PROFILE_TOP", 12))]:
        print(f"  {key:<40} {ms[key]:8.2f}")


def print_torch_op_times(step, steps=5):
    """ms per step of PyTorch's ops (self CPU time from torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(f"PyTorch, self CPU ms per step (mean of {steps} steps, under the profiler):")
    for event in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"  {event.key[:40]:<40} {event.self_cpu_time_total / steps / 1e3:8.1f}")


def bench(name, steps, warmup, profile, default_malloc):
    cfg = CONFIGS[name]
    x, y = make_batch(cfg)
    model, optimizer = build_tinyllm(cfg)
    print(f"\n== {name}: {cfg}  ({model.num_parameters():,} parameters)")
    try:
        import torch
    except ImportError:
        torch = None
        print("PyTorch is not installed: timing tinyllm alone (pip install torch for the comparison)")
    threads = int(os.environ.get("BENCH_THREADS", os.cpu_count()))
    ours, cut = use_threads(cfg, threads)
    how = {"batch": "processes, the batch cut over them", "layers": "threads, each layer cut over them"}[cut]
    how = f"{how}, NumPy's BLAS on 1" if ours > 1 else f"thread, NumPy's BLAS on its own {threads}"
    print(f"cores: tinyllm {ours} {how}; PyTorch {threads if torch is not None else '-'} threads")
    tinyllm_step = tinyllm_stepper(model, optimizer, cut)
    if torch is not None:
        torch.set_num_threads(threads)
        tmodel, toptimizer = build_torch(cfg, model.state_dict())
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        loss_ours = tinyllm_step(x, y)
        loss_theirs = torch_step(tmodel, toptimizer, tx, ty)
        print(f"first-step loss: tinyllm {loss_ours:.6f}  PyTorch {loss_theirs:.6f}  "
              f"(|diff| {abs(loss_ours - loss_theirs):.2e}; threads {threads})")
        if abs(loss_ours - loss_theirs) > 1e-4:
            raise SystemExit("the two models disagree: not timing different computations")
    else:
        tinyllm_step(x, y)
    if profile:
        print_op_times(lambda: tinyllm_step(x, y))
        if torch is not None:
            print_torch_op_times(lambda: torch_step(tmodel, toptimizer, tx, ty))
    # Turns: TURN steps of one framework, then TURN of the other, after a rest (see PAUSE); the first
    # step of a turn only wakes the framework's threads and is not timed. A paired ratio per round.
    ours, theirs, paired, faults = [], [], [], [0, 0]
    rounds = warmup + -(-steps // (TURN - 1))
    for i in range(rounds):
        ours_turn, faults_ours = take_turn(lambda: tinyllm_step(x, y))
        if torch is not None:
            theirs_turn, faults_theirs = take_turn(lambda: torch_step(tmodel, toptimizer, tx, ty))
        if i < warmup:
            continue
        ours += ours_turn
        faults[0] += faults_ours
        if torch is not None:
            theirs += theirs_turn
            faults[1] += faults_theirs
            paired.append(statistics.median(ours_turn) / statistics.median(theirs_turn))
    steps = len(ours)
    m_ours = statistics.median(ours) * 1e3
    tokens = cfg["batch_size"] * cfg["block_size"]
    print(f"tinyllm  step: median {m_ours:8.2f} ms  ({tokens / m_ours * 1e3:,.0f} tok/s, "
          f"{faults[0] // steps:,} page faults)")
    mem_ours = measure_memory("tinyllm", name, default_malloc)
    result = {"config": name, "tinyllm_ms": m_ours, "tinyllm_peak_rise_mib": mem_ours["rise_mib"],
              "tinyllm_rss_sum_rise_mib": mem_ours["rss_sum_rise_mib"]}
    if torch is not None:
        m_theirs = statistics.median(theirs) * 1e3
        mem_theirs = measure_memory("torch", name, default_malloc)
        print(f"PyTorch  step: median {m_theirs:8.2f} ms  ({tokens / m_theirs * 1e3:,.0f} tok/s, "
              f"{faults[1] // steps:,} page faults)")
        paired = statistics.median(paired)
        print(f"ratio tinyllm/PyTorch: {m_ours / m_theirs:.3f} (of medians); {paired:.3f} (median of the "
              f"{len(theirs) // (TURN - 1)} rounds' ratios); {min(ours) / min(theirs):.3f} (of best steps)")
        shared = (f" in {mem_ours['processes']} processes by PSS; {mem_ours['rss_sum_rise_mib']:.1f} MiB counting "
                  "shared pages in each" if mem_ours["processes"] > 1 else "")
        print(f"peak memory rise during steps: tinyllm {mem_ours['rise_mib']:.1f} MiB{shared}, PyTorch "
              f"{mem_theirs['rise_mib']:.1f} MiB (ratio {mem_ours['rise_mib'] / mem_theirs['rise_mib']:.2f}); "
              f"RSS before steps: {mem_ours['before_mib']:.0f} vs {mem_theirs['before_mib']:.0f} MiB")
        result.update(torch_ms=m_theirs, ratio=m_ours / m_theirs, paired_ratio=paired,
                      best_ratio=min(ours) / min(theirs), torch_peak_rise_mib=mem_theirs["rise_mib"])
    else:
        print(f"peak memory rise during steps: tinyllm {mem_ours['rise_mib']:.1f} MiB")
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), action="append")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", action="store_true",
                   help="print where five steps of each framework spend their time, op by op")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc malloc as it is; by default the benchmark does what `tinyllm train` does, "
                        "tinyllm.backend.keep_freed_host_memory(), which applies to both frameworks alike")
    p.add_argument("--memory-child", choices=["tinyllm", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.default_malloc:
        from tinyllm.backend import keep_freed_host_memory
        keep_freed_host_memory()
    if args.memory_child:
        return memory_child(args.memory_child, args.config[0], args.steps)
    print(f"numpy {np.__version__}, {os.cpu_count()} CPUs")
    print("glibc malloc: " + ("as it is" if args.default_malloc else "keep_freed_host_memory() (as tinyllm train)"))
    results = [bench(name, args.steps, args.warmup, args.profile, args.default_malloc)
               for name in (args.config or ["baby", "char"])]
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
