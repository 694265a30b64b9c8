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


@pytest.fixture(scope="module", params=[2, 3])
def checks(request, tmp_path_factory):
    """{rank: {check: outcome}} of one job of 2 or 3 processes, and its output."""
    tmp = tmp_path_factory.mktemp(f"checks{request.param}")
    out, _ = run_job(request.param, ["checks", str(tmp / "results")], tmp)
    results = {}
    for rank in range(request.param):
        path = tmp / "results" / f"rank{rank}.json"
        results[rank] = json.loads(path.read_text()) if path.exists() else {}
    return request.param, results, out


@needs_mpi
@pytest.mark.parametrize("name", CONTRACT + ENGINE)
def test_check_in_every_process(checks, name):
    nproc, results, out = checks
    for rank in range(nproc):
        assert results[rank].get(name) == "ok", (f"rank {rank} of {nproc}: {results[rank].get(name, 'not run')}\n"
                                                 f"job exit {out.returncode}:\n{out.stderr[-4000:]}")


@needs_mpi
@pytest.mark.parametrize("how, says", [
    ("raise", "rank 1 of 2: RuntimeError: a deliberate failure on rank 1"),
    ("kill", "rank 1"),                                   # the launcher's words: process rank 1 ... killed
    ("hang", "rank 0 of 2: waited 3 s for the other processes"),
])
def test_a_failing_process_ends_the_job(tmp_path, how, says):
    """Rank 1 raises, is killed, or hangs at its third step: the job ends within seconds (not at
    the 120 s the hang would last), with an exit status that is not 0 and a message naming a rank."""
    out, seconds = run_job(2, ["die", str(tmp_path / "results"), how], tmp_path, timeout=100,
                           env={"TINYLLM_COLLECTIVE_TIMEOUT": "3"})
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
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("the NCCL back end sends its unique id over MPI: needs mpi4py")
    out = subprocess.run([sys.executable, str(WORKER), "checks", str(tmp_path / "r"), "--backend", "nccl"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads((tmp_path / "r" / "rank0.json").read_text())
    assert results == {name: "ok" for name in CONTRACT}, results
