import hashlib
import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tinyllm import data
from tinyllm.data import (
    BatchLoader,
    DatasetError,
    load_dataset_tokenizer,
    load_meta,
    prepare_dataset,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare.txt"
GPT2_DIR = SHARED / "gpt2"

needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="shared Tiny Shakespeare not present")

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20


def quiet(*args):
    pass


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


def read_split(directory, split, dtype="uint16"):
    return np.fromfile(Path(directory) / f"{split}.bin", dtype=dtype)


# ---------------------------------------------------------------- preparation


@needs_shakespeare
def test_shakespeare_char_matches_nanogpt(tmp_path):
    meta = prepare_dataset("shakespeare_char", tmp_path / "d", input_path=SHAKESPEARE, log=quiet)
    assert meta["vocab_size"] == 65
    assert meta["train_tokens"] == 1_003_854
    assert meta["val_tokens"] == 111_540
    assert meta["dtype"] == "uint16"
    assert meta["source_sha256"] == data.SHAKESPEARE_SHA256
    assert load_meta(tmp_path / "d") == meta
    assert (tmp_path / "d" / "train.bin").stat().st_size == 2 * 1_003_854
    tok = load_dataset_tokenizer(tmp_path / "d")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    assert tok.decode(read_split(tmp_path / "d", "train")[:40].tolist()) == text[:40]
    assert tok.decode(read_split(tmp_path / "d", "val")[-40:].tolist()) == text[-40:]


def test_text_char_level_split(tmp_path, corpus):
    meta = prepare_dataset("text", tmp_path / "d", input_path=corpus, log=quiet)
    tok = load_dataset_tokenizer(tmp_path / "d")
    ids = tok.encode(CORPUS)
    n_train = int(len(ids) * 0.9)
    np.testing.assert_array_equal(read_split(tmp_path / "d", "train"), ids[:n_train])
    np.testing.assert_array_equal(read_split(tmp_path / "d", "val"), ids[n_train:])
    assert meta["tokenizer"] == "char"
    assert meta["vocab_size"] == len(set(CORPUS))
    assert meta["source_sha256"] == hashlib.sha256(CORPUS.encode()).hexdigest()
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["meta.json", "tokenizer.txt", "train.bin", "val.bin"]


def test_text_bpe(tmp_path, corpus):
    meta = prepare_dataset("text", tmp_path / "d", input_path=corpus, vocab_size=300, log=quiet)
    assert meta["tokenizer"] == "bpe"
    assert meta["vocab_size"] == 300
    tok = load_dataset_tokenizer(tmp_path / "d")
    ids = np.concatenate([read_split(tmp_path / "d", "train"), read_split(tmp_path / "d", "val")])
    assert tok.decode(ids.tolist()) == CORPUS
    assert ids.max() < 300


@pytest.mark.skipif(not (GPT2_DIR / "vocab.bpe").is_file(), reason="shared GPT-2 tokenizer files not present")
def test_text_with_gpt2_tokenizer(tmp_path):
    path = tmp_path / "hello.txt"
    path.write_text("hello world" * 10, encoding="utf-8")
    meta = prepare_dataset("text", tmp_path / "d", input_path=path, gpt2_dir=GPT2_DIR, log=quiet)
    assert meta["tokenizer"] == "gpt2"
    assert meta["vocab_size"] == 50257
    assert read_split(tmp_path / "d", "train")[:2].tolist() == [31373, 995]


def test_large_vocabulary_uses_uint32(tmp_path):
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 70_000) if not 0xD800 <= c <= 0xDFFF]
    path = tmp_path / "wide.txt"
    path.write_text("".join(chars), encoding="utf-8")
    meta = prepare_dataset("text", tmp_path / "d", input_path=path, log=quiet)
    assert meta["vocab_size"] == len(chars) > 65_535
    assert meta["dtype"] == "uint32"
    assert (tmp_path / "d" / "train.bin").stat().st_size == 4 * meta["train_tokens"]
    assert read_split(tmp_path / "d", "val", "uint32").max() == len(chars) - 1  # unique chars, sorted ids


def test_token_dtype_boundary():
    assert data._token_dtype(65_535) == np.uint16
    assert data._token_dtype(65_536) == np.uint32


def test_pystdlib_is_offline_capped_and_deterministic(tmp_path):
    a = prepare_dataset("pystdlib", tmp_path / "a", max_chars=20_000, log=quiet)
    b = prepare_dataset("pystdlib", tmp_path / "b", max_chars=20_000, log=quiet)
    assert a["source_chars"] == 20_000
    assert a["train_tokens"] == 18_000 and a["val_tokens"] == 2_000
    assert a["source_sha256"] == b["source_sha256"]
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "b" / "train.bin").read_bytes()
    text, root = data.pystdlib_text(max_chars=5_000)
    assert Path(root).is_dir() and len(text) == 5_000


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_offline_says_to_pass_input(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetError, match="--input PATH"):
        prepare_dataset("shakespeare_char", tmp_path / "d", log=quiet)
    assert not (tmp_path / "d" / "meta.json").exists()


def test_download_checks_sha256(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(b"not shakespeare"))
    with pytest.raises(DatasetError, match="sha256"):
        prepare_dataset("shakespeare_char", tmp_path / "d", log=quiet)


@needs_shakespeare
def test_download_path_accepts_the_right_bytes(tmp_path, monkeypatch):
    urls = []

    def fake(url, timeout=None):
        urls.append(url)
        return FakeResponse(SHAKESPEARE.read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    meta = prepare_dataset("shakespeare_char", tmp_path / "d", log=quiet)
    assert urls == [data.SHAKESPEARE_URL]
    assert meta["train_tokens"] == 1_003_854
    assert meta["source"] == data.SHAKESPEARE_URL


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("imagenet", {}, "unknown dataset"),
        ("text", {}, "needs --input"),
        ("shakespeare_char", {"vocab_size": 500}, "character-level"),
        ("pystdlib", {"input_path": "x.txt"}, "'text' dataset"),
        ("text", {"input_path": "/nonexistent/file.txt"}, "cannot read"),
        ("text", {"input_path": "x.txt", "vocab_size": 100}, "at least 256"),
    ],
)
def test_prepare_errors(tmp_path, monkeypatch, name, kwargs, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.txt").write_text("abc", encoding="utf-8")
    with pytest.raises(DatasetError, match=message):
        prepare_dataset(name, tmp_path / "d", log=quiet, **kwargs)


def test_prepare_rejects_non_utf8_and_empty(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DatasetError, match="not UTF-8"):
        prepare_dataset("text", tmp_path / "d", input_path=tmp_path / "latin1.txt", log=quiet)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DatasetError, match="empty"):
        prepare_dataset("text", tmp_path / "d", input_path=tmp_path / "empty.txt", log=quiet)


def test_interrupted_preparation_is_not_a_dataset(tmp_path, corpus, monkeypatch):
    prepare_dataset("text", tmp_path / "d", input_path=corpus, log=quiet)

    def crash(path, tokens):
        raise OSError("disk full")

    monkeypatch.setattr(data, "_write_tokens", crash)
    with pytest.raises(OSError):
        prepare_dataset("text", tmp_path / "d", input_path=corpus, log=quiet)
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        load_meta(tmp_path / "d")


# ---------------------------------------------------------------- load_meta


def test_load_meta_errors(tmp_path, corpus):
    with pytest.raises(DatasetError, match="does not exist.*tinyllm prepare"):
        load_meta(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no meta.json.*tinyllm prepare"):
        load_meta(tmp_path / "empty")
    prepare_dataset("text", tmp_path / "d", input_path=corpus, log=quiet)
    meta_path = tmp_path / "d" / "meta.json"
    meta_path.write_text("{not json", encoding="utf-8")
    with pytest.raises(DatasetError, match="corrupted"):
        load_meta(tmp_path / "d")
    meta_path.write_text(json.dumps({"format": "something else"}), encoding="utf-8")
    with pytest.raises(DatasetError, match="not a tinyllm dataset"):
        load_meta(tmp_path / "d")


# ---------------------------------------------------------------- batches


@pytest.fixture
def prepared(tmp_path, corpus):
    prepare_dataset("text", tmp_path / "d", input_path=corpus, log=quiet)
    return tmp_path / "d"


def test_batches_are_shifted_windows(prepared):
    loader = BatchLoader(prepared, "train", batch_size=6, block_size=16, seed=3)
    tokens = read_split(prepared, "train")
    x, y = loader.next_batch()
    assert x.shape == y.shape == (6, 16)
    assert x.dtype == y.dtype == np.int64
    assert x.flags.c_contiguous and y.flags.c_contiguous
    starts = np.random.Generator(np.random.PCG64(3)).integers(0, len(tokens) - 16, size=6)
    for row, i in enumerate(starts):
        np.testing.assert_array_equal(x[row], tokens[i : i + 16])
        np.testing.assert_array_equal(y[row], tokens[i + 1 : i + 17])
    assert len(loader) == len(tokens)


def test_every_window_fits(prepared):
    n_val = load_meta(prepared)["val_tokens"]
    loader = BatchLoader(prepared, "val", batch_size=50, block_size=n_val - 1, seed=0)
    tokens = read_split(prepared, "val")
    x, y = loader.next_batch()  # only one window exists: the whole split
    assert (x == tokens[:-1]).all() and (y == tokens[1:]).all()
    with pytest.raises(DatasetError, match="too few"):
        BatchLoader(prepared, "val", batch_size=1, block_size=n_val, seed=0)


def test_resumed_loader_draws_identical_batches(prepared):
    loader = BatchLoader(prepared, "train", batch_size=4, block_size=8, seed=11)
    for _ in range(3):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # survives JSON
    expected = [loader.next_batch() for _ in range(5)]
    resumed = BatchLoader(prepared, "train", batch_size=4, block_size=8, seed=999)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (resumed.next_batch() for _ in range(5))):
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(y, ry)


def test_loader_state_for_another_split_is_refused(prepared):
    state = BatchLoader(prepared, "train", 2, 4).state_dict()
    with pytest.raises(ValueError, match="split"):
        BatchLoader(prepared, "val", 2, 4).load_state_dict(state)


def test_truncated_split_is_detected(prepared):
    path = prepared / "train.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DatasetError, match="incomplete or corrupted"):
        BatchLoader(prepared, "train", 2, 4)


def test_loader_argument_errors(prepared):
    with pytest.raises(ValueError, match="split"):
        BatchLoader(prepared, "test", 2, 4)
    with pytest.raises(ValueError, match="positive"):
        BatchLoader(prepared, "train", 0, 4)
    with pytest.raises(DatasetError, match="tinyllm prepare"):
        BatchLoader(prepared / "nope", "train", 2, 4)
