"""BPE ids without holes (SPEC section 5, issue 18): merges take the ids below both vocab_size and
every special id, the special ids follow with no hole, vocab_size == max id + 1, and the naive
trainer (the oracle) follows the same rule."""
import argparse
import inspect
import tarfile
import typing

import pytest

from tinyllm.tokenizer import BPETokenizer
from tinyllm.tokenizer.naive import train_naive

SPECIALS = {"<|endoftext|>": 300, "<|im_start|>": 301}


@pytest.fixture(scope="module")
def text():
    """About 300 KB of Python source from the standard library: offline, enough pairs for 4,096 ids."""
    return "\n".join(inspect.getsource(m) for m in (argparse, inspect, tarfile, typing))


def every_id_decodes(tok):
    ids = [*tok.merges.values(), *tok.special_tokens.values()]
    assert tok.vocab_size == max(ids) + 1
    assert sorted(range(256)) + sorted(ids) == list(range(tok.vocab_size))
    for i in range(tok.vocab_size):
        assert tok.decode_bytes([i])


def test_worked_example_with_two_special_tokens(text):
    tok = BPETokenizer().train(text, 300, special_tokens=SPECIALS)
    assert len(tok.merges) == 44 and list(tok.merges.values()) == list(range(256, 300))
    assert tok.vocab_size == 302
    every_id_decodes(tok)
    assert tok.decode([298, 299]) and tok.encode("<|im_start|>", allowed_special="all") == [301]


def test_worked_example_with_one_special_token(text):
    tok = BPETokenizer().train(text, 4096, special_tokens={"<|endoftext|>": 4095})
    assert len(tok.merges) == 3839 and tok.vocab_size == 4096
    every_id_decodes(tok)


def test_a_special_id_below_vocab_size_caps_the_merges(text):
    tok = BPETokenizer().train(text, 400, special_tokens={"<|a|>": 280, "<|b|>": 281})
    assert len(tok.merges) == 24 and tok.vocab_size == 282
    every_id_decodes(tok)


@pytest.mark.parametrize("specials, message", [
    ({"<|a|>": 303}, "leave the ids 300-302 empty"),
    ({"<|a|>": 300, "<|b|>": 302}, "leave the id 301 empty"),
    ({"<|a|>": 297, "<|b|>": 299}, "leave the id 298 empty"),
    ({"<|a|>": 100}, "ids below 256"),
    ({"<|a|>": 300, "<|b|>": 300}, "share the id 300"),
])
def test_special_ids_that_leave_a_hole_are_refused(text, specials, message):
    with pytest.raises(ValueError, match=message):
        BPETokenizer().train(text, 300, special_tokens=specials)


def test_running_out_of_pairs_before_the_special_ids_is_refused():
    with pytest.raises(ValueError, match="pairs for only 2 merges"):
        BPETokenizer().train("ab ab", 1000, special_tokens={"<|e|>": 999})
    tok = BPETokenizer().train("ab ab", 1000, special_tokens={"<|e|>": 258})  # right after the merges
    assert tok.vocab_size == 259
    every_id_decodes(tok)
    assert BPETokenizer().train("ab ab", 1000).vocab_size == 258  # no special ids: just smaller


def test_empty_text_is_refused():
    with pytest.raises(ValueError, match="empty text"):
        BPETokenizer().train("", 300)
    with pytest.raises(ValueError, match="empty text"):
        train_naive("", 300)


@pytest.mark.parametrize("vocab_size, specials", [
    (300, SPECIALS), (300, {}), (290, {"<|a|>": 290}), (400, {"<|a|>b": 270, "<|a|>": 271}),
    (300, {"<|a|>": 303}), (300, {"<|a|>": 300, "<|b|>": 302}),
])
def test_naive_trainer_follows_the_same_rule(vocab_size, specials):
    sample = ("def f(x):\n    return x * 2  <|a|>b <|endoftext|> <|im_start|>\n" * 5
              + "class Point:\n    x: int\n    y: int\n" * 4)
    try:
        fast = BPETokenizer("gpt4").train(sample, vocab_size, special_tokens=specials)
    except ValueError:
        with pytest.raises(ValueError):
            train_naive(sample, vocab_size, "gpt4", special_tokens=specials)
        return
    assert list(fast.merges.items()) == list(train_naive(sample, vocab_size, "gpt4", specials).items())


def test_naive_trainer_refuses_running_out_of_pairs():
    with pytest.raises(ValueError, match="without a hole"):
        train_naive("ab ab", 1000, special_tokens={"<|e|>": 999})
    assert len(train_naive("ab ab", 1000, special_tokens={"<|e|>": 258})) == 2


def test_a_saved_tokenizer_with_a_hole_is_refused_at_load(tmp_path, text):
    path = tmp_path / "tok.txt"
    BPETokenizer().train(text, 300, special_tokens=SPECIALS).save(path)
    assert BPETokenizer.load(path).vocab_size == 302
    path.write_text(path.read_text().replace('"<|im_start|>" 301', '"<|im_start|>" 305'))
    with pytest.raises(ValueError, match="leave the ids 301-304 empty"):
        BPETokenizer.load(path)
