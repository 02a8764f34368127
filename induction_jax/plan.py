"""`python -m induction_jax.plan`: compile training and analysis ahead of time for a TPU slice, without the TPU.

`--topology v5e:16x16` compiles with libtpu (the `tpu` extra: `pip install 'jax[tpu]'`) for that slice's devices,
on the code path a TPU runs, and gives a verdict. It lowers the real train step (step.build's step_fn) and what
`analyze` and `ablate` run per snapshot (training/aot_analysis.py: the per-token-loss forward at the eval batch,
the head-measure and composition programs, the ablation's clean run and one lane group) on ShapeDtypeStructs that
carry the training's shardings, so nothing of the model is ever allocated, and prints each program's per-chip
memory (arguments, outputs, temporaries, peak) against the chip's HBM, FLOPs per step (analytic and from the
compiled cost analysis), the step time at a stated MFU, and the storage the snapshot schedule needs.

`--devices N` compiles for N fake CPU devices instead. That is the CPU code path (row-major projections, the
blocked CPU attention, remat undone by the CPU compiler), whose memory is no guide to a TPU's: it prints those
figures with no verdict and says how to get libtpu's.

Exit status: 1 when a program compiled by libtpu does not fit the chip, 2 for a mistake in the arguments, else 0
(always 0 for fake CPU devices).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
from jax._src import xla_bridge

from .base import cli
from .base.config import UserError
from .training import aot


def _rerun_with_cpu_devices(n: int, argv: list[str]) -> int:
    """Runs this command again in a fresh interpreter started with n fake CPU devices (this one has another
    count, fixed once jax started)."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(n), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "induction_jax.plan", *argv], env=env).returncode


def main(argv=None) -> int:
    parser = cli.Parser(prog="python -m induction_jax.plan", description=__doc__.splitlines()[0],
                        epilog="Example: python -m induction_jax.plan --config configs/full_40l.yaml "
                               "--topology v5e:8x16")
    cli.add_config_args(parser, required=True)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--topology", help="TPU slice to compile for, e.g. v5e:16x16, v5p:4x4x4 (needs libtpu)")
    target.add_argument("--devices", type=int, help="compile for N fake CPU devices instead (figures without a "
                        "verdict: the CPU code path is not a TPU's)")
    parser.add_argument("--chip", default=None, help=f"chip whose peak FLOP/s apply with --devices "
                        f"({', '.join(aot.CHIPS)}; default v5e)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the step time "
                        "(default 0.4)")
    skip = parser.add_mutually_exclusive_group()
    skip.add_argument("--no-analysis", action="store_true", help="compile the train step only")
    skip.add_argument("--no-train", action="store_true", help="compile the analysis programs only")
    parser.add_argument("--lanes", type=int, default=None, help="lanes in the ablation lane group (default: the "
                        "heads of one layer)")
    parser.add_argument("--markdown", action="store_true", help="also print docs/scale.md's table rows (needs "
                        "--topology)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if "JAX_PLATFORMS" not in os.environ and not xla_bridge.backends_are_initialized():
        # Planning runs nothing on an accelerator; keeping jax's own backends to the CPU also stops libtpu from
        # probing for TPU chips the machine does not have.
        jax.config.update("jax_platforms", "cpu")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu {args.mfu}: must be in (0, 1]")
    if args.lanes is not None and args.lanes < 1:
        raise UserError(f"--lanes {args.lanes}: must be >= 1")
    if args.markdown and args.devices:
        raise UserError("--markdown prints rows of docs/scale.md's tables, which hold libtpu's figures for a TPU "
                        "slice; --devices compiles the CPU code path, so name a slice with --topology")
    cfg = cli.config_from_args(args)
    if args.topology:
        if args.chip:
            raise UserError("--chip applies to --devices; a topology names its chip")
        devices, chip = aot.tpu_devices(args.topology)
        target_name = args.topology
    else:
        if args.devices < 1:
            raise UserError(f"--devices {args.devices}: must be >= 1")
        # Set the count only in a process nobody has configured (the command line); a process that chose its own
        # (JAX_NUM_CPU_DEVICES, or a started backend) keeps it, and the plan runs in a fresh interpreter instead.
        if not xla_bridge.backends_are_initialized() and "JAX_NUM_CPU_DEVICES" not in os.environ:
            jax.config.update("jax_num_cpu_devices", args.devices)
        elif len(jax.devices("cpu")) != args.devices:
            return _rerun_with_cpu_devices(args.devices, argv)
        devices, chip = aot.cpu_devices(args.devices), aot.chip_named(args.chip or "v5e")
        target_name = f"{args.devices} CPU devices as {chip.name}"
    out = aot.plan(cfg, devices, chip, mfu=args.mfu, train=not args.no_train, analysis=not args.no_analysis,
                   lanes=args.lanes)
    name = os.path.splitext(os.path.basename(args.config))[0]
    print(aot.report(cfg, out, f"{args.config} on {target_name}"))
    if args.markdown:
        if not args.no_train:
            print(aot.markdown_row(name, cfg, out, args.topology))
        if not args.no_analysis:
            print(aot.analysis_row(name, out, args.topology))
    return 1 if out["fits"] is False else 0


if __name__ == "__main__":
    cli.run(main)
