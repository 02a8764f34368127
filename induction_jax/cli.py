"""Shared command-line plumbing: config arguments and one-line reporting of user mistakes."""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Callable, Sequence

from .config import Config, UserError, load


def add_config_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", default=default, help=f"YAML config file (default: {default or 'built-in'})")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. model.n_layers=2 train.lr=1e-3")


def config_from_args(args: argparse.Namespace) -> Config:
    return load(args.config, args.overrides)


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Runs a command's main; a UserError becomes one line on stderr and exit status 2, never a traceback."""
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        # The file-system faults a user fixes outside the program; anything else is a bug and keeps its traceback.
        if e.errno not in _USER_FIXABLE:
            raise
        print(f"error: {f'{e.filename}: ' if e.filename else ''}{e.strerror}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


_USER_FIXABLE = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, getattr(errno, "EDQUOT", errno.ENOSPC)}
