"""Prepared data: token store, fixed eval set and token frequencies on disk; a stateless multi-host loader.

`python -m induction_jax.data prepare --config configs/X.yaml [key=value ...]` prepares `data.sources` into the
cache (dataset.prepare) and prints what it holds.
"""

from __future__ import annotations

import time

from ..base import cli
from .dataset import prepare, summary


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(prog="python -m induction_jax.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize data.sources into the cache (a no-op when already done)")
    cli.add_config_args(prep, required=True)
    cli.add_progress_arg(prep)
    args = parser.parse_args(argv)
    cfg = cli.config_from_args(args)
    t0 = time.perf_counter()
    prepared = prepare(cfg, progress=not args.no_progress)
    print(summary(prepared))
    print(f"({time.perf_counter() - t0:.1f} s this call)")
    return 0


if __name__ == "__main__":
    cli.run(main)
