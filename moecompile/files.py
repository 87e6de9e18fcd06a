"""Output paths checked before work, atomic writes, and JSON reads: every file moecompile writes.

A reader of our output files never sees half of one: every write goes to a temporary file in the
destination folder and is moved over the destination with `os.replace`, which is atomic on POSIX
and Windows when both paths are on one file system (same folder guarantees that). Every failure to
read or write becomes a one-line `UserInputError` naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import IO, Callable

from .errors import UserInputError

_TMP_PREFIX = ".tmp-"


def check_output(path: str | os.PathLike | None, what: str = "output") -> None:
    """Fail now, before any work, if `path` cannot be written: its folder is missing, is a file or
    is not writable, the path is a folder or another non-regular file (a device, a pipe), or its
    name is too long. Writes and removes a probe file in the folder, so what this accepts the write
    will accept."""
    if path is None:
        return
    path = os.fspath(path)
    if not path or path.endswith(os.sep) or os.path.basename(path) in (".", "..") or os.path.isdir(path):
        raise UserInputError(f"cannot write {what} {path!r}: it names a folder, not a file")
    target = _target(path)
    if os.path.exists(target) and not os.path.isfile(target):
        raise UserInputError(f"cannot write {what} {path}: it exists and is not a regular file")
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        parent = _existing_parent(folder)
        why = f" ({parent} is a file)" if os.path.exists(parent) and not os.path.isdir(parent) else ""
        raise UserInputError(f"cannot write {what} {path}: folder {folder} does not exist{why}")
    name_max = _name_max(folder)
    if len(os.fsencode(os.path.basename(target))) > name_max:
        raise UserInputError(f"cannot write {what} {path}: its name is longer than {name_max} bytes")
    try:
        fd, probe = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=folder)
    except OSError as err:
        raise UserInputError(f"cannot write {what} {path}: {err.strerror or err}") from None
    os.close(fd)
    os.unlink(probe)


def _target(path: str) -> str:
    """The absolute path a write lands on: a symbolic link's target, so the link stays a link."""
    return os.path.realpath(path) if os.path.islink(path) else os.path.abspath(path)


def _name_max(folder: str) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _existing_parent(folder: str) -> str:
    while folder and not os.path.exists(folder):
        up = os.path.dirname(folder)
        if up == folder:
            break
        folder = up
    return folder


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], make_dirs: bool = False) -> None:
    """Call `write(f)` on a temporary binary file next to `path`, then move it over `path`.

    On any failure the temporary file is removed and `path` is left as it was; a failure of the
    file system (full disk, no permission) raises UserInputError naming the file.
    """
    path = _target(os.fspath(path))
    folder = os.path.dirname(path)
    if os.path.exists(path) and not os.path.isfile(path):
        raise UserInputError(f"cannot write {path}: it exists and is not a regular file")
    if make_dirs:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise UserInputError(f"cannot create folder {folder}: {err.strerror or err}") from None
    if not os.path.isdir(folder):
        raise UserInputError(f"cannot write {path}: folder {folder} does not exist")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=folder)  # short: any legal name fits
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except OSError as err:
        raise UserInputError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str, make_dirs: bool = False) -> None:
    data = text.encode()
    atomic_write(path, lambda f: f.write(data), make_dirs=make_dirs)


def _file_mode(path: str) -> int:
    """The mode `open(path, "w")` would give: the existing file's, else 0666 minus the umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write `obj` as indented JSON, atomically; NaN or infinity in `obj` is an error (not JSON)."""
    try:
        text = json.dumps(obj, indent=1, allow_nan=False) + "\n"
    except ValueError as err:
        raise UserInputError(f"cannot write {os.fspath(path)}: {err}") from None
    write_text(path, text)


def read_json(path: str | os.PathLike, what: str) -> object:
    """Parse a JSON file; any failure becomes a one-line UserInputError naming `what`."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except OSError as err:
        raise UserInputError(f"cannot read {what} {os.fspath(path)}: {err.strerror or err}") from None
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError, integers of 4300+ digits
        raise UserInputError(f"{what} {os.fspath(path)} is not valid JSON: {_first_line(err)}") from None
    except RecursionError:
        raise UserInputError(f"{what} {os.fspath(path)} nests too deeply to read") from None
    except MemoryError:
        raise UserInputError(f"{what} {os.fspath(path)} is too large to read") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
