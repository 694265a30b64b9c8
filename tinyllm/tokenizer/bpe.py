"""Byte-level byte-pair encoding (BPE), trained and applied the way GPT-2/GPT-4 do it.

Text is pre-split into chunks by a regex (see patterns.py), each chunk is
turned into its UTF-8 bytes, and learned merges join adjacent ids into new
ids.  Every byte has an id, so any text can be encoded and nothing is ever
"unknown".  docs/tokenizer.md explains the algorithms; the comments here say
why the code is shaped the way it is.

Two id spaces:
    internal ids  byte b is id b, merge k (from 0) creates id 256 + k; the id
                  made by a merge doubles as its rank (lower = learned first).
    public ids    what encode returns and decode takes.  Identical to internal
                  ids, except for tokenizers imported from GPT-2, whose 256
                  single-byte ids are a permutation of 0..255 (merge ids match).
"""

import hashlib
import heapq
import json
import sys
from array import array
from collections import Counter
from itertools import chain

import regex

from ._textfile import LineReader, write_atomic
from .patterns import (GPT2_PATTERN, GPT4_PATTERN, compile_ascii_twin, compile_pattern, resolve_pattern,
                       split_builtin)

FORMAT_HEADER = "tinyllm-bpe v1"

# Chunk cache: a dict from chunk text to its ids, cleared when it gets full
# (simple, and real text repeats its common words long before that).  Long
# chunks are rare and not worth the memory.
CACHE_SIZE = 1 << 16
CACHE_MAX_CHUNK = 64

# Chunks of at most this many bytes are merged by rescanning (tiny constant);
# longer ones in O(n log n) by merge_heap (linked list, rank buckets, heap of ranks).
SMALL_CHUNK = 32

# Merge lists known to be self-consistent (every token's bytes, encoded alone, give that
# token), by the SHA-256 of merges_digest.  Merges learned by train() always are; others
# must be checked, and checking 50,000 tokens costs more than the fast path saves on
# a few MB.  GPT-2's list is checked once and for all by tests/test_tokenizer_gpt2.py.
SELF_CONSISTENT_MERGES = {
    "75c0191f7a30bdd81ebc35d351e72f02c396606c6e46ee0497ae4e2f0704d0bf": "GPT-2",
}


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------

def train_merges(chunk_counts, num_merges):
    """Learn up to num_merges merges from {chunk_bytes: count}; returns [(left, right), ...].

    Same result as naive.train_naive, but each merge only touches the chunks
    that contain the merged pair:
      * ``counts[pair]``  occurrences of each adjacent pair (times chunk count);
      * ``where[pair]``   indices of chunks that may hold the pair (entries are
                          added, never removed, so a chunk may no longer hold it);
      * ``heap``          entries (-count, pair): the top is the most frequent
                          pair, ties broken by the smaller pair, as required.
    The heap is validated lazily: a count only grows during the merge that
    creates the newer of the pair's two ids (only a merge makes new
    neighbours), so after that a heap entry can only overstate its pair's
    count.  An entry that disagrees with ``counts`` when popped is pushed
    back with the true count; one that agrees is the true maximum.
    """
    words = [list(chunk) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    counts = {}
    where = {}
    for index, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            counts[pair] = counts.get(pair, 0) + freq
            holders = where.get(pair)
            if holders is None:
                where[pair] = {index}
            else:
                holders.add(index)
    heap = [(-count, pair) for pair, count in counts.items()]
    heapq.heapify(heap)

    merges = []
    while len(merges) < num_merges:
        # Pop until an entry agrees with the current count.
        while heap:
            neg_count, pair = heapq.heappop(heap)
            count = counts.get(pair, 0)
            if count == -neg_count:
                break
            if count > 0:
                heapq.heappush(heap, (-count, pair))
        else:
            break  # no pair left anywhere: every chunk is a single token
        if count <= 0:
            break
        new_id = 256 + len(merges)
        merges.append(pair)
        left, right = pair
        new_pairs = set()

        for index in where.pop(pair):
            word = words[index]
            if left not in word:
                continue  # a stale index entry
            freq = freqs[index]
            out = []
            i = 0
            n = len(word)
            while i < n:
                token = word[i]
                if token == left and i + 1 < n and word[i + 1] == right:
                    # Replace (prev, left) and (right, next) by (prev, new) and
                    # (new, next).  "prev" is read from the output so far, so a
                    # just-merged neighbour is seen as it now is ("abab" -> "XX").
                    if out:
                        prev = out[-1]
                        counts[prev, left] -= freq
                        key = (prev, new_id)
                        counts[key] = counts.get(key, 0) + freq
                        new_pairs.add(key)
                        where.setdefault(key, set()).add(index)
                    if i + 2 < n:
                        nxt = word[i + 2]
                        counts[right, nxt] -= freq
                        key = (new_id, nxt)
                        counts[key] = counts.get(key, 0) + freq
                        new_pairs.add(key)
                        where.setdefault(key, set()).add(index)
                    out.append(new_id)
                    i += 2
                else:
                    out.append(token)
                    i += 1
            words[index] = out
        # Every occurrence is gone (a left-to-right pass leaves no adjacent pair behind).
        del counts[pair]
        for key in new_pairs:
            count = counts[key]
            if count > 0:
                heapq.heappush(heap, (-count, key))
    return merges


# ----------------------------------------------------------------------------
# Encoding one chunk
# ----------------------------------------------------------------------------

_NO_RANK = float("inf")


def merge_small(ids, ranks):
    """BPE on a short chunk: merge the lowest-rank pair (leftmost if repeated), repeat.

    ranks maps (left, right) -> new id, which is also the merge's rank.  A list
    of the ranks of all adjacent pairs is kept, and after a merge only the two
    pairs next to it are looked up again.  Finding the minimum rescans the
    list each time (quadratic), which is still the fastest way for the few
    bytes of a typical word.  Taking the leftmost occurrence each time merges
    repeated pairs left to right without overlap: [a, a, a] -> [aa, a].
    Works in place on ids and returns it.
    """
    if len(ids) < 2:
        return ids
    get = ranks.get
    pair_ranks = [get(pair, _NO_RANK) for pair in zip(ids, ids[1:])]
    while pair_ranks:
        rank = min(pair_ranks)
        if rank == _NO_RANK:
            break
        i = pair_ranks.index(rank)
        ids[i:i + 2] = (rank,)  # the new id is the rank
        del pair_ranks[i]
        if i < len(pair_ranks):
            pair_ranks[i] = get((rank, ids[i + 1]), _NO_RANK)
        if i > 0:
            pair_ranks[i - 1] = get((ids[i - 1], rank), _NO_RANK)
    return ids


def merge_heap(ids, ranks):
    """BPE on a long chunk in O(n log n): a doubly linked list, buckets and a heap of ranks.

    Same result as merge_small, without rescanning.  Every adjacent pair that
    has a merge is filed in the bucket of its rank (a list of positions); a
    heap holds the ranks whose buckets are waiting.  The lowest rank is taken,
    its positions are merged left to right (sorted), and each merge files the
    two new pairs it creates with its neighbours.  Those contain the new id,
    so their ranks are higher: a bucket is complete by the time it comes up,
    and never refilled afterwards.  A filed position may have gone stale (its
    node was merged away or changed), so each is checked before merging; a
    node merged into its left neighbour is marked -1.
    """
    n = len(ids)
    tokens = list(ids)
    nxt = list(range(1, n + 1))  # n means "no next node"
    prv = list(range(-1, n - 1))  # -1 means "no previous node"
    get = ranks.get
    buckets = {}  # rank -> positions holding that rank's pair
    pair_of = {}  # rank -> its pair
    pairs = list(zip(tokens, tokens[1:]))
    for i, rank in enumerate(map(get, pairs)):
        if rank is not None:
            bucket = buckets.get(rank)
            if bucket is None:
                buckets[rank] = [i]
                pair_of[rank] = pairs[i]
            else:
                bucket.append(i)
    heap = list(buckets)
    heapq.heapify(heap)

    def file(position, pair):
        rank = get(pair)
        if rank is not None:
            bucket = buckets.get(rank)
            if bucket is None:
                buckets[rank] = [position]
                pair_of[rank] = pair
                heapq.heappush(heap, rank)
            else:
                bucket.append(position)

    while heap:
        rank = heapq.heappop(heap)
        left, right = pair_of[rank]
        positions = buckets.pop(rank)
        positions.sort()
        for i in positions:
            if tokens[i] != left:
                continue  # stale: this node changed or was merged away
            j = nxt[i]
            if j == n or tokens[j] != right:
                continue  # stale: its right neighbour changed
            tokens[i] = rank  # the new id is the rank
            tokens[j] = -1
            k = nxt[j]
            nxt[i] = k
            if k < n:
                prv[k] = i
                file(i, (rank, tokens[k]))
            p = prv[i]
            if p >= 0:
                file(p, (tokens[p], rank))
    return [t for t in tokens if t >= 0]


def merges_digest(merge_list):
    """SHA-256 (hex) of a merge list in internal ids, as little-endian 32-bit integers."""
    typecode = next(code for code in "IL" if array(code).itemsize == 4)
    numbers = array(typecode, chain.from_iterable(merge_list))
    if sys.byteorder == "big":
        numbers.byteswap()
    return hashlib.sha256(numbers.tobytes()).hexdigest()


def _id_ranges(ids):
    """[3, 4, 5, 9] -> "the ids 3-5, 9"; [7] -> "the id 7": sorted ids written as runs."""
    runs = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ("the ids " if len(ids) > 1 else "the id ") + ", ".join(
        str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _surrogate_error(text):
    """The error for text that UTF-8 cannot encode, pointing at the first lone surrogate."""
    match = regex.search("[\ud800-\udfff]", text)
    where = f" {match.group()!r} at index {match.start()}" if match else ""
    return ValueError(
        f"cannot encode text containing the lone surrogate{where}: UTF-8 has no bytes for it "
        "(clean the text first, e.g. text.encode('utf-8', 'replace').decode('utf-8'))")


# ----------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------

class BPETokenizer:
    """Byte-level BPE tokenizer: train it, or import GPT-2's; encode, decode, save, load.

    >>> tok = BPETokenizer("gpt4")
    >>> tok.train(text, vocab_size=4096, special_tokens={"<|endoftext|>": 4095})
    >>> tok.decode(tok.encode("hello world")) == "hello world"
    """

    def __init__(self, pattern="gpt4"):
        self.pattern = resolve_pattern(pattern)
        self._regex = compile_pattern(self.pattern)
        self._ascii_regex = compile_ascii_twin(self.pattern)  # None unless the pattern is built in
        self._set_model([], {}, None, trained=True)

    # -- state -----------------------------------------------------------------

    def _set_model(self, merge_list, special_tokens, byte_ids, trained):
        """Install merges (internal ids, in order), specials (public ids) and the byte permutation.

        trained says the merges come from train(), which guarantees that every
        token, encoded on its own, comes out as itself (see _init_single); so do
        the merge lists in SELF_CONSISTENT_MERGES.
        """
        self._merge_list = list(merge_list)
        self._ranks = {pair: 256 + k for k, pair in enumerate(self._merge_list)}
        vocab = [bytes([b]) for b in range(256)]
        for left, right in self._merge_list:
            vocab.append(vocab[left] + vocab[right])
        self._vocab = vocab
        # byte_ids[b] is the public id of byte b; None means the identity.
        self._byte_ids = None if byte_ids is None or list(byte_ids) == list(range(256)) else list(byte_ids)
        if self._byte_ids is None:
            self._to_public = None
            self._decoder = dict(enumerate(vocab))
        else:
            self._to_public = self._byte_ids + list(range(256, len(vocab)))
            self._decoder = {public: vocab[internal] for internal, public in enumerate(self._to_public)}
        self._special_tokens = dict(special_tokens)
        for text, token_id in self._special_tokens.items():
            self._decoder[token_id] = text.encode("utf-8")
        if not trained and self._merge_list:
            trained = merges_digest(self._merge_list) in SELF_CONSISTENT_MERGES
        self._init_single(trained)
        self._cache = {}
        self._special_regexes = {}

    def _init_single(self, trained):
        """The encode fast path: {chunk bytes: public id} for chunks that are one whole token.

        A chunk of one byte is always its byte's token.  For merges learned by
        train() every token qualifies: a token's bytes, encoded alone, replay
        the merges that built it (docs/tokenizer.md); so does every token of a
        merge list known to be self-consistent (GPT-2's).  Other merges (a saved
        file someone may have edited) carry no such guarantee, and checking all
        of them up front costs more than it saves, so the table starts with the
        bytes and learns every chunk that BPE turns into a single token.  Either
        way the fast path never changes an answer, only the time.
        """
        to_public = self._to_public or range(len(self._vocab))
        count = len(self._vocab) if trained else 256
        self._single = {self._vocab[i]: to_public[i] for i in range(count)}

    @property
    def vocab_size(self):
        """Number of ids: 256 bytes + merges + special tokens."""
        return 256 + len(self._merge_list) + len(self._special_tokens)

    @property
    def merges(self):
        """{(left_id, right_id): new_id} in merge order, in public ids."""
        if self._to_public is None:
            return dict(self._ranks)
        pub = self._to_public
        return {(pub[left], pub[right]): pub[new] for (left, right), new in self._ranks.items()}

    @property
    def special_tokens(self):
        """{text: id} of the special tokens."""
        return dict(self._special_tokens)

    @property
    def vocab(self):
        """{id: bytes} for every id, special tokens included (as their UTF-8 text)."""
        return dict(self._decoder)

    def __repr__(self):
        name = {GPT2_PATTERN: "gpt2", GPT4_PATTERN: "gpt4"}.get(self.pattern, "custom")
        return (f"BPETokenizer(pattern={name!r}, vocab_size={self.vocab_size}, "
                f"merges={len(self._merge_list)}, special_tokens={len(self._special_tokens)})")

    # -- splitting ---------------------------------------------------------------

    def _split(self, text):
        """Pre-split text into chunks.  Text the pattern does not match (only possible
        with a custom pattern) is kept as chunks of its own, so nothing is lost.
        The built-in patterns match every character and split ASCII text faster."""
        if self._ascii_regex is not None:
            return split_builtin(text, self._regex, self._ascii_regex)
        chunks = self._regex.findall(text)
        if sum(map(len, chunks)) == len(text):
            return chunks
        chunks = []
        pos = 0
        for match in self._regex.finditer(text):
            if match.start() > pos:
                chunks.append(text[pos:match.start()])
            if match.end() > match.start():
                chunks.append(match.group())
            pos = match.end()
        if pos < len(text):
            chunks.append(text[pos:])
        return chunks

    # -- training ----------------------------------------------------------------

    def train(self, text, vocab_size, special_tokens=None):
        """Learn merges from text; returns self (whatever the tokenizer knew before is replaced).

        Merges take the ids from 256 up to (not including) both vocab_size and the smallest
        special id; the special ids follow the merges with no hole, so vocab_size (the
        property) is max id + 1 and every id below it decodes:

            train(text, 300, {"<|endoftext|>": 300, "<|im_start|>": 301})   44 merges, 302 ids
            train(text, 4096, {"<|endoftext|>": 4095})                       3,839 merges, 4,096 ids

        Special-token text is cut out of the training text first, so no merge ever spans one.
        If the text runs out of pairs, training stops early: without special tokens the
        vocabulary just comes out smaller; with them, the hole it would leave below the special
        ids is a ValueError, as are special ids that leave a hole anyway and an empty text.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
        if vocab_size < 256:
            raise ValueError(f"vocab_size must be at least 256 (one id per byte), got {vocab_size}")
        if not text:
            raise ValueError("cannot train a BPE tokenizer on an empty text")
        special_tokens = dict(special_tokens or {})
        ids = [i for i in special_tokens.values() if isinstance(i, int) and not isinstance(i, bool)]
        num_merges = max(0, min([vocab_size, *ids]) - 256)
        self._check_special_tokens(special_tokens, 256 + num_merges)

        segments = [text]
        if special_tokens:
            segments = self._special_regex(frozenset(special_tokens)).split(text)
        chunk_counts = Counter()
        for segment in segments:
            chunk_counts.update(self._split(segment))
        try:
            byte_counts = {chunk.encode("utf-8"): count for chunk, count in chunk_counts.items()}
        except UnicodeEncodeError:
            raise _surrogate_error(text) from None

        merge_list = train_merges(byte_counts, num_merges)
        if special_tokens and len(merge_list) < num_merges:
            raise ValueError(
                f"the text has pairs for only {len(merge_list)} merges (ids 256 to {255 + len(merge_list)}), "
                f"so the special ids from {256 + num_merges} would leave the ids {256 + len(merge_list)} to "
                f"{255 + num_merges} empty; give the special tokens the ids from {256 + len(merge_list)}, "
                "or train on more text")
        self._set_model(merge_list, special_tokens, None, trained=True)
        return self

    @staticmethod
    def _check_special_tokens(special_tokens, first_free_id):
        """Special ids must be distinct and fill the ids from first_free_id on, with no hole."""
        seen = {}
        for text, token_id in special_tokens.items():
            if not isinstance(text, str) or not text:
                raise ValueError(f"special token {text!r} must be a non-empty str")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"special token {text!r} is not encodable as UTF-8") from None
            if isinstance(token_id, bool) or not isinstance(token_id, int):
                raise ValueError(f"special token {text!r} has id {token_id!r}, not an int")
            if token_id < first_free_id:
                raise ValueError(
                    f"special token {text!r} has id {token_id}, but ids below {first_free_id} "
                    f"belong to the bytes and merges; use ids >= {first_free_id}")
            if token_id in seen:
                raise ValueError(f"special tokens {seen[token_id]!r} and {text!r} share the id {token_id}")
            seen[token_id] = text
        expected = list(range(first_free_id, first_free_id + len(seen)))
        if seen and sorted(seen) != expected:
            holes = sorted(set(range(first_free_id, max(seen))) - set(seen))
            raise ValueError(
                f"special ids {sorted(seen)} leave {_id_ranges(holes)} empty: special tokens must "
                f"follow the merges with no hole, so here they take {_id_ranges(expected)}")

    # -- encoding ----------------------------------------------------------------

    def _encode_chunk(self, chunk):
        """Ids of one chunk (public ids), through the single-token fast path or BPE."""
        data = chunk.encode("utf-8")  # UnicodeEncodeError for a lone surrogate: see encode_ordinary
        token = self._single.get(data)
        if token is not None:
            ids = [token]
        else:
            ids = list(data)
            ids = merge_small(ids, self._ranks) if len(ids) <= SMALL_CHUNK else merge_heap(ids, self._ranks)
            if self._to_public is not None:
                pub = self._to_public
                ids = [pub[i] for i in ids]
            if len(ids) == 1:
                self._single[data] = ids[0]  # a proven single-token chunk: remember it for good
        if len(chunk) <= CACHE_MAX_CHUNK:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            self._cache[chunk] = ids
        return ids

    def encode_ordinary(self, text):
        """Encode text as plain text: special-token text gets no special treatment."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        out = []
        extend = out.extend
        cache_get = self._cache.get
        encode_chunk = self._encode_chunk
        try:
            for chunk in self._split(text):
                ids = cache_get(chunk)
                if ids is None:
                    ids = encode_chunk(chunk)
                extend(ids)
        except UnicodeEncodeError:
            raise _surrogate_error(text) from None
        return out

    def encode(self, text, allowed_special=(), disallowed_special="all"):
        """Encode text, with tiktoken's rules for special tokens.

        allowed_special: "all" or a set of special-token strings that, found in
            the text, become their special ids (longest match first).
        disallowed_special: "all" (every special token not allowed) or a set of
            strings; if any of them occurs in the text, ValueError.  This is the
            default because text from users could otherwise forge control tokens
            such as <|endoftext|>.  Pass disallowed_special=() to encode such text
            as ordinary text instead.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        allowed = self._string_set(allowed_special, "allowed_special")
        if allowed is None:
            allowed = frozenset(self._special_tokens)
        allowed = frozenset(s for s in allowed if s in self._special_tokens)
        disallowed = self._string_set(disallowed_special, "disallowed_special")
        if disallowed is None:
            disallowed = frozenset(self._special_tokens) - allowed
        if disallowed:
            match = self._special_regex(disallowed).search(text)
            if match:
                token = match.group()
                raise ValueError(
                    f"the text contains the special token {token!r} (at index {match.start()}), "
                    "which is not allowed here. To encode it as the special token, pass "
                    f"allowed_special={{{token!r}}} (or allowed_special='all'); to encode it as "
                    f"ordinary text, pass disallowed_special=() (or leave {token!r} out of "
                    "disallowed_special).")
        if not allowed:
            return self.encode_ordinary(text)
        out = []
        start = 0
        for match in self._special_regex(allowed).finditer(text):
            out.extend(self.encode_ordinary(text[start:match.start()]))
            out.append(self._special_tokens[match.group()])
            start = match.end()
        out.extend(self.encode_ordinary(text[start:]))
        return out

    @staticmethod
    def _string_set(value, name):
        """"all" -> None; a collection of str -> frozenset; anything else -> error."""
        if isinstance(value, str):
            if value == "all":
                return None
            raise ValueError(f"{name} must be 'all' or a set of strings, got the string {value!r} "
                             f"(did you mean {name}={{{value!r}}}?)")
        try:
            items = frozenset(value)
        except TypeError:
            raise TypeError(f"{name} must be 'all' or a set of strings, got {value!r}") from None
        for item in items:
            if not isinstance(item, str):
                raise TypeError(f"{name} must contain strings, got {item!r}")
        return items

    def _special_regex(self, tokens):
        """A regex matching any of the given strings, longest first (so "<|a|>b" beats "<|a|>")."""
        compiled = self._special_regexes.get(tokens)
        if compiled is None:
            ordered = sorted((t for t in tokens if t), key=lambda t: (-len(t), t))
            compiled = regex.compile("|".join(regex.escape(t) for t in ordered) or r"(?!)")
            self._special_regexes[tokens] = compiled
        return compiled

    # -- decoding ----------------------------------------------------------------

    def decode_bytes(self, ids):
        """The bytes of all tokens, joined."""
        decoder = self._decoder
        if hasattr(ids, "tolist"):
            ids = ids.tolist()  # NumPy/CuPy arrays: plain ints are faster to look up
        elif not isinstance(ids, (list, tuple)):
            ids = list(ids)  # may be read twice below
        try:
            return b"".join([decoder[i] for i in ids])
        except (KeyError, TypeError):
            for i in ids:
                try:
                    decoder[i]
                except (KeyError, TypeError):
                    raise ValueError(f"unknown token id {i!r}: this tokenizer has {self.vocab_size} "
                                     f"ids (0 to {max(decoder)})") from None
            raise

    def decode(self, ids, errors="replace"):
        """Decode ids to text.  A token may end in the middle of a UTF-8 character (it is
        byte-level), so a slice of ids may not decode cleanly: errors="replace" puts
        U+FFFD there, errors="strict" raises."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # -- GPT-2 -------------------------------------------------------------------

    @classmethod
    def from_gpt2(cls, encoder_json_path, vocab_bpe_path, pattern="gpt2"):
        """Import GPT-2's tokenizer from its encoder.json and vocab.bpe; ids match GPT-2's.

        GPT-2 writes every byte as a printable character (bytes_to_unicode), so
        its token strings are mapped back to bytes here.  Its 256 single-byte ids
        are a permutation of 0..255, its merge k creates id 256 + k, and every
        remaining entry of encoder.json (<|endoftext|> = 50256) is a special token.
        """
        byte_decoder = {char: byte for byte, char in gpt2_bytes_to_unicode().items()}
        with open(encoder_json_path, encoding="utf-8") as f:
            encoder = json.load(f)
        if not isinstance(encoder, dict):
            raise ValueError(f"{encoder_json_path}: expected a JSON object of token -> id")
        with open(vocab_bpe_path, encoding="utf-8") as f:
            lines = f.read().split("\n")

        def to_bytes(token, line_number):
            try:
                return bytes(byte_decoder[char] for char in token)
            except KeyError as exc:
                raise ValueError(f"{vocab_bpe_path}, line {line_number}: {exc.args[0]!r} is not "
                                 "in GPT-2's byte alphabet") from None

        byte_ids = []
        unicode_of_byte = gpt2_bytes_to_unicode()
        for byte in range(256):
            token_id = encoder.get(unicode_of_byte[byte])
            if token_id is None:
                raise ValueError(f"{encoder_json_path}: no id for byte {byte}")
            byte_ids.append(token_id)
        if sorted(byte_ids) != list(range(256)):
            raise ValueError(f"{encoder_json_path}: the single-byte ids are not a permutation of 0..255")

        internal_of = {bytes([b]): b for b in range(256)}
        merge_list = []
        token_strings = set(unicode_of_byte.values())
        for line_number, line in enumerate(lines, start=1):
            if line_number == 1 and line.startswith("#version"):
                continue
            if not line.strip():
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{vocab_bpe_path}, line {line_number}: expected two tokens "
                                 f"separated by one space, found {line[:60]!r}")
            left_bytes, right_bytes = to_bytes(parts[0], line_number), to_bytes(parts[1], line_number)
            try:
                pair = (internal_of[left_bytes], internal_of[right_bytes])
            except KeyError:
                raise ValueError(f"{vocab_bpe_path}, line {line_number}: merges a token that no "
                                 "earlier line created") from None
            new_id = 256 + len(merge_list)
            merged = parts[0] + parts[1]
            if encoder.get(merged) != new_id:
                raise ValueError(f"{vocab_bpe_path}, line {line_number}: expected {merged!r} to have "
                                 f"id {new_id} in {encoder_json_path}, found {encoder.get(merged)!r}")
            internal_of.setdefault(left_bytes + right_bytes, new_id)
            merge_list.append(pair)
            token_strings.add(merged)
        special_tokens = {text: token_id for text, token_id in encoder.items() if text not in token_strings}
        cls._check_special_tokens(special_tokens, 256 + len(merge_list))
        tok = cls(pattern)
        tok._set_model(merge_list, special_tokens, byte_ids, trained=False)
        return tok

    # -- files -------------------------------------------------------------------

    def save(self, path):
        """Write the tokenizer as a versioned, human-readable text file (atomically).

        Layout (every string JSON-encoded):
            tinyllm-bpe v1
            pattern "<regex>"
            byte_ids identity            (or the 256 public ids of bytes 0..255)
            special_tokens <count>
            "<text>" <id>                (one per special token)
            merges <count>
            <left> <right>  # "<bytes>"  (public ids; merge k creates id 256 + k;
                                          the comment shows the new token's bytes)
            end                          (so that a cut-off file is detected)
        """
        lines = [FORMAT_HEADER, "pattern " + json.dumps(self.pattern)]
        if self._byte_ids is None:
            lines.append("byte_ids identity")
        else:
            lines.append("byte_ids " + " ".join(map(str, self._byte_ids)))
        lines.append(f"special_tokens {len(self._special_tokens)}")
        for text, token_id in sorted(self._special_tokens.items(), key=lambda item: item[1]):
            lines.append(f"{json.dumps(text)} {token_id}")
        lines.append(f"merges {len(self._merge_list)}")
        pub = self._to_public or range(len(self._vocab))
        for k, (left, right) in enumerate(self._merge_list):
            shown = json.dumps(self._vocab[256 + k].decode("utf-8", errors="backslashreplace"))
            lines.append(f"{pub[left]} {pub[right]}  # {shown}")
        lines.append("end")
        write_atomic(path, "\n".join(lines) + "\n")

    @classmethod
    def load(cls, path):
        """Read a file written by save().  A malformed file gives a ValueError naming the
        file, the line and the problem; nothing in the file is ever executed."""
        reader = LineReader(path)
        reader.header(FORMAT_HEADER, "BPE tokenizer")
        pattern = reader.json_string(reader.keyword("pattern"), "the pattern")
        try:
            tok = cls(pattern)
        except ValueError as exc:
            raise reader.error(str(exc)) from None

        value = reader.keyword("byte_ids")
        if value == "identity":
            byte_ids = None
        else:
            fields = value.split()
            if len(fields) != 256 or not all(f.isascii() and f.isdigit() for f in fields):
                raise reader.error("byte_ids must be 'identity' or 256 non-negative integers")
            byte_ids = [int(f) for f in fields]
            if sorted(byte_ids) != list(range(256)):
                raise reader.error("byte_ids must be a permutation of 0..255")
        internal_of = list(range(256))  # public -> internal, for the byte range
        if byte_ids is not None:
            for internal, public in enumerate(byte_ids):
                internal_of[public] = internal

        special_tokens = {}
        for _ in range(reader.count("special_tokens")):
            line = reader.next("a special token line: \"<text>\" <id>")
            text, _, id_text = line.rpartition(" ")
            if not text or not (id_text.isascii() and id_text.isdigit()):
                raise reader.error(f"expected '\"<text>\" <id>', found {line[:60]!r}")
            text = reader.json_string(text, "the special token")
            if text in special_tokens:
                raise reader.error(f"special token {text!r} appears twice")
            special_tokens[text] = int(id_text)

        merge_list = []
        seen = set()
        num_merges = reader.count("merges")
        for k in range(num_merges):
            line = reader.next(f"merge {k + 1} of {num_merges}: '<left> <right>'")
            fields = line.split("#", 1)[0].split()
            if len(fields) != 2 or not all(f.isascii() and f.isdigit() for f in fields):
                raise reader.error(f"expected a merge '<left> <right>', found {line[:60]!r}")
            left, right = (int(f) for f in fields)
            for public in (left, right):
                if public >= 256 + k:
                    raise reader.error(f"merge {k + 1} uses id {public}, which does not exist yet "
                                       f"(merges so far make ids up to {255 + k})")
            pair = (internal_of[left] if left < 256 else left, internal_of[right] if right < 256 else right)
            if pair in seen:
                raise reader.error(f"merge {k + 1} repeats an earlier merge ({left}, {right})")
            seen.add(pair)
            merge_list.append(pair)
        reader.expect_end()
        try:
            cls._check_special_tokens(special_tokens, 256 + len(merge_list))
        except ValueError as exc:
            raise ValueError(f"{reader.path}: {exc}") from None
        tok._set_model(merge_list, special_tokens, byte_ids, trained=False)
        return tok


def gpt2_bytes_to_unicode():
    """GPT-2's map from each byte to a printable character.

    Bytes that are printable and not a space ('!'..'~', '¡'..'¬', '®'..'ÿ') map to
    themselves; the other 68 bytes map, in order, to chr(256), chr(257), ...
    This is why a space shows up as 'Ġ' (chr(288)) in GPT-2's files.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping

