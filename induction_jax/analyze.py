"""`python -m induction_jax.analyze RUN_DIR [RUN_DIR ...]`: every committed snapshot x every probe, then report.

Per snapshot: per-token losses on the fixed eval set, ICL score, and the head measures of every (layer, head),
written to the run's results store (analysis/scoring.py, analysis/store.py). Re-running skips snapshots already
analysed and picks up new ones of a run still training; a killed job loses at most the snapshot in flight. A
snapshot that cannot be read is reported by path and skipped. With several runs, the report compares them (same
eval set needed).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from .analysis import scoring
from .analysis.run import ANALYSIS_DIR, Run
from .analysis.store import EVAL
from .base import cli, logs
from .base.config import UserError
from .report import markdown


def main(argv=None) -> int:
    parser = cli.Parser(prog="python -m induction_jax.analyze", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, help="results and report directory (default: RUN_DIR/analysis; "
                                                 "with several runs, the joint report goes to runs' parent)")
    parser.add_argument("--steps", type=int, nargs="*", help="only these snapshot steps")
    parser.add_argument("--ablations", action="store_true", help="also run pattern-preserving head ablations")
    parser.add_argument("--no-report", action="store_true", help="compute results only")
    cli.add_progress_arg(parser)
    args = parser.parse_args(argv)
    progress = not args.no_progress
    logs.divert()
    several = len(args.run_dirs) > 1
    if several and not args.out and not args.no_report:
        cli.check_writable(args.run_dirs[0].parent / ANALYSIS_DIR, "; pass --out DIR to write the joint report "
                                                                 "elsewhere")
    runs = []
    # Each run's results directory stays locked until the report is written: another analysis of the same run is
    # refused rather than interleaving its commits with this one's.
    with contextlib.ExitStack() as held:
        for rd in args.run_dirs:
            run = Run(rd, args.out / rd.name if (args.out and several) else args.out)
            run.check_steps(args.steps)
            cli.check_writable(run.analysis_dir, "" if args.out else "; pass --out DIR to write them elsewhere")
            held.enter_context(run.store.writing())
            scoring.analyze_run(run, args.steps, progress)
            if args.ablations:
                scoring.ablate_run(run, steps=args.steps, progress=progress)
            runs.append(run)
        if len({run.eval_set.eval_hash for run in runs}) > 1:
            raise UserError("runs use different eval sets (data configs); a joint report needs the same one")
        if not args.no_report:
            if not any(run.store.steps(EVAL) for run in runs):
                raise UserError(f"{', '.join(map(str, args.run_dirs))}: nothing analysed (every snapshot was "
                                "skipped)")
            print(f"report: {markdown.write(runs, args.out)}")
    return 0


if __name__ == "__main__":
    cli.run(main)
