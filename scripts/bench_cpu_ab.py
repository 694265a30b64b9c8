"""tinyllm against tinyllm: the training step of two versions of the code, A/B on one machine.

    python scripts/bench_cpu_ab.py HEAD~1                 # a git revision against the working tree
    python scripts/bench_cpu_ab.py HEAD~3 HEAD --config char --rounds 6
    python scripts/bench_cpu_ab.py HEAD --config fixed --rounds 10 --steps 400 --warmup 100

scripts/bench_cpu.py compares tinyllm with PyTorch; this compares a change with the code before it,
which is how the per-change figures in docs/benchmarks.md are measured. Each version is unpacked
from git (or the working tree is used as it is) and run in fresh processes, A then B then A ...:
each process builds the benchmark model (that version's own scripts/bench_cpu.py: configs, weights,
batch, threads and step), takes warm-up steps, then times --steps steps. Alternating whole processes spreads the machine's slow
spells over both versions; the ratio B/A is reported per round and as the median over the rounds.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
sys.path[:0] = [{tree!r}, {scripts!r}]
import tinyllm
from tinyllm import backend
assert tinyllm.__file__.startswith({tree!r}), tinyllm.__file__
import bench_cpu
backend.keep_freed_host_memory()
cfg = bench_cpu.CONFIGS[{config!r}]
model, optimizer = bench_cpu.build_tinyllm(cfg)
plan = bench_cpu.use_threads(cfg, None)
if hasattr(bench_cpu, "tinyllm_stepper"):      # the version's own way to take a step
    step = bench_cpu.tinyllm_stepper(model, optimizer, plan[1])
else:                                          # versions from before data parallelism
    step = lambda x, y: bench_cpu.tinyllm_step(model, optimizer, x, y)
x, y = bench_cpu.make_batch(cfg)
loss = step(x, y)
for _ in range({warmup}):
    step(x, y)
times = []
for _ in range({steps}):
    t0 = time.perf_counter()
    step(x, y)
    times.append(time.perf_counter() - t0)
print(json.dumps(dict(loss=loss, times=times)))
"""


# --config fixed: the fixed cost of a step (the calls to Python and NumPy), the "baby" model shrunk to
# a few numbers per array (block 2, n_embd 16, one row), forward and backward as the main process of
# data parallelism runs them (threads.serial(), BLAS on one thread); no optimizer step.
CHILD_FIXED = """
import json, sys, time
sys.path[:0] = [{tree!r}, {scripts!r}]
import tinyllm
from tinyllm import backend, threads
assert tinyllm.__file__.startswith({tree!r}), tinyllm.__file__
import bench_cpu
backend.keep_freed_host_memory()
cfg = dict(bench_cpu.CONFIGS["baby"], block_size=2, n_embd=16, batch_size=1)   # as part 11 of bench_cpu_parts.py
model, optimizer = bench_cpu.build_tinyllm(cfg)   # the optimizer only clears the gradients, as a step does
x, y = bench_cpu.make_batch(cfg)
threads.set_num_threads(2)
times = []
with threads.serial():
    for i in range({warmup} + {steps}):
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t0)
print(json.dumps(dict(loss=float(loss.data), times=times[{warmup}:])))
"""


def unpack(rev, into):
    """The tree of a git revision, unpacked under `into`; None means the working tree itself."""
    if rev is None:
        return ROOT
    target = Path(into) / rev.replace("/", "_").replace("~", "-")
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(target, filter="data")
    return target


def run_child(tree, args):
    code = (CHILD_FIXED if args.config == "fixed" else CHILD).format(
        tree=str(tree), scripts=str(tree / "scripts"), config=args.config, warmup=args.warmup, steps=args.steps)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="git revision of version A")
    parser.add_argument("b", nargs="?", default=None, help="git revision of version B (default: the working tree)")
    parser.add_argument("--config", choices=["baby", "char", "fixed"], default="baby",
                        help="fixed: the fixed cost of a step (see CHILD_FIXED)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"A": unpack(args.a, tmp), "B": unpack(args.b, tmp)}
        names = {"A": args.a, "B": args.b or "working tree"}
        medians = {"A": [], "B": []}
        ratios = []
        for r in range(args.rounds):
            losses = {}
            for side in "AB":
                result = run_child(trees[side], args)
                medians[side].append(statistics.median(result["times"]) * 1e3)
                losses[side] = result["loss"]
            ratios.append(medians["B"][-1] / medians["A"][-1])
            print(f"round {r + 1}: A {medians['A'][-1]:8.2f} ms   B {medians['B'][-1]:8.2f} ms   B/A {ratios[-1]:.3f}"
                  f"   (first-step losses {losses['A']:.6f}, {losses['B']:.6f})", flush=True)
    print(f"{args.config}: A = {names['A']}, B = {names['B']}, {args.steps} timed steps per process")
    digits = 3 if args.config == "fixed" else 2
    print(f"median step: A {statistics.median(medians['A']):.{digits}f} ms, "
          f"B {statistics.median(medians['B']):.{digits}f} ms; "
          f"B/A median over {args.rounds} rounds {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
