"""The communicator contract: what data parallelism needs from the processes' link.

Every process of a job holds a Communicator. `rank` numbers the processes 0 .. size − 1, and
rank 0 is the one that writes (checkpoints, metrics, the terminal). Five collectives, each called
by every process in the same order (that order is the whole protocol: nothing says which call a
message belongs to but its place in the sequence):

    allreduce(a)              a ← Σ_ranks a                          (in place)
    reduce_scatter(a, out)    out ← chunk `rank` of Σ_ranks a        (a.size == size · out.size)
    allgather(a)              chunk r of a ← chunk r of rank r's a   (in place: each rank fills its chunk)
    broadcast(a, root)        a ← root's a                           (in place)
    barrier()

The first three return a Work at once and run while the caller goes on (computing the next
gradients, say); `work.wait()` returns when the result is there. With now=True they are done when
they return (MPI then uses its blocking calls, whose algorithms are often faster than the
non-blocking ones: docs/parallel.md). `broadcast` and `barrier` wait.
Arrays are those of the back end: NumPy arrays for MPI (host memory), CuPy arrays for NCCL (each
process's own GPU). `host_sum(values)` adds small host arrays over the processes (counts, losses,
flags) whatever the back end.

Nothing waits forever: a wait that lasts longer than `timeout` seconds (TINYLLM_COLLECTIVE_TIMEOUT,
default 600) means a process is stuck or gone, and `abort` stops the whole job with a message
that names this process's rank. `abort` is also how an error in one process ends the others.

Back ends: tinyllm.parallel.mpi.MPICommunicator (mpi4py) and tinyllm.parallel.nccl.NCCLCommunicator
(CuPy's NCCL, its unique id sent over MPI). `init()` picks one for a process started by mpiexec.
"""
import os
import sys
import time

import numpy

DEFAULT_TIMEOUT = 600.0
# A process that waits for the others asks "done?" again and again for this long before it
# sleeps between questions: a sleeping process wakes late (about 0.1 ms in a virtual machine),
# and the messages of one training step come well within this (see docs/parallel.md).
SPIN_SECONDS = 0.002
NAP_SECONDS = 0.0002


def collective_timeout():
    """Seconds a collective may wait before the job is stopped (TINYLLM_COLLECTIVE_TIMEOUT)."""
    text = os.environ.get("TINYLLM_COLLECTIVE_TIMEOUT")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"TINYLLM_COLLECTIVE_TIMEOUT must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise ValueError(f"TINYLLM_COLLECTIVE_TIMEOUT must be positive, got {text!r}")
    return value


class Work:
    """A collective under way. `done()` asks without waiting (and lets it progress: MPI moves
    a non-blocking collective on only inside MPI calls); `wait()` waits for it."""

    def __init__(self, comm, what, test):
        self.comm, self.what, self._test, self._done = comm, what, test, False

    def done(self):
        if not self._done:
            self._done = bool(self._test())
        return self._done

    def wait(self):
        wait_all([self])


def wait_all(works):
    """Wait until every Work is done, asking each in turn; past the communicator's timeout, stop
    the job (a process that never joins would otherwise hang every other one)."""
    works = [w for w in works if not w.done()]
    if not works:
        return
    comm = works[0].comm
    start = time.perf_counter()
    while works:
        works = [w for w in works if not w.done()]
        if not works:
            return
        waited = time.perf_counter() - start
        if waited > comm.timeout:
            comm.abort(f"waited {waited:.0f} s for the other processes in a collective ({works[0].what}): one "
                       "of them is stuck or has died. TINYLLM_COLLECTIVE_TIMEOUT sets this limit (seconds)")
        if waited > SPIN_SECONDS:
            time.sleep(NAP_SECONDS)


class Communicator:
    """The contract (see the module docstring). Subclasses set rank, size, local_rank,
    local_size (the processes on this machine), device ("cpu" or "cuda"), timeout."""

    rank, size, local_rank, local_size = 0, 1, 0, 1
    device = "cpu"
    timeout = DEFAULT_TIMEOUT
    name = "?"

    def allreduce(self, array, now=False):
        raise NotImplementedError

    def reduce_scatter(self, array, out, now=False):
        raise NotImplementedError

    def allgather(self, array, now=False):
        raise NotImplementedError

    def broadcast(self, array, root=0):
        raise NotImplementedError

    def barrier(self):
        raise NotImplementedError

    def host_sum(self, values):
        """Σ over the processes of a small host array (float64 or int64), returned as a new array."""
        raise NotImplementedError

    def abort(self, message, code=1):
        """Print the message, naming this rank, and stop every process of the job. Never returns."""
        raise NotImplementedError

    # --- built on the above ---------------------------------------------------------------------
    def broadcast_bytes(self, data, root=0):
        """root's bytes on every process (a JSON text, say: nothing here is ever pickled)."""
        length = numpy.array([len(data) if self.rank == root else 0], dtype=numpy.int64)
        self.host_broadcast(length, root)
        buffer = numpy.frombuffer(bytearray(data), dtype=numpy.uint8) if self.rank == root else \
            numpy.empty(int(length[0]), dtype=numpy.uint8)
        self.host_broadcast(buffer, root)
        return buffer.tobytes()

    def host_broadcast(self, array, root=0):
        """root's host array on every process, in place (the back end's broadcast for MPI)."""
        raise NotImplementedError

    def any(self, flag):
        """True on every process when any process passes a true flag (e.g. a stop request)."""
        return bool(self.host_sum(numpy.array([1 if flag else 0], dtype=numpy.int64))[0] > 0)

    def _message(self, text):
        return f"tinyllm: rank {self.rank} of {self.size}: {text}"

    def _print_abort(self, message):
        print(self._message(message), file=sys.stderr, flush=True)


_world = None


def under_mpiexec():
    """True when this process was started by mpiexec (or mpirun, srun with PMI): its environment
    has the launcher's variables. A plain `python` process is not, and never imports MPI."""
    names = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
    return any(name in os.environ for name in names)


def init(device="cpu"):
    """This process's Communicator, made once: MPI for the CPU, NCCL (its unique id sent over MPI)
    for "cuda". Call it only in a process started by mpiexec (see under_mpiexec)."""
    global _world
    if _world is None:
        from tinyllm.parallel.mpi import MPICommunicator
        mpi = MPICommunicator()
        if str(device).startswith("cuda") and mpi.size > 1:
            from tinyllm.parallel.nccl import NCCLCommunicator
            _world = NCCLCommunicator(mpi)
        else:
            _world = mpi
    return _world
