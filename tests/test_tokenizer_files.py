"""Tokenizer files (save/load/load_tokenizer) and the character-level tokenizer."""

import os
import pickle
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"

TEXT = "Hello world! Hello, hello world.\n\nIt's 2024: naïve café, 日本語 🎉🎉\r\n" * 4
ODD_SPECIALS = {"<|endoftext|>": 300, "two words": 301, "line\nbreak": 302, 'quote " \\ back': 303,
                "tab\there": 304, "é🎉": 305, "  ": 306, "#": 307}


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer("gpt4").train(TEXT, 308, special_tokens=ODD_SPECIALS)


def saved_lines(tok, tmp_path):
    path = tmp_path / "tok.txt"
    tok.save(path)
    return path, path.read_text(encoding="utf-8").split("\n")


# ----------------------------------------------------------------------------
# BPE files
# ----------------------------------------------------------------------------

def test_save_load_round_trip(tok, tmp_path):
    path, lines = saved_lines(tok, tmp_path)
    assert lines[0] == "tinyllm-bpe v1"
    assert lines[1].startswith('pattern "')
    assert lines[2] == "byte_ids identity"
    assert lines[3] == f"special_tokens {len(ODD_SPECIALS)}"
    assert lines[-2:] == ["end", ""]  # a closing line, so a cut-off file is detected
    for loaded in (BPETokenizer.load(path), load_tokenizer(path), BPETokenizer.load(str(path))):
        assert isinstance(loaded, BPETokenizer)
        assert loaded.pattern == tok.pattern
        assert list(loaded.merges.items()) == list(tok.merges.items())
        assert loaded.special_tokens == ODD_SPECIALS
        assert loaded.vocab_size == tok.vocab_size == 308
        text = TEXT + "".join(ODD_SPECIALS)
        assert loaded.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
        assert loaded.decode(tok.encode(text, allowed_special="all")) == text


def test_merge_lines_are_readable(tok, tmp_path):
    _, lines = saved_lines(tok, tmp_path)
    start = lines.index(f"merges {len(tok.merges)}") + 1
    (left, right), new_id = next(iter(tok.merges.items()))
    shown = tok.decode_bytes([new_id]).decode()
    assert lines[start] == f'{left} {right}  # "{shown}"'


def test_custom_pattern_and_empty_tokenizer_round_trip(tmp_path):
    path = tmp_path / "t.txt"
    custom = BPETokenizer(r"\s+|\w+|[^\s\w]+ #\n").train("ab ab, ab", 260)
    custom.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.pattern == custom.pattern
    assert loaded.encode("ab ab") == custom.encode("ab ab")
    BPETokenizer("gpt2").save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.vocab_size == 256 and loaded.merges == {} and loaded.pattern == BPETokenizer("gpt2").pattern


def test_save_is_atomic(tok, tmp_path, monkeypatch):
    path = tmp_path / "tok.txt"
    path.write_text("old contents", encoding="utf-8")
    tok.save(path)
    assert path.read_text(encoding="utf-8").startswith("tinyllm-bpe v1")
    assert sorted(os.listdir(tmp_path)) == ["tok.txt"]  # no temporary file left behind

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    path.write_text("old contents", encoding="utf-8")
    with pytest.raises(OSError, match="disk full"):
        tok.save(path)
    assert path.read_text(encoding="utf-8") == "old contents"
    assert sorted(os.listdir(tmp_path)) == ["tok.txt"]


def test_saved_file_permissions_follow_umask(tok, tmp_path):
    path = tmp_path / "tok.txt"
    old = os.umask(0o022)
    try:
        tok.save(path)
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644


def _write(tmp_path, lines, name="bad.txt"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _good_lines(tok, tmp_path):
    _, lines = saved_lines(tok, tmp_path)
    return lines[:-1]


CORRUPTIONS = [
    # (description, edit of the line list, expected line number, expected message part)
    ("empty file", lambda L: [], 1, "file ends early"),
    ("other format", lambda L: ["hello"] + L[1:], 1, "not a tinyllm BPE tokenizer file"),
    ("future version", lambda L: ["tinyllm-bpe v2"] + L[1:], 1, "unsupported format version"),
    ("char file", lambda L: ["tinyllm-char v1"] + L[1:], 1, "load_tokenizer"),
    ("bad pattern json", lambda L: L[:1] + ["pattern not-json"] + L[2:], 2, "not a valid JSON string"),
    ("pattern not a string", lambda L: L[:1] + ["pattern 5"] + L[2:], 2, "JSON string"),
    ("bad regex", lambda L: L[:1] + ['pattern "(unclosed"'] + L[2:], 2, "invalid pre-split pattern"),
    ("missing pattern", lambda L: L[:1] + L[2:], 2, "expected a 'pattern ...' line"),
    ("short byte_ids", lambda L: L[:2] + ["byte_ids 1 2 3"] + L[3:], 3, "256 non-negative integers"),
    ("byte_ids repeat", lambda L: L[:2] + ["byte_ids " + " ".join(["0"] * 256)] + L[3:], 3, "permutation"),
    ("bad count", lambda L: L[:3] + ["special_tokens x"] + L[4:], 4, "non-negative integer"),
    ("bad special line", lambda L: L[:4] + ['"<|endoftext|>"'] + L[5:], 5, "expected '\"<text>\" <id>'"),
    ("bad special json", lambda L: L[:4] + ['"<|endoftext| 300'] + L[5:], 5, "not a valid JSON string"),
    ("bad merge", lambda L: L[:13] + ["1 two"] + L[14:], 14, "expected a merge"),
    ("merge from the future", lambda L: L[:13] + ["400 401"] + L[14:], 14, "does not exist yet"),
    ("repeated merge", lambda L: L[:14] + [L[13]] + L[15:], 15, "repeats an earlier merge"),
    ("extra line", lambda L: L + ["surprise"], None, "unexpected extra content"),
    ("no end line", lambda L: L[:-1], None, "file ends early"),
    ("wrong end line", lambda L: L[:-1] + ["ending"], None, "expected the closing 'end' line"),
    ("truncated", lambda L: L[:-3], None, "file ends early"),
    ("last merge cut short", lambda L: L[:-2] + [L[-2].split("#")[0][:-4]], None, "'end' line"),
]


@pytest.mark.parametrize("what,edit,line,message", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_malformed_files_name_file_line_and_problem(tok, tmp_path, what, edit, line, message):
    lines = _good_lines(tok, tmp_path)
    assert lines[12] == f"merges {len(tok.merges)}"  # the edits above rely on this layout
    path = _write(tmp_path, edit(list(lines)))
    with pytest.raises(ValueError) as info:
        BPETokenizer.load(path)
    text = str(info.value)
    assert str(path) in text and message in text
    if line is not None:
        assert f"line {line}:" in text


def test_special_token_clash_in_file(tok, tmp_path):
    lines = _good_lines(tok, tmp_path)
    lines[4] = '"<|endoftext|>" 256'  # an id that a merge owns
    path = _write(tmp_path, lines)
    with pytest.raises(ValueError, match=r"bad\.txt: special token '<\|endoftext\|>' has id 256"):
        BPETokenizer.load(path)


@settings(max_examples=30, deadline=None)
@given(cut=st.integers(0, 10_000))
def test_every_truncation_is_refused(tok, tmp_path_factory, cut):
    path = tmp_path_factory.mktemp("cut") / "tok.txt"
    tok.save(path)
    data = path.read_bytes()
    cut = cut % len(data)
    if data[:cut] == data[:-1]:
        return  # only the final newline was cut: still a whole file
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="tok.txt"):
        BPETokenizer.load(path)


def test_pickle_is_never_loaded(tok, tmp_path):
    path = tmp_path / "tok.pkl"
    path.write_bytes(pickle.dumps({"merges": 1}))
    with pytest.raises(ValueError, match="tok.pkl"):
        load_tokenizer(path)
    with pytest.raises(ValueError, match="tok.pkl"):
        BPETokenizer.load(path)


def test_crlf_line_endings_are_tolerated(tok, tmp_path):
    path, _ = saved_lines(tok, tmp_path)
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert BPETokenizer.load(path).merges == tok.merges


def test_load_tokenizer_unknown_header(tmp_path):
    path = _write(tmp_path, ["something else"])
    with pytest.raises(ValueError, match="not a tinyllm tokenizer file"):
        load_tokenizer(path)


# ----------------------------------------------------------------------------
# CharTokenizer
# ----------------------------------------------------------------------------

def test_char_tokenizer_basics():
    ct = CharTokenizer.from_text("hello world")
    assert ct.chars == [" ", "d", "e", "h", "l", "o", "r", "w"]
    assert ct.vocab_size == 8
    assert ct.encode("hello") == [3, 2, 4, 4, 5]
    assert ct.decode([3, 2, 4, 4, 5]) == "hello"
    assert ct.encode("") == [] and ct.decode([]) == ""


def test_char_tokenizer_shakespeare():
    path = DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    text = path.read_text(encoding="utf-8")
    ct = CharTokenizer.from_text(text)
    assert ct.vocab_size == 65  # as in nanoGPT's shakespeare_char
    assert ct.chars[0] == "\n" and ct.chars[1] == " "
    ids = ct.encode(text)
    assert len(ids) == 1_115_394 and ct.decode(ids) == text


def test_char_tokenizer_errors():
    ct = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"character 'z' \(U\+007A\) at index 2"):
        ct.encode("abz")
    for bad in [3, -1, "a", 1.0]:
        with pytest.raises(ValueError, match="unknown token id"):
            ct.decode([0, bad])
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer.from_text("")
    with pytest.raises(TypeError):
        CharTokenizer.from_text(b"abc")
    with pytest.raises(TypeError):
        ct.encode(b"abc")


def test_char_tokenizer_accepts_numpy_ids():
    np = pytest.importorskip("numpy")
    ct = CharTokenizer.from_text("hello")
    ids = np.array(ct.encode("hello"))
    assert ct.decode(ids) == "hello"
    assert ct.decode(list(ids)) == "hello"  # a list of NumPy integers


@settings(max_examples=100, deadline=None)
@given(text=st.text(min_size=1, max_size=200))
def test_char_tokenizer_round_trip(text):
    ct = CharTokenizer.from_text(text)
    assert ct.decode(ct.encode(text)) == text
    assert ct.chars == sorted(set(text))


def test_char_tokenizer_file(tmp_path):
    text = 'ab "quoted" \\ \n\t\r\u2028é🎉\x00\ud800'
    ct = CharTokenizer.from_text(text)
    path = tmp_path / "chars.txt"
    ct.save(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[0] == "tinyllm-char v1" and lines[1] == f"chars {ct.vocab_size}"
    for loaded in (CharTokenizer.load(path), load_tokenizer(path)):
        assert isinstance(loaded, CharTokenizer)
        assert loaded.chars == ct.chars
        assert loaded.decode(loaded.encode(text)) == text
    assert sorted(os.listdir(tmp_path)) == ["chars.txt"]


@pytest.mark.parametrize("lines,line,message", [
    (["tinyllm-char v2", "chars 1", '"a"'], 1, "unsupported format version"),
    (["tinyllm-bpe v1", "chars 1", '"a"'], 1, "not a tinyllm character tokenizer file"),
    (["tinyllm-char v1", "chars 2", '"a"'], 4, "file ends early"),
    (["tinyllm-char v1", "chars 1", '"ab"', "end"], 3, "exactly one character"),
    (["tinyllm-char v1", "chars 2", '"a"', '"a"'], 4, "appears twice"),
    (["tinyllm-char v1", "chars 1", "a"], 3, "not a valid JSON string"),
    (["tinyllm-char v1", "chars 1", '"a"', '"b"'], 4, "expected the closing 'end' line"),
    (["tinyllm-char v1", "chars 1", '"a"', "end", "x"], 5, "unexpected extra content"),
    (["tinyllm-char v1", "chars 1", '"a"'], 4, "file ends early"),
    (["tinyllm-char v1", "chars 0"], 2, "at least one character"),
    (["tinyllm-char v1", "chars -1"], 2, "non-negative integer"),
])
def test_malformed_char_files(tmp_path, lines, line, message):
    path = _write(tmp_path, lines, "chars.txt")
    with pytest.raises(ValueError) as info:
        CharTokenizer.load(path)
    text = str(info.value)
    assert str(path) in text and f"line {line}:" in text and message in text
