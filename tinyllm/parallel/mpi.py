"""The MPI back end (mpi4py): host arrays, any number of processes, on one machine or many.

MPI is the standard the field's clusters run on: `mpiexec -n N` starts the processes (on the
machines of a hostfile, or those a scheduler gave), and its library moves the numbers, through
shared memory between processes of one machine and the network between machines. Each of the
contract's collectives is one non-blocking MPI call (MPI_Iallreduce, MPI_Ireduce_scatter_block,
MPI_Iallgather); MPI_IN_PLACE says that the result goes where the input was.

An MPI library moves a non-blocking collective on only while the process is inside an MPI call
(most have no thread of their own for it): Work.done() is such a call, and the data-parallel
engine asks it after each gradient it hands over, so a bucket's sum goes on while backward runs.
"""
import numpy

from tinyllm.parallel.comm import Communicator, Work, collective_timeout, wait_all


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError("this process was started by mpiexec, but mpi4py cannot be imported "
                           f"({e}); install the mpi extra: pip install 'tinyllm[mpi]'") from None
    except RuntimeError as e:                  # mpi4py found no MPI library to load
        raise RuntimeError(f"mpi4py cannot load an MPI library ({str(e).splitlines()[0]}); install the mpi "
                           "extra (pip install 'tinyllm[mpi]'), which brings one") from None
    return MPI


class MPICommunicator(Communicator):
    """The contract over an MPI communicator (MPI_COMM_WORLD by default) with NumPy arrays."""

    name = "mpi"
    device = "cpu"

    def __init__(self, comm=None):
        self.MPI = MPI = _mpi()
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)   # the processes of this machine
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.timeout = collective_timeout()

    def _work(self, what, request, *arrays):
        work = Work(self, what, request.Test)
        work.arrays = arrays            # kept alive until the collective is done
        return work

    def _done(self, what):
        return Work(self, what, lambda: True)

    def allreduce(self, array, now=False):
        _check(array)
        if now:
            self.comm.Allreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)
            return self._done("allreduce")
        return self._work("allreduce", self.comm.Iallreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM), array)

    def reduce_scatter(self, array, out, now=False):
        _check(array, out)
        if array.size != self.size * out.size:
            raise ValueError(f"reduce_scatter of {array.size} numbers over {self.size} processes gives chunks of "
                             f"{array.size / self.size:g}, not {out.size}")
        if now:
            self.comm.Reduce_scatter_block(array, out, op=self.MPI.SUM)
            return self._done("reduce_scatter")
        return self._work("reduce_scatter", self.comm.Ireduce_scatter_block(array, out, op=self.MPI.SUM), array, out)

    def allgather(self, array, now=False):
        _check(array)
        if array.size % self.size:
            raise ValueError(f"allgather of {array.size} numbers does not cut into {self.size} equal chunks")
        if now:
            self.comm.Allgather(self.MPI.IN_PLACE, array)
            return self._done("allgather")
        return self._work("allgather", self.comm.Iallgather(self.MPI.IN_PLACE, array), array)

    def broadcast(self, array, root=0):
        _check(array)
        wait_all([self._work("broadcast", self.comm.Ibcast(array, root=root), array)])

    host_broadcast = broadcast

    def barrier(self):
        wait_all([self._work("barrier", self.comm.Ibarrier())])

    def host_sum(self, values):
        out = numpy.array(values, copy=True)
        wait_all([self._work("host sum", self.comm.Iallreduce(self.MPI.IN_PLACE, out, op=self.MPI.SUM), out)])
        return out

    def abort(self, message, code=1):
        self._print_abort(message)
        self.comm.Abort(code)


def _check(*arrays):
    for a in arrays:
        if not isinstance(a, numpy.ndarray):
            raise TypeError(f"the MPI back end moves NumPy arrays (host memory), got {type(a).__name__}; "
                            "on GPUs the NCCL back end is used")
        if not a.flags.c_contiguous:
            raise ValueError("a collective needs a contiguous array")
