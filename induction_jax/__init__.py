"""induction_jax: train transformer families with dense snapshots and measure in-context learning and induction
heads on every snapshot (Olsson et al. 2022)."""

__version__ = "0.1.0"
