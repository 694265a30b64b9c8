"""Data parallelism on CPU cores: the batch cut over processes, each running the whole model.

`tinyllm.threads` can cut every layer's rows over threads. Threads of one Python process share one
interpreter lock, though, and the work changes hands a few times per layer: on a small model, whose
NumPy calls take microseconds, the threads spend much of a step waiting for each other. Cutting
the batch over processes hands work over twice per step, and the processes share nothing but
memory:

- the weights live in a block of shared memory, and the model's Parameters are views into it;
- `DataParallel(model)` forks n − 1 workers (n = tinyllm.threads.get_num_threads()), each with a
  copy of the model over those same weights;
- `forward_backward`: each worker reads its rows of the batch from a pipe, runs forward and
  backward, its gradients written straight into shared memory of its own (each Parameter's
  `grad_home`, see tinyllm.autograd); meanwhile this process runs the first rows, its own
  gradients going into shared memory too, and as each of them is complete (a post-accumulate-grad
  hook) the workers add theirs into it, one after the other down a chain (see _serve);
- `step(optimizer)`: AdamW's update is elementwise, so each process updates one stretch of the
  parameters (taken end to end), reading this process's gradients where they already are. The
  moments live in shared memory too.

The loss is a mean over the targets that count (those not equal to ignore_index), so part r, with
c_r of the batch's c counted targets, weighs c_r / c:

    loss = Σ_r (c_r / c) · loss_r        dloss/dθ = Σ_r (c_r / c) · dloss_r/dθ

and each part's backward starts from c_r / c (times `scale`, e.g. 1 / grad_accum). The result is
the whole batch's loss and gradient, up to the order of float additions; each part runs the same
rows every time, so a run is repeatable and resumes bit-exactly.

Dropout: a worker draws its masks from a generator seeded, for each call, from this process's
generator (tinyllm.rng), so a run with dropout is repeatable too, though its masks differ from a
one-process run's.

Nothing is pickled: a command is a fixed binary header and raw numbers, a result a fixed header
and, after an error, its message. Workers are forked only where `os.fork` exists and
tinyllm.threads controls NumPy's BLAS (the OpenBLAS of NumPy's wheels on Linux: each process's BLAS
must run on one thread); elsewhere get_num_threads() stays 1 and every call is a plain one.
"""
import itertools
import mmap
import os
import select
import signal
import struct
import time
import weakref

import numpy

from tinyllm import rng, threads
from tinyllm.autograd import Tensor, _accumulate
from tinyllm.nn.layers import Dropout
from tinyllm.optim import UPDATE_BLOCK, AdamW, stretch_pieces, update_all, update_span, update_stretch

__all__ = ["DataParallel"]

IGNORE_INDEX = -100                  # F.cross_entropy's default, which GPT.forward uses
_FORWARD_BACKWARD, _GRADIENT, _UPDATE = 0, 1, 2    # what a command asks of a worker
# call number, kind, then for _FORWARD_BACKWARD: rows, positions per row, the next worker in the
# chain (or _LAST, or _NO_CHAIN), loss weight, dropout seed (−1: none); for _GRADIENT: the parameter
# whose gradient this process completed (or _END), 0, 0, 0.0, 0; for _UPDATE: parameters in the
# plan, first and last element of the stretch, 0.0, whole (1: the stretch is of the shared blocks
# taken whole, see DataParallel._update_whole; 0: of the plan's parameters taken end to end)
_LAST, _NO_CHAIN = -1, -2           # in place of the next worker: none (the chain ends here); no chain
_END = -1                            # in place of a parameter: this process's backward has ended
_COMMAND = struct.Struct("<qqqqqdq")
_RESULT = struct.Struct("<qdBI")     # call number, loss, failed (0/1), length of the message after it
_PLAN_COLUMNS = 8                    # an _UPDATE plan row: parameter number, then AdamW's 7 hyperparameters
# the main process's ends of every worker's pipes: a worker forked later closes them, so that each
# worker sees its command pipe close when the main process closes it
_main_ends = set()
_ERRORS = {e.__name__: e for e in (ValueError, IndexError, TypeError, MemoryError, FloatingPointError)}
# A process asleep in a read takes about 0.1 ms to wake in a virtual machine (its idle core halts
# until the host wakes it), against a few µs for one that keeps asking: so each side waiting for
# the other asks for this long before it sleeps (part 10 of scripts/bench_cpu_parts.py). The
# messages of one step come well within it; a longer wait (an evaluation, a checkpoint) sleeps.
POLL_SECONDS = 0.002


class DataParallel:
    """model(idx, targets)'s loss and gradients, and AdamW's step, shared out over
    tinyllm.threads.get_num_threads() processes (plain calls with one).

        data_parallel = DataParallel(model)
        loss = data_parallel.forward_backward(x, y)    # the mean loss; gradients in each p.grad
        data_parallel.step(optimizer)                  # optimizer.step(), shared out for an AdamW

    The model's Parameter objects must stay the ones it had here; their arrays may be replaced (as
    `load_state_dict` does): the next call copies them into the shared memory. `close()` (or leaving
    a `with` block, or the end of the process) stops the workers.

    overlap: the workers add their gradients into this process's while its backward still runs,
    each parameter's as soon as this process has completed it (True), or this process adds them
    all after its backward (False; scripts/bench_cpu_parts.py times the two).
    whole_blocks (an attribute): the step updates the shared blocks whole when it can (True, see
    _update_whole), or always parameter by parameter (False; part 9 of that script times the two).
    """

    def __init__(self, model, overlap=True):
        self.model, self.overlap, self.whole_blocks = model, overlap, True
        self.params = model.parameters()
        self.has_dropout = any(isinstance(m, Dropout) and m.p > 0 for _, m in model.named_modules())
        self._calls = 0
        self._workers = []
        n = threads.get_num_threads()
        if n == 1:
            return
        if not hasattr(os, "fork"):
            raise RuntimeError("data parallelism forks worker processes, which this system cannot do; "
                               "cut the layers over the threads instead (tinyllm train --parallel layers)")
        dtypes = {p.dtype for p in self.params}
        if any(not isinstance(p.data, numpy.ndarray) for p in self.params) or len(dtypes) != 1:
            raise TypeError("data parallelism needs every parameter in one NumPy array dtype (CPU), got "
                            f"{sorted(str(d) for d in dtypes)}; on a GPU leave --parallel at auto")
        shared = lambda: _SharedArrays([p.shape for p in self.params], *dtypes)   # noqa: E731
        # the weights, this process's gradients (the workers add theirs in, and read them to update
        # their stretch), AdamW's two moments
        self.weights, self.grads, self.moments = shared(), shared(), (shared(), shared())
        self.weights.adopt(self.params, "data")             # the Parameters become views of shared memory
        for p, home in zip(self.params, self.grads.arrays):  # and their gradients are written into it
            p.grad_home = home
        self._number = {id(a): i for i, a in enumerate(self.weights.arrays)}
        pipes = [(os.pipe(), os.pipe()) for _ in range(n - 1)]    # each worker's commands and results
        for number in range(n - 1):
            self._workers.append(_Worker.start(self, number, shared(), pipes))
        for (command_read, _), (_, result_write) in pipes:          # the workers' ends
            os.close(command_read)
            os.close(result_write)
        for worker in self._workers:
            _main_ends.update((worker.commands, worker.results))
        self._finalizer = weakref.finalize(self, _stop, self._workers)
        self._chain = None                  # during forward_backward: the first worker of the chain
        self._sent = set()                  # the parameters whose gradients went down the chain
        ref = weakref.ref(self)             # (hooks holding self would keep it, and its workers, alive)
        self._hooks = [p.register_post_accumulate_grad_hook(lambda p, i=i: _gradient_done(ref, i))
                       for i, p in enumerate(self.params)]

    @property
    def worker_pids(self):
        return [w.pid for w in self._workers]

    # --- forward and backward -------------------------------------------------------------------
    def forward_backward(self, idx, targets, scale=1.0):
        """The mean loss over the batch (a 0-d array); its gradient times `scale` is added into the
        model's `.grad`, as `(loss * scale).backward()` would."""
        idx, targets = _ids(idx, "idx"), _ids(targets, "targets")
        if idx.ndim != 2 or targets.shape != idx.shape:
            raise ValueError(f"forward_backward takes idx and targets of one shape (B, T), got {idx.shape} "
                             f"and {targets.shape}")
        dtype = self.params[0].dtype
        N = len(idx)
        k = min(len(self._workers) + 1, N)
        cut = [N * r // k for r in range(k + 1)]                       # part r: rows cut[r] .. cut[r + 1]
        counted = (targets != IGNORE_INDEX).sum(axis=1)                 # (N,) targets that count, per row
        c = [int(counted[cut[r]:cut[r + 1]].sum()) for r in range(k)]
        if k == 1 or sum(c) == 0:          # one part, or nothing counts (the loss is nan, the gradient 0)
            return numpy.asarray(_part(self.model, idx, targets, scale), dtype=dtype)
        weights = [c_r / sum(c) for c_r in c]
        self.weights.adopt(self.params, "data")          # arrays replaced since (load_state_dict) come back
        self._calls += 1
        busy = [(worker, weights[r]) for r, worker in enumerate(self._workers[:k - 1], start=1)
                if weights[r] > 0]                 # a part without a counted target adds nothing
        losses, self._sent, asked = [], set(), []
        try:
            for j, (worker, weight) in enumerate(busy):
                seed = int(rng.host().integers(2**62)) if self.has_dropout else -1
                after = (busy[j + 1][0].number if j + 1 < len(busy) else _LAST) if self.overlap else _NO_CHAIN
                rows = slice(cut[worker.number + 1], cut[worker.number + 2])
                worker.send(_COMMAND.pack(self._calls, _FORWARD_BACKWARD, *idx[rows].shape, after, weight * scale,
                                          seed), idx[rows], targets[rows])
                asked.append(worker)
                if self.overlap:                   # from now on, each gradient completed here goes down the chain
                    self._chain = busy[0][0]
            if weights[0] > 0:
                with threads.serial():            # the other cores are the workers'
                    losses.append(weights[0] * _part(self.model, idx[:cut[1]], targets[:cut[1]], weights[0] * scale))
        finally:                                   # always, even after an error here:
            chain, self._chain = self._chain, None
            if chain is not None:                  # the end of this process's backward, down the chain
                chain.send(_COMMAND.pack(self._calls, _GRADIENT, _END, 0, 0, 0.0, 0))
            results = [worker.receive(self._calls) for worker in asked]
        self._add_up([worker for worker, _ in busy], [i for i in range(len(self.params)) if i not in self._sent])
        losses += [weight * loss for (_, weight), loss in zip(busy, results)]
        return numpy.asarray(sum(losses), dtype=dtype)

    def _send_gradient(self, i):
        """This process's backward completed parameter i's gradient: down the chain of workers with
        it, if it is in shared memory, where each worker adds its own (see _serve)."""
        if self._chain is not None and self.params[i].grad is self.grads.arrays[i]:
            self._chain.send(_COMMAND.pack(self._calls, _GRADIENT, i, 0, 0, 0.0, 0))
            self._sent.add(i)

    def _add_up(self, workers, numbers):
        """p.grad += each worker's gradient, as backward accumulates one (the first copied into
        p.grad_home), for the parameters numbered here, those that did not go down the chain."""
        for i in numbers:
            for worker in workers:
                if worker.given[i]:
                    _accumulate(self.params[i], worker.grads.arrays[i])

    # --- the optimizer's step ---------------------------------------------------------------------
    def step(self, optimizer):
        """optimizer.step(); for an AdamW over this model's parameters, each process updates its
        stretch of them (see tinyllm.optim.update_stretch)."""
        if not self._workers or not isinstance(optimizer, AdamW):
            return optimizer.step()
        updates = optimizer.updates()                       # states created and advanced here, in this process
        numbers = [self._number.get(id(data)) for data, *_ in updates]
        if None in numbers:
            return update_all(updates)                      # not all in shared memory: update them here
        m, v = self.moments
        if any(m_i is not m.arrays[i] or v_i is not v.arrays[i] for i, (_, _, m_i, v_i, _) in zip(numbers, updates)):
            self._share_moments(optimizer)                  # new states, or states loaded since
        plan = numpy.array([(i,) + hyper for i, (*_, hyper) in zip(numbers, updates)], dtype=numpy.float64)
        # the usual case: every parameter, one set of hyperparameters but for weight decay, and the
        # gradients where backward wrote them; then the blocks are updated whole, with no call per parameter
        whole = (self.whole_blocks and sorted(numbers) == list(range(len(self.params)))
                 and all(grad is self.grads.arrays[i] for i, (_, grad, *_) in zip(numbers, updates))
                 and len({hyper[:4] + hyper[5:] for *_, hyper in updates}) == 1)
        if whole:
            total = self.weights.block.size
        else:                                               # parameter by parameter, taken end to end,
            # with contiguous gradients, so that this process cuts the parameters where the workers do
            ours = [(self.weights.arrays[i], numpy.ascontiguousarray(grad), m.arrays[i], v.arrays[i], hyper)
                    for i, (_, grad, _, _, hyper) in zip(numbers, updates)]
            sizes = [data.size for data, *_ in ours]
            total = sum(sizes)
        k = len(self._workers) + 1
        cut = [total * r // k for r in range(k + 1)]        # process r updates the elements cut[r] .. cut[r + 1]
        self._calls += 1
        busy = []
        try:
            for r, worker in enumerate(self._workers, start=1):
                for n, a, b in [] if whole else stretch_pieces(sizes, cut[r], cut[r + 1]):
                    i, grad = numbers[n], ours[n][1]        # the worker's pieces of the gradients, shared
                    if grad is not self.grads.arrays[i]:    # (already, unless p.grad was replaced)
                        self.grads.arrays[i].reshape(-1)[a:b] = grad.reshape(-1)[a:b]
                worker.send(_COMMAND.pack(self._calls, _UPDATE, len(plan), cut[r], cut[r + 1], 0.0, whole), plan)
                busy.append(worker)
            with threads.serial():
                if whole:
                    self._update_whole(plan, cut[0], cut[1])
                else:
                    update_stretch(ours, cut[0], cut[1])
        finally:
            for worker in busy:                             # always, even after an error here
                worker.receive(self._calls)

    def _share_moments(self, optimizer):
        """Move the optimizer's moments of this model's parameters into shared memory (once; again
        after load_state_dict replaced them)."""
        index = 0                                           # AdamW numbers its states in group order
        for group in optimizer.param_groups:
            for p in group["params"]:
                state, i = optimizer.state.get(index), self._number.get(id(p.data))
                if state is not None and i is not None:
                    for name, block in zip(("exp_avg", "exp_avg_sq"), self.moments):
                        if state[name] is not block.arrays[i]:
                            block.arrays[i][...] = state[name]
                            state[name] = block.arrays[i]
                index += 1

    def _update_whole(self, plan, i, j):
        """AdamW on the elements i .. j of the shared blocks (weights, gradients, moments) taken whole,
        the padding between parameters included, when the plan gives every parameter the same
        hyperparameters but for weight decay. Cache-sized block by block: the decay of the decayed
        parameters' pieces of the block, then the rest of the update on the whole block, with no
        call per parameter (a baby step has 27 parameters, 9 of them of 128 numbers; its shared
        step took 1.23-1.25 ms against 1.33 parameter by parameter). The padding stays 0 (its
        gradient and moments are 0, so is its update); each element sees the same operations as
        in update_stretch, in the same order."""
        m, v = self.moments
        hyper = dict(_plan_rows(plan))
        decayed = [(start, start + array.size, 1.0 - hyper[n][0] * hyper[n][4])   # (first, end, 1 − lr·wd)
                   for n, (start, array) in enumerate(zip(self.weights.starts, self.weights.arrays)) if hyper[n][4]]
        no_decay = hyper[0][:4] + (0.0,) + hyper[0][5:]
        blocks = (self.weights.block, self.grads.block, m.block, v.block)
        first = 0                                           # the first decayed parameter not wholly before c
        for c, e in threads.blocks(i, j, UPDATE_BLOCK):    # a block at a time, so that it stays in cache:
            while first < len(decayed) and decayed[first][1] <= c:
                first += 1
            for a, b, factor in itertools.takewhile(lambda d: d[0] < e, decayed[first:]):
                self.weights.block[max(a, c):min(b, e)] *= factor   # p ← p · (1 − lr·wd) first, as AdamW does,
            update_span(blocks, c, e, no_decay)             # then the rest of the update

    def _updates(self, plan):
        """AdamW.updates() rebuilt from a plan, over this process's views of the shared arrays."""
        m, v = self.moments
        return [(self.weights.arrays[i], self.grads.arrays[i], m.arrays[i], v.arrays[i], hyper)
                for i, hyper in _plan_rows(plan)]

    # --- the workers ------------------------------------------------------------------------------
    def close(self):
        """Stop the workers (they also stop when this process ends); gradients go back to new arrays."""
        for p in self.params:
            p.grad_home = None
        for hook in getattr(self, "_hooks", ()):
            hook.remove()
        if self._workers:
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _plan_rows(plan):
    """[(parameter number, AdamW's 7 hyperparameters)] from an _UPDATE plan, as Python ints and
    floats (as AdamW's: a NumPy float64 scalar would promote float32 arrays)."""
    return [(int(row[0]), tuple(row[1:])) for row in plan.tolist()]


def _part(model, idx, targets, grad_weight):
    """The mean loss over these rows, as a float; d(grad_weight · loss)/dθ is added into the model's .grad."""
    _, loss = model(idx, targets)
    loss.backward(grad_weight)
    return float(loss.data)


def _ids(a, what):
    """Token ids as a host int64 array (from a Tensor, an array or a list)."""
    a = a.data if isinstance(a, Tensor) else a
    if not isinstance(a, (numpy.ndarray, list, tuple)):
        raise TypeError(f"data parallelism takes {what} as a NumPy integer array (CPU), got {type(a).__name__}")
    a = numpy.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{what} must hold integers, got dtype {a.dtype}")
    return a.astype(numpy.int64, copy=False)


def _shared_block(nbytes):
    """Zeroed memory that this process and the processes it forks later share (an anonymous shared
    mmap: after a fork both see the same pages, where ordinary memory would be copied on write)."""
    return mmap.mmap(-1, max(nbytes, 1))


class _SharedArrays:
    """One array per parameter shape, end to end in one shared block (each on a cache line)."""

    def __init__(self, shapes, dtype):
        align = 64 // dtype.itemsize
        sizes = [int(numpy.prod(shape)) for shape in shapes]
        starts = numpy.cumsum([0] + [-(-size // align) * align for size in sizes])
        self.block = numpy.frombuffer(_shared_block(int(starts[-1]) * dtype.itemsize), dtype=dtype)
        self.starts = [int(s) for s in starts[:-1]]
        self.arrays = [self.block[s:s + size].reshape(shape) for s, size, shape in zip(starts, sizes, shapes)]

    def adopt(self, params, attribute):
        """Copy each parameter's array in, and make the shared one its .data (or .grad)."""
        for p, shared in zip(params, self.arrays):
            current = getattr(p, attribute)
            if current is not shared:
                if not isinstance(current, numpy.ndarray) or current.shape != shared.shape:
                    raise ValueError(f"a parameter of shape {shared.shape} was given {type(current).__name__} "
                                     f"{getattr(current, 'shape', '')}: data parallelism needs host arrays of the "
                                     "shapes the model had when it started")
                shared[...] = current
                setattr(p, attribute, shared)


class _Worker:
    """One forked worker process: its number, this process's ends of its two pipes, its gradient
    arrays, and a flag per parameter in shared memory (`given`: its part gave that parameter a gradient)."""

    def __init__(self, number, pid, commands, results, grads, given):
        self.number, self.pid, self.commands, self.results = number, pid, commands, results
        self.grads, self.given = grads, given

    @classmethod
    def start(cls, data_parallel, number, grads, pipes):
        """Fork worker `number` to serve data_parallel's model, its gradients written into grads.
        pipes: every worker's ((command read, write), (result read, write)), made before any fork."""
        given = numpy.frombuffer(_shared_block(len(grads.arrays)), dtype=numpy.uint8)
        (command_read, command_write), (result_read, result_write) = pipes[number]
        for fd in (command_read, result_read):        # reads poll first (see _read)
            os.set_blocking(fd, False)
        pid = os.fork()
        if pid == 0:                                   # the worker: serve until the main process goes
            code = 1
            try:
                # it keeps its command reads and result writes, and the command writes of the workers
                # after it (it passes gradients on to them); its own command pipe then closes once the
                # main process and the workers before it have closed theirs
                later = {n: commands[1] for n, (commands, _) in enumerate(pipes) if n > number}
                keep = {command_read, result_write, *later.values()}
                for fd in {fd for commands, results in pipes for fd in commands + results} - keep:
                    os.close(fd)
                for fd in _main_ends:                  # earlier DataParallel's pipes: those must close when
                    os.close(fd)                       # the main process closes them
                signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is for the main process to handle
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # and so is SIGTERM (it saves too)
                _serve(data_parallel, grads, given, command_read, result_write, later)
                code = 0
            finally:
                os._exit(code)                         # never return into the main process's code
        return cls(number, pid, command_write, result_read, grads, given)

    def send(self, header, *arrays):
        try:
            _write(self.commands, header + b"".join(a.tobytes() for a in arrays))
        except BrokenPipeError:
            raise self._died() from None

    def receive(self, call):
        """The loss the worker sends back for this call (a float); raises the worker's error, if any."""
        while True:
            head = _read(self.results, _RESULT.size)
            if head is None:
                raise self._died()
            done, loss, failed, length = _RESULT.unpack(head)
            message = _read(self.results, length).decode("utf-8") if length else ""
            if done == call:                           # older results were left by an interrupted call
                break
        if failed:
            name, _, text = message.partition(": ")
            raise _ERRORS.get(name, RuntimeError)(f"in data-parallel worker process {self.pid}: {text or name}")
        return loss

    def _died(self):
        return RuntimeError(f"data-parallel worker process {self.pid} died (out of memory?); run on one core "
                            "(--threads 1) or cut the layers instead (--parallel layers)")


def _serve(data_parallel, grads, given, commands, results, later):
    """A worker's loop: a command in, its work done, a result out, until the command pipe closes.

    A forward-backward's result waits for the end of the main process's backward, and of the chain:
    each parameter whose gradient the main process has completed comes down it (a _GRADIENT
    command), and this worker adds its own gradient of that parameter into the main process's
    (shared) one, then passes the command on to the next worker in the chain (`later` maps each
    later worker's number to its command pipe). The end of the backward (_END) comes last.
    """
    model, params, homes = data_parallel.model, data_parallel.params, data_parallel.grads.arrays
    for p, home in zip(params, grads.arrays):          # backward writes the gradients into shared memory
        p.grad, p.grad_home = None, home               # (not on the main process's, copied by the fork)

    def forward_backward(ids, grad_weight, seed):
        try:
            if seed >= 0:
                rng.manual_seed(seed)                  # this call's dropout masks
            loss = _part(model, ids[0], ids[1], grad_weight)
        except Exception:
            given[:] = 0                               # nothing to add
            for p in params:
                p.grad = None
            raise
        for i, (p, g) in enumerate(zip(params, grads.arrays)):
            given[i] = p.grad is not None
            if p.grad is not None and p.grad is not g:   # (in g already, unless p.grad was replaced)
                numpy.copyto(g, p.grad)
            p.grad = None
        return loss

    waiting = None          # after a forward-backward: (its call, its result, the next worker's pipe or None)
    while True:
        head = _read(commands, _COMMAND.size)
        if head is None:                               # the main process closed the pipe, or ended
            return
        call, kind, a, b, c, grad_weight, seed = _COMMAND.unpack(head)
        payload = _read(commands, {_FORWARD_BACKWARD: 2 * a * b * 8, _GRADIENT: 0, _UPDATE: a * _PLAN_COLUMNS * 8}[kind])
        if payload is None:
            return
        if kind == _FORWARD_BACKWARD:                  # a rows of b positions: ids, then targets
            ids = numpy.frombuffer(payload, dtype=numpy.int64).reshape(2, a, b)
            result = _outcome(call, lambda: forward_backward(ids, grad_weight, seed))
            if c == _NO_CHAIN:
                _write(results, result)
            else:
                waiting = (call, result, later.get(c))
        elif kind == _GRADIENT:                        # the main process's gradient a is complete
            if waiting is None or waiting[0] != call:
                continue                               # left by an interrupted call
            if a != _END and given[a]:
                homes[a] += grads.arrays[a]
            if waiting[2] is not None:
                _write(waiting[2], head)
            if a == _END:                              # every gradient of this call is added
                _write(results, waiting[1])
                waiting = None
        else:                                          # the elements b .. c of the plan's a parameters
            plan = numpy.frombuffer(payload, dtype=numpy.float64).reshape(a, _PLAN_COLUMNS)
            if seed:                                   # (the flag `whole`)
                _write(results, _outcome(call, lambda: data_parallel._update_whole(plan, b, c) or 0.0))
            else:
                _write(results, _outcome(call, lambda: update_stretch(data_parallel._updates(plan), b, c) or 0.0))


def _outcome(call, work):
    """The result message of work() (which returns a loss): the loss, or the error it raised."""
    try:
        return _RESULT.pack(call, work(), 0, 0)
    except Exception as e:                             # reported to the main process, which raises it
        message = f"{type(e).__name__}: {e}".encode("utf-8")
        return _RESULT.pack(call, numpy.nan, 1, len(message)) + message


def _gradient_done(ref, i):
    """Parameter i's post-accumulate-grad hook in the main process: tell the DataParallel (if any still)."""
    data_parallel = ref()
    if data_parallel is not None:
        data_parallel._send_gradient(i)


def _read(fd, n):
    """Exactly n bytes from a pipe's non-blocking read end, or None when it closed first. Asks
    again and again for POLL_SECONDS, then sleeps until the pipe has something."""
    chunks, deadline = [], None
    while n:
        try:
            chunk = os.read(fd, n)
        except BlockingIOError:                        # nothing there yet
            now = time.perf_counter()
            deadline = deadline or now + POLL_SECONDS
            if now > deadline:
                select.select([fd], [], [])
            continue
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _write(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _stop(workers):
    """Close the pipes (each worker then ends) and wait for the workers."""
    for worker in workers:
        for fd in (worker.commands, worker.results):
            os.close(fd)
            _main_ends.discard(fd)
    for worker in workers:
        try:
            os.waitpid(worker.pid, 0)
        except ChildProcessError:                      # already reaped
            pass
    workers.clear()
