"""Atomic file writes: readers see the old file or the complete new one, never half of one.

Every file tinyllm writes (token files, tokenizers, safetensors, checkpoint state) goes through
`atomic_open`: write a temporary file next to the target, fsync it, then rename it over the target.
"""
import contextlib
import os
import secrets
from pathlib import Path


@contextlib.contextmanager
def atomic_open(path, mode="wb", encoding="utf-8", newline=None):
    """Open a temporary file next to ``path``; on success, fsync it and rename it onto ``path``.

    Readers see either the old file or the complete new one, never a half-written file: the
    rename (``os.replace``) is atomic on POSIX and Windows when both names are in the same
    directory. On an exception the temporary file is removed and ``path`` is left untouched.
    Text modes write UTF-8 unless told otherwise (`newline="\n"` keeps line ends the same on every OS).
    """
    path = Path(path)
    tmp_name = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    # O_EXCL: never share a temp file with another writer; mode 0o666 lets the umask decide the
    # permissions, as for any ordinary new file.
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        text = "b" not in mode
        with os.fdopen(fd, mode, encoding=encoding if text else None, newline=newline if text else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the name points at them
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory):
    """Make a rename inside ``directory`` durable (best effort: not every OS can fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
