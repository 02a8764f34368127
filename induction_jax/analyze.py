"""`python -m induction_jax.analyze RUN_DIR [RUN_DIR ...]`: every committed snapshot x every probe, then report.

Per snapshot: per-token losses on the fixed eval set, ICL score, and the head measures of every (layer, head),
written to the run's results store (analysis/scoring.py, analysis/store.py). Re-running skips snapshots already
analysed and picks up new ones of a run still training; a killed job loses at most the snapshot in flight. A
snapshot that cannot be read is reported by path and skipped. With several runs, the report compares them (same
eval set needed).

Multi-host and job arrays (analysis/job.py): started on every process of a TPU slice or a SLURM allocation, or as
the tasks of a SLURM job array, the snapshots are measured sharded by every process together or spread over them
(analysis.placement; analysis/parts.py names the rule), and process 0 writes each run's store and the report.
`mesh.*` and `analysis.*` overrides (key=value) change where and how the snapshots are measured.
"""

from __future__ import annotations

from pathlib import Path

from .analysis import job, scoring
from .analysis.run import ANALYSIS_DIR, Run
from .analysis.store import EVAL
from .base import cli, logs
from .base.config import UserError
from .report import markdown


def main(argv=None) -> int:
    parser = cli.Parser(prog="python -m induction_jax.analyze", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories, then any mesh.*/analysis.* key=value overrides")
    parser.add_argument("--out", type=Path, help="results and report directory (default: RUN_DIR/analysis; "
                                                 "with several runs, the joint report goes to runs' parent)")
    parser.add_argument("--steps", nargs="*", type=job.step_or_override, help="only these snapshot steps")
    parser.add_argument("--ablations", action="store_true", help="also run pattern-preserving head ablations")
    parser.add_argument("--no-report", action="store_true", help="compute results only")
    cli.add_progress_arg(parser)
    job.add_args(parser)
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    args.steps, after_steps = job.steps_arg(args.steps)
    run_dirs, overrides = job.split(args.run_dirs + after_steps)
    if not run_dirs:
        raise UserError("no RUN_DIR given (only key=value overrides)")
    part = job.start(args)
    progress = not args.no_progress
    logs.divert()
    several = len(run_dirs) > 1
    if several and not args.out and not args.no_report and job.writes(part):
        cli.check_writable(run_dirs[0].parent / ANALYSIS_DIR, "; pass --out DIR to write the joint report "
                                                            "elsewhere")
    runs = []
    for rd in run_dirs:
        run = Run(rd, args.out / rd.name if (args.out and several) else args.out, overrides)
        run.check_steps(args.steps)
        cli.check_writable(run.analysis_dir, "" if args.out else "; pass --out DIR to write them elsewhere")
        runs.append(run)
    if len({run.eval_set.eval_hash for run in runs}) > 1 and not args.no_report:
        raise UserError("runs use different eval sets (data configs); a joint report needs the same one")
    # Each run's results directory stays locked until the report is written: another analysis of the same run is
    # refused rather than interleaving its commits with this one's.
    with job.holding(runs, part):
        for run, offset in zip(runs, job.offsets(runs)):
            scoring.analyze_run(run, args.steps, progress, part, offset)
            if args.ablations:
                scoring.ablate_run(run, steps=args.steps, progress=progress, part=part, offset=offset)
        if job.gather(runs, part) and not args.no_report:
            if not any(run.store.steps(EVAL) for run in runs):
                raise UserError(f"{', '.join(map(str, run_dirs))}: nothing analysed (every snapshot was "
                                "skipped)")
            print(f"report: {markdown.write(runs, args.out)}")
        job.done()
    return 0


if __name__ == "__main__":
    cli.run(main)
