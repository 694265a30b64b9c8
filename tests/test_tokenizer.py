"""Tests for tinyllm.tokenizer: BPE training (fast vs naive), encoding, special tokens, decoding."""

import re
from pathlib import Path

import pytest
import regex
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tinyllm.tokenizer import GPT2_PATTERN, GPT4_PATTERN, BPETokenizer, patterns
from tinyllm.tokenizer.bpe import merge_heap, merge_small
from tinyllm.tokenizer.naive import encode_chunk_naive, encode_naive, train_naive

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "tinyshakespeare.txt").is_file(),
                                reason=f"shared corpora not found under {DATA}")

SAMPLE = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.  It's 2024 -- we'll see THEY'RE here!!!   \t
Taylor Alison Swift (born December 13, 1989) is an American singer-songwriter.
  indented    code(); x=1_000_000 # comment\r\n\r\nemoji 🎉🎉 café naïve 日本語テキスト
"""

# Text that stresses the pre-split patterns and UTF-8: whitespace runs of every kind,
# CRLF, contractions in both cases, digits, emoji, combining marks, other scripts.
PIECES = [" ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\x85", "\u00a0", "\u2028", "\u3000",
          "a", "b", "ab", "The", "THE", "'s", "'S", "'ll", "'VE", "don't", "1", "12345", "٣", "Ⅻ",
          "!", "?!", "...", "-", "_", "@", "é", "e\u0301", "\u0301", "ñ", "日本", "한국어", "🎉", "👍🏽",
          "👨‍👩‍👧", "\U0001f600", "\x00", "\u200d", "ß", "İ", "ﬁ"]
tricky_text = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)
any_text = st.one_of(st.text(max_size=200), tricky_text)


@pytest.fixture(scope="module")
def trained():
    """A small tokenizer trained on SAMPLE repeated, with two special tokens."""
    tok = BPETokenizer("gpt4")
    tok.train(SAMPLE * 3, 400, special_tokens={"<|endoftext|>": 398, "<|fim middle|>\n": 399})
    return tok


# ----------------------------------------------------------------------------
# Patterns
# ----------------------------------------------------------------------------

def test_patterns_by_name():
    assert BPETokenizer("gpt2").pattern == GPT2_PATTERN
    assert BPETokenizer("gpt4").pattern == GPT4_PATTERN
    assert BPETokenizer().pattern == GPT4_PATTERN
    assert BPETokenizer(r"\w+|\W").pattern == r"\w+|\W"


def test_bad_pattern_is_a_clear_error():
    with pytest.raises(ValueError, match="invalid pre-split pattern"):
        BPETokenizer("(unclosed")


def test_gpt2_and_gpt4_splits():
    text = "Hello's WORLD'S 12345 \n\n  x  "
    assert BPETokenizer("gpt2")._split(text) == [
        "Hello", "'s", " WORLD", "'", "S", " 12345", " \n\n ", " x", "  "]
    assert BPETokenizer("gpt4")._split(text) == [
        "Hello", "'s", " WORLD", "'S", " ", "123", "45", " \n\n", " ", " x", "  "]


def test_custom_pattern_never_drops_text():
    # \w+ alone skips spaces and punctuation; the skipped text still gets encoded.
    tok = BPETokenizer(r"\w+")
    tok.train("hello, world! hello world", 270)
    for text in ["hello, world!", "  ", "!!", ""]:
        assert tok.decode(tok.encode(text)) == text


# The ASCII fast path: the stdlib-re twins must split ASCII text exactly as the regex patterns.

ASCII = "".join(map(chr, range(128)))


@pytest.mark.parametrize("unicode_class, ascii_class", [
    (r"\s", patterns.ASCII_SPACE), (r"\p{L}", patterns.ASCII_LETTER), (r"\p{N}", patterns.ASCII_DIGIT)])
def test_ascii_classes_match_the_unicode_classes(unicode_class, ascii_class):
    expected = [c for c in ASCII if regex.fullmatch(unicode_class, c)]
    assert [c for c in ASCII if re.fullmatch(f"[{ascii_class}]", c)] == expected


ASCII_PIECES = [" ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\x1c", "\x1f", "\x00", "\x7f",
                "a", "Z", "'s", "'S", "'ll", "'Ve", "don't", "1", "1234567", "!", "?!", "_", "'", "$"]
ascii_text = st.one_of(st.text(alphabet=ASCII, max_size=200),
                       st.lists(st.sampled_from(ASCII_PIECES), max_size=40).map("".join))


@given(text=ascii_text, pattern=st.sampled_from(["gpt2", "gpt4"]))
def test_ascii_twin_splits_like_the_regex_pattern(text, pattern):
    assert patterns.compile_ascii_twin(pattern).findall(text) == patterns.compile_pattern(pattern).findall(text)


@needs_data
@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_ascii_twin_splits_the_corpus_like_the_regex_pattern(pattern):
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
    assert text.isascii()
    assert patterns.compile_ascii_twin(pattern).findall(text) == patterns.compile_pattern(pattern).findall(text)


def test_regex_whitespace_is_within_str_isspace():
    # is_safe_cut reads "not isspace" as "not regex \s": that needs every \s character to be isspace.
    every_char = "".join(map(chr, range(0x110000))).encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    assert all(c.isspace() for c in regex.findall(r"\s", every_char))


LINE_PIECES = ASCII_PIECES + ["\n", "\n\n", "x\n", "\nY", ".\n", "é", "\u00a0", "\u2028", "\x85", "🎉", "日本",
                              "\u3000", "'é", " é", "x ", ". ", "1 ", " \n", "\n "]
mixed_text = st.lists(st.sampled_from(LINE_PIECES), max_size=60).map("".join)


@given(text=st.one_of(mixed_text, any_text), pattern=st.sampled_from(["gpt2", "gpt4"]),
       stretch=st.sampled_from([0, 3, 64]))
@example(text="x.\né", pattern="gpt4", stretch=0)  # a newline is no safe cut (".\n" is one chunk)
@example(text="x\n  é", pattern="gpt4", stretch=0)  # nor a space after whitespace
def test_mostly_ascii_text_splits_like_the_regex_pattern(text, pattern, stretch):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(patterns, "MIN_ASCII_STRETCH", stretch)  # 0: cut at every safe line break
        assert BPETokenizer(pattern)._split(text) == patterns.compile_pattern(pattern).findall(text)


@needs_data
@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_mixed_corpus_splits_like_the_regex_pattern(pattern):
    text = (DATA / "taylorswift.txt").read_text(encoding="utf-8")
    assert not text.isascii()
    for stretch in (0, patterns.MIN_ASCII_STRETCH):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(patterns, "MIN_ASCII_STRETCH", stretch)
            assert BPETokenizer(pattern)._split(text) == patterns.compile_pattern(pattern).findall(text)


def test_custom_patterns_have_no_ascii_twin():
    assert patterns.compile_ascii_twin(r"\w+") is None
    assert BPETokenizer(r"\w+")._ascii_regex is None


# ----------------------------------------------------------------------------
# Training: rules, and the fast trainer against the naive one
# ----------------------------------------------------------------------------

def test_tie_goes_to_smallest_pair():
    # (a,b), (b,c), (c,d) all occur once: the smallest pair, (a,b), goes first;
    # then (256,c) and (c,d) tie and (c,d) = (99,100) is the smaller.
    tok = BPETokenizer("gpt4").train("abcd", 259)
    assert list(tok.merges.items()) == [((97, 98), 256), ((99, 100), 257), ((256, 257), 258)]


def test_overlapping_runs_merge_left_to_right():
    tok = BPETokenizer("gpt4").train("aaaa", 258)
    # "aaaa" holds (a,a) three times; merging gives [aa, aa], then (aa, aa).
    assert list(tok.merges.items()) == [((97, 97), 256), ((256, 256), 257)]
    assert tok.encode("aaa") == [256, 97]
    assert tok.encode("aaaa") == [257]
    assert tok.encode("aaaaa") == [257, 97]
    assert tok.encode("aaaaaaa") == [257, 256, 97]


def test_most_frequent_pair_wins():
    tok = BPETokenizer("gpt4").train("xy xy xy ab", 257)
    # " xy" appears twice and "xy" once: (x, y) occurs 3 times, (32, x) twice.
    assert tok.merges == {(ord("x"), ord("y")): 256}


def test_new_ids_in_merge_order_and_vocab_size():
    tok = BPETokenizer("gpt2").train(SAMPLE, 300)
    assert list(tok.merges.values()) == list(range(256, 300))
    assert tok.vocab_size == 300
    assert len(tok.vocab) == 300


def test_early_stop_when_no_pairs_left():
    tok = BPETokenizer("gpt4").train("ab ab", 1000)
    # Chunks "ab" and " ab": (a,b) then (32, ab); then every chunk is one token.
    assert list(tok.merges.items()) == [((97, 98), 256), ((32, 256), 257)]
    assert tok.vocab_size == 258


def test_vocab_size_must_cover_the_bytes():
    with pytest.raises(ValueError, match="at least 256"):
        BPETokenizer().train("hello", 255)
    with pytest.raises(TypeError):
        BPETokenizer().train("hello", 300.0)
    with pytest.raises(TypeError):
        BPETokenizer().train(b"hello", 300)


def test_special_token_validation():
    with pytest.raises(ValueError, match="leave the id 298 empty"):
        BPETokenizer().train(SAMPLE, 300, special_tokens={"<|a|>": 297, "<|b|>": 299})
    with pytest.raises(ValueError, match="share the id 299"):
        BPETokenizer().train(SAMPLE, 300, special_tokens={"<|a|>": 299, "<|b|>": 299})
    with pytest.raises(ValueError, match="non-empty"):
        BPETokenizer().train(SAMPLE, 300, special_tokens={"": 299})
    with pytest.raises(ValueError, match="not an int"):
        BPETokenizer().train(SAMPLE, 300, special_tokens={"<|a|>": "299"})


def test_special_tokens_come_after_the_merges(trained):
    assert trained.special_tokens == {"<|endoftext|>": 398, "<|fim middle|>\n": 399}
    assert trained.vocab_size == 400
    assert max(trained.merges.values()) == 397
    # Special text is cut out of the training text: no token holds part of it
    # together with its neighbours.
    tok = BPETokenizer("gpt4").train("hello<|endoftext|>hello<|endoftext|>" * 20, 300,
                                     special_tokens={"<|endoftext|>": 260})  # "hello" makes 4 merges
    for token_id, data in tok.vocab.items():
        if token_id != 260:
            assert b"|>h" not in data and b"o<|" not in data


CORPUS_SLICES = [("tinyshakespeare.txt", 0, 20_000), ("taylorswift.txt", 5_000, 25_000)]


@needs_data
@pytest.mark.parametrize("name,start,stop", CORPUS_SLICES)
@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
@pytest.mark.parametrize("vocab_size", [256, 300, 600])
def test_fast_trainer_matches_naive_on_corpora(name, start, stop, pattern, vocab_size):
    text = (DATA / name).read_text(encoding="utf-8")[start:stop]
    fast = BPETokenizer(pattern).train(text, vocab_size)
    naive = train_naive(text, vocab_size, pattern)
    assert list(fast.merges.items()) == list(naive.items())
    # And encoding with those merges agrees with the naive encoder.
    sample = text[:3000]
    assert fast.encode_ordinary(sample) == encode_naive(sample, naive, pattern)


@pytest.mark.parametrize("text", [
    "aaaa", "aaaaa aaaaaaa aa a", "abababab abab", "ab" * 50 + " " + "ba" * 30,
    "\n\n\n\n  \n\n\t\t", "😀😀😀 😀😀", "x" * 300, SAMPLE,
])
@pytest.mark.parametrize("pattern", ["gpt4", r"(?s).+"])
def test_fast_trainer_matches_naive_on_runs(text, pattern):
    # (?s).+ makes the whole text one chunk: long runs with many overlapping pairs.
    for vocab_size in (257, 260, 280, 400):
        fast = BPETokenizer(pattern).train(text, vocab_size)
        assert list(fast.merges.items()) == list(train_naive(text, vocab_size, pattern).items())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(alphabet="aab ^\n", min_size=1, max_size=120), extra=st.integers(0, 40),
       pattern=st.sampled_from(["gpt2", "gpt4", r"(?s).+"]))
def test_fast_trainer_matches_naive_property(text, extra, pattern):
    vocab_size = 256 + extra
    fast = BPETokenizer(pattern).train(text, vocab_size)
    naive = train_naive(text, vocab_size, pattern)
    assert list(fast.merges.items()) == list(naive.items())
    assert fast.encode(text) == encode_naive(text, naive, pattern)


# ----------------------------------------------------------------------------
# Encoding one chunk: fast paths, small and long chunks
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_merges():
    """Merges learned from runs and repeats, so long chunks have much to merge."""
    text = "aaaaaaaaaaaaaaaaab abababababab ^^^^^^^^^^^^^^ " * 5 + SAMPLE
    return train_naive(text, 330, r"(?s).+")


@settings(max_examples=200, deadline=None)
@given(data=st.lists(st.sampled_from(b"ab ^\ncd"), max_size=300))
def test_small_and_heap_merges_match_naive(run_merges, data):
    expected = encode_chunk_naive(bytes(data), run_merges)
    assert merge_small(list(data), run_merges) == expected
    assert merge_heap(list(data), run_merges) == expected


def test_every_trained_token_encodes_to_itself(trained):
    # The fast path for trained tokenizers relies on this (docs/tokenizer.md).
    for token_id, data in trained.vocab.items():
        if token_id < 256 + len(trained.merges):
            assert merge_small(list(data), trained._ranks) == [token_id]


def test_encoding_does_not_depend_on_the_cache(trained):
    first = trained.encode(SAMPLE, disallowed_special=())
    trained._cache.clear()
    assert trained.encode(SAMPLE, disallowed_special=()) == first
    fresh = BPETokenizer("gpt4")
    fresh._set_model(trained._merge_list, trained.special_tokens, None, trained=False)
    assert fresh.encode(SAMPLE, disallowed_special=()) == first


@pytest.mark.parametrize("text", ["a" * 100_000, " " * 100_000, "^" * 1_000_000],
                         ids=["a*100k", "space*100k", "caret*1M"])
def test_very_long_chunks(trained, run_merges, text):
    # Each is a single pre-split chunk; the bucketed heap merge keeps this
    # O(n log n) where rescanning would be quadratic.  (GPT-2's exact answers
    # for these are in test_tokenizer_gpt2.py.)
    assert trained.decode(trained.encode(text)) == text
    tok = BPETokenizer(r"(?s).+")
    tok._set_model(list(run_merges), {}, None, trained=False)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    if len(text) <= 100_000:  # the naive encoder is too slow for the longest one
        assert ids == encode_chunk_naive(text.encode(), run_merges)
    else:
        assert len(ids) < len(text) // 4  # runs of "^" were merged, level after level


# ----------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(text=any_text)
def test_round_trip_trained(trained, text):
    assert trained.decode(trained.encode(text)) == text
    assert trained.decode_bytes(trained.encode_ordinary(text)) == text.encode("utf-8")


@settings(max_examples=100, deadline=None)
@given(text=any_text, pattern=st.sampled_from(["gpt2", "gpt4"]))
def test_round_trip_untrained(text, pattern):
    tok = BPETokenizer(pattern)
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", ["", " ", "\r\n", "\r\n\r\n  \t\n", "   leading", "trailing   ",
                                  "🎉", "e\u0301", "a\u0300\u0301\u0302", "👨‍👩‍👧"])
def test_round_trip_edge_cases(trained, text):
    assert trained.decode(trained.encode(text)) == text


def test_lone_surrogate_is_a_clear_error(trained):
    for text in ["a\ud800b", "\udfff", "x" * 10 + "\ud83d"]:
        with pytest.raises(ValueError, match="surrogate"):
            trained.encode(text)
        with pytest.raises(ValueError, match="surrogate"):
            trained.encode_ordinary(text)
    with pytest.raises(ValueError, match="surrogate"):
        BPETokenizer().train("ok \ud800", 260)


def test_encode_rejects_non_text(trained):
    with pytest.raises(TypeError):
        trained.encode(b"bytes")
    with pytest.raises(TypeError):
        trained.encode_ordinary(None)


# ----------------------------------------------------------------------------
# Special tokens when encoding (tiktoken's rules)
# ----------------------------------------------------------------------------

def test_special_text_is_refused_by_default(trained):
    with pytest.raises(ValueError) as info:
        trained.encode("hi <|endoftext|> there")
    message = str(info.value)
    assert "<|endoftext|>" in message
    assert "allowed_special" in message and "disallowed_special=()" in message


def test_special_text_as_ordinary_text(trained):
    text = "hi <|endoftext|> there"
    ids = trained.encode(text, disallowed_special=())
    assert ids == trained.encode_ordinary(text)
    assert 398 not in ids
    assert trained.decode(ids) == text


def test_allowed_special_tokens(trained):
    text = "a<|endoftext|>b<|fim middle|>\nc"
    ids = trained.encode(text, allowed_special="all")
    assert ids == (trained.encode_ordinary("a") + [398] + trained.encode_ordinary("b") + [399]
                   + trained.encode_ordinary("c"))
    assert trained.decode(ids) == text
    assert trained.encode(text, allowed_special={"<|endoftext|>", "<|fim middle|>\n"}) == ids
    # Allowing one while the other stays disallowed (the default) refuses the other.
    with pytest.raises(ValueError, match="fim middle"):
        trained.encode(text, allowed_special={"<|endoftext|>"})
    # ... unless that one is not disallowed either: then it is ordinary text.
    ids = trained.encode(text, allowed_special={"<|endoftext|>"}, disallowed_special=())
    assert 398 in ids and 399 not in ids
    assert trained.decode(ids) == text


def test_text_between_specials_is_split_separately(trained):
    # A chunk never runs across a special token.
    ids = trained.encode("word<|endoftext|>word", allowed_special="all")
    word = trained.encode_ordinary("word")
    assert ids == word + [398] + word


def test_longest_special_wins():
    tok = BPETokenizer("gpt4").train(SAMPLE, 300, special_tokens={"<|a|>": 298, "<|a|>b": 299})
    assert tok.encode("<|a|>b<|a|>", allowed_special="all") == [299, 298]
    assert tok.encode("x<|a|>bb", allowed_special="all") == tok.encode("x") + [299] + tok.encode("b")


def test_disallowed_special_set_is_checked_as_given(trained):
    # tiktoken semantics: a disallowed set is searched for as given.
    with pytest.raises(ValueError, match="<|endoftext|>"):
        trained.encode("x <|endoftext|>", disallowed_special={"<|endoftext|>"})
    assert trained.encode("x <|endoftext|>", disallowed_special=set()) == \
        trained.encode_ordinary("x <|endoftext|>")


def test_bad_special_arguments(trained):
    with pytest.raises(ValueError, match="did you mean"):
        trained.encode("x", allowed_special="<|endoftext|>")
    with pytest.raises(TypeError):
        trained.encode("x", allowed_special={1})
    with pytest.raises(TypeError):
        trained.encode("x", disallowed_special=5)


def test_without_special_tokens_encode_equals_ordinary():
    tok = BPETokenizer("gpt2").train(SAMPLE, 300)
    assert tok.encode("<|endoftext|>") == tok.encode_ordinary("<|endoftext|>")
    assert tok.encode("<|endoftext|>", allowed_special="all") == tok.encode_ordinary("<|endoftext|>")


# ----------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------

def test_decode_unknown_id(trained):
    for bad in [400, -1, 10**9]:
        with pytest.raises(ValueError, match=f"unknown token id {bad}.*400 ids"):
            trained.decode([1, 2, bad])
    with pytest.raises(ValueError, match="unknown token id"):
        trained.decode_bytes([None])


def test_decode_partial_utf8(trained):
    ids = trained.encode("é")  # two bytes, maybe two tokens
    data = "é".encode("utf-8")
    assert trained.decode_bytes(list(data)) == data
    assert trained.decode([data[0]]) == "\ufffd"
    with pytest.raises(UnicodeDecodeError):
        trained.decode([data[0]], errors="strict")
    assert trained.decode(ids) == "é"


def test_decode_accepts_iterables(trained):
    ids = trained.encode("hello there")
    assert trained.decode(iter(ids)) == "hello there"
    assert trained.decode(tuple(ids)) == "hello there"
    np = pytest.importorskip("numpy")
    assert trained.decode(np.array(ids)) == "hello there"
    assert trained.decode(list(np.array(ids))) == "hello there"  # a list of NumPy integers


def test_merges_and_vocab_are_copies(trained):
    merges = trained.merges
    merges.clear()
    assert trained.merges
    specials = trained.special_tokens
    specials["x"] = 5
    assert "x" not in trained.special_tokens


def test_repr(trained):
    assert repr(trained) == "BPETokenizer(pattern='gpt4', vocab_size=400, merges=142, special_tokens=2)"
