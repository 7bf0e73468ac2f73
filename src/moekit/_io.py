"""Atomic file writes: a temporary file in the same folder, fsync, then rename, so a reader
never sees a half-written file and an interrupted write leaves the old file intact.

The temporary file is ``<name>.<random>.tmp`` next to the target. A write killed before its
rename (SIGKILL, power loss) leaves it behind: :func:`remove_stale_temporaries` deletes those of
one target (call it only when no other process writes that folder)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Union

TMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
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
