"""The plainest possible byte-level BPE: a trainer and an encoder for reading.

Nothing here is clever.  The trainer recounts every pair of every chunk after
each merge; the encoder rescans the whole chunk for its best pair after each
merge.  That makes both easy to check by eye, and slow: they serve as the
reference ("oracle") that the fast code in ``bpe.py`` is tested against, and
as the baseline in ``scripts/bench_tokenizer.py``.

Ids: 0..255 are the raw bytes; merge number k (counting from 0) creates id
256 + k.  A merge is the pair ``(left_id, right_id)`` it joins.
"""

import re
from collections import Counter

from .patterns import compile_pattern


def split_chunks(text, pattern="gpt4"):
    """Pre-split text into chunks with the pattern; merges never cross chunks."""
    return compile_pattern(pattern).findall(text)


def pair_counts(chunks):
    """How often each adjacent pair occurs, over (ids, count) chunks.

    Overlapping occurrences all count: "aaa" holds the pair (a, a) twice.
    """
    counts = {}
    for ids, count in chunks:
        for pair in zip(ids, ids[1:]):
            counts[pair] = counts.get(pair, 0) + count
    return counts


def merge_pair(ids, pair, new_id):
    """Replace each occurrence of pair in ids by new_id, scanning left to right.

    Occurrences never overlap: [a, a, a] with pair (a, a) becomes [new, a].
    """
    out = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_naive(text, vocab_size, pattern="gpt4", special_tokens=None):
    """Learn merges the slow, obvious way; returns {(left, right): new_id}.

    Each round counts all pairs from scratch, merges the most frequent one
    (ties go to the smallest (left, right)), and stops early when no pair is
    left.  Identical chunks are counted once with a multiplicity, which changes
    no count, only the time.

    special_tokens ({text: id}) are cut out of the text first; the merges stop
    below the smallest special id (and below vocab_size), and afterwards the
    special ids must be exactly the next ids after the merges: no hole.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (one id per byte), got {vocab_size}")
    if not text:
        raise ValueError("cannot train a BPE tokenizer on an empty text")
    special_tokens = dict(special_tokens or {})
    pieces = [text]
    if special_tokens:
        longest_first = sorted(special_tokens, key=lambda t: (-len(t), t))
        pieces = re.split("|".join(re.escape(t) for t in longest_first), text)
    chunks = Counter()
    for piece in pieces:
        chunks.update(split_chunks(piece, pattern))
    chunks = [(list(chunk.encode("utf-8")), count) for chunk, count in chunks.items()]
    merges = {}
    for new_id in range(256, min([vocab_size, *special_tokens.values()])):
        counts = pair_counts(chunks)
        if not counts:
            break  # every chunk is a single token: nothing left to merge
        # Largest count first; among equal counts the smallest pair wins.
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges[best] = new_id
        chunks = [(merge_pair(ids, best, new_id), count) for ids, count in chunks]
    next_id = 256 + len(merges)
    if sorted(special_tokens.values()) != list(range(next_id, next_id + len(special_tokens))):
        raise ValueError(f"special ids {sorted(special_tokens.values())} do not follow the "
                         f"{len(merges)} merges without a hole (the next free id is {next_id})")
    return merges


def encode_chunk_naive(chunk_bytes, merges):
    """Encode one chunk: repeatedly merge the pair with the lowest rank.

    The rank of a merge is the id it creates, so "lowest rank" means "learned
    first".  All occurrences of that pair are merged, left to right, before
    looking for the next pair.
    """
    ids = list(chunk_bytes)
    while len(ids) >= 2:
        present = [pair for pair in zip(ids, ids[1:]) if pair in merges]
        if not present:
            break
        best = min(present, key=lambda pair: merges[pair])
        ids = merge_pair(ids, best, merges[best])
    return ids


def encode_naive(text, merges, pattern="gpt4"):
    """Encode text (no special tokens) with merges from train_naive."""
    ids = []
    for chunk in split_chunks(text, pattern):
        ids.extend(encode_chunk_naive(chunk.encode("utf-8"), merges))
    return ids


def decode_naive(ids, merges):
    """Turn ids back into bytes by expanding every merge."""
    vocab = {i: bytes([i]) for i in range(256)}
    for (left, right), new_id in sorted(merges.items(), key=lambda item: item[1]):
        vocab[new_id] = vocab[left] + vocab[right]
    return b"".join(vocab[i] for i in ids)
