"""Character-level tokenizer: one id per distinct character, as in nanoGPT's shakespeare_char.

The vocabulary is the sorted set of characters of a text, so ids are
0..n-1 in code-point order.  Tiny and transparent, good for first experiments;
it cannot encode a character it has not seen.
"""

import json
import operator

from ._textfile import LineReader, write_atomic

FORMAT_HEADER = "tinyllm-char v1"


class CharTokenizer:
    def __init__(self, chars):
        chars = list(chars)
        for char in chars:
            if not isinstance(char, str) or len(char) != 1:
                raise ValueError(f"each vocabulary entry must be one character, got {char!r}")
        if not chars:
            raise ValueError("a CharTokenizer needs at least one character")
        if len(set(chars)) != len(chars):
            raise ValueError("the characters of a CharTokenizer must be distinct")
        self.chars = chars
        self._stoi = {char: i for i, char in enumerate(chars)}

    @classmethod
    def from_text(cls, text):
        """Vocabulary = the sorted distinct characters of text."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text:
            raise ValueError("cannot build a CharTokenizer from empty text")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text):
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        stoi = self._stoi
        try:
            return [stoi[char] for char in text]
        except KeyError:
            for index, char in enumerate(text):
                if char not in stoi:
                    raise ValueError(f"character {char!r} (U+{ord(char):04X}) at index {index} is not "
                                     f"in this CharTokenizer's vocabulary of {len(self.chars)} "
                                     "characters") from None
            raise

    def decode(self, ids):
        chars = self.chars
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out = []
        for i in ids:
            try:
                index = operator.index(i)  # any integer type (NumPy's too), but not 1.0 or "1"
            except TypeError:
                index = -1
            if isinstance(i, bool) or not 0 <= index < len(chars):
                raise ValueError(f"unknown token id {i!r}: this CharTokenizer has ids 0 to {len(chars) - 1}")
            out.append(chars[index])
        return "".join(out)

    def __repr__(self):
        return f"CharTokenizer(vocab_size={self.vocab_size})"

    def save(self, path):
        """Write a versioned text file: the header, 'chars N', one JSON string per id, 'end'."""
        lines = [FORMAT_HEADER, f"chars {len(self.chars)}"]
        lines.extend(json.dumps(char) for char in self.chars)
        lines.append("end")
        write_atomic(path, "\n".join(lines) + "\n")

    @classmethod
    def load(cls, path):
        reader = LineReader(path)
        reader.header(FORMAT_HEADER, "character tokenizer")
        count = reader.count("chars")
        if count == 0:
            raise reader.error("a CharTokenizer needs at least one character")
        chars = []
        seen = set()
        for i in range(count):
            char = reader.json_string(reader.next(f"character {i} of {count} (a JSON string)"),
                                      f"character {i}")
            if len(char) != 1:
                raise reader.error(f"expected exactly one character, found {char!r}")
            if char in seen:
                raise reader.error(f"character {char!r} appears twice")
            seen.add(char)
            chars.append(char)
        reader.expect_end()
        return cls(chars)
