"""Analysis work spread over workers: which (run, snapshot) pairs a worker takes, where it writes, and folding the
workers' results into each run's own store.

The rule: list every committed snapshot of every run given, runs in the order given and snapshots in step order;
the k-th pair goes to part k mod N. Workers are the processes of a multi-host job (part = process index, N =
process count), the tasks of a SLURM job array (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of
SLURM_ARRAY_TASK_COUNT), or `--part I/N`. Part I of N writes into its own store, RESULTS_DIR/parts/I-of-N (its own
lock, so tasks never share a writer), skipping what the run's store or its own already holds, so a killed part
resumes where it stopped. `merge` copies every part's committed results into the run's store in step order, as one
process analysing them all would have written them, and removes the parts no worker holds any more.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..base.config import UserError
from .store import Store

PARTS_DIR = "parts"


@dataclass(frozen=True)
class Part:
    index: int = 0
    count: int = 1

    @property
    def whole(self) -> bool:
        return self.count == 1

    def takes(self, k: int) -> bool:
        """Whether the k-th (run, snapshot) pair of the job is this part's."""
        return k % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}-of-{self.count}"


def parse(spec: str) -> Part:
    """"I/N" -> Part(I, N), one-line error otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise UserError(f"--part {spec!r}: expected I/N with 0 <= I < N (e.g. 0/4)")
    return Part(int(m.group(1)), int(m.group(2)))


def from_slurm_array(environ=os.environ) -> Part | None:
    """This task's part of a SLURM job array (None outside one). Task ids need not start at 0 but must be
    consecutive (--array=0-7, or 1-8; not a stride or a list)."""
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return None
    try:
        task, first = int(environ["SLURM_ARRAY_TASK_ID"]), int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        count = int(environ["SLURM_ARRAY_TASK_COUNT"])
        last = int(environ.get("SLURM_ARRAY_TASK_MAX", first + count - 1))
    except (KeyError, ValueError):
        raise UserError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is missing or not an integer; run "
                        "under sbatch --array, or pass --part I/N") from None
    if last - first + 1 != count:
        raise UserError(f"SLURM job array {first}-{last} has {count} tasks: use consecutive task ids (--array="
                        f"0-{count - 1}), or pass --part I/N")
    return Part(task - first, count)


def directory(results_dir: Path, part: Part) -> Path:
    return Path(results_dir) / PARTS_DIR / str(part)


def part_dirs(results_dir: Path) -> list[Path]:
    root = Path(results_dir) / PARTS_DIR
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def sections(store: Store) -> list[str]:
    """The sections a store holds (those with an index)."""
    if not store.dir.is_dir():
        return []
    return sorted(p.name[: -len(".index.json")] for p in store.dir.glob("*.index.json"))


def merge(main: Store) -> int:
    """Copies every part's committed results that `main` lacks into `main` (the caller holds main's lock), in step
    order per section; removes each part whose writer has finished. Returns the number of snapshots copied."""
    copied = 0
    for part_dir in part_dirs(main.root):
        part = Store(part_dir, main.key)
        try:
            with part.writing():  # refused while its worker still runs: copy what it has committed, keep it
                copied += _copy(part, main)
                finished = True
        except UserError:
            copied += _copy(part, main)
            finished = False
        if finished:
            shutil.rmtree(part_dir, ignore_errors=True)
    parts_root = Path(main.root) / PARTS_DIR
    if parts_root.is_dir() and not any(parts_root.iterdir()):
        parts_root.rmdir()
    return copied


def _copy(part: Store, main: Store) -> int:
    n = 0
    for section in sections(part):
        have = set(main.steps(section))
        idx = part.index(section)
        names = sorted({name for d in idx["digests"] for name in d})
        for step in sorted(set(idx["steps"]) - have):
            record = {k: v for k, v in idx["records"][idx["steps"].index(step)].items() if k != "step"}
            main.write(section, step, record, {name: part.read(section, name, step) for name in names})
            n += 1
    return n
