"""Run directories of tiny models for the export tests: one trained briefly, the others random but saved as runs.

The random ones cover the model variants TransformerLens can represent. Their parameters keep activations at unit
scale (LayerNorm weights around 1, biases non-zero), so attention patterns are sharp, MLP pre-activations reach the
range where GELU variants differ, and a weight mapped to the wrong place cannot go unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from corpus import tiny_overrides
from induction_jax.base import config
from induction_jax.data import dataset, evalset
from induction_jax.model import model
from induction_jax.training import checkpoint, loop

TINY = "configs/cpu/tiny.yaml"
TRAINED_STEP = 16
# name -> overrides of configs/cpu/tiny.yaml (2 layers, d_model 32, 4 heads, context 32, shortformer, LayerNorm).
VARIANTS = {
    "mlp": ["model.d_mlp=64", "model.pos_table=learned"],
    "learned_positions": ["model.positions=learned", "model.pos_table=learned"],
    "no_layernorm": ["model.layer_norm=false", "model.pos_table=learned"],
    "rotary_mlp_no_layernorm": ["model.positions=rotary", "model.d_mlp=64", "model.layer_norm=false"],
    "no_positions": ["model.positions=none"],
    "local_heads": ["model.local_heads=4", "model.local_window=5", "model.positions=learned"],
}


def trained_run(root: Path) -> Path:
    """The tiny attention-only shortformer model (sinusoidal table, LayerNorm), trained for TRAINED_STEP steps."""
    cfg = config.load(TINY, tiny_overrides(root) + [f"train.steps={TRAINED_STEP}", "snapshots.every=8",
                                                    "train.probe_every=0"])
    out = root / "trained"
    loop.train(cfg, out, progress=False)
    return out


def all_runs(root: Path) -> dict[str, tuple[Path, int]]:
    """{name: (run directory, snapshot step)}: "trained" and every one of VARIANTS."""
    runs = {"trained": (trained_run(root), TRAINED_STEP)}
    for seed, (name, overrides) in enumerate(VARIANTS.items()):
        runs[name] = (random_run(root, name, overrides, seed), 0)
    return runs


def random_run(root: Path, name: str, overrides: list[str], seed: int = 0) -> Path:
    """A run directory whose one snapshot (step 0) holds unit-scale random parameters."""
    cfg = config.load(TINY, tiny_overrides(root) + overrides)
    run_dir = root / name
    # What the trainer writes before its first snapshot: the eval set, then config.yaml.
    es = evalset.from_prepared(dataset.prepare(cfg, progress=False), cfg.eval.exclude_common)
    loop.record_config(run_dir, cfg, es)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        key = jax.tree_util.keystr(path)
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if key.endswith("['scale']"):  # LayerNorm weights
            return 1.0 + 0.2 * noise
        if leaf.ndim == 1:  # biases
            return 0.2 * noise
        if "W_E" in key or "W_pos" in key:  # looked up, not multiplied: unit scale per dimension
            return noise
        # Unit-scale outputs for unit-scale inputs; queries and keys 1.5x, for sharp patterns.
        fan_in = int(np.prod(leaf.shape[:-1])) if "W_O" in key else leaf.shape[0]
        return (1.5 if "W_Q" in key or "W_K" in key else 1.0) * noise / np.sqrt(fan_in)

    params = jax.tree_util.tree_map_with_path(draw, model.init_params(cfg.model, jax.random.key(seed)))
    with checkpoint.SnapshotWriter(run_dir / "snapshots") as writer:
        writer.save(0, params, {"tokens_seen": 0})
    return run_dir
