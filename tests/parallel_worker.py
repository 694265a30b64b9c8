"""Checks that run inside an MPI job (tests/test_parallel.py starts it with mpiexec):

    mpiexec -n N python tests/parallel_worker.py SCENARIO OUT_DIR

Each process writes OUT_DIR/rank<r>.json: {check name: "ok" or what went wrong}; one job runs many
checks, since starting one costs about a second. Scenarios:
- checks DATA ROOT: the communicator's collectives (the contract; with `--backend nccl`, on GPUs,
  only these), then DataParallel and ZeroAdamW against one process computing the whole batch,
  then `tinyllm train` in every process: runs, bit-exact resumes, ZeRO-1, and no process but
  rank 0 writes anything under ROOT;
- die: rank 1 fails at its third step in the way argv[3] says (raise, kill, hang, or an error in
  the trainer): the test looks at how the job ends.
"""
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tinyllm as tl  # noqa: E402
from tinyllm.optim import clip_grad_norm_  # noqa: E402
from tinyllm.parallel import DataParallel, ZeroAdamW, init  # noqa: E402

RESULTS = {}
COMM = None


def check(name):
    """Run a check now and record its outcome. A failed check ends the job at once (its
    processes would no longer call the same collectives in the same order), with the traceback."""
    def run(f):
        try:
            f()
            RESULTS[name] = "ok"
        except Exception:
            RESULTS[name] = traceback.format_exc(limit=6)
            COMM.abort(f"check {name!r} failed:\n{RESULTS[name]}")
        return f
    return run


def gpt(dtype="float64", dropout=0.0, device="cpu"):
    tl.manual_seed(0)
    config = tl.GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, bias=True,
                          dropout=dropout)
    model = tl.GPT(config)
    for p in model.parameters():
        p.data = p.data.astype(dtype)
    return model.to(device) if device != "cpu" else model


def batch(rows, seed=1, ignore=()):
    ids = np.random.default_rng(seed).integers(0, 11, (rows, 9))
    x, y = ids[:, :-1], ids[:, 1:].copy()
    for r, upto in ignore:
        y[r, :upto] = -100
    return x, y


def one_process(x, y, steps, clip, accumulate=1):
    """The reference: one process, the whole batch (split into `accumulate` micro-batches)."""
    model = gpt()
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95))
    losses, norms = [], []
    for _ in range(steps):
        total = 0.0
        for part in np.array_split(np.arange(len(x)), accumulate):
            _, loss = model(x[part], y[part])
            (loss * (1.0 / accumulate)).backward()
            total += loss.item()
        losses.append(total)
        norms.append(clip_grad_norm_(model.parameters(), clip))
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer, losses, norms


def data_parallel(comm, x, y, steps, clip, zero=False, accumulate=1, bucket_bytes=3000):
    model = gpt()
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95))
    engine = DataParallel(model, comm, bucket_bytes=bucket_bytes, zero=zero)
    if zero:
        optimizer = ZeroAdamW(optimizer, engine)
    losses, norms = [], []
    for _ in range(steps):
        parts = np.array_split(np.arange(len(x)), accumulate)
        for k, part in enumerate(parts):
            loss = engine.forward_backward(x[part], y[part], scale=1.0 / accumulate, sync=k == len(parts) - 1)
        losses.append(float(loss))
        norms.append(engine.clip_grad_norm_(clip))
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer, engine, losses, norms


def close(a, b, rtol=1e-10, atol=1e-13, what=""):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, err_msg=what)


def same_as_one_process(comm, rows, ignore=(), zero=False, accumulate=1, steps=3):
    x, y = batch(rows, ignore=ignore)
    ref, ref_opt, ref_losses, ref_norms = one_process(x, y, steps, 0.5, accumulate)
    model, opt, engine, losses, norms = data_parallel(comm, x, y, steps, 0.5, zero, accumulate)
    close(losses, ref_losses, rtol=1e-12, what="losses")
    close(norms, ref_norms, rtol=1e-12, what="gradient norms")
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        close(q.data, p.data, what=name)
    state, ref_state = opt.state_dict(), ref_opt.state_dict()
    assert sorted(state["state"]) == sorted(ref_state["state"])
    for k, entry in ref_state["state"].items():
        assert state["state"][k]["step"] == entry["step"] == steps
        for name in ("exp_avg", "exp_avg_sq"):
            close(state["state"][k][name], entry[name], rtol=1e-9, atol=1e-15, what=f"{name} {k}")
    assert state["param_groups"] == ref_state["param_groups"]
    identical_everywhere(comm, model)
    engine.close()


def identical_everywhere(comm, model):
    """Every process holds bit for bit rank 0's weights (the replicas never drift apart)."""
    for name, p in model.named_parameters():
        theirs = p.data.copy()
        comm.broadcast(theirs, root=0)
        assert np.array_equal(theirs, p.data), f"{name} differs from rank 0's on rank {comm.rank}"


# ------------------------------------------------------------------------------------- scenarios

def contract(comm, xp):
    n, r = comm.size, comm.rank

    @check("allreduce")
    def _():
        a = xp.arange(7, dtype=xp.float32) * (r + 1)
        comm.allreduce(a).wait()
        close(tl.backend.to_numpy(a), np.arange(7) * n * (n + 1) / 2, rtol=0)

    @check("reduce_scatter")
    def _():
        a = xp.arange(3 * n, dtype=xp.float64) + r
        out = xp.zeros(3, dtype=xp.float64)
        comm.reduce_scatter(a, out).wait()
        close(tl.backend.to_numpy(out), np.arange(3 * r, 3 * r + 3) * n + n * (n - 1) / 2, rtol=0)

    @check("allgather")
    def _():
        a = xp.full(2 * n, -1.0, dtype=xp.float32)
        a[2 * r:2 * r + 2] = r
        comm.allgather(a).wait()
        close(tl.backend.to_numpy(a), np.repeat(np.arange(n), 2), rtol=0)

    @check("several at once, waited in any order")
    def _():
        arrays = [xp.full(5 + k, float(r + k), dtype=xp.float32) for k in range(4)]
        works = [comm.allreduce(a) for a in arrays]
        for w in reversed(works):
            w.wait()
        for k, a in enumerate(arrays):
            close(tl.backend.to_numpy(a), np.full(5 + k, n * k + n * (n - 1) / 2), rtol=0)

    @check("broadcast")
    def _():
        a = xp.full(4, float(r), dtype=xp.float32)
        comm.broadcast(a, root=n - 1)
        close(tl.backend.to_numpy(a), np.full(4, n - 1.0), rtol=0)

    @check("host messages")
    def _():
        assert comm.broadcast_bytes("é json".encode() if r == 0 else b"") == "é json".encode()
        assert comm.host_sum(np.array([r, 1], dtype=np.int64)).tolist() == [n * (n - 1) // 2, n]
        assert comm.any(r == n - 1) and not comm.any(False)
        comm.barrier()
        assert 0 <= comm.local_rank < comm.local_size <= n

    @check("wrong arrays are refused")
    def _():
        for bad in (np.zeros(3, np.float32) if xp is not np else [0.0], xp.zeros((4, 2), np.float32)[:, 0]):
            try:
                comm.allreduce(bad)
            except (TypeError, ValueError):
                continue
            raise AssertionError(f"allreduce took {type(bad).__name__}")


def engine(comm):
    n = comm.size

    @check("losses and weights as one process")
    def _():
        same_as_one_process(comm, rows=5, ignore=[(0, 3)])

    @check("a process whose rows count no target")
    def _():
        same_as_one_process(comm, rows=5, ignore=[(0, 8), (1, 8)], steps=2)

    @check("fewer rows than processes")
    def _():
        same_as_one_process(comm, rows=n - 1, steps=2)

    @check("no target counts anywhere: nan, as one process")
    def _():
        x, y = batch(3, ignore=[(0, 8), (1, 8), (2, 8)])
        engine = DataParallel(gpt(), comm)
        assert np.isnan(float(engine.forward_backward(x, y)))

    @check("gradient accumulation")
    def _():
        same_as_one_process(comm, rows=6, accumulate=2, steps=2)

    @check("zero-1 as one process")
    def _():
        same_as_one_process(comm, rows=5, ignore=[(1, 2)], zero=True)

    @check("zero-1 checkpoint round trip")
    def _():
        x, y = batch(4)
        a, a_opt, _, _, _ = data_parallel(comm, x, y, steps=4, clip=1.0, zero=True)
        b, b_opt, b_engine, _, _ = data_parallel(comm, x, y, steps=2, clip=1.0, zero=True)
        c = gpt()
        c.load_state_dict(b.state_dict())
        c_opt = c.configure_optimizers(0.1, 1e-2, (0.9, 0.95))
        c_engine = DataParallel(c, comm, bucket_bytes=1000, zero=True)   # other buckets: other pieces
        c_opt = ZeroAdamW(c_opt, c_engine)
        c_opt.load_state_dict(b_opt.state_dict())
        for _ in range(2):
            c_engine.forward_backward(x, y)
            c_engine.clip_grad_norm_(1.0)
            c_opt.step()
            c_opt.zero_grad()
        for (name, p), q in zip(a.named_parameters(), c.parameters()):
            assert np.array_equal(p.data, q.data), name

    @check("dropout: repeatable, each process its own masks")
    def _():
        x, y = batch(4)
        runs = []
        for _ in range(2):
            model = gpt(dropout=0.5)
            engine = DataParallel(model, comm)
            tl.manual_seed(7)
            losses = []
            for _ in range(2):
                losses.append(float(engine.forward_backward(x, y)))
                model.zero_grad()
            runs.append(losses)
            engine.close()
        assert runs[0] == runs[1], runs
        ref = gpt(dropout=0.0)
        _, loss = ref(x, y)
        assert runs[0][0] != loss.item()       # dropout did act

    @check("the gradients of a synchronised step must be zeroed")
    def _():
        x, y = batch(4)
        model = gpt()
        engine = DataParallel(model, comm)
        engine.forward_backward(x, y)
        try:
            engine.forward_backward(x, y)
        except RuntimeError as e:
            assert "zero them" in str(e)
        else:
            raise AssertionError("no error")

    @check("float32 model")
    def _():
        x, y = batch(6)
        model = gpt(dtype="float32")
        engine = DataParallel(model, comm)
        loss = engine.forward_backward(x, y)
        _, ref = gpt(dtype="float32")(x, y)
        assert loss.dtype == np.float32 and abs(float(loss) - ref.item()) < 1e-5


TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "5",
        "--eval-iters", "2", "--log-interval", "1", "--sample-tokens", "0", "--warmup-iters", "2"]


def train(data, out, *args):
    from tinyllm.train import main as train_main
    return train_main(["--data", str(data), "--out", str(out), *TINY, *args])


def files(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(Path(directory).rglob("*"))
            if p.is_file()}


def writes_under(root):
    """Record every write this process makes under root (an audit hook: opens for writing, mkdir,
    rename, remove, copy): the list it returns fills as they happen."""
    root, seen = str(root), []
    names = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.unlink", "shutil.copyfile",
             "shutil.rmtree", "os.truncate", "os.symlink", "os.link", "os.utime", "os.chmod"}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event, args):
        if event == "open":
            path, mode, flags = (list(args) + [None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (isinstance(flags, int) and flags & write_flags)
            if writing and str(path).startswith(root):
                seen.append((event, str(path)))
        elif event in names and any(str(a).startswith(root) for a in args if isinstance(a, (str, Path))):
            seen.append((event, str(args[0])))
    sys.addaudithook(hook)
    return seen


def trainer(comm, data, root):
    """`tinyllm train` in every process of this job, several runs one after the other."""
    root = Path(root)
    seen = writes_under(root) if comm.rank != 0 else []
    common = ["--max-iters", "6", "--lr-decay-iters", "6", "--eval-interval", "3", "--grad-accum", "2",
              "--dropout", "0.1"]
    first = ["--max-iters", "3"] + common[2:]

    @check("trainer: runs")
    def _():
        assert train(data, root / "straight", *common) == 0
        assert train(data, root / "plain", "--max-iters", "4", "--eval-interval", "2") == 0

    @check("trainer: resume is bit-exact")
    def _():
        assert train(data, root / "resumed", *first) == 0
        assert train(data, root / "resumed", *common, "--resume") == 0
        if comm.rank == 0:
            a, b = files(root / "straight" / "ckpt"), files(root / "resumed" / "ckpt")
            assert a.keys() == b.keys()
            for name in ("model.safetensors", "optimizer.safetensors"):
                assert a[name] == b[name], name

    @check("trainer: zero-1, its resume bit-exact, close to plain data parallelism")
    def _():
        assert train(data, root / "zero", *common, "--zero", "true") == 0
        assert train(data, root / "zero-resumed", *first, "--zero", "true") == 0
        assert train(data, root / "zero-resumed", *common, "--zero", "true", "--resume") == 0
        if comm.rank == 0:
            from tinyllm.safetensors_io import load_file
            a, b = files(root / "zero" / "ckpt"), files(root / "zero-resumed" / "ckpt")
            for name in ("model.safetensors", "optimizer.safetensors"):
                assert a[name] == b[name], name
            plain = load_file(root / "straight" / "ckpt" / "model.safetensors")
            zero = load_file(root / "zero" / "ckpt" / "model.safetensors")
            for key in plain:
                np.testing.assert_allclose(zero[key], plain[key], rtol=1e-4, atol=1e-6, err_msg=key)

    @check("trainer: only rank 0 writes")
    def _():
        assert seen == [], seen[:5]


def die(comm, how):
    """Rank 1 fails at its third step; the others go on into the collectives."""
    if how == "trainer":
        from tinyllm import train as training
        step = training.Trainer.train_step
        calls = []

        def failing(self):
            calls.append(1)
            if comm.rank == 1 and len(calls) == 3:
                raise ValueError("a deliberate error in rank 1's trainer")
            return step(self)
        training.Trainer.train_step = failing
        train(sys.argv[4], Path(sys.argv[5]) / "run", "--max-iters", "50", "--eval-interval", "50")
        return
    x, y = batch(4)
    model = gpt()
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95))
    engine = DataParallel(model, comm)
    # the short wait that the hang test wants, only once every process is up (a slow start on a
    # loaded machine is no hang)
    comm.timeout = float(os.environ.get("DIE_TIMEOUT", comm.timeout))
    for step in range(100):
        if comm.rank == 1 and step == 3:
            if how == "raise":
                raise RuntimeError("a deliberate failure on rank 1")
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "hang":
                time.sleep(120)
        engine.forward_backward(x, y)
        optimizer.step()
        optimizer.zero_grad()
        time.sleep(0.01)


def main():
    scenario, out = sys.argv[1], Path(sys.argv[2])
    backend = "mpi"
    if "--backend" in sys.argv:
        backend = sys.argv[sys.argv.index("--backend") + 1]
    if backend == "nccl":
        import cupy
        from tinyllm.parallel.mpi import MPICommunicator
        from tinyllm.parallel.nccl import NCCLCommunicator
        comm, xp = NCCLCommunicator(MPICommunicator()), cupy
    else:
        comm, xp = init(), np
    global COMM
    COMM = comm
    if scenario == "checks":
        contract(comm, xp)
        if backend == "mpi":
            engine(comm)
            trainer(comm, sys.argv[3], sys.argv[4])
    elif scenario == "die":
        try:
            die(comm, sys.argv[3])
        except Exception as e:
            comm.abort(f"{type(e).__name__}: {e}")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{comm.rank}.json").write_text(json.dumps(RESULTS))


if __name__ == "__main__":
    main()
