"""Best-of-N wall time of a callable (shared by the benchmark scripts)."""

import resource
import time


def timed(fn, repeats: int, warmups: int = 1) -> tuple[float, float]:
    """(best seconds of `repeats` calls after `warmups` untimed ones, minor page faults per timed call).

    `fn` must wait for its own work to finish (a torch peer's calls do; see `best_time` for jax)."""
    for _ in range(warmups):
        fn()
    best = float("inf")
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / repeats


def best_time(fn, repeats: int = 3) -> float:
    """Best seconds of `fn`, waiting for any jax arrays it returns."""
    import jax

    return timed(lambda: jax.block_until_ready(fn()), repeats)[0]
