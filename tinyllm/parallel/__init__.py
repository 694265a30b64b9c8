"""Data parallelism over processes and machines: MPI (host arrays) and NCCL (GPUs).

    mpiexec -n 4 tinyllm train ...          or      tinyllm train --nproc 4 ...

- comm.py: the communicator contract (allreduce, reduce-scatter, allgather, broadcast, barrier,
  abort) and `init()`, which makes this process's communicator;
- mpi.py and nccl.py: its two back ends;
- ddp.py: DataParallel, each process's rows of the batch and the gradients summed in buckets
  while backward runs;
- zero.py: ZeroAdamW, AdamW's state cut over the processes (ZeRO stage 1);
- launch.py: `tinyllm train --nproc N` through the installed MPI's mpiexec.

docs/parallel.md tells how to run it, on one machine and on several, and what it costs.
"""
from tinyllm.parallel.comm import Communicator, Work, init, under_mpiexec, wait_all
from tinyllm.parallel.ddp import BUCKET_BYTES, DataParallel
from tinyllm.parallel.launch import use_cores
from tinyllm.parallel.zero import ZeroAdamW

__all__ = ["Communicator", "Work", "init", "under_mpiexec", "wait_all", "DataParallel", "BUCKET_BYTES", "ZeroAdamW",
           "use_cores"]
