"""Atomic file replacement: a reader sees the old file or the new one, whole, never a partly written one."""

from __future__ import annotations

import os
from pathlib import Path


def write(path: str | Path, data: str | bytes, *, durable: bool = False) -> Path:
    """Writes `data` to a temporary file beside `path` and renames it over `path`.

    The temporary name carries the PID, so processes sharing a directory never write the same one. `durable`
    also flushes the bytes to disk before the rename, for files that must survive a power cut with the rename.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or an interrupt leaves no stray temporary behind
        raise
    return path
