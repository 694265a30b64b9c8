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
"""

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
