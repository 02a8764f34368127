"""Host memory: XLA:CPU's freed buffers stay in the process's heap instead of going back to the kernel.

By default glibc hands every large buffer (a [B, H, T, T] pattern, a [B, T, V] logits block) back to the kernel when
XLA frees it, through munmap or by dropping a per-thread arena's heap, so the next step faults the same pages in
again, zero-filled: about a million page faults per all-heads ablation of 256 windows, and 10-20% of a CPU train
step's, ablation's or loss pass's wall time (docs/benchmarks.md). One arena that never unmaps or trims keeps them.

The settings must be made before XLA starts its threads (each thread keeps the arena it first used), so the
package makes them on import (`induction_jax/__init__.py`), on Linux with glibc, when XLA computes on the CPU.
`INDUCTION_JAX_KEEP_HEAP=0` leaves the allocator alone. The cost is resident memory: the process keeps its
high-water heap (0.8 → 1.7 GiB peak RSS in a process running the train, ablation and loss benchmarks).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))  # mallopt takes an int


def computes_on_cpu() -> bool:
    """Whether XLA will compute on the CPU: JAX_PLATFORMS says so, or no accelerator plugin is installed."""
    chosen = os.environ.get("JAX_PLATFORMS", "").strip()
    if chosen:
        return chosen.split(",")[0].strip() == "cpu"
    if importlib.util.find_spec("libtpu") or importlib.util.find_spec("jax_plugins"):
        return False
    return not importlib.metadata.entry_points(group="jax_plugins")


def keep_freed_buffers() -> bool:
    """Applies SETTINGS where they help (see the module docstring); True if they were applied."""
    if os.environ.get("INDUCTION_JAX_KEEP_HEAP", "1") == "0" or not computes_on_cpu():
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
