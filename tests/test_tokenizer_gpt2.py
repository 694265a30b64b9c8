"""GPT-2's tokenizer imported with BPETokenizer.from_gpt2, checked three independent ways:
known answers, a slow reference encoder written here from GPT-2's original algorithm, and
tiktoken (when installed; its encodings are built offline from the same two files).
"""

import json
import unicodedata
from functools import lru_cache
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm.tokenizer import GPT2_PATTERN, GPT4_PATTERN, BPETokenizer, load_tokenizer

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ENCODER = DATA / "gpt2" / "encoder.json"
VOCAB = DATA / "gpt2" / "vocab.bpe"
CORPORA = ["tinyshakespeare.txt", "taylorswift.txt"]

pytestmark = pytest.mark.skipif(not (ENCODER.is_file() and VOCAB.is_file()),
                                reason=f"GPT-2's encoder.json/vocab.bpe not found under {DATA / 'gpt2'}")


@pytest.fixture(scope="module")
def gpt2():
    return BPETokenizer.from_gpt2(ENCODER, VOCAB)


@pytest.fixture(scope="module")
def encoder():
    return json.loads(ENCODER.read_text(encoding="utf-8"))


def corpus(name):
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------
# Known answers and the id layout
# ----------------------------------------------------------------------------

def test_known_answers(gpt2):
    assert gpt2.encode("hello world") == [31373, 995]
    assert gpt2.encode_ordinary("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    assert gpt2.encode("<|endoftext|>", disallowed_special=()) == [27, 91, 437, 1659, 5239, 91, 29]
    assert gpt2.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert gpt2.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    with pytest.raises(ValueError, match="allowed_special"):
        gpt2.encode("<|endoftext|>")
    assert gpt2.decode([31373, 995]) == "hello world"
    assert gpt2.decode([50256]) == "<|endoftext|>"


def test_id_layout(gpt2, encoder):
    assert gpt2.vocab_size == 50257 == len(encoder)
    assert gpt2.special_tokens == {"<|endoftext|>": 50256}
    assert gpt2.pattern == GPT2_PATTERN
    # Single bytes have GPT-2's permuted ids: "!" is 0, a space ("Ġ") is 220.
    assert gpt2.encode("!") == [0] and gpt2.encode(" ") == [220]
    assert gpt2.decode([0, 220]) == "! "
    merges = gpt2.merges
    assert len(merges) == 50000
    assert list(merges.values()) == list(range(256, 50256))
    assert next(iter(merges.items())) == ((encoder["Ġ"], encoder["t"]), 256)  # line 1: "Ġ t"
    vocab = gpt2.vocab
    assert all(vocab[i] == gpt2.decode_bytes([i]) for i in (0, 220, 256, 50255))


def test_every_gpt2_token_encodes_to_itself(gpt2):
    # GPT-2's merges are self-consistent: each token's bytes, merged on their own,
    # give back that token (as for merges learned by train(); see docs/tokenizer.md).
    # This is what lets bpe.SELF_CONSISTENT_MERGES list GPT-2's merges.
    from tinyllm.tokenizer.bpe import merge_small

    ranks = gpt2._ranks
    for internal_id, data in enumerate(gpt2._vocab):
        assert merge_small(list(data), ranks) == [internal_id]


def test_gpt2_gets_the_full_single_token_table(gpt2, tmp_path):
    from tinyllm.tokenizer.bpe import SELF_CONSISTENT_MERGES, merges_digest

    assert SELF_CONSISTENT_MERGES[merges_digest(gpt2._merge_list)] == "GPT-2"
    assert len(BPETokenizer.from_gpt2(ENCODER, VOCAB)._single) == 50256
    gpt2.save(tmp_path / "gpt2.tok")
    assert len(BPETokenizer.load(tmp_path / "gpt2.tok")._single) == 50256
    # Any other merge list starts from the 256 bytes and learns.
    other = BPETokenizer.from_gpt2(ENCODER, VOCAB)
    other._set_model(gpt2._merge_list[:-1], {}, gpt2._byte_ids, trained=False)
    assert len(other._single) == 256


def test_very_long_chunks(gpt2, encoder):
    # GPT-2 has merges "^ ^" and "^^ ^^" but none that extends "^^^^".
    assert gpt2.encode("^" * 1_000_000) == [encoder["^^^^"]] * 250_000
    assert gpt2.encode(" " * 100_000) == [220] * 100_000  # no merge joins two spaces
    ids = gpt2.encode("a" * 100_000)
    assert ids == reference_encode("a" * 100_000)
    assert gpt2.decode(ids) == "a" * 100_000


# ----------------------------------------------------------------------------
# An independent, slow reference: GPT-2's original algorithm, on its own strings
# ----------------------------------------------------------------------------

@lru_cache(maxsize=None)
def reference_tables():
    # The byte <-> printable character map, rebuilt here from its definition.
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    char_of_byte = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in char_of_byte):
        char_of_byte[b] = chr(256 + n)
    lines = VOCAB.read_text(encoding="utf-8").split("\n")[1:]
    pair_rank = {tuple(line.split()): rank for rank, line in enumerate(lines) if line}
    token_id = json.loads(ENCODER.read_text(encoding="utf-8"))
    # GPT-2's own pattern as first published (no possessive quantifiers).
    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    return char_of_byte, pair_rank, token_id, pattern


@lru_cache(maxsize=None)
def reference_word(word):
    """Classic GPT-2 BPE of one pre-split word written in the printable alphabet."""
    _, pair_rank, _, _ = reference_tables()
    parts = list(word)
    while len(parts) > 1:
        candidates = {(a, b) for a, b in zip(parts, parts[1:]) if (a, b) in pair_rank}
        if not candidates:
            break
        first, second = min(candidates, key=pair_rank.__getitem__)
        joined = []
        i = 0
        while i < len(parts):
            if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                joined.append(first + second)
                i += 2
            else:
                joined.append(parts[i])
                i += 1
        parts = joined
    return tuple(parts)


def reference_encode(text):
    char_of_byte, _, token_id, pattern = reference_tables()
    ids = []
    for piece in pattern.findall(text):
        word = "".join(char_of_byte[b] for b in piece.encode("utf-8"))
        ids.extend(token_id[part] for part in reference_word(word))
    return ids


def test_reference_encoder_known_answers():
    assert reference_encode("hello world") == [31373, 995]
    assert reference_encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]


@pytest.mark.parametrize("name", CORPORA)
def test_whole_corpus_matches_reference(gpt2, name):
    text = corpus(name)
    ids = gpt2.encode_ordinary(text)
    assert ids == reference_encode(text)
    assert gpt2.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
def test_arbitrary_text_matches_reference(gpt2, text):
    assert gpt2.encode_ordinary(text) == reference_encode(text)


# ----------------------------------------------------------------------------
# tiktoken, when installed: its gpt2 and cl100k_base rules, built offline
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiktoken_patterns():
    """tiktoken's own pattern strings for gpt2 and cl100k_base (their rank files are
    downloaded on first use, which these tests cannot do, so that part is stubbed)."""
    tiktoken = pytest.importorskip("tiktoken")
    from unittest import mock

    try:
        import tiktoken_ext.openai_public as public

        with mock.patch.object(public, "load_tiktoken_bpe", lambda *a, **k: {}), \
                mock.patch.object(public, "data_gym_to_mergeable_bpe_ranks", lambda *a, **k: {}):
            patterns = {"gpt2": public.gpt2()["pat_str"], "gpt4": public.cl100k_base()["pat_str"]}
    except Exception as exc:  # a tiktoken whose layout differs: nothing to compare with
        pytest.skip(f"cannot read tiktoken's pattern strings: {exc!r}")
    return tiktoken, patterns


@pytest.fixture(scope="module")
def tiktoken_encodings(tiktoken_patterns, encoder):
    """tiktoken Encodings with GPT-2's ranks (by bytes) and each pattern."""
    tiktoken, patterns = tiktoken_patterns
    char_of_byte, _, _, _ = reference_tables()
    byte_of_char = {c: b for b, c in char_of_byte.items()}
    ranks = {bytes(byte_of_char[c] for c in token): i for token, i in encoder.items()
             if token != "<|endoftext|>"}
    return {name: tiktoken.Encoding(name=f"tinyllm-test-{name}", pat_str=pat, mergeable_ranks=ranks,
                                     special_tokens={"<|endoftext|>": 50256})
            for name, pat in patterns.items()}


@pytest.fixture(scope="module")
def gpt2_with_gpt4_split():
    return BPETokenizer.from_gpt2(ENCODER, VOCAB, pattern="gpt4")


def test_tiktoken_pattern_strings(tiktoken_patterns):
    _, patterns = tiktoken_patterns
    assert patterns == {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}


@pytest.mark.parametrize("name", CORPORA)
def test_whole_corpus_matches_tiktoken(gpt2, gpt2_with_gpt4_split, tiktoken_encodings, name):
    text = corpus(name)
    assert gpt2.encode_ordinary(text) == tiktoken_encodings["gpt2"].encode_ordinary(text)
    assert gpt2_with_gpt4_split.encode_ordinary(text) == tiktoken_encodings["gpt4"].encode_ordinary(text)


SPLIT_PIECES = [" ", "  ", "   ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x85", "\xa0",
                "\u2028", "\u3000", "a", "Z", "abc", "'", "'s", "'S", "'ll", "'LL", "'Re", "'x",
                "0", "12", "12345", "٣", "Ⅻ", "½", "!", "?!", ".", "-", "_", "(", "@", "é", "e\u0301",
                "\u0301", "日本", "🎉", "👍🏽", "\u200d", "<|endoftext|>"]
# Only characters this Python's Unicode database knows: the regex module and tiktoken's
# regex engine each carry their own Unicode tables, and a character assigned in a newer
# Unicode version than one of them knows (e.g. CJK Extension J, Unicode 17) may be a
# letter to one and unassigned to the other.
known_char = st.characters(codec="utf-8").filter(lambda c: unicodedata.category(c) != "Cn")
split_text = st.one_of(st.lists(st.sampled_from(SPLIT_PIECES), max_size=30).map("".join),
                       st.text(alphabet=known_char, max_size=100))


@settings(max_examples=400, deadline=None)
@given(text=split_text)
def test_splits_match_tiktoken(gpt2, gpt2_with_gpt4_split, tiktoken_encodings, text):
    # Encodings agree only if the pre-split chunks agree, so this checks that the
    # regex module reads both patterns exactly as tiktoken's regex engine does.
    assert gpt2.encode_ordinary(text) == tiktoken_encodings["gpt2"].encode_ordinary(text)
    assert gpt2_with_gpt4_split.encode_ordinary(text) == tiktoken_encodings["gpt4"].encode_ordinary(text)


def test_special_tokens_match_tiktoken(gpt2, tiktoken_encodings):
    enc = tiktoken_encodings["gpt2"]
    text = "a<|endoftext|>b <|endoftext|><|endoftext|>"
    assert gpt2.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    assert gpt2.encode(text, disallowed_special=()) == enc.encode(text, disallowed_special=())
    with pytest.raises(ValueError):
        enc.encode(text)
    with pytest.raises(ValueError):
        gpt2.encode(text)


# ----------------------------------------------------------------------------
# Saving and loading an imported GPT-2 keeps GPT-2's ids
# ----------------------------------------------------------------------------

def test_save_load_keeps_gpt2_ids(gpt2, tmp_path):
    path = tmp_path / "gpt2.tok"
    gpt2.save(path)
    head = path.read_text(encoding="utf-8").split("\n")[:5]
    assert head[0] == "tinyllm-bpe v1"
    assert head[2].startswith("byte_ids 188 189 ")  # byte 0 has GPT-2 id 188
    assert head[4] == '"<|endoftext|>" 50256'
    for loaded in (BPETokenizer.load(path), load_tokenizer(path)):
        assert loaded.merges == gpt2.merges
        assert loaded.special_tokens == gpt2.special_tokens
        assert loaded.pattern == gpt2.pattern
        assert loaded.encode("hello world") == [31373, 995]
        assert loaded.encode("<|endoftext|>", allowed_special="all") == [50256]
    text = corpus("taylorswift.txt")
    assert loaded.encode_ordinary(text) == gpt2.encode_ordinary(text)


def test_from_gpt2_rejects_broken_files(tmp_path):
    bad_vocab = tmp_path / "vocab.bpe"
    bad_vocab.write_text("#version: 0.2\nĠ t\nĠt he extra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.bpe, line 3: expected two tokens"):
        BPETokenizer.from_gpt2(ENCODER, bad_vocab)
    bad_vocab.write_text("#version: 0.2\nĠ t\nĠth e\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 3: merges a token that no earlier line created"):
        BPETokenizer.from_gpt2(ENCODER, bad_vocab)
