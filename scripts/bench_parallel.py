"""Data parallelism on this machine's cores: MPI processes (tinyllm.parallel, `tinyllm train --nproc N`)
against the fork-based engine (tinyllm.data_parallel, `--parallel batch`) while it exists, and
the scaling over 1, 2, 3 processes, with and without ZeRO-1.

    flock /tmp/cpu.lock python scripts/bench_parallel.py                 # baby and char
    flock /tmp/cpu.lock python scripts/bench_parallel.py --config baby --rounds 5 --steps 30

One training step (forward, backward, gradient sum, AdamW) of the "baby" and "char" configs of
scripts/bench_cpu.py, the same batch every step, float32, no dropout. Every measurement is a fresh
process (or job of processes): the engines take turns, round after round, and each round times
`--steps` steps after `--warmup` untimed ones; the figures are medians. The MPI jobs are timed on
rank 0 (a step ends when its weights are updated there, which needs every process's gradients).
Peak memory: each process's peak resident set (VmHWM) after the steps.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import CONFIGS, build_tinyllm, make_batch  # noqa: E402

HERE = Path(__file__).resolve()


def peak_mib():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024


def time_steps(step, steps, warmup, parts=None):
    """Seconds of each timed step; parts (if given) collects {phase: [seconds]} that step() fills."""
    for _ in range(warmup):
        step()
    if parts is not None:
        parts.clear()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def phase(parts, name, t0):
    """Add the seconds since t0 to parts[name]; returns now."""
    now = time.perf_counter()
    parts.setdefault(name, []).append(now - t0)
    return now


def phase_ms(parts):
    return {name: statistics.median(times) * 1e3 for name, times in parts.items()}


# ---------------------------------------------------------------------------------------- workers

def mpi_worker(name, steps, warmup, zero, bucket_bytes, overlap):
    """Under mpiexec (or alone: one process, no MPI): time steps on rank 0, print JSON there."""
    from tinyllm.parallel import DataParallel, ZeroAdamW, init, under_mpiexec
    cfg = CONFIGS[name]
    x, y = make_batch(cfg)
    model, optimizer = build_tinyllm(cfg)
    if under_mpiexec():
        comm = init()
        engine = DataParallel(model, comm, bucket_bytes=bucket_bytes, zero=zero, overlap=overlap)
        if zero:
            optimizer = ZeroAdamW(optimizer, engine)
        finish = engine._finish

        def timed_finish():              # the wait for the sums after this process's backward
            t0 = time.perf_counter()
            try:
                return finish()
            finally:
                phase(parts, "wait for the sums", t0)
        engine._finish = timed_finish

        def step():
            t0 = time.perf_counter()
            engine.forward_backward(x, y)
            t0 = phase(parts, "forward+backward+sums", t0)
            optimizer.step()
            t0 = phase(parts, "AdamW (+allgather)", t0)
            optimizer.zero_grad()
        comm.barrier()
    else:
        comm = None

        def step():
            t0 = time.perf_counter()
            _, loss = model(x, y)
            loss.backward()
            t0 = phase(parts, "forward+backward+sums", t0)
            optimizer.step()
            t0 = phase(parts, "AdamW (+allgather)", t0)
            optimizer.zero_grad()
    parts = {}
    times = time_steps(step, steps, warmup, parts)
    peaks = [peak_mib()]
    if comm is not None:
        mine = np.zeros(comm.size)
        mine[comm.rank] = peaks[0]
        peaks = comm.host_sum(mine).tolist()
    if comm is None or comm.rank == 0:
        print(json.dumps({"ms": [t * 1e3 for t in times], "peak_mib": peaks, "parts_ms": phase_ms(parts)}))


def fork_worker(name, steps, warmup, cores):
    """The fork-based engine (tinyllm.data_parallel) as `tinyllm train --parallel batch` runs it."""
    from tinyllm import threads
    from tinyllm.data_parallel import DataParallel
    cfg = CONFIGS[name]
    x, y = make_batch(cfg)
    model, optimizer = build_tinyllm(cfg)
    if threads.set_num_threads(cores) != cores:
        raise SystemExit("no control over NumPy's BLAS threads here: the fork engine cannot run")
    data_parallel = DataParallel(model)

    def step():
        t0 = time.perf_counter()
        data_parallel.forward_backward(x, y)
        t0 = phase(parts, "forward+backward+sums", t0)
        data_parallel.step(optimizer)
        t0 = phase(parts, "AdamW (+allgather)", t0)
        optimizer.zero_grad()
    parts = {}
    times = time_steps(step, steps, warmup, parts)
    print(json.dumps({"ms": [t * 1e3 for t in times], "peak_mib": [peak_mib()], "parts_ms": phase_ms(parts)}))
    data_parallel.close()


# ---------------------------------------------------------------------------------------- runs

def run(kind, name, args, nproc=1, zero=False, bucket_bytes=None, overlap=True, mpiexec_args=()):
    """One measurement in fresh processes: {"ms": [...], "peak_mib": [...]}."""
    from tinyllm.parallel.launch import THREAD_VARIABLES, command
    cores = os.cpu_count() or 1
    base = [sys.executable, str(HERE), "--config", name, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = dict(os.environ)
    if kind == "fork":
        argv = base + ["--fork-worker"]
    else:
        program = base + ["--mpi-worker"] + (["--zero"] if zero else []) + ([] if overlap else ["--no-overlap"]) + \
            (["--bucket-bytes", str(bucket_bytes)] if bucket_bytes else [])
        if nproc == 1:
            argv = program                                 # one process, BLAS threads on every core
        else:
            argv, extra = command(nproc, program)
            argv[1:1] = list(mpiexec_args)
            env.update({k: v for k, v in extra.items() if k in THREAD_VARIABLES})
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fork_available():
    try:
        import tinyllm.data_parallel  # noqa: F401
        return True
    except ImportError:
        return False


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), action="append")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scaling", action="store_true", help="also 1 and 3 processes, and ZeRO-1 on 2")
    p.add_argument("--bucket-bytes", type=int, help="DataParallel's bucket size (default: its BUCKET_BYTES)")
    p.add_argument("--mpi-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fork-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--zero", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-overlap", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--binding", action="store_true",
                   help="also 2 processes left unbound to cores (Open MPI: --bind-to none), and ZeRO-1 both ways")
    p.add_argument("--variants", action="store_true",
                   help="also MPI without overlap (blocking calls) and ZeRO-1, on 2 processes")
    args = p.parse_args()
    from tinyllm.backend import keep_freed_host_memory
    keep_freed_host_memory()                         # as tinyllm train does
    names = args.config or ["baby", "char"]
    if args.mpi_worker:
        from tinyllm.parallel import BUCKET_BYTES
        return mpi_worker(names[0], args.steps, args.warmup, args.zero, args.bucket_bytes or BUCKET_BYTES,
                          not args.no_overlap)
    if args.fork_worker:
        return fork_worker(names[0], args.steps, args.warmup, 2)
    cores = os.cpu_count()
    print(f"numpy {np.__version__}, {cores} CPUs; {args.rounds} rounds of {args.steps} timed steps "
          f"(after {args.warmup}) per engine, fresh processes each round")
    results = {}
    for name in names:
        cfg = CONFIGS[name]
        tokens = cfg["batch_size"] * cfg["block_size"]
        engines = [("mpi2", dict(kind="mpi", nproc=2))]
        if fork_available():
            engines.insert(0, ("fork2", dict(kind="fork")))
        if args.variants:
            engines += [("mpi2-blocking", dict(kind="mpi", nproc=2, overlap=False)),
                        ("zero2-blocking", dict(kind="mpi", nproc=2, zero=True, overlap=False))]
        if args.binding:
            engines += [("mpi2-unbound", dict(kind="mpi", nproc=2, mpiexec_args=("--bind-to", "none"))),
                        ("zero2", dict(kind="mpi", nproc=2, zero=True)),
                        ("zero2-unbound", dict(kind="mpi", nproc=2, zero=True, mpiexec_args=("--bind-to", "none")))]
        if args.scaling:
            engines += [("mpi1", dict(kind="mpi", nproc=1)), ("mpi3", dict(kind="mpi", nproc=3)),
                        ("zero2", dict(kind="mpi", nproc=2, zero=True)), ("zero3", dict(kind="mpi", nproc=3, zero=True))]
        per = {label: [] for label, _ in engines}
        peaks, parts = {}, {label: [] for label, _ in engines}
        print(f"\n== {name}: {cfg}")
        for r in range(args.rounds):
            line = []
            for label, how in engines:
                got = run(name=name, args=args, bucket_bytes=args.bucket_bytes, **how)
                per[label].append(statistics.median(got["ms"]))
                peaks[label] = got["peak_mib"]
                parts[label].append(got.get("parts_ms", {}))
                line.append(f"{label} {per[label][-1]:.2f}")
            print(f"round {r + 1}: " + ", ".join(line) + " ms")
        summary = {}
        for label, _ in engines:
            ms = statistics.median(per[label])
            summary[label] = {"ms": ms, "tokens_per_s": tokens / ms * 1e3, "rounds_ms": per[label],
                              "peak_mib": peaks[label]}
            print(f"{label:>14}: median {ms:8.2f} ms/step ({tokens / ms * 1e3:,.0f} tok/s); peak RSS per process "
                  + ", ".join(f"{m:.0f}" for m in peaks[label]) + " MiB")
            names = sorted({n for p in parts[label] for n in p})
            summary[label]["parts_ms"] = {n: statistics.median(p[n] for p in parts[label] if n in p) for n in names}
            if names:
                print(" " * 16 + "rank 0's phases (medians): " + ", ".join(
                    f"{n} {summary[label]['parts_ms'][n]:.2f} ms" for n in names))
        if "fork2" in per:
            ratios = [m / f for m, f in zip(per["mpi2"], per["fork2"])]
            summary["ratio_mpi2_fork2"] = statistics.median(ratios)
            print(f"ratio MPI 2 processes / fork engine 2 processes: {statistics.median(ratios):.3f} (median of the "
                  f"rounds' ratios {', '.join(f'{q:.3f}' for q in ratios)}); within 10%: "
                  f"{'yes' if statistics.median(ratios) <= 1.10 else 'NO'}")
        results[name] = summary
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
