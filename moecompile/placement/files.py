"""Atomic file writes and JSON reads shared by the trace and plan formats.

A reader of our output files never sees half of one: every write goes to a temporary file in the
destination folder and is moved over the destination with `os.replace`, which is atomic on POSIX
and Windows when both paths are on one file system (same folder guarantees that).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import IO, Callable

from ..errors import UserInputError


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(f)` on a temporary binary file next to `path`, then move it over `path`.

    On any failure the temporary file is removed and `path` is left as it was.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserInputError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _file_mode(path: str) -> int:
    """The mode `open(path, "w")` would give: the existing file's, else 0666 minus the umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write `obj` as indented JSON, atomically."""
    data = (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def read_json(path: str | os.PathLike, what: str) -> object:
    """Parse a JSON file; any failure becomes a one-line UserInputError naming `what`."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except OSError as err:
        raise UserInputError(f"cannot read {what} {os.fspath(path)}: {err.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserInputError(f"{what} {os.fspath(path)} is not valid JSON: {err}") from None
