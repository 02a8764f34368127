"""Tensorstore zarr arrays of a prepared directory: whole writes, appends that a kill cannot corrupt, lazy reads.

A token stream is a 1-D uint16 zarr array in uncompressed chunks of `TOKEN_CHUNK` tokens, so a window of a few
hundred tokens costs one small chunk read and the loader needs no more memory than its batch. Paths may be local
or URLs (gs://...), which tensorstore reads directly.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import tensorstore as ts

TOKEN_CHUNK = 1 << 16  # tokens per chunk (128 KiB)
_BLOCK = 1 << 24  # tokens per read while hashing a whole stream


def url(path: str | Path) -> str:
    """A tensorstore kvstore URL, so a prepared directory may live on a local disk or at gs://."""
    path = str(path)
    return path.rstrip("/") + "/" if "://" in path else Path(path).absolute().as_uri() + "/"


def write(directory: Path, name: str, array: np.ndarray) -> None:
    """A small array (eval set, frequencies) written whole."""
    chunks = [min(max(s, 1), 1 << 20) if i == 0 else max(s, 1) for i, s in enumerate(array.shape)]
    if array.ndim == 2:  # whole eval windows per chunk, ~1M tokens each
        chunks[0] = max(1, min(array.shape[0], (1 << 20) // max(array.shape[1], 1)))
    spec = {"driver": "zarr", "kvstore": url(directory / name),
            "metadata": {"dtype": array.dtype.str, "shape": list(array.shape), "chunks": chunks},
            "create": True, "delete_existing": True}
    ts.open(spec).result().write(array).result()


def open_array(path: str | Path, name: str) -> ts.TensorStore:
    return ts.open({"driver": "zarr", "kvstore": url(path) + name + "/"}, open=True, read=True).result()


def read(path: str | Path, name: str) -> np.ndarray:
    return np.asarray(open_array(path, name).read().result())


def read_file(path: str | Path, name: str) -> bytes | None:
    result = ts.KvStore.open(url(path)).result().read(name).result()
    return result.value if result.state == "value" else None


class Stream:
    """A growing uint16 token array whose committed length the caller records; a reopened stream is cut back to
    that length, dropping whatever a killed writer appended after its last commit."""

    def __init__(self, directory: Path, name: str, length: int):
        spec = {"driver": "zarr", "kvstore": url(directory / name)}
        if (directory / name / ".zarray").is_file():
            self._array = ts.open(spec, open=True).result()
            if self._array.shape[0] != length:
                self._array = self._array.resize(exclusive_max=[length]).result()
        else:
            self._array = ts.open({**spec, "create": True, "metadata": {
                "dtype": "<u2", "shape": [0], "chunks": [TOKEN_CHUNK], "compressor": None}}).result()
        self.length = int(self._array.shape[0])

    def append(self, tokens: np.ndarray) -> None:
        if tokens.size == 0:
            return
        end = self.length + tokens.size
        self._array = self._array.resize(exclusive_max=[end]).result()
        self._array[self.length:end].write(tokens.astype(np.uint16)).result()
        self.length = end


def windows(array: ts.TensorStore, starts: np.ndarray, length: int) -> np.ndarray:
    """Windows [s, s + length) of a 1-D array for every start, read concurrently; uint16 [len(starts), length]."""
    futures = [array[int(s):int(s) + length].read() for s in starts]
    out = np.empty((len(futures), length), np.uint16)
    for i, f in enumerate(futures):
        out[i] = f.result()
    return out


def update_sha256(h: hashlib._Hash, array: ts.TensorStore, progress=None) -> None:
    """Feeds a 1-D uint16 array's little-endian bytes to `h`, a block at a time."""
    for start in range(0, array.shape[0], _BLOCK):
        block = np.asarray(array[start:min(start + _BLOCK, array.shape[0])].read().result())
        h.update(block.astype("<u2").tobytes())
        if progress is not None:
            progress.update(block.size)
