"""Data parallelism: every process runs the whole model on its rows of each batch, and the
gradients are summed over the processes while backward still runs.

    comm = tinyllm.parallel.init()                 # in each process that mpiexec started
    engine = DataParallel(model, comm)
    loss = engine.forward_backward(x, y)           # x, y: the whole batch, the same on every process
    norm = engine.clip_grad_norm_(1.0)
    optimizer.step(); optimizer.zero_grad()        # every process takes the same step

The batch. Each process gets the whole batch (its data loader is seeded like the others) and
takes its own rows: process r of N the rows ⌊B·r/N⌋ .. ⌊B·(r+1)/N⌋. The loss is a mean over the
targets that count (those not equal to -100), so rows with c_r of the batch's c counted targets
weigh c_r / c:

    loss = Σ_r (c_r / c) · loss_r          dloss/dθ = Σ_r (c_r / c) · dloss_r/dθ

Each process starts its backward from c_r / c, and the sum of the processes' gradients is the
whole batch's gradient, as one process would compute it, up to the order of float additions.

Buckets. The gradients are laid end to end in a few flat arrays (buckets of about BUCKET_BYTES
each), in the order backward completes them: the last layer's first. A post-accumulate-grad hook
copies each parameter's gradient into its bucket as soon as backward has completed it; when a
bucket is full its sum over the processes starts at once (a non-blocking allreduce), and backward
goes on with the layers below while the numbers travel. Buckets start in their fixed order on every
process (the contract: collectives are matched by their order), so a bucket completed early waits
for those before it. At the end of backward only the last bucket's sum is still to wait for. Each
parameter's .grad is then a view of its bucket, summed.

Gradient accumulation: `forward_backward(..., sync=False)` only accumulates into .grad (no
communication), as PyTorch DDP's no_sync(); the last micro-batch of a step passes sync=True and
sums everything accumulated.

ZeRO stage 1 (zero=True, with tinyllm.parallel.ZeroAdamW): instead of an allreduce, each bucket is
reduce-scattered: process r receives only chunk r of the summed bucket, updates the AdamW state of
that chunk alone (1/N of the moments), and an allgather hands every process the updated weights.
The same bytes travel (a reduce-scatter and an allgather are an allreduce cut in two), and each
process keeps 1/N of AdamW's two moments instead of all of them.

Dropout: every process draws a seed per call from the shared generator (whose state is the same
everywhere) and takes its masks from a generator seeded with its own one, so a run with dropout is
repeatable and resumes exactly for a fixed N, though its masks differ from a one-process run's.
"""
import contextlib
import math

import numpy

from tinyllm import backend, rng
from tinyllm.autograd import Tensor, no_grad
from tinyllm.nn.layers import Dropout
from tinyllm.parallel.comm import wait_all

__all__ = ["DataParallel", "BUCKET_BYTES"]

IGNORE_INDEX = -100          # F.cross_entropy's default, which GPT.forward uses
# Bucket size: big enough that a bucket's fixed cost (a call, a message's latency) is small against
# moving its numbers, small enough that the first bucket starts early in backward and the last
# one, the only one waited for after backward, is short. Measured in docs/parallel.md.
BUCKET_BYTES = 1 << 20


class _Bucket:
    """Some parameters' gradients end to end in one flat array (padded to a multiple of the
    number of processes under ZeRO, so that it cuts into equal chunks)."""

    def __init__(self, index, members, numel, xp, dtype, size, rank, zero):
        self.index = index
        self.members = members                  # [(parameter number, offset, size)]
        self.numel = numel
        self.grads = xp.zeros(numel, dtype=dtype)
        self.pending = len(members)
        if zero:
            self.chunk_size = numel // size
            self.lo, self.hi = rank * self.chunk_size, (rank + 1) * self.chunk_size
            self.chunk = xp.zeros(self.chunk_size, dtype=dtype)     # this process's chunk of the sum
            self.weights = xp.zeros(numel, dtype=dtype)             # the parameters' data are views of it


class DataParallel:
    """model's forward, backward and gradient sum over comm.size processes (see the module
    docstring). zero: reduce-scatter instead of allreduce, for tinyllm.parallel.ZeroAdamW.
    overlap: each bucket's sum runs while backward goes on (True), or is done before backward goes
    on (False: MPI's blocking calls; on CPU cores that backward keeps busy there is nothing to
    overlap with, see docs/parallel.md)."""

    def __init__(self, model, comm, bucket_bytes=BUCKET_BYTES, zero=False, overlap=True):
        self.model, self.comm, self.zero, self.overlap = model, comm, bool(zero), bool(overlap)
        self.rank, self.size = comm.rank, comm.size
        self.params = model.parameters()
        dtypes = {p.dtype for p in self.params}
        devices = {backend.device_of(p.data) for p in self.params}
        if len(dtypes) != 1 or devices != {comm.device}:
            raise TypeError(f"data parallelism over {comm.name} needs every parameter in one dtype on "
                            f"{comm.device}, got {sorted(map(str, dtypes))} on {sorted(devices)}")
        self.dtype = self.params[0].dtype
        self.xp = backend.get_array_module(self.params[0].data)
        self.has_dropout = any(isinstance(m, Dropout) and m.p > 0 for _, m in model.named_modules())
        self._check_same_model()
        self.buckets, self.place = self._make_buckets(int(bucket_bytes))
        self.given = numpy.zeros(len(self.params), dtype=bool)   # after a sync: which got a gradient anywhere
        self._packed = numpy.zeros(len(self.params), dtype=bool)  # during a sync: which are in their bucket
        self._grad_views = [None] * len(self.params)      # the bucket views handed out as .grad (DDP)
        self._weight_views = [None] * len(self.params)    # the bucket views that are the parameters' data (ZeRO)
        self._sync = False
        self._next = 0                 # the next bucket to start
        self._works = []               # the collectives started this step
        self._local = numpy.zeros(len(self.params) + 1)   # during a sync: this process's [loss, gradient given?...]
        self._loss = 0.0               # Σ (c_r / c) · loss_r since the last sync (a 0-d array after a forward)
        self._hooks = [p.register_post_accumulate_grad_hook(lambda p, i=i: self._gradient_done(i))
                       for i, p in enumerate(self.params)]
        self.broadcast_parameters()
        if self.zero:
            self._adopt_weights()

    # --- set-up ------------------------------------------------------------------------------------
    def _check_same_model(self):
        """Every process must run the same model: rank 0's list of names and shapes against each one's."""
        mine = ";".join(f"{name}:{tuple(p.shape)}:{p.dtype}" for name, p in self.model.named_parameters())
        theirs = self.comm.broadcast_bytes(mine.encode(), root=0).decode()
        if self.comm.any(theirs != mine):
            raise ValueError("the processes built different models (parameter names, shapes or dtypes differ "
                             "from rank 0's): give every process the same options")

    def _make_buckets(self, bucket_bytes):
        """Buckets of about bucket_bytes, parameters taken in reverse (backward completes the last
        layers first), and where each parameter lies: {number: (bucket, offset, size)}."""
        groups, current, nbytes = [], [], 0
        for i in reversed(range(len(self.params))):
            current.append(i)
            nbytes += self.params[i].size * self.dtype.itemsize
            if nbytes >= bucket_bytes:
                groups.append(current)
                current, nbytes = [], 0
        if current:
            groups.append(current)
        buckets, place = [], {}
        for index, numbers in enumerate(groups):
            members, offset = [], 0
            for i in numbers:
                members.append((i, offset, self.params[i].size))
                offset += self.params[i].size
            numel = -(-offset // self.size) * self.size if self.zero else offset
            bucket = _Bucket(index, members, numel, self.xp, self.dtype, self.size, self.rank, self.zero)
            buckets.append(bucket)
            for i, off, size in members:
                place[i] = (bucket, off, size)
        return buckets, place

    def broadcast_parameters(self, root=0):
        """Every process takes root's weights (the processes start from one model)."""
        for p in self.params:
            if not p.data.flags.c_contiguous:
                p.data = self.xp.ascontiguousarray(p.data)
            self.comm.broadcast(p.data, root)

    def _adopt_weights(self):
        """ZeRO: each parameter's data becomes a view of its bucket's weights (the allgather writes
        there); arrays replaced since (load_state_dict) are copied in first."""
        for i, p in enumerate(self.params):
            if p.data is not self._weight_views[i]:
                bucket, off, size = self.place[i]
                view = bucket.weights[off:off + size].reshape(p.shape)
                view[...] = p.data
                p.data = self._weight_views[i] = view

    # --- the rows of a batch -------------------------------------------------------------------
    def rows(self, n):
        """This process's rows of a batch of n rows."""
        return slice(n * self.rank // self.size, n * (self.rank + 1) // self.size)

    def _weight(self, targets):
        """(this process's rows, c_r / c): its share of the batch's counted targets."""
        rows = self.rows(len(targets))
        counted = (targets != IGNORE_INDEX).sum(axis=1)
        c, c_r = int(counted.sum()), int(counted[rows].sum())
        if c == 0:                   # nothing counts: the loss is nan, as one process gives it
            return rows, (rows.stop - rows.start) / len(targets)
        return rows, c_r / c

    # --- forward and backward ----------------------------------------------------------------------
    def forward_backward(self, idx, targets, scale=1.0, sync=True):
        """Forward and backward of this process's rows of the batch (idx, targets: host integer
        arrays (B, T), the same on every process); d(scale · loss)/dθ is added into .grad.

        sync=True (the last micro-batch of a step): the gradients accumulated since the last sync
        are summed over the processes, and the return value is Σ of the whole-batch mean losses of
        those micro-batches (a 0-d array, the same on every process). sync=False: no
        communication, returns None."""
        idx, targets = _host_ids(idx, "idx"), _host_ids(targets, "targets")
        if idx.ndim != 2 or targets.shape != idx.shape:
            raise ValueError(f"forward_backward takes idx and targets of one shape (B, T), got {idx.shape} "
                             f"and {targets.shape}")
        rows, weight = self._weight(targets)
        seed = None
        if self.has_dropout and self.model.training and self.size > 1:
            seed = int(rng.host().integers(2**62, size=self.size)[self.rank])
        if sync:
            self._begin()
        try:
            if weight > 0:
                device = self.comm.device
                x, y = backend.to_device(idx[rows], device), backend.to_device(targets[rows], device)
                with _dropout_masks(seed):
                    _, loss = self.model(x, y)
                loss.backward(weight * scale)
                self._loss = self._loss + weight * loss.data
        except BaseException:
            self._sync = False
            raise
        if sync:
            return self._finish()
        return None

    def _begin(self):
        for bucket in self.buckets:
            bucket.pending = len(bucket.members)
        for i, p in enumerate(self.params):
            if p.grad is not None and p.grad is self._grad_views[i]:
                raise RuntimeError("the gradients of the last synchronised step are still there: zero them "
                                   "(optimizer.zero_grad()) before the next step's backward, as summing them over "
                                   "the processes again would count them once per process")
        self._local[:] = 0.0
        self._packed[:] = False
        self._next, self._works, self._sync = 0, [], True

    def _gradient_done(self, i):
        """Parameter i's post-accumulate-grad hook: backward has completed its gradient."""
        if not self._sync:
            return
        self._pack(i)
        self._start_ready()
        for work in self._works:        # let the collectives under way progress (MPI moves them
            work.done()                 # on only inside its calls)

    def _pack(self, i):
        """Copy parameter i's gradient into its bucket (zeros if it has none)."""
        bucket, off, size = self.place[i]
        view = bucket.grads[off:off + size]
        p = self.params[i]
        if p.grad is None:
            view.fill(0)
        else:
            view[...] = p.grad.reshape(-1)
            self._local[1 + i] = 1.0
            # .grad is now the bucket's view (DDP; it holds the sum once the allreduce is done) or
            # nothing (ZeRO: the sum is cut over the processes): the separate array is freed now
            p.grad = self._grad_views[i] = None if self.zero else view.reshape(p.shape)
        self._packed[i] = True
        bucket.pending -= 1

    def _start_ready(self):
        """Start the buckets that are complete, in their order."""
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            bucket = self.buckets[self._next]
            now = not self.overlap
            if self.zero:
                self._works.append(self.comm.reduce_scatter(bucket.grads, bucket.chunk, now=now))
            else:
                self._works.append(self.comm.allreduce(bucket.grads, now=now))
            self._next += 1

    def _finish(self):
        """After this process's backward: the gradients that no hook handed over (none here), the
        rest of the buckets, then wait for every sum. Returns the summed loss."""
        for bucket in self.buckets[self._next:]:
            for i, _, _ in bucket.members:
                if not self._packed[i]:
                    self._pack(i)
        self._start_ready()
        self._sync = False
        loss = self._loss
        self._loss = 0.0
        # the loss and which parameters got a gradient, summed over the processes, on the host
        self._local[0] = float(loss)
        totals = self.comm.host_sum(self._local)
        wait_all(self._works)
        self._works = []
        self.given = totals[1:] > 0
        for i, p in enumerate(self.params):
            if not self.given[i] or self.zero:
                p.grad = None          # no process gave one (as in one process, AdamW skips it), or ZeRO
            else:                      # the sum, also where this process gave none (rows without targets)
                bucket, off, size = self.place[i]
                if p.grad is None:
                    p.grad = self._grad_views[i] = bucket.grads[off:off + size].reshape(p.shape)
        return self.xp.asarray(totals[0], dtype=self.dtype)

    # --- after backward ----------------------------------------------------------------------------
    def clip_grad_norm_(self, max_norm):
        """tinyllm.optim.clip_grad_norm_ over the summed gradients; under ZeRO, over the chunks,
        the squares summed over the processes. Returns the norm before clipping."""
        if not self.zero:
            from tinyllm.optim import clip_grad_norm_
            return clip_grad_norm_(self.params, max_norm)
        square = sum(float(self.xp.vdot(b.chunk, b.chunk)) for b in self.buckets)
        norm = math.sqrt(float(self.comm.host_sum(numpy.array([square]))[0]))
        if not math.isfinite(norm):
            return norm
        coefficient = float(max_norm) / (norm + 1e-6)
        if coefficient < 1.0:
            for bucket in self.buckets:
                bucket.chunk *= coefficient
        return norm

    @no_grad()
    def partial_loss(self, idx, targets):
        """This process's share of the batch's mean loss, (c_r / c) · loss_r, as a float (no
        gradient); `comm.host_sum` of the shares over the processes is the batch's loss."""
        idx, targets = _host_ids(idx, "idx"), _host_ids(targets, "targets")
        rows, weight = self._weight(targets)
        if weight == 0:
            return 0.0
        device = self.comm.device
        _, loss = self.model(backend.to_device(idx[rows], device), backend.to_device(targets[rows], device))
        return weight * float(loss.data)

    def close(self):
        """Take the hooks off the parameters."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


@contextlib.contextmanager
def _dropout_masks(seed):
    """Dropout masks from a generator seeded with `seed` (none: the shared generator, untouched)."""
    if seed is None:
        yield
        return
    saved = rng.get_state()
    rng.manual_seed(seed)
    try:
        yield
    finally:
        rng.set_state(saved)


def _host_ids(a, what):
    a = a.data if isinstance(a, Tensor) else a
    if not isinstance(a, (numpy.ndarray, list, tuple)):
        raise TypeError(f"data parallelism takes {what} as a host NumPy integer array (the whole batch; each "
                        f"process moves its rows to its device), got {type(a).__name__}")
    a = numpy.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{what} must hold integers, got dtype {a.dtype}")
    return a
