"""Reading an engine folder's files: regular files only, opened so that what was checked is what is read.

Every file the runtime reads from an engine folder (manifest.json and each
artifact) comes through `open_regular`: a symbolic link (even to a file beside
it), a FIFO, a device or a folder in its place is one EngineError, so nothing
outside the folder is ever hashed, parsed or loaded.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import EngineError


def check_regular(path: Path, what: str) -> os.stat_result:
    """lstat `path`: a regular file itself, not a symbolic link (even to a file beside it), FIFO, device or folder.

    An engine folder holds its files: what is verified is what is read, and nothing
    outside the folder is. Hard links are regular files. FileNotFoundError is left
    to the caller, which knows what a missing file means.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise EngineError(f"{path}: {what} is a symbolic link; an engine folder must hold its files "
                          "(copy the file in)")
    if not stat.S_ISREG(st.st_mode):
        raise EngineError(f"{path}: {what} is {_file_kind(st.st_mode)}, not a regular file")
    return st


def open_regular(path: Path, what: str) -> BinaryIO:
    """`path` opened for reading, if `check_regular` accepts it.

    O_NOFOLLOW and an fstat of what was opened: a file swapped for a link or a FIFO
    after the lstat is refused too, and O_NONBLOCK keeps a FIFO from blocking the open.
    """
    check_regular(path, what)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise EngineError(f"cannot read {what} {path}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise EngineError(f"{path}: {what} is {_file_kind(mode)}, not a regular file")
    return os.fdopen(fd, "rb")


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_stream(f: BinaryIO, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    while block := f.read(chunk):
        digest.update(block)
    return digest.hexdigest()
