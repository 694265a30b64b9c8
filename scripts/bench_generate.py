"""Generation speed with and without the KV cache.

    python scripts/bench_generate.py [--device cpu|cuda] [--new 128] [--repeats 3]

A small GPT (4 layers, 4 heads, n_embd 128, block 256, vocab 65), batch 1, greedy decoding of
`--new` tokens from a 1-token and from a 64-token prompt. Prints tokens/s with and without the
cache, the speedup, and checks that both produce the same tokens. The best of `--repeats` runs is
reported; on a busy machine pin BLAS to one thread (OPENBLAS_NUM_THREADS=1) for steadier figures.
"""
import argparse
import time

import numpy as np

import tinyllm as tl


def timed(model, idx, new, use_cache, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = model.generate(idx, new, temperature=0, use_cache=use_cache)
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pos", default="learned", choices=["learned", "rope"])
    args = ap.parse_args()

    tl.manual_seed(0)
    cfg = tl.GPTConfig(vocab_size=65, block_size=256, n_layer=4, n_head=4, n_embd=128, pos=args.pos)
    model = tl.GPT(cfg, device=args.device)
    print(f"model: {cfg.n_layer} layers, {cfg.n_head} heads, n_embd {cfg.n_embd}, block {cfg.block_size}, "
          f"vocab {cfg.vocab_size}, pos={cfg.pos}, {model.num_parameters():,} parameters, device {args.device}")
    model.generate(np.zeros((1, 1), dtype=np.int64), 4)  # warm-up (imports, allocator)
    rows = []
    for prompt_len in (1, 64):
        idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, prompt_len))
        t_cache, a = timed(model, idx, args.new, True, args.repeats)
        t_full, b = timed(model, idx, args.new, False, args.repeats)
        same = np.array_equal(a, b)
        rows.append((prompt_len, args.new / t_cache, args.new / t_full, t_full / t_cache, same))
    print(f"{'prompt':>6} {'new':>5} {'cache tok/s':>12} {'no-cache tok/s':>15} {'speedup':>8} {'same tokens':>12}")
    for prompt_len, with_cache, without, speedup, same in rows:
        print(f"{prompt_len:>6} {args.new:>5} {with_cache:>12.1f} {without:>15.1f} {speedup:>7.2f}x {str(same):>12}")


if __name__ == "__main__":
    main()
