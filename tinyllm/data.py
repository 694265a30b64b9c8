"""Datasets: turn a text into token files once, then draw random training windows from them.

Preparation (``prepare_dataset``, the ``tinyllm prepare`` command) writes a directory::

    train.bin       the first 90% of the token stream, one unsigned integer per token
    val.bin         the last 10%
    tokenizer.txt   the tokenizer that produced the ids (its own ``save`` format)
    meta.json       what the directory holds; written last, so its presence means "complete"

The ``.bin`` files are flat arrays with no header, uint16 (or uint32 when the vocabulary has
more than 65,535 entries): the layout nanoGPT uses, readable with ``numpy.memmap``.

Training (``BatchLoader``) picks random windows of ``block_size + 1`` tokens: the input ``x`` is
the first ``block_size`` tokens and the target ``y`` the same window shifted by one, so the model
learns to predict every next token. The random generator's state is saved with each checkpoint,
so a resumed run draws exactly the batches it would have drawn without the interruption.
"""

import hashlib
import json
import os
import sysconfig
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from tinyllm.fileio import atomic_open

__all__ = [
    "DATASETS",
    "PYSTDLIB_MAX_CHARS",
    "SHAKESPEARE_URL",
    "SHAKESPEARE_SHA256",
    "DatasetError",
    "prepare_dataset",
    "pystdlib_text",
    "load_meta",
    "load_dataset_tokenizer",
    "BatchLoader",
]

DATASETS = ("pystdlib", "shakespeare_char", "shakespeare", "text")

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

# The embedded default corpus is cut at 4 million characters (~4 MB): enough text for a small
# char-level model to learn Python's look, small enough to prepare in about a second.
PYSTDLIB_MAX_CHARS = 4_000_000
# Directories of the standard library left out of that corpus: installed third-party packages,
# test suites (odd encodings, generated data) and the codec tables in encodings/ (hex tables).
PYSTDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings"})

DEFAULT_BPE_VOCAB_SIZE = 1024
VAL_FRACTION = 0.1
META_FORMAT = "tinyllm-dataset"
META_VERSION = 1
TOKENIZER_FILE = "tokenizer.txt"


class DatasetError(RuntimeError):
    """A dataset that cannot be prepared or loaded; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# Source texts
# ----------------------------------------------------------------------------------------------


def pystdlib_text(max_chars=PYSTDLIB_MAX_CHARS):
    """The embedded default corpus: the Python standard library's own ``.py`` files.

    Files are taken in sorted path order from ``sysconfig.get_paths()["stdlib"]`` (skipping
    ``PYSTDLIB_EXCLUDED_DIRS`` and files that are not valid UTF-8), joined by newlines, and the
    result is cut at ``max_chars`` characters. Returns ``(text, stdlib_directory)``.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DatasetError(f"cannot find the Python standard library at {root}")
    files = [
        path
        for path in root.rglob("*.py")
        if not PYSTDLIB_EXCLUDED_DIRS.intersection(path.relative_to(root).parts[:-1])
    ]
    files.sort(key=lambda path: path.relative_to(root).as_posix())  # same order on every OS
    pieces = []
    total = 0
    for path in files:
        if total >= max_chars:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        pieces.append(text)
        total += len(text) + 1
    text = "\n".join(pieces)[:max_chars]
    if not text:
        raise DatasetError(f"found no readable .py files under {root}")
    return text, root


def _read_utf8(path):
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read input file {path}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError as e:
        raise DatasetError(f"input file {path} is not UTF-8 text ({e})") from None


def _shakespeare_text(input_path, log):
    """Tiny Shakespeare from a local copy, or downloaded and checked against its sha256."""
    if input_path is not None:
        text, raw = _read_utf8(input_path)
        digest = hashlib.sha256(raw).hexdigest()
        if digest != SHAKESPEARE_SHA256:
            log(f"note: {input_path} differs from the canonical Tiny Shakespeare (sha256 {digest[:12]}...)")
        return text, raw, str(input_path)

    log(f"downloading Tiny Shakespeare from {SHAKESPEARE_URL}")
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            raw = response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DatasetError(
            f"could not download Tiny Shakespeare from {SHAKESPEARE_URL} ({e}). "
            "If this machine is offline, pass --input PATH to a local copy of input.txt."
        ) from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise DatasetError(
            f"the download from {SHAKESPEARE_URL} has sha256 {digest}, expected {SHAKESPEARE_SHA256} "
            "(incomplete or changed). Pass --input PATH to a local copy of input.txt."
        )
    return raw.decode("utf-8"), raw, SHAKESPEARE_URL


# ----------------------------------------------------------------------------------------------
# Preparation
# ----------------------------------------------------------------------------------------------


def _char_tokenizer(text):
    from tinyllm.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text(text)
    return tok, "char", tok.encode


def _bpe_tokenizer(text, vocab_size, gpt2_dir, log):
    from tinyllm.tokenizer import BPETokenizer

    if gpt2_dir is not None:
        gpt2_dir = Path(gpt2_dir)
        encoder_json, vocab_bpe = gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe"
        for path in (encoder_json, vocab_bpe):
            if not path.is_file():
                raise DatasetError(f"{path} not found: --gpt2-dir must hold GPT-2's encoder.json and vocab.bpe")
        log(f"using GPT-2's tokenizer from {gpt2_dir}")
        tok = BPETokenizer.from_gpt2(encoder_json, vocab_bpe)
        return tok, "gpt2", tok.encode_ordinary
    vocab_size = DEFAULT_BPE_VOCAB_SIZE if vocab_size is None else int(vocab_size)
    if vocab_size < 256:
        raise DatasetError(f"a byte-level BPE vocabulary needs at least 256 entries, got vocab_size={vocab_size}")
    log(f"training a byte-level BPE tokenizer with {vocab_size} tokens on {len(text):,} characters")
    tok = BPETokenizer(pattern="gpt2")
    tok.train(text, vocab_size)
    return tok, "bpe", tok.encode_ordinary


def _token_dtype(vocab_size):
    """uint16 holds ids up to 65,535; larger vocabularies need uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65_535 else np.dtype(np.uint32)


def _write_tokens(path, tokens):
    with atomic_open(path, "wb") as f:
        tokens.tofile(f)


def prepare_dataset(name, out_dir, *, input_path=None, vocab_size=None, gpt2_dir=None,
                    max_chars=PYSTDLIB_MAX_CHARS, log=print):
    """Tokenize a corpus and write ``train.bin``, ``val.bin``, ``tokenizer.txt`` and ``meta.json``.

    ``name`` is one of:

    - ``"pystdlib"``: the Python standard library's source (offline, char-level; ``max_chars`` caps it)
    - ``"shakespeare_char"``: Tiny Shakespeare, char-level (65 characters)
    - ``"shakespeare"``: Tiny Shakespeare, BPE: GPT-2's tokenizer when ``gpt2_dir`` holds its
      ``encoder.json`` and ``vocab.bpe``, else a BPE trained on the text with ``vocab_size`` tokens
    - ``"text"``: any UTF-8 file at ``input_path``; char-level, or BPE when ``vocab_size`` or
      ``gpt2_dir`` is given

    The Shakespeare datasets read ``input_path`` when given, else download the text. Returns the
    metadata dict that is also written to ``meta.json``.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "text" and input_path is None:
        raise DatasetError("the 'text' dataset needs --input PATH (a UTF-8 text file)")
    if name in ("pystdlib", "shakespeare_char") and (vocab_size is not None or gpt2_dir is not None):
        raise DatasetError(f"{name} is character-level: vocab_size and gpt2_dir do not apply")
    if name == "pystdlib" and input_path is not None:
        raise DatasetError("pystdlib reads the standard library; use the 'text' dataset for your own file")
    out_dir = Path(out_dir)

    # 1. The source text.
    if name == "pystdlib":
        text, root = pystdlib_text(max_chars)
        raw = text.encode("utf-8")
        source = str(root)
    elif name in ("shakespeare_char", "shakespeare"):
        text, raw, source = _shakespeare_text(input_path, log)
    else:
        text, raw = _read_utf8(input_path)
        source = str(input_path)
    if not text:
        raise DatasetError(f"the source text of {name} ({source}) is empty")

    # 2. The tokenizer, and the whole text as one stream of ids.
    if name == "shakespeare" or (name == "text" and (vocab_size is not None or gpt2_dir is not None)):
        tok, kind, encode = _bpe_tokenizer(text, vocab_size, gpt2_dir, log)
    else:
        tok, kind, encode = _char_tokenizer(text)
    log(f"encoding {len(text):,} characters with a {kind} tokenizer of {tok.vocab_size:,} tokens")
    dtype = _token_dtype(tok.vocab_size)
    ids = np.array(encode(text), dtype=dtype)

    # 3. Split the stream: the first 90% trains, the last 10% validates (as nanoGPT).
    n_train = int(len(ids) * (1.0 - VAL_FRACTION))
    train, val = ids[:n_train], ids[n_train:]

    # 4. Write. meta.json goes last: a directory without it is not a (complete) dataset.
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "meta.json"
    meta_path.unlink(missing_ok=True)  # an interrupted re-preparation must not look complete
    _write_tokens(out_dir / "train.bin", train)
    _write_tokens(out_dir / "val.bin", val)
    tmp_tokenizer = out_dir / f".{TOKENIZER_FILE}.tmp-{os.getpid()}"
    tok.save(tmp_tokenizer)
    os.replace(tmp_tokenizer, out_dir / TOKENIZER_FILE)

    meta = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "dataset": name,
        "tokenizer": kind,
        "tokenizer_file": TOKENIZER_FILE,
        "vocab_size": int(tok.vocab_size),
        "dtype": dtype.name,
        "train_tokens": int(len(train)),
        "val_tokens": int(len(val)),
        "source": source,
        "source_chars": len(text),
        "source_sha256": hashlib.sha256(raw).hexdigest(),
    }
    with atomic_open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    log(f"wrote {out_dir}: {len(train):,} train and {len(val):,} val tokens, vocab {tok.vocab_size:,}")
    return meta


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

_META_KEYS = ("dataset", "tokenizer_file", "vocab_size", "dtype", "train_tokens", "val_tokens")


def load_meta(data_dir):
    """The ``meta.json`` of a prepared dataset directory, checked."""
    data_dir = Path(data_dir)
    hint = f"run `tinyllm prepare DATASET --out {data_dir}` first"
    if not data_dir.is_dir():
        raise DatasetError(f"dataset directory {data_dir} does not exist; {hint}")
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise DatasetError(f"{data_dir} is not a prepared dataset (no meta.json); {hint}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DatasetError(f"{meta_path} is corrupted ({e}); {hint} again") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise DatasetError(f"{meta_path} is not a tinyllm dataset description; {hint}")
    if meta.get("version") != META_VERSION:
        raise DatasetError(f"{meta_path} has version {meta.get('version')}, this tinyllm reads {META_VERSION}; {hint}")
    missing = [key for key in _META_KEYS if key not in meta]
    if missing:
        raise DatasetError(f"{meta_path} lacks {', '.join(missing)}; {hint} again")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DatasetError(f"{meta_path} names an unsupported token dtype {meta['dtype']!r}")
    return meta


def load_dataset_tokenizer(data_dir):
    """The tokenizer saved with a prepared dataset."""
    from tinyllm.tokenizer import load_tokenizer

    meta = load_meta(data_dir)
    return load_tokenizer(Path(data_dir) / meta["tokenizer_file"])


class BatchLoader:
    """Random training windows from one split of a prepared dataset.

    ``next_batch()`` returns ``(x, y)``, int64 arrays of shape ``(batch_size, block_size)`` with
    ``x[b] = data[i : i + T]`` and ``y[b] = data[i + 1 : i + T + 1]`` for a random start ``i``
    per row. Starts come from ``numpy.random.Generator(PCG64(seed))``; ``state_dict()`` captures
    the generator so that ``load_state_dict`` resumes with the very same batches.
    """

    def __init__(self, data_dir, split, batch_size, block_size, seed=0):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be positive, got {batch_size} and {block_size}")
        meta = load_meta(data_dir)
        self.path = Path(data_dir) / f"{split}.bin"
        self.split = split
        self.batch_size = int(batch_size)
        self.block_size = int(block_size)
        self.vocab_size = meta["vocab_size"]
        dtype = np.dtype(meta["dtype"])
        expected = meta[f"{split}_tokens"]
        size = self.path.stat().st_size if self.path.is_file() else None
        if size != expected * dtype.itemsize:
            found = "is missing" if size is None else f"has {size} bytes"
            raise DatasetError(
                f"{self.path} {found}, meta.json expects {expected} {dtype.name} tokens "
                f"({expected * dtype.itemsize} bytes); the dataset is incomplete or corrupted: "
                f"run `tinyllm prepare` again"
            )
        if expected < self.block_size + 1:
            raise DatasetError(
                f"the {split} split of {data_dir} has {expected} tokens, too few for one window of "
                f"block_size + 1 = {self.block_size + 1}; use a smaller --block-size or a larger corpus"
            )
        # Memory-mapped: the operating system pages in only the windows we read.
        self.data = np.memmap(self.path, dtype=dtype, mode="r")
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._offsets = np.arange(self.block_size + 1)  # 0, 1, ..., T

    def __len__(self):
        """Number of tokens in the split."""
        return len(self.data)

    def next_batch(self):
        """The next ``(x, y)`` pair of int64 arrays, shape ``(batch_size, block_size)``."""
        # Starts in [0, N - T - 1], so the target window's last token, i + T, still exists.
        starts = self.rng.integers(0, len(self.data) - self.block_size, size=self.batch_size)
        windows = np.asarray(self.data[starts[:, None] + self._offsets], dtype=np.int64)  # (B, T + 1)
        x = np.ascontiguousarray(windows[:, :-1])
        y = np.ascontiguousarray(windows[:, 1:])
        return x, y

    def state_dict(self):
        """JSON-serialisable state: the generator's exact position (and the shape, for checks)."""
        return {
            "split": self.split,
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state):
        """Continue from a ``state_dict()``; the next batches are the ones the saved loader would draw."""
        if state.get("split") != self.split:
            raise ValueError(f"loader state is for the {state.get('split')!r} split, this loader reads {self.split!r}")
        rng_state = state["rng"]
        if rng_state.get("bit_generator") != "PCG64":
            raise ValueError(f"loader state has a {rng_state.get('bit_generator')!r} generator, expected PCG64")
        self.rng.bit_generator.state = rng_state
