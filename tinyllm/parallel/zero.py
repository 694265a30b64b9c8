"""ZeRO stage 1: AdamW's state cut over the processes.

Plain data parallelism keeps, in every process, the weights, the gradients and AdamW's two moments
of every parameter: 16 bytes a parameter in float32, of which the moments are 8. AdamW's update is
elementwise, so nothing forces each process to update every element. Under ZeRO-1 (Rajbhandari et
al., 2020) each bucket of gradients is cut into N equal chunks (tinyllm.parallel.DataParallel with
zero=True):

    reduce-scatter   process r receives chunk r of the bucket's sum over the processes
    update           process r runs AdamW on chunk r alone: it keeps the moments of 1/N of the elements
    allgather        every process receives every updated chunk: the whole weights again

A reduce-scatter and an allgather move the same bytes as one allreduce (which is often built of
them), so the traffic is unchanged; what is saved is (N − 1)/N of the moments in each process, and
(N − 1)/N of the update's arithmetic. The update of an element is the very operations AdamW does on
it, so the weights equal plain data parallelism's for the same summed gradients.

ZeroAdamW wraps the model's AdamW (its param_groups are the ones a schedule sets the learning rate
on) and runs a plain AdamW over "pieces": for each parameter the part of it inside this process's
chunk of its bucket, a flat view of the bucket's weights with the matching piece of the summed
gradient. Its state_dict() gathers the moments back into AdamW's own layout, so a checkpoint is the
same whether it was written with ZeRO or not, with any number of processes.
"""
from tinyllm.optim import AdamW
from tinyllm.parallel.comm import wait_all

__all__ = ["ZeroAdamW"]


class _Piece:
    """The part of one parameter that this process updates: flat views of the weights and of the
    summed gradient. (What AdamW needs of a parameter: .data and .grad.)"""

    __slots__ = ("data", "grad", "number", "start", "stop", "chunk")

    def __init__(self, data, chunk, number, start, stop):
        self.data, self.chunk, self.grad = data, chunk, None
        self.number, self.start, self.stop = number, start, stop   # parameter number, its elements start .. stop


class ZeroAdamW:
    """optimizer (the model's AdamW) with its state cut over engine's processes; engine is a
    DataParallel made with zero=True. step(), zero_grad(), state_dict(), load_state_dict() and
    param_groups as AdamW's."""

    def __init__(self, optimizer, engine):
        if not isinstance(optimizer, AdamW):
            raise TypeError(f"ZeRO-1 shards AdamW's state, got {type(optimizer).__name__}")
        if not engine.zero:
            raise ValueError("ZeroAdamW needs a DataParallel made with zero=True (its gradients reduce-scattered)")
        self.optimizer, self.engine = optimizer, engine
        self.param_groups = optimizer.param_groups
        number = {id(p): i for i, p in enumerate(engine.params)}
        # parameter number -> its group's position; AdamW's state index (its parameters in group order)
        # -> parameter number
        self.group_of, self.numbers = {}, []
        for g, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if id(p) not in number:
                    raise ValueError("the optimizer holds a parameter that the model does not")
                self.group_of[number[id(p)]] = g
                self.numbers.append(number[id(p)])
        self.steps = {}                                # parameter number -> AdamW steps taken
        self.pieces = []
        for bucket in engine.buckets:
            for i, off, size in bucket.members:
                a, b = max(off, bucket.lo), min(off + size, bucket.hi)   # its elements inside this chunk
                if a < b and i in self.group_of:
                    self.pieces.append(_Piece(bucket.weights[a:b], bucket.chunk[a - bucket.lo:b - bucket.lo],
                                              i, a - off, b - off))
        groups = [{"params": [q for q in self.pieces if self.group_of[q.number] == g]}
                  for g in range(len(self.param_groups))]
        self._inner_groups = [g for g, group in enumerate(groups) if group["params"]]
        self.inner = AdamW([groups[g] for g in self._inner_groups], **_hyper(optimizer.defaults)) \
            if self._inner_groups else None

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)

    def step(self):
        """Update this process's chunk of every bucket, then gather the weights everywhere."""
        engine = self.engine
        engine._adopt_weights()                       # parameters loaded since are copied into the buckets
        for i in range(len(engine.params)):
            if engine.given[i] and i in self.group_of:
                self.steps[i] = self.steps.get(i, 0) + 1
        if self.inner is not None:
            for inner, g in zip(self.inner.param_groups, self._inner_groups):
                inner.update(_hyper(self.param_groups[g]))            # the schedule's learning rate, ...
            for q in self.pieces:
                q.grad = q.chunk if engine.given[q.number] else None  # no gradient anywhere: skipped, as AdamW does
            self.inner.step()
        wait_all([engine.comm.allgather(bucket.weights, now=not engine.overlap) for bucket in engine.buckets])

    def state_dict(self):
        """AdamW.state_dict() of the whole model, the moments gathered from every process (a
        collective: every process calls it; each gets the whole state)."""
        engine, xp = self.engine, self.engine.xp
        gathered = {}
        for name in ("exp_avg", "exp_avg_sq"):
            flats = [xp.zeros(bucket.numel, dtype=engine.dtype) for bucket in engine.buckets]
            if self.inner is not None:
                for index, q in enumerate(self.inner_pieces()):
                    state = self.inner.state.get(index)
                    if state is not None:
                        bucket, off, _ = engine.place[q.number]
                        flats[bucket.index][off + q.start:off + q.stop] = state[name]
            wait_all([engine.comm.allgather(flat) for flat in flats])
            for i, p in enumerate(engine.params):
                bucket, off, size = engine.place[i]
                gathered.setdefault(i, {})[name] = flats[bucket.index][off:off + size].reshape(p.shape).copy()
        full = self.optimizer.state_dict()            # its param_groups (its own state stays empty)
        full["state"] = {k: {"step": self.steps[i], **gathered[i]} for k, i in enumerate(self.numbers)
                         if i in self.steps}
        return full

    def load_state_dict(self, state_dict):
        """AdamW.load_state_dict() of the whole model's state; each process keeps its pieces."""
        self.optimizer.load_state_dict(state_dict)    # checks it, sets the groups' hyperparameters
        by_number = {i: self.optimizer.state.get(k) for k, i in enumerate(self.numbers)}
        self.optimizer.state = {}                     # the whole moments are not kept here
        self.steps = {i: s["step"] for i, s in by_number.items() if s is not None}
        if self.inner is None:
            return
        self.inner.state = {}
        for index, q in enumerate(self.inner_pieces()):
            state = by_number.get(q.number)
            if state is not None:
                self.inner.state[index] = {"step": state["step"],
                                           **{name: state[name].reshape(-1)[q.start:q.stop].copy()
                                              for name in ("exp_avg", "exp_avg_sq")}}

    def inner_pieces(self):
        """The pieces in the order the inner AdamW numbers its state."""
        return [q for group in (self.inner.param_groups if self.inner else []) for q in group["params"]]


def _hyper(group):
    return {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}
