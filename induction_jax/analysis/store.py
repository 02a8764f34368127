"""The analysis results store of one run: growable tensorstore zarr arrays indexed by snapshot, plus an index.

Arrays have a leading snapshot-slot axis that grows as snapshots are analysed. A slot's arrays are written first
and the slot is committed by atomically replacing index.json afterwards, so a killed job loses at most the
snapshot in flight (its slot is simply rewritten next time). The store lives under a key made of the eval set's
hash and the analysis code version, so results of another eval set or older code are never mixed in.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorstore as ts

from ..base import atomic

ANALYSIS_VERSION = 2
EVAL = "eval"  # per snapshot: per-token losses, ICL scores, head measures (heads.MEASURES)
COMPOSITION = "composition"  # per snapshot: Q/K/V composition scores of every head pair and their random baseline


def ablation_name(kind: str = "pattern", path: str = "total", joint: bool = False) -> str:
    """The section of one kind of head ablation (ablation.KINDS) along one path (ablation.PATHS); `joint`: the
    section whose lanes ablate the induction heads together with each head in turn."""
    return f"ablation-{kind}" + ("" if path == "total" else f"-{path}") + ("-joint" if joint else "")


def store_key(eval_hash: str) -> str:
    return f"eval-{eval_hash[:16]}-v{ANALYSIS_VERSION}"


class Store:
    """Results of one run under `root/<key>/`. Sections (EVAL, `ablation_name(...)`) are separate indices."""

    def __init__(self, root: str | Path, key: str):
        # Created by the first write, not here: reading a run's results must work on a read-only run directory.
        self.dir = Path(root) / key
        self.key = key

    # -- index -------------------------------------------------------------------------------------------
    def _index_path(self, section: str) -> Path:
        return self.dir / f"{section}.index.json"

    def index(self, section: str) -> dict:
        """{"steps": [...], "records": [{step, tokens, scalars...}, ...]} in slot order."""
        p = self._index_path(section)
        if not p.exists():
            return {"steps": [], "records": []}
        return json.loads(p.read_text())

    def steps(self, section: str) -> list[int]:
        return list(self.index(section)["steps"])

    def records(self, section: str) -> list[dict]:
        return list(self.index(section)["records"])

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
        """Writes one snapshot's arrays into the next free slot (or its existing one), then commits the index."""
        self.dir.mkdir(parents=True, exist_ok=True)
        idx = self.index(section)
        slot = idx["steps"].index(step) if step in idx["steps"] else len(idx["steps"])
        for name, value in arrays.items():
            value = np.asarray(value)
            arr = self._array(f"{section}.{name}", value.shape, value.dtype)
            if arr.shape[0] <= slot:
                arr = arr.resize(exclusive_max=(slot + 1,) + tuple(arr.shape[1:])).result()
            arr[slot].write(value).result()
        if step not in idx["steps"]:
            idx["steps"].append(step)
            idx["records"].append({"step": step, **record})
        else:
            idx["records"][slot] = {"step": step, **record}
        atomic.write(self._index_path(section), json.dumps(idx, indent=1, sort_keys=True))

    def read(self, section: str, name: str, step: int | None = None) -> np.ndarray:
        """[S, ...] over committed slots in step order, or one slot's array when `step` is given."""
        idx = self.index(section)
        if not idx["steps"]:
            raise KeyError(f"{self.dir}: no committed {section} results")
        arr = ts.open(self._spec(f"{section}.{name}"), open=True).result()
        if step is not None:
            return np.asarray(arr[idx["steps"].index(step)].read().result())
        order = np.argsort(idx["steps"])
        data = np.asarray(arr[: len(idx["steps"])].read().result())
        return data[order]

    def sorted_records(self, section: str) -> list[dict]:
        return sorted(self.records(section), key=lambda r: r["step"])
