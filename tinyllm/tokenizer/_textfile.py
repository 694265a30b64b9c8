"""Small helpers shared by the tokenizer file formats: atomic writes and a line reader.

Both tokenizer formats are plain UTF-8 text, one item per line, every string
JSON-encoded so that spaces, newlines and odd characters survive.  Nothing is
ever unpickled: a tokenizer file is data, never code.
"""

import json
import os

from tinyllm.fileio import atomic_open


def write_atomic(path, text):
    """Write text to path so that readers see the old file or the new one, never half."""
    with atomic_open(path, "w", newline="\n") as f:
        f.write(text)


class LineReader:
    """Reads a text file line by line and phrases every complaint as 'file, line N: what'."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            with open(self.path, encoding="utf-8", newline="") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise ValueError(f"{self.path}: not a UTF-8 text file ({exc})") from None
        # Split on "\n" only (JSON never writes a raw newline inside a string);
        # tolerate "\r\n" from editors that change line endings.
        self.lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
        if self.lines and self.lines[-1] == "":
            self.lines.pop()  # the newline that ends the last line
        self.number = 0  # 1-based number of the line last returned

    def error(self, what, line_number=None):
        number = self.number if line_number is None else line_number
        return ValueError(f"{self.path}, line {number}: {what}")

    def next(self, what):
        """Return the next line; 'what' names the expected content for the truncation error."""
        if self.number >= len(self.lines):
            raise ValueError(f"{self.path}, line {self.number + 1}: file ends early, expected {what}"
                             " (truncated file?)")
        self.number += 1
        return self.lines[self.number - 1]

    def header(self, expected, kind):
        """Read the first line; it must be `expected` ("tinyllm-<family> v<N>") for a file of `kind`."""
        header = self.next(f"the header {expected!r}")
        if header != expected:
            family = expected.rsplit(" ", 1)[0] + " "
            if header.startswith(family):
                raise self.error(f"unsupported format version {header!r}; this tinyllm reads {expected!r}")
            raise self.error(f"not a tinyllm {kind} file: the first line is {header[:60]!r}, expected "
                             f"{expected!r} (tinyllm.tokenizer.load_tokenizer reads any tinyllm tokenizer file)")

    def keyword(self, name):
        """Read a 'name value' line and return value (the rest of the line)."""
        line = self.next(f"a '{name} ...' line")
        key, _, value = line.partition(" ")
        if key != name:
            raise self.error(f"expected a '{name} ...' line, found {line[:60]!r}")
        return value

    def count(self, name):
        """Read a 'name N' line and return N, a non-negative int."""
        value = self.keyword(name)
        if not (value.isascii() and value.isdigit()):
            raise self.error(f"expected '{name} <count>' with a non-negative integer, found {value[:60]!r}")
        return int(value)

    def json_string(self, text, what):
        """Decode one JSON string literal (the file's way of writing any text)."""
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise self.error(f"{what} is not a valid JSON string: {exc}") from None
        if not isinstance(value, str):
            raise self.error(f"{what} must be a JSON string in double quotes, found {text[:60]!r}")
        return value

    def expect_end(self):
        """Read the closing 'end' line (its absence means the file was cut short), then require EOF."""
        line = self.next("the closing 'end' line")
        if line != "end":
            raise self.error(f"expected the closing 'end' line, found {line[:60]!r}")
        if self.number < len(self.lines):
            raise self.error(f"unexpected extra content {self.lines[self.number][:60]!r}",
                             self.number + 1)


def read_header(path):
    """The first line of a file, for dispatching on the format (no full read)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.readline().rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file, so not a tinyllm tokenizer file") from None
