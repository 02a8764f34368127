"""Shared command-line plumbing: the parser, config arguments, the progress switch, and one-line reporting of user
mistakes.

Every command (`python -m induction_jax.{train,data,analyze,ablate,export,plan,demo}`) builds its parser as a
`Parser` with these helpers and runs its main through `run`, so a mistake reads the same everywhere, a bad flag
included: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from .config import Config, UserError, load


class Parser(argparse.ArgumentParser):
    """argparse with its errors in the one-line form of every other refusal, plus where the usage is, instead of
    the usage block (which --help prints)."""

    def error(self, message: str) -> NoReturn:
        _fail(f"error: {message} (see {self.prog} --help)", 2)


def add_overrides(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=help or "dotted overrides, e.g. model.n_layers=2 train.lr=1e-3")


def add_config_args(parser: argparse.ArgumentParser, default: str | None = None, required: bool = False) -> None:
    """--config FILE and dotted key=value overrides; `config_from_args` turns them into a Config."""
    parser.add_argument("--config", default=default, required=required,
                        help="YAML config file" + ("" if required else f" (default: {default or 'built-in'})"))
    add_overrides(parser)


def config_from_args(args: argparse.Namespace) -> Config:
    return load(args.config, args.overrides)


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_writable(directory: Path, hint: str = "") -> None:
    """Fails in one line, before any work, when results could not be written to `directory`."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"{directory}: cannot write results ({e.strerror}){hint}") from None


def check_directory(path: Path, hint: str) -> None:
    """Refuses in one line a path that cannot be a directory: a regular file, a dangling symlink, or one with a
    component longer than the file system allows. A path that does not exist yet passes (it is created later)."""
    try:
        if path.is_symlink() and not path.exists():
            raise UserError(f"{path}: a dangling symlink (to {os.readlink(path)}); create its target, remove the "
                            f"link, or {hint}")
        if path.exists() and not path.is_dir():
            raise UserError(f"{path}: is a file, not a directory; {hint}")
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
        longest = max(path.parts, key=lambda part: len(os.fsencode(part)))
        raise UserError(f"{path}: the name {longest[:20]}... has {len(os.fsencode(longest))} bytes, more than the "
                        f"file system allows (usually 255); {hint}") from None


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Runs a command's main; a UserError becomes one line on stderr and exit status 2, never a traceback."""
    try:
        code = main(argv)
    except UserError as e:
        _fail(f"error: {e}", 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except OSError as e:
        # The file-system faults a user fixes outside the program; anything else is a bug and keeps its traceback.
        if e.errno not in _USER_FIXABLE:
            raise
        _fail(f"error: {f'{e.filename}: ' if e.filename else ''}{e.strerror}", 2)
    sys.exit(code or 0)


def _fail(line: str, status: int) -> NoReturn:
    print(line, file=sys.stderr)
    # Work the failure abandoned (an Orbax save's unstarted tensorstore writes) is collected at exit, and each
    # never-run coroutine would add a warning after the one line.
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
    sys.exit(status)


# ENAMETOOLONG, ENOTDIR, EISDIR and ELOOP: a path the user gave that cannot name what it should.
_USER_FIXABLE = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, getattr(errno, "EDQUOT", errno.ENOSPC),
                 errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.ELOOP}
