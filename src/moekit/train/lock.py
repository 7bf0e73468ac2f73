"""One writer per run folder: an exclusive, advisory lock held for the whole of a training run.

The lock is ``fcntl.flock`` on ``RUN/.lock``: the kernel releases it when the holder exits, even
after ``kill -9``, so a crashed run never leaves a stale lock behind. The holder writes its pid
(and host) into the file so that a second process can say who holds the folder.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional, Union

LOCK = ".lock"


class RunLockedError(RuntimeError):
    """Another process is training into this run folder."""


class RunLock:
    """``with RunLock(run_dir):`` -- exclusive use of ``run_dir`` or :class:`RunLockedError` at once
    (never waits), naming the holder's pid and host."""

    def __init__(self, run_dir: Union[str, Path]):
        self.path = Path(run_dir) / LOCK
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by {holder}: one training process per run folder "
                f"(wait for it to finish, or stop it; it checkpoints on Ctrl-C or SIGTERM)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
