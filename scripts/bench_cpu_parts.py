"""The measurements behind the CPU choices of issue 7, each against the alternative it replaced.

    python scripts/bench_cpu_parts.py            # about a minute on 2 cores
    python scripts/bench_cpu_parts.py 2 9        # parts 2 and 9 only

1. Threads: GELU right after a matrix product, on 1 or 2 threads, with NumPy's BLAS left threaded
   (its idle worker spins) and with BLAS on one thread and the product cut by tinyllm.threads.
2. GELU backward: the textbook order (16 passes) and the 14-pass order recomputing tanh (written out
   here as the peers) against F.GELU's, which keeps s = 1 + tanh(u) from forward; and GELU forward
   and backward in cache-sized blocks (F.ELEMENTWISE_BLOCK) against whole arrays.
3. Causal attention, forward + backward, in one query block against two (the default from T = 128).
4. Two frameworks in one process: "baby" steps of tinyllm and PyTorch alternated one by one, with
   no rest and with 0.2 s of rest before each step (needs torch; tinyllm on one thread, BLAS on 2).
5. The softmax shift of attention: the textbook per-row max against F._exp_rows on scores computed
   against centred keys (the row mean as the shift), "baby" and "char" shapes.
6. Short rows: sums and dot products over the last axis (.sum, einsum, F._sum_last's matrix-vector
   product, F._dot_last's vecdot), on the shapes of the "baby" step; and attention's small products
   with a transposed right operand: a transposed view (NT) against a transposed copy (NN), for the
   scores against centred keys and for backward's gy vᵀ, on one process's rows of "baby" and
   "char" (F.MAX_TRANSPOSED_COPY picks between them by size).
7. The "baby" layers one at a time, forward + backward, tinyllm against PyTorch (needs torch; both
   on the machine's cores as scripts/bench_cpu.py runs them: tinyllm's elementwise work on one,
   BLAS and PyTorch on all), and GELU's forward on arrays fresh in cache or not.
8. Handing an add to a second thread (tinyllm.threads) against doing it on one; layer norm's
   backward in row blocks (F.ELEMENTWISE_BLOCK) against all rows at once; AdamW's update in blocks
   of optim.UPDATE_BLOCK elements against whole parameters; "baby" and "char".
9. The "baby" step with the batch cut over two processes (tinyllm.data_parallel), phase by phase:
   this process's rows, then the wait for the worker and the adding of its gradients, with the
   worker adding them during this process's backward (DataParallel's overlap) or this process
   after it; AdamW shared out over both processes (the shared blocks updated whole, or parameter by
   parameter) against AdamW in this process; and one process alone on half the batch.
10. A pipe's round trip to a process that waited 0.5 or 2 ms for it: asleep in a blocking read,
   against polling first (tinyllm.data_parallel.POLL_SECONDS).
11. The fixed cost of a step (Python and NumPy calls): "baby" shrunk to a few numbers per array,
   forward and backward, on one thread and as the main process of data parallelism runs it, with
   threads.matmul's plain product inside serial() against the one-part parallel_for it replaced,
   and PyTorch's on one thread (needs torch).
Shapes are those of the "char" config of scripts/bench_cpu.py: B=8, T=256, C=384, 6 heads.
Parts 1-3 and 5-7 report the best of several runs (ms; µs in parts 6 and 7), since they measure code, not the machine's noise;
part 4 reports medians.
"""
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tinyllm.nn.functional as F  # noqa: E402
from tinyllm import backend, threads  # noqa: E402

B, T, C, H = 8, 256, 384, 6


def best_ms(fn, repeat=20):
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def gelu_into(x, out):
    F._gelu_forward(out, x, np.empty_like(x))


def part_threads():
    r = np.random.default_rng(0)
    x = r.standard_normal((B * T, C)).astype(np.float32)
    w = r.standard_normal((C, 4 * C)).astype(np.float32)
    h = r.standard_normal((B * T, 4 * C)).astype(np.float32)
    out = np.empty_like(h)
    half = len(h) // 2
    pool = ThreadPoolExecutor(1)

    def gelu_two_threads():
        later = pool.submit(gelu_into, h[half:], out[half:])
        gelu_into(h[:half], out[:half])
        later.result()

    print("## 1. threads: a (2048, 384) x (384, 1536) product, then GELU on (2048, 1536)")
    product = best_ms(lambda: x @ w)
    one = best_ms(lambda: (x @ w, gelu_into(h, out))) - product
    two = best_ms(lambda: (x @ w, gelu_two_threads())) - product
    print(f"BLAS on its own threads: product {product:.2f} ms; GELU after it: 1 thread {one:.2f} ms, "
          f"2 threads {two:.2f} ms")
    if threads.set_num_threads(2) == 2:
        split = best_ms(lambda: threads.matmul(x, w))
        gelu1 = best_ms(lambda: gelu_into(h, out))
        gelu2 = best_ms(lambda: threads.parallel_for(len(h), lambda i, j: gelu_into(h[i:j], out[i:j])))
        print(f"BLAS on 1 thread, tinyllm.threads on 2: product cut in two {split:.2f} ms; "
              f"GELU 1 thread {gelu1:.2f} ms, cut over 2 {gelu2:.2f} ms")
        threads.set_num_threads(1)
    else:
        print("no control over NumPy's BLAS threads here: tinyllm.threads stays at 1")
    pool.shutdown()
    print()


def gelu_backward_textbook(x, gy):
    """dy/dx = 0.5·(1 + th) + 0.5·x·(1 − th²)·du/dx, in the order the formula reads (16 passes)."""
    k, a = F._GELU_K, F._GELU_A
    th = x * x
    th *= k * a
    th += k
    th *= x
    np.tanh(th, out=th)
    d = x * x
    d *= 1.5 * k * a
    d += 0.5 * k
    d *= x
    t = th * th
    np.subtract(1.0, t, out=t)
    d *= t
    th *= 0.5
    d += th
    d += 0.5
    d *= gy
    return d


def gelu_backward_recomputed(x, gy):
    """The same, in 14 passes, tanh(u) recomputed from x (F.GELU before it kept s = 1 + tanh u)."""
    k, a = F._GELU_K, F._GELU_A
    p = x * x
    s = p * (k * a)
    s += k
    s *= x
    np.tanh(s, out=s)
    s += 1.0
    p *= 1.5 * k * a
    p += 0.5 * k
    p *= x
    p *= np.subtract(2.0, s)
    p += 0.5
    p *= s
    p *= gy
    return p


def part_gelu_backward():
    r = np.random.default_rng(1)
    for shape in [(B, T, 4 * C), (12, 64, 512)]:   # "char" and "baby"
        x = r.standard_normal(shape).astype(np.float32)
        gy = r.standard_normal(x.shape).astype(np.float32)
        op = F.GELU()
        op.forward(x)
        diff = max(np.abs(op.backward(gy) - peer(x, gy)).max() for peer in (gelu_backward_textbook,
                                                                             gelu_backward_recomputed))
        print(f"## 2. GELU backward on {shape}, one thread")
        print(f"textbook order {best_ms(lambda: gelu_backward_textbook(x, gy)):.2f} ms, "
              f"14 passes recomputing tanh {best_ms(lambda: gelu_backward_recomputed(x, gy)):.2f} ms, "
              f"F.GELU (9 passes, s kept from forward) {best_ms(lambda: op.backward(gy)):.2f} ms "
              f"(largest difference {diff:.1e})")
    # in blocks of F.ELEMENTWISE_BLOCK elements or whole, on one process's rows when two share a batch
    for shape in [(B // 2, T, 4 * C), (6, 64, 512)]:
        x = r.standard_normal(shape).astype(np.float32)
        gy = r.standard_normal(x.shape).astype(np.float32)
        block, row = F.ELEMENTWISE_BLOCK, []
        for size in (x.size, block):
            F.ELEMENTWISE_BLOCK = size
            op = F.GELU()
            row += [best_ms(lambda: op.forward(x)), best_ms(lambda: op.backward(gy))]
        F.ELEMENTWISE_BLOCK = block
        print(f"GELU on {shape}, forward and backward: whole {row[0]:.2f} and {row[1]:.2f} ms, in blocks of "
              f"{block} elements {row[2]:.2f} and {row[3]:.2f} ms")
    print()


def part_attention():
    r = np.random.default_rng(2)
    q, k, v, gy = (r.standard_normal((B, H, T, C // H)).astype(np.float32) for _ in range(4))

    def forward_backward(split_min):
        op = F.ScaledDotProductAttention(causal=True, split_min=split_min)
        op.needs_input_grad = (True, True, True)
        op.forward(q, k, v)
        op.backward(gy)

    print("## 3. causal attention, forward + backward, (8, 6, 256, 64), one thread")
    print(f"one query block {best_ms(lambda: forward_backward(T + 1), 10):.2f} ms, "
          f"two blocks {best_ms(lambda: forward_backward(F.SPLIT_MIN_QUERIES), 10):.2f} ms")
    print()


def softmax_textbook(P, scores, mask):
    """The causal softmax of attention as the textbook writes it: scores, mask, per-row max, exp, sum."""
    scores(P)
    P += mask
    P -= P.max(axis=-1, keepdims=True)
    np.exp(P, out=P)
    P /= P.sum(axis=-1, keepdims=True)


def softmax_centred(P, qs, k, mask):
    """As F.ScaledDotProductAttention does it: scores against centred keys, then F._exp_rows."""
    kcT = F._centred_keys_transposed(k, 1.0)                 # (q and k come scaled already)
    _, Z = F._exp_rows(P, lambda out: np.matmul(qs, kcT, out=out), mask)
    P *= 1.0 / Z


def part_softmax_shift():
    r = np.random.default_rng(3)
    for b, h, t, d in [(12, 4, 64, 32), (B, H, T, C // H)]:   # "baby" and "char"
        q, k = (r.standard_normal((b, h, t, d)).astype(np.float32) / d ** 0.25 for _ in range(2))
        mask = F._causal_bias(np, t, t, np.float32)
        P1, P2 = np.empty((b, h, t, t), np.float32), np.empty((b, h, t, t), np.float32)
        textbook = best_ms(lambda: softmax_textbook(P1, lambda out: np.matmul(q, k.swapaxes(-1, -2), out=out), mask))
        centred = best_ms(lambda: softmax_centred(P2, q, k, mask))
        print(f"## 5. attention scores + causal softmax, {(b, h, t, d)}, one thread")
        print(f"textbook (per-row max) {textbook:.2f} ms, centred keys + _exp_rows {centred:.2f} ms "
              f"(largest difference {np.abs(P1 - P2).max():.1e})")
    print()


def best_us(fn, inner=200, repeat=7):
    """Best mean time of `inner` back-to-back calls, in microseconds (for ops of a few µs)."""
    return best_ms(lambda: [fn() for _ in range(inner)], repeat) * 1e3 / inner


def part_short_rows():
    r = np.random.default_rng(4)
    print("## 6. short rows, one thread (µs per call)")
    for name, shape in [("layer norm rows", (12, 64, 128)), ("attention scores", (12, 4, 64, 64)),
                        ("logits", (768, 65))]:
        a, b = (r.standard_normal(shape).astype(np.float32) for _ in range(2))
        sums = {".sum(-1)": lambda: a.sum(axis=-1), "einsum": lambda: np.einsum("...c->...", a),
                "F._sum_last (a @ ones)": lambda: F._sum_last(a)}
        dots = {"einsum": lambda: np.einsum("...c,...c->...", a, b), "F._dot_last": lambda: F._dot_last(a, b)}
        print(f"{name} {shape}: sum " + ", ".join(f"{k} {best_us(f):.1f}" for k, f in sums.items())
              + "; dot " + ", ".join(f"{k} {best_us(f):.1f}" for k, f in dots.items()))
    # attention's products with a transposed right operand, on the shapes of one process's rows when
    # two processes share a batch: "baby" (6 sequences) and "char" (4)
    for b_, t, h, d in [(6, 64, 4, 32), (4, 256, 6, 64)]:
        qkv = r.standard_normal((b_, t, 3 * h * d)).astype(np.float32)
        q, k, v = (qkv[..., i * h * d:(i + 1) * h * d].reshape(b_, t, h, d).transpose(0, 2, 1, 3) for i in range(3))
        qs = q                                                  # as attention takes it: a view of packed rows
        scores = np.empty((b_, h, t, t), np.float32)

        def centred_keys_like_k():                              # the centred keys laid out like k (packed rows)
            k_mean = F._mean_last(k.swapaxes(-1, -2)).swapaxes(-1, -2)
            return np.subtract(k, k_mean, out=np.empty_like(k))

        def centred_keys_transposed():                          # ... written straight into a transposed array
            kT = k.swapaxes(-1, -2)
            return np.subtract(kT, F._mean_last(kT), out=np.empty(kT.shape, np.float32))

        ways = {"k laid out like its rows, transposed view (NT)":
                lambda: np.matmul(qs, centred_keys_like_k().swapaxes(-1, -2), out=scores),
                "centred into a transposed copy (NN)": lambda: np.matmul(qs, centred_keys_transposed(), out=scores)}
        print(f"attention scores against centred keys {k.shape} (F: {'NN' if t * d <= F.MAX_TRANSPOSED_COPY else 'NT'}): "
              + ", ".join(f"{name} {best_us(f, 50):.1f}" for name, f in ways.items()))
        gy = r.standard_normal((b_, t, h, d)).astype(np.float32).transpose(0, 2, 1, 3)   # a view of (B, T, C) rows
        ways = {"transposed view of v (NT)": lambda: np.matmul(gy, v.swapaxes(-1, -2), out=scores),
                "transposed copy of v (NN)": lambda: np.matmul(gy, np.ascontiguousarray(v.swapaxes(-1, -2)), out=scores)}
        print(f"attention backward gy vᵀ {v.shape}: "
              + ", ".join(f"{name} {best_us(f, 50):.1f}" for name, f in ways.items()))
    print()


def part_handovers_and_adamw():
    from tinyllm import optim
    print("## 8. hand-overs to a thread; layer norm backward and AdamW in cache-sized blocks")
    for size in (1 << 16, 1 << 18, 1 << 20):
        a, b = np.ones(size, np.float32), np.ones(size, np.float32)
        row = []
        for n in (1, 2):
            threads.set_num_threads(n)
            times = []
            for i in range(100):                                # one call now and then, as in a step
                if i % 10 == 0:
                    time.sleep(0.01)
                t0 = time.perf_counter()
                threads.parallel_for(size, lambda i, j: np.add(a[i:j], b[i:j], out=a[i:j]), size=size)
                times.append(time.perf_counter() - t0)
            row.append(statistics.median(times) * 1e6)
        threads.set_num_threads(1)
        print(f"a += b on {size} float32 (median µs): one thread {row[0]:.1f}, cut over two {row[1]:.1f}")
    r = np.random.default_rng(8)
    for shape in [(B // 2 * T, C), (6 * 64, 128)]:          # one process's rows of "char" and "baby"
        x, gy = r.standard_normal(shape).astype(np.float32), r.standard_normal(shape).astype(np.float32)
        op = F.LayerNorm(1e-5, has_weight=True, has_bias=False)
        op.needs_input_grad = (True, True)
        op.forward(x, np.ones(shape[1], np.float32))
        block, row = F.ELEMENTWISE_BLOCK, []
        for size in (x.size, block):
            F.ELEMENTWISE_BLOCK = size
            row.append(best_ms(lambda: op.backward(gy)))
        F.ELEMENTWISE_BLOCK = block
        print(f"layer norm backward on {shape}: all rows at once {row[0]:.3f} ms, rows in blocks of about "
              f"{block} numbers {row[1]:.3f} ms")
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_cpu
    block = optim.UPDATE_BLOCK
    for name in ("baby", "char"):
        model, optimizer = bench_cpu.build_tinyllm(bench_cpu.CONFIGS[name])
        for p in model.parameters():
            p.grad = np.random.default_rng(0).standard_normal(p.shape).astype(np.float32)
        optim.UPDATE_BLOCK = 1 << 40                            # each parameter (or its piece) whole
        whole = best_ms(optimizer.step, 10)
        optim.UPDATE_BLOCK = block
        blocks = best_ms(optimizer.step, 10)
        print(f"AdamW.step, {name} ({model.num_parameters():,} parameters), one thread: whole parameters "
              f"{whole:.2f} ms, blocks of {block} elements {blocks:.2f} ms")
    print()


def part_layers_vs_torch():
    print("## 7. \"baby\" layers one at a time, forward + backward (µs per call)")
    r = np.random.default_rng(5)
    b_, t, c, h = 12, 64, 128, 4
    x, gx = (r.standard_normal((b_, t, c)).astype(np.float32) for _ in range(2))
    w = r.standard_normal(c).astype(np.float32)
    hid, ghid = (r.standard_normal((b_, t, 4 * c)).astype(np.float32) for _ in range(2))
    qkv = r.standard_normal((b_, t, 3 * c)).astype(np.float32)

    def layer_norm():
        op = F.LayerNorm(1e-5, True, False)
        op.needs_input_grad = (True, True)
        op.forward(x, w)
        op.backward(gx)

    def gelu():
        op = F.GELU()
        op.forward(hid)
        op.backward(ghid)

    def attention():
        op = F.SelfAttention(h, h)
        op.needs_input_grad = (True,)
        op.forward(qkv)
        op.backward(gx)
    ours = {"layer norm (768, 128)": layer_norm, "GELU (768, 512)": gelu, "causal attention (12, 4, 64, 32)": attention}
    try:
        import torch
    except ImportError:
        torch = None
    theirs = {}
    if torch is not None:
        torch.set_num_threads(os.cpu_count())
        tx, tw, thid, tqkv = (torch.from_numpy(a).requires_grad_(True) for a in (x, w, hid, qkv))
        tgx, tghid = torch.from_numpy(gx), torch.from_numpy(ghid)

        def fresh(*leaves):   # each call starts with no gradient, as tinyllm's ops return fresh ones
            for leaf in leaves:
                leaf.grad = None

        def t_layer_norm():
            torch.nn.functional.layer_norm(tx, (c,), tw).backward(tgx)
            fresh(tx, tw)

        def t_gelu():
            torch.nn.functional.gelu(thid, approximate="tanh").backward(tghid)
            fresh(thid)

        def t_attention():
            q, k, v = (a.view(b_, t, h, c // h).transpose(1, 2) for a in tqkv.split(c, dim=2))
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            y.transpose(1, 2).reshape(b_, t, c).backward(tgx)
            fresh(tqkv)
        theirs = dict(zip(ours, (t_layer_norm, t_gelu, t_attention)))
    for name, fn in ours.items():
        peer = f", PyTorch {best_us(theirs[name], 50):.0f}" if name in theirs else " (PyTorch not installed)"
        print(f"{name}: tinyllm {best_us(fn, 50):.0f}{peer}")
    # In a training step an op's output is rarely in cache: it lands in memory freed long before.
    n = 768 * 512
    inputs = [r.standard_normal(n).astype(np.float32) for _ in range(24)]
    outputs = [np.zeros(n, np.float32) for _ in range(48)]   # 144 MiB in all: more than the caches

    def gelu_forward(k_in, k_out, calls=240):
        times = []
        for i in range(calls):
            x_, y_, s_ = inputs[i % k_in], outputs[2 * i % k_out], outputs[(2 * i + 1) % k_out]
            t0 = time.perf_counter()
            F._gelu_forward(y_, x_, s_)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6
    print("GELU forward on (768, 512), median µs: input and outputs in cache "
          f"{gelu_forward(1, 2):.0f}, input not {gelu_forward(24, 2):.0f}, outputs not {gelu_forward(1, 48):.0f}, "
          f"neither {gelu_forward(24, 48):.0f}")
    print()


def part_interference():
    try:
        import torch
    except ImportError:
        print("## 4. skipped: PyTorch is not installed\n")
        return
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_cpu
    cfg = bench_cpu.CONFIGS["baby"]
    x, y = bench_cpu.make_batch(cfg)
    model, optimizer = bench_cpu.build_tinyllm(cfg)
    torch.set_num_threads(os.cpu_count())
    tmodel, toptimizer = bench_cpu.build_torch(cfg, model.state_dict())
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    step = bench_cpu.tinyllm_stepper(model, optimizer, "layers")   # one thread: NumPy's BLAS on its own threads
    ours = lambda: step(x, y)  # noqa: E731
    theirs = lambda: bench_cpu.torch_step(tmodel, toptimizer, tx, ty)  # noqa: E731
    for _ in range(3):
        ours(), theirs()
    print("## 4. baby steps alternated one by one in one process (median of 10 each)")
    for rest in (0.0, 0.2):
        times = {"tinyllm": [], "PyTorch": []}
        for _ in range(10):
            for name, take_step in (("tinyllm", ours), ("PyTorch", theirs)):
                time.sleep(rest)
                t0 = time.perf_counter()
                take_step()
                times[name].append(time.perf_counter() - t0)
        a, b = (statistics.median(times[n]) * 1e3 for n in ("tinyllm", "PyTorch"))
        print(f"rest {rest:.1f} s: tinyllm {a:.1f} ms, PyTorch {b:.1f} ms, ratio {a / b:.2f}")
    print()


def part_data_parallel():
    """The "baby" step with the batch cut over two processes, phase by phase, against one process alone."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_cpu
    from tinyllm import data_parallel
    print("## 9. baby step over two processes (tinyllm.data_parallel), medians in ms (of 190-290 steps each)")
    cfg = bench_cpu.CONFIGS["baby"]
    x, y = bench_cpu.make_batch(cfg)
    half = dict(cfg, batch_size=cfg["batch_size"] // 2)
    model, optimizer = bench_cpu.build_tinyllm(half)
    threads.set_num_threads(2)                                  # BLAS on one thread, as in each process
    alone = []
    with threads.serial():                                      # one core, as each process runs
        for _ in range(40):
            t0 = time.perf_counter()
            _, loss = model(x[:half["batch_size"]], y[:half["batch_size"]])
            loss.backward()
            alone.append(time.perf_counter() - t0)
            model.zero_grad()
    model, optimizer = bench_cpu.build_tinyllm(cfg)
    ends = []                                                   # when this process's rows were done
    part = data_parallel._part

    def timed_part(*args):
        try:
            return part(*args)
        finally:
            ends.append(time.perf_counter())
    ways = {True: "the worker adds its gradients during this process's backward (overlap)",
            False: "this process adds them after its backward"}
    times = {overlap: {"this process's rows": [], "then until forward_backward returns": [], "whole step": []}
             for overlap in ways}
    steps = {"DataParallel.step (AdamW on both, the shared blocks whole)": [],
             "DataParallel.step (AdamW on both, parameter by parameter)": [], "optimizer.step (AdamW here)": []}
    with data_parallel.DataParallel(model) as dp:              # forked before the timer goes in
        data_parallel._part = timed_part
        try:
            for i in range(1200):                               # the ways alternate by pairs of steps
                dp.overlap = (i // 2) % 2 == 0
                t0 = time.perf_counter()
                dp.forward_backward(x, y)
                t1 = time.perf_counter()
                key = list(steps)[(i // 4) % 3]                 # and the three ways of stepping by fours
                dp.whole_blocks = "whole" in key
                dp.step(optimizer) if key.startswith("Data") else optimizer.step()
                t2 = time.perf_counter()
                optimizer.zero_grad()
                if i % 2 and i >= 40:                           # the second step of each pair
                    row = times[dp.overlap]
                    row["this process's rows"].append(ends[-1] - t0)
                    row["then until forward_backward returns"].append(t1 - ends[-1])
                    steps[key].append(t2 - t1)
                    if "whole" in key:
                        row["whole step"].append(t2 - t0)
        finally:
            data_parallel._part = part
    threads.set_num_threads(1)
    med = lambda ts: statistics.median(ts) * 1e3              # noqa: E731
    print(f"one process alone, forward + backward of {half['batch_size']} rows: {med(alone):.2f}")
    for overlap, name in ways.items():
        print(f"{name}: " + ", ".join(f"{key} {med(ts):.2f}" for key, ts in times[overlap].items()))
    print(", ".join(f"{key} {med(ts):.2f}" for key, ts in steps.items()))
    print()


def part_wake_up():
    """A message to an idle process and its answer: the reader asleep in a read against polling first."""
    from tinyllm import data_parallel
    print("## 10. a pipe's round trip to a process idle for a while (tinyllm.data_parallel._read), median µs of 200")
    commands, results = os.pipe(), os.pipe()
    for fd in (commands[0], results[0]):
        os.set_blocking(fd, False)
    pid = os.fork()
    if pid == 0:                                                # echo each byte, polling as told by its value
        code = 1
        try:
            os.close(commands[1])                               # so that the parent's close ends the loop
            while True:
                got = data_parallel._read(commands[0], 1)
                if got is None:
                    code = 0
                    break
                data_parallel.POLL_SECONDS = got[0] * 1e-3
                os.write(results[1], got)
        finally:
            os._exit(code)
    line = []
    for poll_ms in (0, 2):
        data_parallel.POLL_SECONDS = poll_ms * 1e-3
        for idle in (0.0005, 0.002):
            times = []
            for _ in range(200):
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < idle:          # this process busy, the other waiting
                    pass
                t0 = time.perf_counter()
                os.write(commands[1], bytes([poll_ms]))
                data_parallel._read(results[0], 1)
                times.append(time.perf_counter() - t0)
            line.append(f"{'polling for ' + str(poll_ms) + ' ms' if poll_ms else 'asleep in read'}, idle "
                        f"{idle * 1e3:.1f} ms: {statistics.median(times) * 1e6:.1f}")
    os.close(commands[1])
    os.waitpid(pid, 0)
    for fd in (commands[0], *results):
        os.close(fd)
    print("; ".join(line))
    print()


def part_fixed_cost():
    """What a step costs besides the arithmetic: the "baby" model shrunk to arrays of a few numbers."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_cpu
    print("## 11. fixed cost of a step: \"baby\" with block 2, n_embd 16, one row (so the time is the calls to "
          "Python and NumPy), forward / backward, median ms of 400")
    cfg = dict(bench_cpu.CONFIGS["baby"], block_size=2, n_embd=16, batch_size=1)
    x, y = bench_cpu.make_batch(cfg)
    model, _ = bench_cpu.build_tinyllm(cfg)
    matmul = threads.matmul

    def matmul_as_parts(a, b):                                  # the way before: always through parallel_for
        out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
        threads.parallel_for(a.shape[0], lambda r0, r1: np.matmul(a[r0:r1], b, out=out[r0:r1]))
        return out

    def steps(n=400):
        fwd, bwd = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            _, loss = model(x, y)
            t1 = time.perf_counter()
            loss.backward()
            fwd.append(t1 - t0)
            bwd.append(time.perf_counter() - t1)
            model.zero_grad()
        return f"{statistics.median(fwd) * 1e3:.3f} / {statistics.median(bwd) * 1e3:.3f}"
    lines = {}
    threads.set_num_threads(1)
    steps(50)
    lines["one thread (a data-parallel worker)"] = steps()
    threads.set_num_threads(2)
    with threads.serial():                                      # as the main process of data parallelism
        lines["2 threads inside serial() (the main process)"] = steps()
        threads.matmul = matmul_as_parts
        try:
            lines["the same, products through a one-part parallel_for (before)"] = steps()
        finally:
            threads.matmul = matmul
    threads.set_num_threads(1)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:                                       # the peer: the same model in PyTorch, one thread
        torch.set_num_threads(1)
        tmodel, toptimizer = bench_cpu.build_torch(cfg, model.state_dict())
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        fwd, bwd = [], []
        for i in range(450):
            t0 = time.perf_counter()
            loss = tmodel(tx, ty)
            t1 = time.perf_counter()
            loss.backward()
            if i >= 50:
                fwd.append(t1 - t0)
                bwd.append(time.perf_counter() - t1)
            toptimizer.zero_grad(set_to_none=True)
        lines["PyTorch, one thread"] = f"{statistics.median(fwd) * 1e3:.3f} / {statistics.median(bwd) * 1e3:.3f}"
        torch.set_num_threads(os.cpu_count())
    print("; ".join(f"{k}: {v}" for k, v in lines.items()))
    print()


def main():
    backend.keep_freed_host_memory()   # as `tinyllm train`: freed arrays are reused, not faulted in again
    print(f"numpy {np.__version__}, {os.cpu_count()} CPUs, glibc keeps freed memory\n")
    parts = [part_threads, part_gelu_backward, part_attention, part_interference, part_softmax_shift,
             part_short_rows, part_layers_vs_torch, part_handovers_and_adamw, part_data_parallel, part_wake_up,
             part_fixed_cost]
    chosen = [int(a) for a in sys.argv[1:]] or range(1, len(parts) + 1)
    for number in chosen:
        parts[number - 1]()


if __name__ == "__main__":
    main()
