"""The analysis results store of one run: growable tensorstore zarr arrays indexed by snapshot, plus an index.

Arrays have a leading slot axis that grows as snapshots are analysed. A snapshot's arrays are written into a free
slot first, and it is committed by atomically replacing index.json afterwards, which records its slot and a
digest of each of its arrays: a killed job loses at most the snapshot in flight (its slot is simply reused next
time). The store lives under a key made of the eval set's hash and the analysis code version, so results of
another eval set or older code are never mixed in.

One process writes a results directory at a time: writers hold an exclusive lock on ROOT/.lock (base/lock.py),
which a second writer is refused in one line. What two writers at once did to a store written before the lock
existed, or any other damage to a slot, shows as a digest that does not match: `read` refuses such a slot, and
`verify` drops it from the index so that the next analysis computes it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import tensorstore as ts

from ..base import atomic, lock
from ..base.config import UserError, first_line
from ..training import checkpoint

ANALYSIS_VERSION = 3  # 3: slots and digests in the index
EVAL = "eval"  # per snapshot: per-token losses, ICL scores, head measures (heads.MEASURES)
COMPOSITION = "composition"  # per snapshot: Q/K/V composition scores of every head pair and their random baseline
LOCK_FILE = ".lock"  # in the results directory (a store's root), held by its writer


class StoreError(UserError):
    """Stored results that do not match their digests; one-line message naming the array and the step."""


class DiskFullError(UserError):
    """A write found the disk full; one-line message saying what is kept."""


def ablation_name(kind: str = "pattern", path: str = "total", joint: bool = False) -> str:
    """The section of one kind of head ablation (ablation.KINDS) along one path (ablation.PATHS); `joint`: the
    section whose lanes ablate the induction heads together with each head in turn."""
    return f"ablation-{kind}" + ("" if path == "total" else f"-{path}") + ("-joint" if joint else "")


def store_key(eval_hash: str) -> str:
    return f"eval-{eval_hash[:16]}-v{ANALYSIS_VERSION}"


def digest(value: np.ndarray) -> str:
    """A slot's content digest: its dtype, shape and bytes."""
    value = np.ascontiguousarray(value)
    h = hashlib.sha256(f"{value.dtype.str}{value.shape}".encode())
    h.update(value.tobytes())
    return h.hexdigest()[:32]


# Results directories this process holds the lock of: {resolved root: [DirLock, holds]}. flock is per open file,
# so a second lock of the same directory by the same process would refuse that process itself.
_held: dict[str, list] = {}


class Store:
    """Results of one run under `root/<key>/`. Sections (EVAL, `ablation_name(...)`) are separate indices."""

    def __init__(self, root: str | Path, key: str):
        # Created by the first write, not here: reading a run's results must work on a read-only run directory.
        self.root = Path(root)
        self.dir = self.root / key
        self.key = key

    # -- the writer's lock ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self):
        """Holds the results directory's lock (taken by the outermost `writing` of this process): a second process
        that tries is refused with a UserError naming this one's PID and the directory."""
        name = os.path.realpath(self.root)
        if name not in _held:
            try:
                _held[name] = [lock.DirLock(self.root / LOCK_FILE), 0]
            except lock.Held as e:
                raise UserError(f"{self.root}: in use by another analysis ({e.holder}); wait for it to finish or "
                                "stop it, or pass --out DIR to write elsewhere") from None
            except OSError as e:
                raise UserError(f"{self.root}: cannot write results ({e.strerror})") from None
        _held[name][1] += 1
        try:
            yield self
        finally:
            _held[name][1] -= 1
            if not _held[name][1]:
                _held.pop(name)[0].release()

    # -- index -------------------------------------------------------------------------------------------
    def _index_path(self, section: str) -> Path:
        return self.dir / f"{section}.index.json"

    def index(self, section: str) -> dict:
        """{"steps": [...], "slots": [...], "digests": [{array: digest}, ...], "records": [{step, tokens, scalars...},
        ...]}, one entry per committed snapshot, in commit order."""
        p = self._index_path(section)
        if not p.exists():
            return {"steps": [], "slots": [], "digests": [], "records": []}
        return json.loads(p.read_text())

    def steps(self, section: str) -> list[int]:
        return list(self.index(section)["steps"])

    def records(self, section: str) -> list[dict]:
        return list(self.index(section)["records"])

    def _commit(self, section: str, idx: dict) -> None:
        atomic.write(self._index_path(section), json.dumps(idx, indent=1, sort_keys=True))

    # -- arrays ------------------------------------------------------------------------------------------
    def _spec(self, name: str) -> dict:
        return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(self.dir / f"{name}.zarr")}}

    def _array(self, name: str, slot_shape: tuple[int, ...], dtype) -> ts.TensorStore:
        spec = self._spec(name)
        try:
            arr = ts.open(spec, open=True).result()
            if tuple(arr.shape[1:]) != tuple(slot_shape):
                raise ValueError(f"{self.dir / name}.zarr: holds slots of shape {arr.shape[1:]}, expected "
                                 f"{slot_shape}; delete it to recompute")
            return arr
        except ValueError as e:
            if "expected" in str(e):
                raise
        return ts.open(spec, create=True, dtype=ts.dtype(np.dtype(dtype).name), shape=(0,) + tuple(slot_shape),
                       chunk_layout=ts.ChunkLayout(chunk_shape=(1,) + tuple(slot_shape))).result()

    def write(self, section: str, step: int, record: dict, arrays: dict[str, np.ndarray]) -> None:
        """Writes one snapshot's arrays into a free slot, then commits the index with the slot and the arrays'
        digests. A snapshot stored already is replaced: its new slot is committed before the old one is freed."""
        with self.writing():
            try:
                self._write(section, step, record, arrays)
            except Exception as e:
                if not checkpoint.disk_full(e):
                    raise
                n = len(self.steps(section))
                raise DiskFullError(f"{self.dir}: the disk is full (No space left on device); the {n} snapshot(s) "
                                    f"committed in its {section} section are kept, and a rerun goes on from "
                                    "there once space is freed") from None

    def _write(self, section: str, step: int, record: dict, arrays: dict[str, np.ndarray]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        idx = self.index(section)
        slot = next(k for k in range(len(idx["slots"]) + 1) if k not in idx["slots"])
        digests = {}
        for name, value in arrays.items():
            value = np.asarray(value)
            arr = self._array(f"{section}.{name}", value.shape, value.dtype)
            if arr.shape[0] <= slot:
                arr = arr.resize(exclusive_max=(slot + 1,) + tuple(arr.shape[1:])).result()
            stored = value.astype(arr.dtype.numpy_dtype, copy=False)
            arr[slot].write(stored).result()
            digests[name] = digest(stored)
        if step in idx["steps"]:
            self._drop(idx, idx["steps"].index(step))
        idx["steps"].append(step)
        idx["slots"].append(slot)
        idx["digests"].append(digests)
        idx["records"].append({"step": step, **record})
        self._commit(section, idx)

    @staticmethod
    def _drop(idx: dict, i: int) -> None:
        for key in ("steps", "slots", "digests", "records"):
            idx[key].pop(i)

    def _rows(self, section: str, name: str, idx: dict, entries: list[int]) -> list[np.ndarray]:
        """The arrays of index entries `entries`, each checked against its digest."""
        arr = ts.open(self._spec(f"{section}.{name}"), open=True).result()
        rows = []
        for i in entries:
            value = np.asarray(arr[idx["slots"][i]].read().result())
            if digest(value) != idx["digests"][i].get(name):
                raise StoreError(f"{self.dir / section}.{name}.zarr: the stored results of step {idx['steps'][i]} "
                                 "do not match their digest (damaged, or written by two analyses at once); run "
                                 "python -m induction_jax.analyze on the run, which computes them again")
            rows.append(value)
        return rows

    def read(self, section: str, name: str, step: int | None = None) -> np.ndarray:
        """[S, ...] over committed snapshots in step order, or one snapshot's array when `step` is given; a slot
        that does not match its digest raises StoreError."""
        idx = self.index(section)
        if not idx["steps"]:
            raise KeyError(f"{self.dir}: no committed {section} results")
        if step is not None:
            return self._rows(section, name, idx, [idx["steps"].index(step)])[0]
        return np.stack(self._rows(section, name, idx, list(np.argsort(idx["steps"], kind="stable"))))

    def verify(self, section: str) -> list[tuple[int, str]]:
        """Checks every committed snapshot of `section` against its digests and drops from the index those that do
        not match (or whose arrays cannot be read), so that they count as not analysed; returns (step, one line
        naming the array and what is wrong) of each one dropped. Takes the writer's lock when it drops one."""
        idx = self.index(section)
        bad: dict[int, str] = {}
        names = sorted({name for d in idx["digests"] for name in d})
        for i, step in enumerate(idx["steps"]):
            for name in names:
                path = self.dir / f"{section}.{name}.zarr"
                try:
                    self._rows(section, name, idx, [i])
                except StoreError:
                    bad.setdefault(step, f"{path}: the results of step {step} do not match their digest")
                except ValueError as e:  # tensorstore: a missing or unreadable array or chunk
                    bad.setdefault(step, f"{path}: the results of step {step} cannot be read ({first_line(e)})")
        if bad:
            with self.writing():
                idx = self.index(section)
                for step in bad:
                    if step in idx["steps"]:
                        self._drop(idx, idx["steps"].index(step))
                self._commit(section, idx)
        return sorted(bad.items())

    def sorted_records(self, section: str) -> list[dict]:
        return sorted(self.records(section), key=lambda r: r["step"])
