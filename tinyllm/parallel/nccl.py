"""The NCCL back end: GPU arrays, one GPU per process, through CuPy's binding of NVIDIA's NCCL.

NCCL sums and gathers arrays in GPU memory directly, over NVLink between the GPUs of a machine and
InfiniBand (or TCP) between machines. Its processes meet through a unique id that one of them
makes: as llm.c does, rank 0 asks NCCL for it and MPI broadcasts it, so MPI starts the processes
and carries the small host messages (the contract's host_sum, barrier, abort) while NCCL moves the
gradients.

Each collective runs on a stream of its own, after the work already queued on the caller's stream
(an event orders them), so the GPU computes the next layer's gradients while NCCL sums a bucket.
Work.done() asks an event recorded after the collective. (`now` changes nothing here: the host
never waits for a launch, the GPU orders the work.)

This back end awaits a GPU: the tests run it through the same contract as MPI when one is lent
(tests/test_parallel.py), and on machines without one they run the MPI back end only.
"""
import numpy

from tinyllm.parallel.comm import Communicator, Work, wait_all


def _dtypes(nccl):
    """NumPy dtype name -> NCCL data type, for those this NCCL has."""
    names = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
             "bfloat16": "NCCL_BFLOAT16", "int32": "NCCL_INT32", "int64": "NCCL_INT64", "uint8": "NCCL_UINT8"}
    return {dtype: getattr(nccl, name) for dtype, name in names.items() if hasattr(nccl, name)}


class NCCLCommunicator(Communicator):
    """The contract over NCCL with CuPy arrays; `mpi` (an MPICommunicator) starts it and carries
    the host messages. Each process takes the GPU numbered by its rank on its machine."""

    name = "nccl"
    device = "cuda"

    def __init__(self, mpi):
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError as e:
            raise RuntimeError(f"the NCCL back end needs CuPy with NCCL ({e}); install the gpu extra") from None
        self.cupy, self.nccl, self.mpi = cupy, nccl, mpi
        self.rank, self.size = mpi.rank, mpi.size
        self.local_rank, self.local_size = mpi.local_rank, mpi.local_size
        self.timeout = mpi.timeout
        gpus = cupy.cuda.runtime.getDeviceCount()
        if self.local_size > gpus:
            raise RuntimeError(f"{self.local_size} processes on this machine but {gpus} GPU(s): the NCCL back end "
                               "runs one process per GPU (start fewer processes per machine)")
        cupy.cuda.Device(self.local_rank).use()
        # the unique id: 128 bytes that rank 0 gets from NCCL and MPI hands to the others
        uid = numpy.zeros(128, dtype=numpy.int64)
        if self.rank == 0:
            uid[:] = nccl.get_unique_id()
        mpi.host_broadcast(uid, root=0)
        self.comm = nccl.NcclCommunicator(self.size, tuple(int(v) for v in uid), self.rank)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self._types = _dtypes(nccl)

    def _type(self, array):
        if not isinstance(array, self.cupy.ndarray):
            raise TypeError(f"the NCCL back end moves CuPy arrays (GPU memory), got {type(array).__name__}")
        if not array.flags.c_contiguous:
            raise ValueError("a collective needs a contiguous array")
        try:
            return self._types[array.dtype.name]
        except KeyError:
            raise TypeError(f"NCCL here has no data type for {array.dtype}") from None

    def _launch(self, what, call, *arrays):
        """call(stream pointer) on the collective stream, after the caller's queued work."""
        cuda = self.cupy.cuda
        ready = cuda.Event(disable_timing=True)
        ready.record(cuda.get_current_stream())
        self.stream.wait_event(ready)
        call(self.stream.ptr)
        finished = cuda.Event(disable_timing=True)
        finished.record(self.stream)
        work = Work(self, what, finished.query)
        work.arrays = arrays            # kept alive (out of CuPy's memory pool) until the collective is done
        return work

    def allreduce(self, array, now=False):
        t = self._type(array)
        return self._launch("allreduce", lambda s: self.comm.allReduce(
            array.data.ptr, array.data.ptr, array.size, t, self.nccl.NCCL_SUM, s), array)

    def reduce_scatter(self, array, out, now=False):
        t = self._type(array)
        if self._type(out) != t or array.size != self.size * out.size:
            raise ValueError(f"reduce_scatter of {array.size} {array.dtype} numbers over {self.size} processes "
                             f"cannot give {out.size} {out.dtype}")
        return self._launch("reduce_scatter", lambda s: self.comm.reduceScatter(
            array.data.ptr, out.data.ptr, out.size, t, self.nccl.NCCL_SUM, s), array, out)

    def allgather(self, array, now=False):
        t = self._type(array)
        if array.size % self.size:
            raise ValueError(f"allgather of {array.size} numbers does not cut into {self.size} equal chunks")
        chunk = array.size // self.size
        own = array.data.ptr + self.rank * chunk * array.itemsize     # in place: NCCL reads this rank's chunk
        return self._launch("allgather", lambda s: self.comm.allGather(own, array.data.ptr, chunk, t, s), array)

    def broadcast(self, array, root=0):
        t = self._type(array)
        wait_all([self._launch("broadcast", lambda s: self.comm.broadcast(
            array.data.ptr, array.data.ptr, array.size, t, root, s), array)])

    def host_broadcast(self, array, root=0):
        self.mpi.host_broadcast(array, root)

    def barrier(self):
        self.mpi.barrier()

    def host_sum(self, values):
        return self.mpi.host_sum(values)

    def abort(self, message, code=1):
        try:
            self.comm.abort()           # NCCL kernels waiting for a dead peer would never end
        finally:
            self.mpi.abort(message, code)
