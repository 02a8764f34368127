"""Where a snapshot's analysis runs: replicated on each device, or sharded over the training mesh.

Replicated (the parameters fit every device): each process's local devices form a mesh whose data axis is all of
them, the parameters are copied onto each, and eval batches and ablation lanes are split over them. Processes
then work on different snapshots (analysis/parts.py). Sharded: every device of every process forms the mesh of the
run's `mesh.*` config, the parameters take the training's shardings (training/sharding.py: embed over fsdp, heads,
mlp and vocab over tensor), the eval batch is split over the data and fsdp axes, and every process takes part in
every snapshot. `analysis.placement: auto` shards only when the parameters in `analysis.dtype` would take more than
`analysis.fit_fraction` of one device's memory; devices that report no memory limit (CPU) count as fitting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ..base.config import Config
from ..model import model as model_lib
from ..training import sharding

GiB = 1 << 30


@dataclass(frozen=True)
class Placement:
    mesh: Mesh
    sharded: bool
    why: str  # one line: the choice and its reason

    @property
    def batch_ways(self) -> int:
        """How many devices an eval batch is split over (its size is rounded up to a multiple of this)."""
        return math.prod(self.mesh.shape[a] for a in sharding.BATCH)

    @property
    def batch(self) -> NamedSharding:
        """Eval batches [B, T]: split over the batch axes."""
        return sharding.batch_sharding(self.mesh)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def lanes(self) -> NamedSharding:
        """Ablation lanes [M, ...]: split over every device of a replicated placement; in a sharded one the
        devices already hold parts of every lane's parameters, so lanes stay whole."""
        return NamedSharding(self.mesh, P(None) if self.sharded else P(sharding.AXES))

    @property
    def lane_ways(self) -> int:
        return 1 if self.sharded else self.mesh.size

    def param_shardings(self, cfg: Config):
        if self.sharded:
            return sharding.param_shardings(cfg.model, self.mesh)
        return jax.tree.map(lambda _: self.replicated, model_lib.abstract_params(cfg.model))


def param_bytes(cfg: Config) -> int:
    """Bytes of the parameters in `analysis.dtype`."""
    return model_lib.count_params(cfg.model) * np.dtype(jax.numpy.dtype(cfg.analysis.dtype)).itemsize


def device_memory(device) -> int | None:
    """Bytes the device lets one program use; None when it reports no limit (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics raise various errors
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / (1 << 20):.1f} MiB"


def choose(cfg: Config) -> Placement:
    """The placement `analysis.placement` asks for (auto: by whether the parameters fit every device)."""
    local = jax.local_devices()
    need = param_bytes(cfg)
    limits = [m for m in (device_memory(d) for d in local) if m is not None]
    share = cfg.analysis.fit_fraction
    want = cfg.analysis.placement
    if want == "auto":
        fits = not limits or need <= share * min(limits)
        room = (f"{_size(need)} of {cfg.analysis.dtype} parameters "
                + (f"{'fit' if fits else 'exceed'} {share:.0%} of a device's {_size(min(limits))}" if limits
                   else "on devices with no memory limit"))
        want = "replicated" if fits else "sharded"
        reason = f"analysis.placement auto: {room}"
    else:
        reason = f"analysis.placement {want}"
    if want == "replicated":
        mesh = Mesh(np.asarray(local).reshape(len(local), 1, 1), sharding.AXES, axis_types=(AxisType.Auto,) * 3)
        where = (f"{len(local)} local device(s) of process {jax.process_index()}" if jax.process_count() > 1
                 else f"{len(local)} device(s)")
        return Placement(mesh, False, f"snapshots restored replicated on {where} ({reason})")
    mesh = sharding.make_mesh(cfg.mesh)
    shape = " x ".join(f"{a}={mesh.shape[a]}" for a in sharding.AXES)
    return Placement(mesh, True, f"snapshots restored sharded over the mesh {shape} with the training's parameter "
                                 f"shardings ({reason})")
