"""Atomic file writes: a temporary file in the same folder, fsync, rename, then fsync of the
folder, so a reader never sees a half-written file, an interrupted write leaves the old file
intact, and a written file survives a power loss.

The temporary file is ``<name>.<random>.tmp`` next to the target. A write killed before its
rename (SIGKILL, power loss) leaves it behind: :func:`remove_stale_temporaries` deletes those of
one target (call it only when no other process writes that folder).

:func:`read_json` is the one reader of the JSON files of a run folder (config, tokenizer,
summaries, comparison): whatever is wrong with a file, the error names it.
:func:`check_writable` and :func:`os_error_text` turn what the file system refuses into a one-line
reason naming the path."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Union

TMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably: temporary file, fsync, rename, then fsync
    of the folder (see :func:`fsync_dir`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Union[str, Path]) -> None:
    """Flush ``folder``'s entries (a rename, a new file) to disk: without it, a power loss after
    :func:`atomic_write_bytes` may lose the rename although the file's data was synced. Skipped
    where the platform cannot open a folder (Windows) or the file system refuses to sync one
    (EINVAL, ENOTSUP: some network and FUSE file systems)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(folder, flags)
    except (PermissionError, IsADirectoryError):  # Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def stale_temporaries(path: Union[str, Path]) -> list[Path]:
    """The temporary files that interrupted :func:`atomic_write_bytes` calls for ``path`` left."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(re.escape(path.name) + r"\.[A-Za-z0-9_]+" + re.escape(TMP_SUFFIX))
    return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name) and p.is_file())


def remove_stale_temporaries(path: Union[str, Path]) -> list[Path]:
    """Delete what :func:`stale_temporaries` lists; returns the removed paths."""
    removed = []
    for p in stale_temporaries(path):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def read_json(path: Union[str, Path]) -> Any:
    """The JSON value stored in ``path``. ValueError naming the file when it is not UTF-8 JSON (random
    bytes, a torn write); the OSError of an unreadable file (missing, a folder, no permission) names
    it too."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON: it is not UTF-8 text (byte {err.start} is 0x{data[err.start]:02x})"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None


def os_error_text(err: OSError, path: Union[str, Path, None] = None) -> str:
    """``PATH: reason`` for an OSError (``path`` when the error does not carry its own file name;
    just the message of one raised with a message of its own)."""
    where = err.filename if err.filename is not None else path
    reason = err.strerror or str(err)
    return f"{where}: {reason}" if where is not None else reason


def nearest_existing(path: Union[str, Path]) -> Path:
    """``path`` itself, or the closest folder above it that exists (where it would be created)."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if p.exists()), path)


def check_writable(path: Union[str, Path], what: str) -> None:
    """ValueError (a one-line message naming ``what`` and the folder) unless files can be created
    in the folder ``path``, or, when it does not exist yet, in the closest existing folder above it.
    Asks the kernel (``access(2)``): a read-only file system is refused for every user, root included."""
    where = nearest_existing(path)
    if where.is_dir() and not os.access(where, os.W_OK | os.X_OK):
        code = errno.EROFS if _read_only_fs(where) else errno.EACCES
        raise ValueError(f"{what}: cannot write to {where} ({os.strerror(code)})")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
