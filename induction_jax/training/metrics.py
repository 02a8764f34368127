"""A run's metrics.jsonl, one JSON record a line (training steps and live probes), and its TensorBoard copy: the
writer the trainer uses and the readers everything else uses.

The last line may be torn (a trainer killed in the middle of a write, or one still writing it): readers skip it,
and a resumed trainer drops it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..base import atomic
from . import sharding

FILE = "metrics.jsonl"


def parse(line: str) -> dict | None:
    """A metrics line as a dict; None for a blank or torn one."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def read(run_dir: str | Path) -> list[dict]:
    """Every whole record of the run, in file order (none when the run has logged nothing)."""
    path = Path(run_dir) / FILE
    if not path.exists():
        return []
    return [rec for rec in map(parse, path.read_text().splitlines()) if rec is not None]


def tail(run_dir: str | Path, nbytes: int = 65536) -> list[dict]:
    """The whole records in the file's last `nbytes` bytes, for watching a long run without reading it all."""
    path = Path(run_dir) / FILE
    if not path.exists():
        return []
    with path.open("rb") as f:
        start = max(f.seek(0, os.SEEK_END) - nbytes, 0)
        f.seek(start)
        lines = f.read().decode(errors="replace").splitlines()
    if start > 0:
        lines = lines[1:]  # begins inside a line
    return [rec for rec in map(parse, lines) if rec is not None]


class MetricsLog:
    """metrics.jsonl + TensorBoard, written by process 0; a resumed run drops lines past its restored step."""

    def __init__(self, run_dir: Path, start_step: int):
        self.enabled = sharding.is_main_process()
        self.path = run_dir / FILE
        self.tb = None
        if not self.enabled:
            return
        if self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines()
                    if (rec := parse(ln)) is not None and rec.get("step", 0) <= start_step]
            atomic.write(self.path, "".join(ln + "\n" for ln in keep))
        # Only the trainer writes events: the readers above need not import TensorBoard.
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self.file = self.path.open("a")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
