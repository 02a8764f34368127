"""Device mesh from config, logical-axis -> mesh-axis rules, and multi-host initialisation and barriers.

Mesh axes are ("data", "fsdp", "tensor"). Parameters are sharded by their logical names (model.logical_axes):
"embed" over fsdp, "heads"/"mlp"/"vocab" over tensor; the batch over data and fsdp together, and activations
likewise (model.shard_batch, active while the mesh is set with `jax.set_mesh`).
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ..base.config import ConfigError, MeshConfig, ModelConfig, UserError, first_line
from ..model import model as model_lib

AXES = ("data", "fsdp", "tensor")
BATCH = model_lib.BATCH_AXES
RULES = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "vocab": "tensor", "head_dim": None}

log = logging.getLogger(__name__)


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ConfigError(f"mesh: only one of data/fsdp/tensor may be -1, got {sizes}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if fill:
        if n_devices % known:
            raise ConfigError(f"mesh: {n_devices} devices do not divide by the fixed axes' product {known}")
        sizes[fill[0]] = n_devices // known
    if int(np.prod(sizes)) != n_devices:
        raise ConfigError(f"mesh: data x fsdp x tensor = {sizes} needs {int(np.prod(sizes))} devices, "
                          f"this job has {n_devices}")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    # Explicit Auto axis types: jax's default became Explicit, which rejects our partially-sharded FSDP specs.
    types = (AxisType.Auto,) * 3
    try:
        return jax.make_mesh(shape, AXES, axis_types=types, devices=devices)
    except NotImplementedError:
        # A TPU torus whose axes no product of which equals a mesh axis (e.g. tensor=2 on v5p's 4x8x8): lay the
        # mesh out by splitting a physical axis, which jax.make_mesh allows on v5e only.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, AXES, axis_types=types)


def _spec_for(logical: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    axes = []
    for name, dim in zip(tuple(logical), shape):
        axis = RULES.get(name) if name else None
        # A dimension that does not divide stays replicated (e.g. a per-head scalar on a wide tensor axis).
        axes.append(axis if axis and dim % mesh.shape[axis] == 0 and mesh.shape[axis] > 1 else None)
    return P(*axes)


def param_shardings(cfg: ModelConfig, mesh: Mesh):
    """NamedSharding per parameter, from the model's logical axis names."""
    abstract = model_lib.abstract_params(cfg)
    logical = model_lib.logical_axes(cfg)
    return jax.tree.map(lambda spec, leaf: NamedSharding(mesh, _spec_for(spec, leaf.shape, mesh)),
                        logical, abstract, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(global_batch: int, mesh: Mesh) -> None:
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % ways:
        raise ConfigError(f"train.batch_size: {global_batch} does not divide over data x fsdp = {ways} devices")
    if global_batch % jax.process_count():
        raise ConfigError(f"train.batch_size: {global_batch} does not divide over {jax.process_count()} processes")


class BarrierTimeout(UserError):
    """Not every process reached a barrier in time (one died, hangs, or runs different code); names the barrier."""


def _on_tpu_vm() -> bool:
    # The devices a TPU VM exposes (as jax's own hardware probe looks for them), read before jax starts a backend.
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _tpu_worker_hosts() -> list[str]:
    hosts = [h.strip() for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    # Only real host names count: libtpu writes a sentence (with commas) here when it cannot find them.
    return hosts if all(re.fullmatch(r"[\w.:-]+", h) for h in hosts) else []


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: int = 300) -> bool:
    """Joins a multi-host job when there is one: explicit arguments, env vars, SLURM or a TPU VM.

    Returns True when jax.distributed was initialised. Env vars: INDUCTION_JAX_COORDINATOR (host:port),
    INDUCTION_JAX_NUM_PROCESSES, INDUCTION_JAX_PROCESS_ID. Under SLURM (more than one task) and on TPU VMs jax
    finds the coordinator, process count and id itself. Must run before anything starts a jax backend.
    `timeout_s` bounds the wait for every process to join; a missing one is reported, not waited on forever.
    """
    coordinator = coordinator or os.environ.get("INDUCTION_JAX_COORDINATOR")
    try:
        if num_processes is None and "INDUCTION_JAX_NUM_PROCESSES" in os.environ:
            num_processes = int(os.environ["INDUCTION_JAX_NUM_PROCESSES"])
        if process_id is None and "INDUCTION_JAX_PROCESS_ID" in os.environ:
            process_id = int(os.environ["INDUCTION_JAX_PROCESS_ID"])
    except ValueError as e:
        raise UserError(f"INDUCTION_JAX_NUM_PROCESSES / INDUCTION_JAX_PROCESS_ID: not an integer ({e})") from None
    if coordinator:
        if num_processes is None or process_id is None:
            raise UserError(f"coordinator {coordinator}: also give the number of processes and this process's id "
                            "(INDUCTION_JAX_NUM_PROCESSES, INDUCTION_JAX_PROCESS_ID)")
        if not 0 <= process_id < num_processes:
            raise UserError(f"process id {process_id} is not in 0..{num_processes - 1}")
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or len(_tpu_worker_hosts()) > 1 or _on_tpu_vm():
        kwargs = {}
    else:
        return False
    try:
        jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
    except (RuntimeError, ValueError) as e:
        where = coordinator or "auto-detected cluster"
        raise UserError(f"jax.distributed.initialize ({where}) failed within {timeout_s} s: "
                        f"{first_line(e)}") from None
    log.info("process %d of %d joined", jax.process_index(), jax.process_count())
    return True


_barrier_ids = itertools.count()


def barrier(name: str, timeout_s: float) -> None:
    """Blocks until every process reaches the barrier called `name`, or raises BarrierTimeout after `timeout_s`.

    Every process must call the same barriers in the same order (each call gets a fresh id, as the coordination
    service refuses to reuse one). A no-op in a single-process run.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the coordination client: the only barrier in jax that takes a timeout

    key = f"induction_jax:{next(_barrier_ids)}:{name}"
    try:
        distributed.global_state.client.wait_at_barrier(key, int(timeout_s * 1000))
    except Exception as e:  # noqa: BLE001 - the client raises XlaRuntimeError subclasses that vary by version
        detail = first_line(e)
        raise BarrierTimeout(f"process {jax.process_index()} of {jax.process_count()}: gave up after {timeout_s:.0f} s "
                             f"waiting for every process at barrier '{name}' ({detail})") from None


def agreed(values: Sequence[float]) -> list[float]:
    """Process 0's values on every process, for a decision each process takes alone that must come out the same
    everywhere (which steps to snapshot). Sent as float32: exact for the float32 scalars the probe returns."""
    if jax.process_count() == 1:
        return [float(v) for v in values]
    from jax.experimental import multihost_utils
    return [float(v) for v in np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(values, np.float32)))]


def is_main_process() -> bool:
    return jax.process_index() == 0
