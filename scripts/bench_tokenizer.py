"""Benchmark tinyllm's BPE tokenizer: training time (fast vs naive) and encoding speed (vs tiktoken).

    python scripts/bench_tokenizer.py                 # full run (about a minute on 2 cores)
    python scripts/bench_tokenizer.py --naive-vocabs 512 --repeat 1   # quicker

Corpora come from ../shared/data (next to the repository); --data-dir points elsewhere.
MB/s means 10**6 bytes of UTF-8 text per second.  "cold" is the first encode by a freshly
built tokenizer (empty chunk cache); "warm" is the best of --repeat further calls, with the
cache filled.  tiktoken, when installed, is measured on the same text with an Encoding built
offline from GPT-2's encoder.json (no download needed), and its ids are checked against ours.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import regex  # noqa: E402

from tinyllm.tokenizer import BPETokenizer  # noqa: E402
from tinyllm.tokenizer.bpe import gpt2_bytes_to_unicode  # noqa: E402
from tinyllm.tokenizer.patterns import compile_pattern  # noqa: E402
from tinyllm.tokenizer.naive import train_naive  # noqa: E402


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def mbps(nbytes, seconds):
    return nbytes / seconds / 1e6


def tiktoken_gpt2(gpt2_dir, pattern):
    """A tiktoken Encoding equal to GPT-2's, built from the local files; None if tiktoken is absent."""
    try:
        import tiktoken
    except ImportError:
        return None, "tiktoken not installed"
    byte_of_char = {c: b for b, c in gpt2_bytes_to_unicode().items()}
    encoder = json.loads((gpt2_dir / "encoder.json").read_text(encoding="utf-8"))
    ranks = {bytes(byte_of_char[c] for c in token): i for token, i in encoder.items() if token != "<|endoftext|>"}
    enc = tiktoken.Encoding(name="gpt2-offline", pat_str=pattern, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256})
    return enc, f"tiktoken {tiktoken.__version__}, Encoding built offline from encoder.json"


def encode_section(name, text, repeat, gpt2_dir, enc, trained):
    # trained: {label: function returning a freshly trained tokenizer}
    """Encode MB/s of text: cold (median over fresh tokenizers) and warm (best), then tiktoken's."""
    nbytes = len(text.encode("utf-8"))
    kind = "ASCII" if text.isascii() else "not ASCII"
    print(f"## encoding {name} ({nbytes:,} bytes, {kind}; cold = first call of a fresh tokenizer, "
          f"median of {repeat}; warm = best of {repeat} further calls)")
    regex_split = min(timed(compile_pattern("gpt2").findall, text)[0] for _ in range(repeat))
    ours_split = min(timed(BPETokenizer("gpt2")._split, text)[0] for _ in range(repeat))
    print(f"pre-split with the GPT-2 pattern: regex {regex_split * 1e3:.1f} ms, tinyllm's split "
          f"(the re twin on ASCII stretches) {ours_split * 1e3:.1f} ms")
    print(f"{'tokenizer':<34} {'tokens':>8} {'cold MB/s':>10} {'warm MB/s':>10}")
    makers = {}
    if gpt2_dir is not None:
        makers["tinyllm GPT-2 (from_gpt2)"] = lambda: BPETokenizer.from_gpt2(
            gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")
    for label, train in trained.items():
        makers[label] = train
    results = {}
    for label, make in makers.items():
        colds = []
        for _ in range(repeat):
            tok = make()
            cold, ids = timed(tok.encode_ordinary, text)
            colds.append(cold)
        warm = min(timed(tok.encode_ordinary, text)[0] for _ in range(repeat))
        results[label] = (ids, mbps(nbytes, statistics.median(colds)), mbps(nbytes, warm))
        print(f"{label:<34} {len(ids):>8,} {results[label][1]:>10.2f} {results[label][2]:>10.2f}")
    if enc is not None:
        cold, ids = timed(enc.encode_ordinary, text)
        warm = min(timed(enc.encode_ordinary, text)[0] for _ in range(repeat))
        print(f"{'tiktoken GPT-2':<34} {len(ids):>8,} {mbps(nbytes, cold):>10.2f} {mbps(nbytes, warm):>10.2f}")
        ours, ours_cold, ours_warm = results["tinyllm GPT-2 (from_gpt2)"]
        print(f"ids identical to tiktoken's: {ids == ours}; tinyllm / tiktoken speed: "
              f"cold {ours_cold / mbps(nbytes, cold):.2f}x, warm {ours_warm / mbps(nbytes, warm):.2f}x")
    print()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".." / "shared" / "data")
    parser.add_argument("--vocabs", default="512,1024,4096,8192", help="vocab sizes for the fast trainer")
    parser.add_argument("--naive-vocabs", default="512,1024",
                        help="vocab sizes for the naive trainer (slow: about 8 s at 512, 22 s at 1024)")
    parser.add_argument("--naive-chars", type=int, default=0,
                        help="train the naive (and, for the ratio, the fast) trainer on only this many "
                             "characters (0 = the whole corpus)")
    parser.add_argument("--pattern", default="gpt4", help="pre-split pattern for training")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median / best)")
    args = parser.parse_args(argv)

    data = args.data_dir.resolve()
    shakespeare = (data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    nbytes = len(shakespeare.encode("utf-8"))
    print("# tinyllm tokenizer benchmark")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"python {platform.python_version()}, regex {regex.__version__}")
    print(f"corpus: tinyshakespeare.txt, {nbytes:,} bytes; training pattern {args.pattern!r}")
    print()

    # -- training ---------------------------------------------------------------
    print("## training (median of %d runs)" % args.repeat)
    print(f"{'vocab':>6} {'fast s':>8} {'merges':>7}")
    fast_times = {}
    trained = {}
    for vocab in [int(v) for v in args.vocabs.split(",") if v]:
        times = []
        for _ in range(args.repeat):
            seconds, tok = timed(BPETokenizer(args.pattern).train, shakespeare, vocab)
            times.append(seconds)
        fast_times[vocab] = statistics.median(times)
        trained[vocab] = tok
        print(f"{vocab:>6} {fast_times[vocab]:>8.3f} {len(tok.merges):>7}")
    print()

    naive_text = shakespeare[:args.naive_chars] if args.naive_chars else shakespeare
    where = (f"the first {len(naive_text):,} characters" if args.naive_chars else "the whole corpus")
    print(f"## naive trainer vs fast trainer, on {where} (naive: 1 run; fast: median of {args.repeat})")
    print(f"{'vocab':>6} {'naive s':>9} {'fast s':>8} {'speedup':>8} {'same merges':>12}")
    for vocab in [int(v) for v in args.naive_vocabs.split(",") if v]:
        naive_seconds, naive_merges = timed(train_naive, naive_text, vocab, args.pattern)
        times = []
        for _ in range(args.repeat):
            seconds, tok = timed(BPETokenizer(args.pattern).train, naive_text, vocab)
            times.append(seconds)
        fast = statistics.median(times)
        same = list(tok.merges.items()) == list(naive_merges.items())
        print(f"{vocab:>6} {naive_seconds:>9.2f} {fast:>8.3f} {naive_seconds / fast:>7.1f}x {str(same):>12}")
    print()

    # -- encoding ---------------------------------------------------------------
    gpt2_dir = data / "gpt2"
    gpt2 = None
    enc, about = (None, "no GPT-2 files")
    if (gpt2_dir / "encoder.json").is_file():
        seconds, gpt2 = timed(BPETokenizer.from_gpt2, gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")
        enc, about = tiktoken_gpt2(gpt2_dir, gpt2.pattern)
    corpora = [("tinyshakespeare.txt", shakespeare)]
    if (data / "taylorswift.txt").is_file():
        corpora.append(("taylorswift.txt", (data / "taylorswift.txt").read_text(encoding="utf-8")))
    for name, text in corpora:
        encode_section(name, text, args.repeat, gpt2_dir if gpt2 else None, enc,
                       {f"tinyllm trained {args.pattern} 4096":
                        lambda: BPETokenizer(args.pattern).train(shakespeare, 4096)})
    print(f"tiktoken: {about}")
    if gpt2 is not None:
        print(f"GPT-2 import (from_gpt2): {seconds:.3f} s")
    print()

    # -- pathological chunks ------------------------------------------------------
    if gpt2 is not None:
        print("## very long single chunks, GPT-2 tokenizer (fresh tokenizer each)")
        for label, text in [('"a" * 100_000', "a" * 100_000), ('" " * 100_000', " " * 100_000),
                            ('"^" * 1_000_000', "^" * 1_000_000)]:
            tok = BPETokenizer.from_gpt2(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")
            seconds, ids = timed(tok.encode, text)
            print(f"{label:<18} {seconds:>7.3f} s  ({len(ids):,} tokens)")


if __name__ == "__main__":
    main()
