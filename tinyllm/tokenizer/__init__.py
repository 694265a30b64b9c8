"""Tokenizers: byte-level BPE (GPT-2/GPT-4 style) and a character-level one.

    from tinyllm.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

See docs/tokenizer.md for how they work.
"""

import os

from ._textfile import read_header
from .bpe import BPETokenizer
from .char import CharTokenizer
from .patterns import GPT2_PATTERN, GPT4_PATTERN

__all__ = ["BPETokenizer", "CharTokenizer", "GPT2_PATTERN", "GPT4_PATTERN", "load_tokenizer"]


def load_tokenizer(path):
    """Load a BPETokenizer or CharTokenizer from a file written by its save(), by the file's header."""
    header = read_header(path)
    kind = header.split(" ", 1)[0]
    if kind == "tinyllm-bpe":
        return BPETokenizer.load(path)
    if kind == "tinyllm-char":
        return CharTokenizer.load(path)
    raise ValueError(f"{os.fspath(path)}, line 1: not a tinyllm tokenizer file (the first line is "
                     f"{header[:60]!r}; expected 'tinyllm-bpe v1' or 'tinyllm-char v1')")
