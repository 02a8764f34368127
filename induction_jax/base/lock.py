"""Exclusive directory locks: an flock on a lock file, held by one process until it releases it or exits.

The kernel drops an flock when the process holding it dies, however it dies, so a stale lock file never blocks a
later run. The file holds the holder's PID and host, for the refusal message. Used by the trainer (one trainer per
run directory, training/loop.py) and by the results store (one writer per results directory, analysis/store.py).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path


class Held(Exception):
    """The lock is held by another process (or another open of the file); `holder` says which, for a message."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


class DirLock:
    """An exclusive, non-blocking flock on `path`, taken at construction.

    Raises `Held` when another holder has it, and OSError when the file cannot be created (the caller phrases both).
    On a file system without locks (some FUSE mounts) nothing can protect the directory, so the lock is a no-op.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise Held(holder) from None
        except OSError:
            pass
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError:
            pass  # a full disk: the lock holds all the same, and the refusal of a second holder names no PID
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _holder(fd: int) -> str:
    # The holder writes its PID just after it takes the lock: give it a moment.
    for _ in range(20):
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
        if text:
            return f"pid {text[0]}" + (f" on {text[1]}" if len(text) > 1 else "")
        time.sleep(0.05)
    return "a process that has not written its pid yet"
