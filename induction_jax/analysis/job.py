"""How `analyze` and `ablate` run as one job over several processes or tasks: their shared command-line options,
joining a multi-host job, which part of the work this process takes, and the merge and barriers around it.

Processes join as the trainer's do (sharding.initialize_distributed: a TPU VM, srun with several tasks, or the
INDUCTION_JAX_* variables). Process 0 alone writes each run's store and the report; before the work it folds in
the parts that earlier (killed, or SLURM array) workers left, and after it the parts of this job's processes,
while the others wait at barriers that give up, in one line, after `timeout_s`.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import jax

from ..training import sharding
from . import parts
from .run import Run

BARRIER_TIMEOUT_S = 3600  # process 0 merging parts or writing a report while the others wait


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", metavar="I/N", help="analyse part I of N of the snapshots (the k-th (run, "
                        "snapshot) pair goes to part k mod N) into RESULTS_DIR/parts; a later run without --part "
                        "merges the parts and writes the report. Set by itself in a SLURM job array")
    multi = parser.add_argument_group("multi-host (TPU VMs and SLURM are detected without these)")
    multi.add_argument("--coordinator", metavar="HOST:PORT",
                       help="process 0's address (or env INDUCTION_JAX_COORDINATOR)")
    multi.add_argument("--num-processes", type=int, help="processes in the job (or INDUCTION_JAX_NUM_PROCESSES)")
    multi.add_argument("--process-id", type=int, help="this process, 0-based (or INDUCTION_JAX_PROCESS_ID)")


def split(items: list[str]) -> tuple[list[Path], list[str]]:
    """(run directories, key=value overrides) of the positional arguments: an argument with "=" that names no
    existing path is an override (Run refuses any but mesh.* and analysis.* in one line)."""
    overrides = [i for i in items if "=" in i and not Path(i).exists()]
    return [Path(i) for i in items if i not in overrides], overrides


def step_or_override(value: str) -> int | str:
    """An argparse type for --steps: a snapshot step, or a key=value override that follows the steps."""
    if "=" in value:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {value!r}") from None


def steps_arg(values: list | None) -> tuple[list[int] | None, list[str]]:
    """(--steps as integers, the key=value overrides that followed them on the command line)."""
    if values is None:
        return None, []
    return [v for v in values if isinstance(v, int)], [v for v in values if isinstance(v, str)]


def start(args: argparse.Namespace) -> parts.Part | None:
    """Joins the multi-host job when there is one; the part asked for (--part, a SLURM job array) or None."""
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    return parts.parse(args.part) if args.part else parts.from_slurm_array()


def writes(part: parts.Part | None) -> bool:
    """Whether this process writes the runs' stores and the report: process 0 of a job that does all the work."""
    return jax.process_index() == 0 and (part is None or part.whole)


@contextlib.contextmanager
def holding(runs: list[Run], part: parts.Part | None):
    """Holds, on the writing process, every run's store lock and folds in the parts left by earlier workers; the
    other processes wait until that is done, so every process then sees the same pending snapshots."""
    with contextlib.ExitStack() as held:
        if writes(part):
            for run in runs:
                held.enter_context(run.store.writing())
                copied = parts.merge(run.store)
                if copied:
                    print(f"{run.name}: merged {copied} snapshot result(s) of earlier parts", flush=True)
        sharding.barrier("results merged by process 0", BARRIER_TIMEOUT_S)
        yield


def offsets(runs: list[Run]) -> list[int]:
    """Each run's first index among the job's (run, snapshot) pairs (analysis/parts.py's rule)."""
    out, k = [], 0
    for run in runs:
        out.append(k)
        k += len(run.steps)
    return out


def gather(runs: list[Run], part: parts.Part | None) -> bool:
    """After the work: every process waits for the others; process 0 merges their parts. True on the process that
    goes on to write the report."""
    sharding.barrier("every process's snapshots done", BARRIER_TIMEOUT_S)
    if writes(part) and jax.process_count() > 1:
        for run in runs:
            parts.merge(run.store)
    if part is not None and not part.whole:
        print(f"part {part.index} of {part.count}: written to {parts.directory(runs[0].analysis_dir, part).parent}; "
              "run the command again without --part (outside the job array) to merge the parts and write the "
              "report", flush=True)
    return writes(part)


def done() -> None:
    """The last barrier: the other processes leave only once process 0 has written the report."""
    sharding.barrier("report written by process 0", BARRIER_TIMEOUT_S)
