"""Best-of-N wall time of a callable, waiting for any jax arrays it returns (shared by the benchmark scripts)."""

import time

import jax


def best_time(fn, repeats: int = 3) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best
