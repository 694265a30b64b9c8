"""Pre-split patterns: how text is cut into chunks before byte-pair merging.

BPE never merges across chunk boundaries, so the pattern decides what a token
can be: with these patterns a token never joins a word to the space *after* it,
never mixes letters with digits, and so on.  Both patterns below are written to
split text exactly as tiktoken's current ``gpt2`` (r50k) and ``cl100k_base``
encodings do.  They need the third-party ``regex`` module: the standard
library's ``re`` knows neither ``\\p{L}`` nor possessive quantifiers.

Reading guide (``++``, ``?+`` and ``{1,3}+`` are *possessive*: once they have
matched they never give characters back, which keeps matching linear and fast):

GPT-2
    ``'(?:[sdmt]|ll|ve|re)``   English contractions: 's 'd 'm 't 'll 've 're
    `` ?\\p{L}++``             a run of letters, optionally with one leading space
    `` ?\\p{N}++``             a run of digits, likewise
    `` ?[^\\s\\p{L}\\p{N}]++``  a run of punctuation/symbols, likewise
    ``\\s++$``                 whitespace that runs to the end of the text
    ``\\s+(?!\\S)``            whitespace, leaving its last space for the next word
    ``\\s``                    a single leftover whitespace character

GPT-4 (cl100k_base) differs in a few ways: contractions match any case, a word
may take one leading non-letter (not just a space), numbers are cut into groups
of at most three digits, punctuation runs keep trailing newlines, and newlines
get their own rule so that line breaks are grouped together.

ASCII fast path.  The standard library's ``re`` splits about 2.4x faster than
``regex`` but knows no ``\\p{..}``.  On pure-ASCII text the Unicode classes
shrink to plain sets (``\\p{L}`` is ``A-Za-z``, ``\\p{N}`` is ``0-9``, and
``regex``'s ``\\s`` is ``\\t\\n\\v\\f\\r`` and space; ``re``'s ``\\s``
would also take ``\\x1c``-``\\x1f``, so it is spelled out), which gives the
two patterns below an exact ``re`` twin for ASCII text.  Python 3.11's ``re``
has possessive quantifiers, so the twins read like the originals.  Text that is
mostly ASCII is cut into pieces at *safe* spaces (see is_safe_cut) and
only the pieces with other characters go through ``regex``.
"""

import re
import sys

import regex

GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++"""
    r"""|\s++$|\s+(?!\S)|\s"""
)

GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

NAMED_PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

# What the Unicode classes mean on ASCII text (checked char by char in the tests).
ASCII_SPACE = r"\t\n\x0b\x0c\r "  # regex's \s
ASCII_LETTER = "A-Za-z"  # \p{L}
ASCII_DIGIT = "0-9"  # \p{N}
_S, _L, _N = ASCII_SPACE, ASCII_LETTER, ASCII_DIGIT

GPT2_ASCII_PATTERN = (
    rf"""'(?:[sdmt]|ll|ve|re)| ?[{_L}]++| ?[{_N}]++| ?[^{_S}{_L}{_N}]++"""
    rf"""|[{_S}]++$|[{_S}]+(?![^{_S}])|[{_S}]"""
)

GPT4_ASCII_PATTERN = (
    rf"""'(?i:[sdmt]|ll|ve|re)|[^\r\n{_L}{_N}]?+[{_L}]++|[{_N}]{{1,3}}+"""
    rf"""| ?[^{_S}{_L}{_N}]++[\r\n]*+|[{_S}]++$|[{_S}]*[\r\n]|[{_S}]+(?![^{_S}])|[{_S}]"""
)

ASCII_TWINS = {GPT2_PATTERN: GPT2_ASCII_PATTERN, GPT4_PATTERN: GPT4_ASCII_PATTERN}


def resolve_pattern(pattern):
    """Map "gpt2"/"gpt4" to their regex; any other string is taken as a regex."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be 'gpt2', 'gpt4' or a regex string, got {type(pattern).__name__}")
    return NAMED_PATTERNS.get(pattern, pattern)


def compile_pattern(pattern):
    """Compile a pre-split pattern, with an error that names the bad pattern."""
    regex_text = resolve_pattern(pattern)
    try:
        return regex.compile(regex_text)
    except regex.error as exc:
        raise ValueError(f"invalid pre-split pattern {regex_text!r}: {exc}") from None


def compile_ascii_twin(pattern):
    """The stdlib ``re`` twin of a built-in pattern, for pure-ASCII text; None for other patterns."""
    twin = ASCII_TWINS.get(resolve_pattern(pattern))
    if twin is None or sys.version_info < (3, 11):  # possessive quantifiers arrived in 3.11
        return None
    return re.compile(twin)


# -- splitting text that is mostly ASCII -----------------------------------------

NON_ASCII = re.compile(r"[^\x00-\x7f]")
MIN_ASCII_STRETCH = 64  # shorter ASCII stretches between non-ASCII text are not worth a cut


def is_safe_cut(text, p):
    """True when text[p] is a space that follows a non-space character ("x| Y").

    In both built-in patterns the chunk holding that non-space character stops
    before the space (no rule takes a space after a letter, digit or symbol), so
    a chunk starts at p; and no lookahead (``$``, ``(?!\\S)``) of a chunk before
    p reaches p, since those only follow whitespace.  So the text before p and
    the text from p split exactly as the whole does.  str.isspace covers every
    character regex's \\s does (checked in the tests).
    """
    return 0 < p < len(text) and text[p] == " " and not text[p - 1].isspace()


def safe_cut_before(text, i, lo):
    """The last safe cut in (lo, i], or lo."""
    p = text.rfind(" ", lo + 1, i + 1)
    while p > lo:
        if is_safe_cut(text, p):
            return p
        p = text.rfind(" ", lo + 1, p)
    return lo


def safe_cut_after(text, i):
    """The first safe cut at or after i, or len(text)."""
    p = text.find(" ", i)
    while p >= 0:
        if is_safe_cut(text, p):
            return p
        p = text.find(" ", p + 1)
    return len(text)


def split_builtin(text, pattern_regex, ascii_twin):
    """findall of a built-in pattern, sending the ASCII stretches of text through its stdlib twin.

    The pieces are split in place with findall(text, start, end), which treats
    end as the end of the text, as a separate string would be.
    """
    if text.isascii():  # O(1): str knows its widest character
        return ascii_twin.findall(text)
    chunks = []
    pos = 0  # text[:pos] is split; pos is 0 or a safe cut
    while True:
        found = NON_ASCII.search(text, pos)
        if found is None:
            return chunks + ascii_twin.findall(text, pos)
        start = safe_cut_before(text, found.start(), pos)
        end = safe_cut_after(text, found.end())
        while (found := NON_ASCII.search(text, end, end + MIN_ASCII_STRETCH)) is not None:
            end = safe_cut_after(text, found.end())  # join non-ASCII pieces that are close together
        chunks += ascii_twin.findall(text, pos, start)
        chunks += pattern_regex.findall(text, start, end)
        pos = end
