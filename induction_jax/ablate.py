"""`python -m induction_jax.ablate RUN_DIR`: head ablations at every committed snapshot of a run, then report.

Each snapshot's induction heads (one more lane ablates them together) come from its stored head measures when
it has been analysed, else from the two measures that classify them, computed for it alone. `--before/--after`
also analyse those two snapshots, whose per-token losses the before-and-after attribution compares.
"""

from __future__ import annotations

from pathlib import Path

from .analysis import job, scoring
from .analysis.run import Run
from .base import cli, logs
from .base.config import UserError
from .measures.ablation import KINDS, PATHS
from .report import markdown


def parse_heads(spec: str, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """"0.1,1.3" -> [(0, 1), (1, 3)]; one-line error for anything else."""
    out = []
    for item in spec.split(","):
        try:
            layer, head = (int(x) for x in item.strip().split("."))
        except ValueError:
            raise UserError(f"--heads: {item!r} is not LAYER.HEAD (e.g. 1.3)") from None
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise UserError(f"--heads: {item!r} is outside {n_layers} layers x {n_heads} heads")
        out.append((layer, head))
    return out


def main(argv=None) -> int:
    parser = cli.Parser(prog="python -m induction_jax.ablate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="mesh.* and analysis.* overrides")
    parser.add_argument("--steps", nargs="*", type=job.step_or_override, help="only these snapshot steps")
    parser.add_argument("--kind", choices=KINDS, default="pattern")
    parser.add_argument("--path", choices=PATHS, default="total",
                        help="total (the paper's), direct (final residual stream only) or frozen_ln (every "
                             "LayerNorm's scale frozen at the clean run's)")
    parser.add_argument("--heads", help="comma-separated LAYER.HEAD list (default: every head)")
    parser.add_argument("--out", type=Path, help="results directory (default: RUN_DIR/analysis)")
    parser.add_argument("--before", type=int, help="snapshot step before the phase change (attribution)")
    parser.add_argument("--after", type=int, help="snapshot step after the phase change (attribution)")
    cli.add_progress_arg(parser)
    job.add_args(parser)
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    args.steps, after_steps = job.steps_arg(args.steps)
    args.overrides += after_steps
    progress = not args.no_progress
    if args.before is not None and args.after is not None and args.before >= args.after:
        raise UserError(f"--before {args.before} is not earlier than --after {args.after}: the attribution compares "
                        "a snapshot before the phase change with one after it; swap them")
    part = job.start(args)
    logs.divert()
    run = Run(args.run_dir, args.out, args.overrides)
    cfg = run.config.model
    head_list = parse_heads(args.heads, cfg.n_layers, cfg.n_heads) if args.heads else None
    ends = [s for s in (args.before, args.after) if s is not None]
    run.check_steps((args.steps or []) + ends)
    cli.check_writable(run.analysis_dir, "" if args.out else "; pass --out DIR to write them elsewhere")
    with job.holding([run], part):  # the whole command: another analysis of the run is refused, not interleaved
        scoring.ablate_run(run, args.steps, args.kind, head_list, progress=progress, path=args.path, part=part)
        if ends:
            scoring.analyze_run(run, ends, progress, part)
        if job.gather([run], part):
            print(f"report: {markdown.write([run], args.out, before_after=(args.before, args.after))}")
        job.done()
    return 0


if __name__ == "__main__":
    cli.run(main)
