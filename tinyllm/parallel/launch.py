"""`tinyllm train --nproc N`: N processes on this machine through the installed MPI's mpiexec, as
torchrun starts them for torch.

The command it runs is printed first, so that the same job can be started by hand, or across
machines (docs/parallel.md):

    mpiexec -n N [--hostfile H] python -m tinyllm train ...

What this adds for one machine:
- Open MPI refuses to start as root unless told (`--allow-run-as-root`): containers and CI run as
  root, so the flag is added when this process is root;
- Open MPI starts at most one process per core unless told (`--oversubscribe`): added when N is
  more than this machine's cores (a test of 3 processes on 2 cores, say);
- each process's BLAS gets cores / N threads (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS)
  unless they are set already, so that N processes do not each start a thread per core.
MPICH and Intel MPI need neither flag (Hydra runs as root and places any number of processes).
"""
import os
import shutil
import signal
import subprocess
import sys

THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def find_mpiexec():
    """The mpiexec of this Python's environment (the mpi extra's), else the first on PATH, else None."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    return shutil.which("mpiexec")


def mpi_flavour(mpiexec):
    """"openmpi", "mpich" (MPICH, Intel MPI: Hydra) or "other", from `mpiexec --version`."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "other"
    text = (out.stdout + out.stderr).lower()
    if "open mpi" in text or "open-mpi" in text or "openrte" in text or "prte" in text:
        return "openmpi"
    if "hydra" in text or "mpich" in text or "intel" in text:
        return "mpich"
    return "other"


def command(nproc, program, mpiexec=None, flavour=None, cores=None, is_root=None):
    """(argv, environment changes) that start the program (an argv list) in nproc processes."""
    mpiexec = mpiexec or find_mpiexec()
    if mpiexec is None:
        raise RuntimeError("--nproc starts processes through MPI's mpiexec, and none was found: install the mpi "
                           "extra (pip install 'tinyllm[mpi]': mpi4py and Open MPI from the package registry)")
    flavour = flavour or mpi_flavour(mpiexec)
    cores = cores or os.cpu_count() or 1
    is_root = (hasattr(os, "geteuid") and os.geteuid() == 0) if is_root is None else is_root
    argv = [mpiexec, "-n", str(nproc)]
    if flavour == "openmpi":
        if is_root:
            argv.append("--allow-run-as-root")
        if nproc > cores:
            argv.append("--oversubscribe")
    argv += list(program)
    env = {name: str(max(1, cores // nproc)) for name in THREAD_VARIABLES if name not in os.environ}
    return argv, env


def launch(nproc, args, log=print):
    """Run `tinyllm train ARGS` in nproc processes; returns mpiexec's exit status. Ctrl-C goes to
    mpiexec, which stops the processes (each saves a checkpoint as Ctrl-C does, if it has time)."""
    argv, env = command(nproc, [sys.executable, "-m", "tinyllm", "train", *args])
    log("launching: " + " ".join(argv))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)       # the terminal's Ctrl-C reaches mpiexec
    try:
        return subprocess.run(argv, env={**os.environ, **env}).returncode
    finally:
        signal.signal(signal.SIGINT, previous)


def use_cores(comm):
    """In each process of a job: NumPy's BLAS on this machine's cores shared out over the job's
    processes on it (as the launcher's variables say; for a job started by hand without them)."""
    if any(name in os.environ for name in THREAD_VARIABLES):
        return                          # set by the launcher, or by whoever started the job
    from tinyllm import threads
    blas = threads._openblas_threads_control()
    if blas is not None:
        blas[0](max(1, (os.cpu_count() or 1) // comm.local_size))
