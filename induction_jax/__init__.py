"""induction_jax: train transformer families with dense snapshots and measure in-context learning and induction
heads on every snapshot (Olsson et al. 2022)."""

__version__ = "0.1.0"

from .training import hostmem as _hostmem

# Before XLA starts its threads, or its CPU buffers are returned to the kernel and faulted in again each step.
_hostmem.keep_freed_buffers()


def __getattr__(name):
    # Lazy, so `python -m induction_jax.train` does not import the analysis stack.
    if name == "Run":
        from .analysis.run import Run
        return Run
    raise AttributeError(name)


__all__ = ["Run"]
