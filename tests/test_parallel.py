"""tinyllm.parallel under mpiexec on this machine: 2 and 3 processes (3 oversubscribed on 2 cores).

Each job runs many checks (tests/parallel_worker.py), since starting one costs about a second.
Skipped without mpi4py or mpiexec (the mpi extra installs both: pip install -e ".[test,check,mpi]").
"""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinyllm.parallel import launch

WORKER = Path(__file__).resolve().parent / "parallel_worker.py"
MPIEXEC = launch.find_mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
                               reason="needs mpi4py and mpiexec (pip install 'tinyllm[mpi]')")

CONTRACT = ["allreduce", "reduce_scatter", "allgather", "several at once, waited in any order", "broadcast",
            "host messages", "wrong arrays are refused"]
TRAINER = ["trainer: runs", "trainer: resume is bit-exact",
           "trainer: zero-1, its resume bit-exact, close to plain data parallelism", "trainer: only rank 0 writes"]
ENGINE = ["losses and weights as one process", "a process whose rows count no target", "fewer rows than processes",
          "no target counts anywhere: nan, as one process", "gradient accumulation", "zero-1 as one process",
          "zero-1 checkpoint round trip", "dropout: repeatable, each process its own masks",
          "the gradients of a synchronised step must be zeroed", "float32 model"]


def run_job(nproc, args, tmp, timeout=240, env=None):
    """mpiexec -n nproc python tests/parallel_worker.py ARGS, as `tinyllm train --nproc` starts it."""
    argv, extra = launch.command(nproc, [sys.executable, str(WORKER), *args])
    start = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=tmp,
                         env={**os.environ, **extra, "TINYLLM_COLLECTIVE_TIMEOUT": "60", **(env or {})})
    return out, time.perf_counter() - start


TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "5",
        "--eval-iters", "2", "--log-interval", "1", "--sample-tokens", "0", "--warmup-iters", "2"]
PLAIN = ["--max-iters", "4", "--eval-interval", "2"]      # the worker's "plain" run


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    """The worker's "plain" run in one process: its metrics."""
    from tinyllm.cli import main as cli_main
    out = tmp_path_factory.mktemp("one") / "run"
    assert cli_main(["train", "--data", str(data_dir), "--out", str(out), *TINY, *PLAIN]) == 0
    return metrics(out)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def same_run(got, want):
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for a, b in zip(got, want):
        for key in ("loss", "grad_norm", "train_loss", "val_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)


@pytest.fixture(scope="module", params=[2, 3])
def checks(request, tmp_path_factory, data_dir):
    """One job of 2 or 3 processes: ({rank: {check: outcome}}, its output, its runs' root)."""
    tmp = tmp_path_factory.mktemp(f"checks{request.param}")
    out, _ = run_job(request.param, ["checks", str(tmp / "results"), str(data_dir), str(tmp / "runs")], tmp)
    results = {}
    for rank in range(request.param):
        path = tmp / "results" / f"rank{rank}.json"
        results[rank] = json.loads(path.read_text()) if path.exists() else {}
    return request.param, results, out, tmp / "runs"


@needs_mpi
@pytest.mark.parametrize("name", CONTRACT + ENGINE + TRAINER)
def test_check_in_every_process(checks, name):
    nproc, results, out, _ = checks
    for rank in range(nproc):
        assert results[rank].get(name) == "ok", (f"rank {rank} of {nproc}: {results[rank].get(name, 'not run')}\n"
                                                 f"job exit {out.returncode}:\n{out.stderr[-4000:]}")


@needs_mpi
def test_trainer_in_several_processes_equals_one_process(checks, one_process):
    """The same losses, gradient norms and evaluations as one process, up to float32 rounding;
    each step and evaluation logged once."""
    *_, runs = checks
    same_run(metrics(runs / "plain"), one_process)


@needs_mpi
def test_nproc_launches_through_mpiexec(data_dir, tmp_path, one_process):
    """`tinyllm train --nproc 2` starts two processes and equals one process; the terminal lines
    come once, from rank 0."""
    out = subprocess.run([sys.executable, "-m", "tinyllm", "train", "--nproc", "2", "--data", str(data_dir),
                          "--out", str(tmp_path / "run"), *TINY, *PLAIN], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "TINYLLM_COLLECTIVE_TIMEOUT": "60"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("launching: ") and " -n 2 " in out.stdout.splitlines()[0]
    assert "2 processes (MPI)" in out.stdout
    assert sum(line.startswith("step 4/4:") for line in out.stdout.splitlines()) == 1
    same_run(metrics(tmp_path / "run"), one_process)


@needs_mpi
def test_ctrl_c_saves_a_checkpoint_in_every_process(data_dir, tmp_path):
    """Ctrl-C on `tinyllm train --nproc 2` (SIGINT to its process group): mpiexec hands the
    processes SIGTERM, they agree to stop after the same step, rank 0 saves, the job ends."""
    import signal
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "tinyllm", "train", "--nproc", "2", "--data", str(data_dir),
                            "--out", str(out), *TINY, "--max-iters", "100000", "--eval-interval", "100000"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not any('"loss"' in line for line in _lines(out / "metrics.jsonl")):
            time.sleep(0.2)
        os.killpg(job.pid, signal.SIGINT)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    state = json.loads((out / "ckpt" / "state.json").read_text())
    assert 0 < state["step"] < 100000


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


@needs_mpi
@pytest.mark.parametrize("how, says", [
    ("trainer", "rank 1 of 2: tinyllm train: error: a deliberate error in rank 1's trainer"),
    ("raise", "rank 1 of 2: RuntimeError: a deliberate failure on rank 1"),
    ("kill", "rank 1"),                                   # the launcher's words: process rank 1 ... killed
    ("hang", "rank 0 of 2: waited 3 s for the other processes"),
])
def test_a_failing_process_ends_the_job(tmp_path, data_dir, how, says):
    """Rank 1 raises, is killed, or hangs at its third step: the job ends within seconds (not at
    the 120 s the hang would last), with an exit status that is not 0 and a message naming a rank."""
    out, seconds = run_job(2, ["die", str(tmp_path / "results"), how, str(data_dir), str(tmp_path)], tmp_path,
                           timeout=100, env={"DIE_TIMEOUT": "3"})
    assert out.returncode != 0
    assert says in out.stdout + out.stderr, out.stdout + out.stderr
    assert seconds < 30


def test_launch_command_for_open_mpi_as_root_and_oversubscribed():
    argv, env = launch.command(3, ["python", "x.py"], mpiexec="/m/mpiexec", flavour="openmpi", cores=2, is_root=True)
    assert argv == ["/m/mpiexec", "-n", "3", "--allow-run-as-root", "--oversubscribe", "python", "x.py"]
    assert all(env.get(name, "1") == "1" for name in launch.THREAD_VARIABLES)   # 2 cores / 3 processes: 1 each
    argv, env = launch.command(2, ["p"], mpiexec="/m/mpiexec", flavour="openmpi", cores=8, is_root=False)
    assert argv == ["/m/mpiexec", "-n", "2", "p"]
    assert all(env.get(name, "4") == "4" for name in launch.THREAD_VARIABLES)


def test_launch_command_for_mpich_needs_no_flags():
    argv, _ = launch.command(4, ["p"], mpiexec="/m/mpiexec", flavour="mpich", cores=2, is_root=True)
    assert argv == ["/m/mpiexec", "-n", "4", "p"]


def test_launch_without_mpiexec_says_what_to_install(monkeypatch):
    monkeypatch.setattr(launch, "find_mpiexec", lambda: None)
    with pytest.raises(RuntimeError, match=r"pip install 'tinyllm\[mpi\]'"):
        launch.command(2, ["p"])


@pytest.mark.gpu
def test_nccl_contract_on_one_gpu(tmp_path):
    """The NCCL back end through the same contract checks (one process: one GPU is lent)."""
    from tinyllm import backend
    if backend.cupy_is_standin() or not backend.cuda_available():
        pytest.skip("NCCL needs real CuPy and a GPU (the CuPy stand-in has no NCCL)")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("the NCCL back end sends its unique id over MPI: needs mpi4py")
    out = subprocess.run([sys.executable, str(WORKER), "checks", str(tmp_path / "r"), "--backend", "nccl"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads((tmp_path / "r" / "rank0.json").read_text())
    assert results == {name: "ok" for name in CONTRACT}, results
