"""Orbax checkpoints of a run: resume state, params-only snapshots, and a read-only snapshot reader.

On-disk layout inside a run directory (step s = the parameters after s optimizer updates):

    state/<s>/state/       the train-state pytree (Orbax PyTree, OCDBT)       latest 2 kept
    state/<s>/extra/       a small JSON dict (data position, ...)
    snapshots/<s>/params/  the parameters (Orbax PyTree, OCDBT)                never deleted
    snapshots/<s>/meta/    JSON {step, tokens_seen, wall_time, ...}

Orbax writes each step into `<s>.orbax-checkpoint-tmp*` and renames it when every item is complete (on object
stores it writes commit_success.txt instead), so a crash at any moment leaves every visible step whole, and a
reader that lists steps the way Orbax does never sees a half-written one.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from ..base import logs
from ..base.config import CONFIG_FILE, UserError, first_line

STATE_DIR = "state"
SNAPSHOTS_DIR = "snapshots"
LOCK_FILE = ".lock"  # held (flock) by the trainer of a run directory; see loop.RunLock
_STATE, _EXTRA = "state", "extra"
_PARAMS, _META = "params", "meta"

_sigterm = threading.Event()
_stop_signal: list[int] = []  # the signal that set _sigterm, for the exit status


class SnapshotError(UserError):
    """A snapshot that cannot be read (missing, truncated, corrupted, or of another model); one-line message that
    names its path, so a caller can skip it."""


class RunDirError(UserError):
    """A directory that is not a run directory; one-line message naming it."""


def _absolute(path) -> epath.Path:
    """Orbax refuses relative paths; object-store URLs (gs://...) are left as they are."""
    text = str(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def install_sigterm_handler():
    """Makes SIGTERM set a flag that `ResumeCheckpointer.reached_preemption` reports, instead of killing the
    process, so the loop can save and exit cleanly. Returns the previous handler.

    Only for single-process runs: with several processes JAX's preemption service owns SIGTERM and Orbax's
    sync point makes every host agree on the step, which a per-process flag cannot.
    """
    _sigterm.clear()
    _stop_signal.clear()
    if jax.process_count() > 1:
        return signal.getsignal(signal.SIGTERM)
    return signal.signal(signal.SIGTERM, _on_stop_signal)


def install_stop_handlers() -> dict:
    """SIGTERM as in `install_sigterm_handler`, and Ctrl-C (SIGINT) the same way: save, then stop. A second
    Ctrl-C interrupts at once, for a user who will not wait for the save. Returns the previous handlers, for
    `restore_handlers`."""
    previous = {signal.SIGTERM: install_sigterm_handler()}
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_stop_signal)
    return previous


def restore_handlers(previous: dict) -> None:
    if threading.current_thread() is threading.main_thread():
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _on_stop_signal(signum, frame):
    if signum == signal.SIGINT and _sigterm.is_set():
        raise KeyboardInterrupt
    _stop_signal.append(signum)
    _sigterm.set()


def stop_signal() -> int | None:
    """The signal (SIGTERM or SIGINT) that asked this run to stop, if any."""
    return _stop_signal[0] if _stop_signal else None


@jax.jit
def _finite(leaves):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree: Any) -> bool:
    """Whether every float array of `tree` is free of NaN and infinity: one reduction on the devices, so call it
    where a sync is due anyway (at a save)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return True
    # The replicated scalar is addressable on every process, also when the params span several hosts.
    return bool(np.asarray(_finite(leaves).addressable_data(0)))


@jax.jit
def _norm(leaves):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def norm(tree: Any) -> float:
    """The global L2 norm of `tree`'s float arrays (one reduction on the devices, like `all_finite`)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return 0.0
    return float(np.asarray(_norm(leaves).addressable_data(0)))


def disk_full(e: BaseException | None) -> bool:
    """Whether `e` (or an exception it was raised from) is a full disk. Tensorstore reports it as a ValueError
    naming the OS error code, not as an OSError."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
        text = str(e)
        if "No space left on device" in text or f"os_error_code='{errno.ENOSPC}'" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def committed_steps(directory: str | epath.Path) -> list[int]:
    """Steps Orbax has committed in a checkpoint directory, ascending: temporary directories of saves in progress
    (or of crashed ones) never appear."""
    directory = _absolute(directory)
    if not directory.is_dir():
        return []
    return sorted(m.step for m in ocp.step.standard_name_format().find_all(directory))


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path) or "<root>"


def _restore_args(abstract: Any, what: str):
    """Restore arguments that put every array on the sharding of its ShapeDtypeStruct. Orbax needs these to
    restore onto another mesh or device count; `item=abstract` alone is not enough (docs/method.md §7)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        if getattr(leaf, "sharding", None) is None:
            raise ValueError(f"{what}: leaf {_path_name(path)} has no sharding; pass jax.ShapeDtypeStruct(shape, "
                             "dtype, sharding=...) leaves")
    return ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


def _json_dict(extra: dict, what: str) -> dict:
    # Checked here, in the caller's thread, rather than failing later inside Orbax's background commit.
    try:
        return json.loads(json.dumps(extra))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: not JSON-serialisable ({e})") from None


_manager_ids = itertools.count()


def _multiprocessing_options(kind: str) -> ocp.options.MultiprocessingOptions:
    """Orbax names its multi-host barriers after the operation alone ("...:set_value_start"), so the snapshot
    and resume managers, whose background commits overlap when both save at one step, would meet at each
    other's barriers and commit before every process has written. A prefix per manager keeps them apart; it
    counts managers rather than naming the directory, whose absolute path may differ from host to host, and
    every process creates its managers in the same order."""
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=f"{kind}{next(_manager_ids)}")


class _Managed:
    """Shared by the two writers: both wrap one Orbax CheckpointManager in `self._manager`."""

    _manager: ocp.CheckpointManager

    def wait(self) -> None:
        """Blocks until the pending save is committed (and re-raises its error, if any)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ResumeCheckpointer(_Managed):
    """The full train state every `every` steps and at preemption, keeping the latest 2.

    `state` is any pytree of jax arrays (params, optimizer state, step counter, typed PRNG keys); `extra` is a
    small JSON dict (e.g. the data position). Saving is asynchronous: `save` returns once the arrays are copied
    to host memory, so the caller may donate or overwrite them; the files are written in the background.
    """

    def __init__(self, directory: str | epath.Path, *, every: int = 1):
        if every < 1:
            raise ValueError(f"ResumeCheckpointer: every must be >= 1, got {every}")
        self.directory = _absolute(directory)
        # A save_decision_policy replaces Orbax's default policy, preemption saving included, so it is listed.
        policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(every),
                                         policies.PreemptionCheckpointingPolicy()])
        options = ocp.CheckpointManagerOptions(max_to_keep=2, save_decision_policy=policy,
                                               cleanup_tmp_directories=True, enable_async_checkpointing=True,
                                               multiprocessing_options=_multiprocessing_options("resume"))
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def reached_preemption(self, step: int) -> bool:
        """True when this run should save now and exit: Orbax's multi-host preemption sync point (call it on
        every process at every step) or a SIGTERM caught by `install_sigterm_handler`."""
        return self._manager.reached_preemption(step) or _sigterm.is_set()

    def save(self, step: int, state: Any, extra: dict | None = None, *, force: bool = False) -> bool:
        """Saves `state` as step `step` when forced, at a multiple of `every`, or at preemption; True if a save
        started. A step that is already saved is left as it is (False)."""
        extra = _json_dict(extra or {}, f"{self.directory}: extra of step {step}")
        force = force or _sigterm.is_set()
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(**{_STATE: ocp.args.PyTreeSave(state), _EXTRA: ocp.args.JsonSave(extra)})
        return self._manager.save(step, args=args, force=force)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def extra(self, step: int) -> dict:
        """The small JSON dict saved with step `step`, read without the state; empty when it cannot be read."""
        try:
            with logs.diverted():
                restored = self._manager.restore(step, args=ocp.args.Composite(**{_EXTRA: ocp.args.JsonRestore()}))
        except Exception:  # noqa: BLE001 - only ever a detail of a message about another failure
            return {}
        return dict(restored[_EXTRA] or {})

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, extra) of step `step`, each array placed on the sharding of its jax.ShapeDtypeStruct in
        `abstract_state` (which must have the saved tree structure)."""
        args = ocp.args.Composite(**{_STATE: _restore_args(abstract_state, f"{self.directory}/{step}"),
                                     _EXTRA: ocp.args.JsonRestore()})
        restored = self._manager.restore(step, args=args)
        return restored[_STATE], dict(restored[_EXTRA] or {})



class SnapshotWriter(_Managed):
    """Params-only snapshots, one per scheduled step, each with its metadata; all are kept."""

    def __init__(self, directory: str | epath.Path):
        self.directory = _absolute(directory)
        # Every save is forced: the schedule lives in the caller, and Orbax's own policy would skip steps.
        options = ocp.CheckpointManagerOptions(max_to_keep=None, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=True,
                                               multiprocessing_options=_multiprocessing_options("snapshots"))
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, params: Any, meta: dict) -> bool:
        """Snapshots `params` as step `step`, asynchronously. `meta` must hold tokens_seen; `step` and
        `wall_time` (Unix seconds at this call) are added unless given. A step already saved, which a resumed
        run reaches again, is left as it is (False)."""
        if "tokens_seen" not in meta:
            raise ValueError(f"{self.directory}: snapshot {step} metadata lacks tokens_seen")
        meta = _json_dict({"step": step, "wall_time": time.time(), **meta}, f"{self.directory}: metadata of {step}")
        if meta["step"] != step:
            raise ValueError(f"{self.directory}: metadata step {meta['step']} differs from snapshot step {step}")
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(**{_PARAMS: ocp.args.PyTreeSave(params), _META: ocp.args.JsonSave(meta)})
        return self._manager.save(step, args=args, force=True)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())



class SnapshotReader:
    """Read-only access to a run's committed snapshots; safe while training is still writing them.

    It never writes, deletes or caches: each call looks at the directory afresh, so new snapshots appear as
    they are committed. In a multi-host job every process reads each snapshot together (Orbax meets at a barrier
    after each read), unless `local` is set: then each process reads on its own, which processes that analyse
    different snapshots need.
    """

    def __init__(self, run_dir: str | epath.Path, local: bool = False):
        self.local = local
        self.run_dir = _absolute(run_dir)
        self.directory = self.run_dir / SNAPSHOTS_DIR
        if not self.run_dir.is_dir():
            raise RunDirError(f"{self.run_dir}: no such run directory")
        if not (self.run_dir / CONFIG_FILE).exists() and not self.directory.is_dir():
            if (self.run_dir / LOCK_FILE).exists():
                raise RunDirError(f"{self.run_dir}: nothing committed yet (its trainer has not got past data "
                                  "preparation); try again once it has saved a snapshot")
            raise RunDirError(f"{self.run_dir}: not a run directory (no {CONFIG_FILE} and no {SNAPSHOTS_DIR}/)")

    def steps(self) -> list[int]:
        """Steps of the committed snapshots, ascending. Orbax's own listing is used, so temporary directories of
        saves in progress (or of crashed ones) never appear."""
        return committed_steps(self.directory)

    def path(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _committed(self, step: int) -> epath.Path:
        path = self.path(step)
        if not (path.is_dir() and ocp.step.is_path_finalized(path)):
            raise SnapshotError(f"{path}: no committed snapshot at step {step}")
        return path

    def metadata(self, step: int) -> dict:
        """The snapshot's JSON metadata: step, tokens_seen, wall_time and whatever the writer added."""
        path = self._committed(step)
        try:
            with logs.diverted():
                meta = self._checkpointer(ocp.JsonCheckpointHandler).restore(path / _META,
                                                                               args=ocp.args.JsonRestore())
        except Exception as e:  # noqa: BLE001 - any failure to read means an unusable snapshot
            raise SnapshotError(f"{path}: unreadable snapshot metadata "
                                f"({first_line(e, with_type=True)})") from None
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise SnapshotError(f"{path}: metadata is not that of snapshot {step}")
        return meta

    def restore(self, step: int, abstract_params: Any = None) -> Any:
        """The parameters of snapshot `step`, each array placed on the sharding of its jax.ShapeDtypeStruct in
        `abstract_params` (any mesh or device count, not necessarily the training one). With None, every array
        goes whole onto the first local device. Shapes and tree structure must match the saved ones; dtypes are
        cast to the requested ones."""
        path = self._committed(step)
        if abstract_params is None:
            abstract_params = self._single_device_abstract(path)
        args = _restore_args(abstract_params, str(path))
        try:
            with logs.diverted():
                return self._checkpointer(ocp.PyTreeCheckpointHandler).restore(path / _PARAMS, args=args)
        except Exception as e:  # noqa: BLE001 - tensorstore and Orbax raise many types for damaged files
            raise SnapshotError(f"{path}: unreadable snapshot ({first_line(e, with_type=True)})") from None

    def _checkpointer(self, handler_cls) -> ocp.Checkpointer:
        if not self.local:
            return ocp.Checkpointer(handler_cls())
        me = jax.process_index()  # a barrier over this process alone is skipped
        options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        return ocp.Checkpointer(handler_cls(multiprocessing_options=options), multiprocessing_options=options)

    def shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """{key path: shape} of the snapshot's arrays, read from its metadata alone."""
        tree = self._single_device_abstract(self._committed(step))
        return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def _single_device_abstract(self, path: epath.Path) -> Any:
        try:
            with logs.diverted():
                tree = ocp.PyTreeCheckpointer().metadata(path / _PARAMS).item_metadata.tree
        except Exception as e:  # noqa: BLE001
            raise SnapshotError(f"{path}: unreadable snapshot metadata "
                                f"({first_line(e, with_type=True)})") from None
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)

