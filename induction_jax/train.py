"""`python -m induction_jax.train`: the training loop, snapshots on schedule, exact resume, live metrics.

The loop itself is training/loop.py; this is its command line (single- and multi-host).
"""

from __future__ import annotations

import math
import signal
from pathlib import Path

from .base import cli, logs
from .training import loop, sharding

DEFAULT_CONFIG = "configs/cpu/attn_only_2l.yaml"


def default_run_dir(config_path: str | None) -> Path:
    return Path("runs") / (Path(config_path).stem if config_path else "default")


def main(argv=None) -> int:
    parser = cli.Parser(prog="python -m induction_jax.train", description=__doc__.splitlines()[0])
    cli.add_config_args(parser, default=DEFAULT_CONFIG)
    parser.add_argument("--run-dir", type=Path, help="run directory (default: runs/<config name>)")
    parser.add_argument("--override-config", action="store_true",
                        help="continue a run directory even though its config differs")
    cli.add_progress_arg(parser)
    multi = parser.add_argument_group("multi-host (TPU VMs and SLURM are detected without these)")
    multi.add_argument("--coordinator", metavar="HOST:PORT",
                       help="process 0's address (or env INDUCTION_JAX_COORDINATOR)")
    multi.add_argument("--num-processes", type=int, help="processes in the job (or INDUCTION_JAX_NUM_PROCESSES)")
    multi.add_argument("--process-id", type=int, help="this process, 0-based (or INDUCTION_JAX_PROCESS_ID)")
    args = parser.parse_args(argv)
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    cfg = cli.config_from_args(args)
    run_dir = args.run_dir or default_run_dir(args.config)
    if sharding.is_main_process():
        print(f"run directory: {run_dir}", flush=True)
    logs.set_path(run_dir / loop.LOG_FILE)
    logs.divert()
    out = loop.train(cfg, run_dir, override_config=args.override_config, progress=not args.no_progress)
    interrupted = out["signal"] == signal.SIGINT
    if sharding.is_main_process():
        what = ("interrupted; saved at" if interrupted else "preempted; saved at") if out["preempted"] \
            else "finished at"
        loss = f" (loss {out['loss']:.4f})" if math.isfinite(out["loss"]) else ""  # none logged (metrics.jsonl gone)
        print(f"{what} step {out['step']}{loss} in {run_dir}", flush=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    cli.run(main)
