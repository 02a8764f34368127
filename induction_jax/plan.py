"""`python -m induction_jax.plan`: compile the train step ahead of time for a TPU slice, without the TPU.

`--topology v5e:16x16` compiles with libtpu (the `tpu` extra: `pip install 'jax[tpu]'`) for that slice's devices;
`--devices N` compiles for N fake CPU devices instead (the CPU compiler's memory figures, which differ from a
TPU's). Either way it lowers the real train step (step.build's step_fn) and the analysis forward (evaluate's
per-token losses) on ShapeDtypeStructs that carry shardings, so nothing of the model is ever allocated, and prints
per-device memory (arguments, outputs, temporaries, peak) against the chip's HBM, FLOPs per step (analytic and
from the compiled cost analysis), the step time at a stated MFU, and the storage the snapshot schedule needs
(training/aot.py). Exit status: 0 when the step fits the chip's memory, 1 when it does not, 2 for a mistake in the
arguments.
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
                               "--topology v5p:8x8x16")
    cli.add_config_args(parser, required=True)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--topology", help="TPU slice to compile for, e.g. v5e:16x16, v5p:4x4x4 (needs libtpu)")
    target.add_argument("--devices", type=int, help="compile for N fake CPU devices instead")
    parser.add_argument("--chip", default=None, help=f"chip whose HBM and peak apply with --devices "
                        f"({', '.join(aot.CHIPS)}; default v5e)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the step time "
                        "(default 0.4)")
    parser.add_argument("--no-forward", action="store_true", help="skip the analysis forward")
    parser.add_argument("--markdown", action="store_true", help="also print the docs/scale.md table row")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if "JAX_PLATFORMS" not in os.environ and not xla_bridge.backends_are_initialized():
        # Planning runs nothing on an accelerator; keeping jax's own backends to the CPU also stops libtpu from
        # probing for TPU chips the machine does not have.
        jax.config.update("jax_platforms", "cpu")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu {args.mfu}: must be in (0, 1]")
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
    out = aot.plan(cfg, devices, chip, mfu=args.mfu, forward=not args.no_forward)
    name = os.path.splitext(os.path.basename(args.config))[0]
    print(aot.report(cfg, out, f"{args.config} on {target_name}"))
    if args.markdown:
        print(aot.markdown_row(name, cfg, out, args.topology or f"{args.devices} x CPU"))
    return 0 if out["fits"] else 1


if __name__ == "__main__":
    cli.run(main)
