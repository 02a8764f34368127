"""Library noise kept out of the terminal, in a log file instead.

Orbax and tensorstore report one failed read or write many times over: absl ERROR records from each of their
threads, asyncio's "exception was never retrieved" for every sibling task, "Exception ignored in" for abandoned
coroutines, exceptions in background threads. A damaged snapshot or a full disk turns into hundreds of traceback
lines, while the commands already say what happened in one line. Those reports go to `path()` (created on first
use; a run's train.log, or a per-user file in the temp directory), where they remain for debugging.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

# Loggers of the libraries whose failures our commands report themselves. JAX's own warnings (no GPU found, ...)
# are left alone: they tell the user something.
LIBRARY_LOGGERS = ("absl", "asyncio", "orbax", "tensorstore")

_path = Path(tempfile.gettempdir()) / f"induction_jax-{os.getuid() if hasattr(os, 'getuid') else 0}.log"
_lock = threading.Lock()


def path() -> Path:
    return _path


def set_path(new: str | Path) -> None:
    global _path
    _path = Path(new)


def write(text: str) -> None:
    """Appends to the log file; never raises (the disk it is on may be the full one)."""
    try:
        with _lock, open(_path, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n{text.rstrip()}\n")
    except Exception:  # noqa: BLE001 - nowhere left to report it
        pass


class _Handler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            write(self.format(record))
        except Exception:  # noqa: BLE001
            pass


_handler = _Handler()
_handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))


def _unraisable(u) -> None:
    lines = traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback) if u.exc_type else []
    write(f"{u.err_msg or 'Exception ignored in'}: {u.object!r}\n{''.join(lines)}")


def _thread_exception(args) -> None:
    if args.exc_type is SystemExit:
        return
    lines = traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)
    write(f"exception in thread {getattr(args.thread, 'name', '?')}\n{''.join(lines)}")


class _Stream:
    """Stands in for sys.stderr: C extensions print tracebacks of failed callbacks through it."""

    def write(self, text: str) -> int:
        if text.strip():
            write(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def divert() -> None:
    """For the commands, process-wide and for good: library loggers, unraisable exceptions (finalisers, atexit)
    and uncaught exceptions in background threads go to the log file. Our own messages still reach stderr."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [_handler]
        logger.propagate = False
    # A handler that cannot write (full disk) must not print "--- Logging error ---" with a traceback instead.
    logging.raiseExceptions = False
    sys.unraisablehook = _unraisable
    threading.excepthook = _thread_exception


def _from_library(text: str) -> bool:
    return any(f"{os.sep}{name}{os.sep}" in text for name in ("orbax", "tensorstore"))


def _closed_loop_callback(exc, tb) -> bool:
    # Tensorstore completes the reads a failed restore abandoned on a thread of its own and hands each result to
    # an event loop Orbax has already closed; the RuntimeError comes from C, with no Python caller above it.
    frames = traceback.extract_tb(tb)
    return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and bool(frames)
            and frames[0].name == "call_soon_threadsafe")


def _filtered_unraisable(previous):
    def hook(u) -> None:
        code = getattr(u.object, "cr_code", None) or getattr(u.object, "gi_code", None)
        where = (code.co_filename if code else "") + "".join(traceback.format_tb(u.exc_traceback))
        if _from_library(where) or _closed_loop_callback(u.exc_value, u.exc_traceback):
            _unraisable(u)
        else:
            previous(u)
    hook.induction_jax = True
    return hook


class _LibraryRecords(logging.Filter):
    """Diverts asyncio's reports about Orbax's and tensorstore's abandoned tasks; keeps the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info:
            text += "".join(traceback.format_exception(*record.exc_info))
        if _from_library(text):
            _handler.handle(record)
            return False
        return True


def _install_library_filters() -> None:
    """Permanent, but narrow: once a snapshot read has failed, its abandoned coroutines are finalised whenever
    the event loop thread lets go of them, possibly long after the call returned."""
    if not getattr(sys.unraisablehook, "induction_jax", False):
        sys.unraisablehook = _filtered_unraisable(sys.unraisablehook)
    aio = logging.getLogger("asyncio")
    if not any(isinstance(f, _LibraryRecords) for f in aio.filters):
        aio.addFilter(_LibraryRecords())


@contextlib.contextmanager
def diverted():
    """For library calls (the Run API): the same diversion, and stderr, only while the block runs. A failed block
    collects its abandoned coroutines before it ends, so that their reports land in the log file too."""
    loggers = [logging.getLogger(n) for n in LIBRARY_LOGGERS]
    saved = [(lg.handlers, lg.propagate) for lg in loggers]
    hooks = sys.unraisablehook, threading.excepthook, sys.stderr
    for lg in loggers:
        lg.handlers, lg.propagate = [_handler], False
    sys.unraisablehook, threading.excepthook, sys.stderr = _unraisable, _thread_exception, _Stream()
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        import gc
        gc.collect()
        raise
    finally:
        for lg, (handlers, propagate) in zip(loggers, saved):
            lg.handlers, lg.propagate = handlers, propagate
        sys.unraisablehook, threading.excepthook, sys.stderr = hooks
        if failed:
            _install_library_filters()
