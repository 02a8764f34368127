"""Peak FLOP/s of the devices a job runs on, the denominator of MFU.

Accelerators use their datasheet dense peak for the compute dtype; a CPU has no datasheet figure we could trust,
so its peak is a float32 matmul probe, measured once per machine and cached.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp

from ..base import atomic
from ..data import dataset

# Dense peak FLOP/s per chip: (bfloat16, float32). On NVIDIA GPUs XLA runs float32 matmuls as TF32 by default,
# so their float32 figure is the TF32 tensor-core peak.
DATASHEET = {
    "H100": (989e12, 495e12), "H200": (989e12, 495e12), "A100": (312e12, 156e12),
    "TPU v4": (275e12, 275e12 / 2), "TPU v5 lite": (197e12, 197e12 / 2), "TPU v5e": (197e12, 197e12 / 2),
    "TPU v5p": (459e12, 459e12 / 2), "TPU v6 lite": (918e12, 918e12 / 2), "TPU v6e": (918e12, 918e12 / 2),
}


def matmul_probe(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-N float32 n x n matmul throughput on the default device, FLOP/s."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def device_peak(dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        for name, (bf16, f32) in DATASHEET.items():
            if name.lower() in dev.device_kind.lower():
                return (bf16 if dtype == "bfloat16" else f32), f"datasheet {dev.device_kind}"
        return matmul_probe(4096), f"matmul probe on {dev.device_kind}"
    threads = os.environ.get("XLA_FLAGS", "")
    key = f"{platform.node()}|{os.cpu_count()}|{jax.__version__}|{threads}"
    path = dataset.cache_root() / "cpu_peak.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["flops"], "cached float32 matmul probe"
    except (OSError, ValueError):
        pass
    flops = matmul_probe()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write(path, json.dumps({"key": key, "flops": flops}))  # processes sharing a cache may probe at once
    except OSError:
        pass  # a cache that cannot be written (a file, a full disk) costs a probe per run, nothing more
    return flops, "float32 matmul probe"
