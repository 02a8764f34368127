"""Device mesh from config, logical-axis -> mesh-axis rules, and multi-host initialisation.

Mesh axes are ("data", "fsdp", "tensor"). Parameters are sharded by their logical names (model.logical_axes):
"embed" over fsdp, "heads"/"mlp"/"vocab" over tensor; the batch over data and fsdp together.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from .config import ConfigError, MeshConfig, ModelConfig
from . import model as model_lib

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")
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
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


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


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: int = 300) -> bool:
    """Joins a multi-host job when there is one: explicit arguments, env vars, SLURM or a TPU VM.

    Returns True when jax.distributed was initialised. Env vars: INDUCTION_JAX_COORDINATOR,
    INDUCTION_JAX_NUM_PROCESSES, INDUCTION_JAX_PROCESS_ID. Under SLURM and on TPU VMs jax finds the rest itself.
    """
    coordinator = coordinator or os.environ.get("INDUCTION_JAX_COORDINATOR")
    if num_processes is None and "INDUCTION_JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["INDUCTION_JAX_NUM_PROCESSES"])
    if process_id is None and "INDUCTION_JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["INDUCTION_JAX_PROCESS_ID"])
    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s)
        return True
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
    if slurm or tpu_pod:
        jax.distributed.initialize(initialization_timeout=timeout_s)
        return True
    return False


def is_main_process() -> bool:
    return jax.process_index() == 0
