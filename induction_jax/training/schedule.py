"""When to snapshot, and the learning-rate / weight-decay schedules of the optimizer.

Step numbering, used everywhere: step s names the parameters after s optimizer updates (step 0 = init). optax
schedules receive the number of updates already applied, so the update that turns step s into step s + 1 uses
`schedule(s)`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from ..base.config import SnapshotsConfig, TrainConfig


def snapshot_steps(cfg: SnapshotsConfig, total_steps: int) -> list[int]:
    """Sorted, unique steps to snapshot: the union of `every` (up to `until`), `powers_of_two` and `steps`,
    clipped to total_steps, plus total_steps itself. Step 0 (init) appears only when listed in `steps`."""
    out = {total_steps}
    if cfg.every > 0:
        last = min(cfg.until, total_steps) if cfg.until > 0 else total_steps
        out.update(range(cfg.every, last + 1, cfg.every))
    if cfg.powers_of_two:
        a, b = cfg.powers_of_two
        out.update(2**k for k in range(a, b + 1) if 2**k <= total_steps)
    out.update(s for s in cfg.steps if 0 <= s <= total_steps)
    return sorted(out)


def warmup_steps(cfg: TrainConfig, tokens_per_step: int) -> int:
    """Warm-up length in updates: warmup_tokens converted at tokens_per_step when given, else warmup_steps."""
    if cfg.warmup_tokens > 0:
        return cfg.warmup_tokens // tokens_per_step
    return cfg.warmup_steps


def learning_rate(cfg: TrainConfig, tokens_per_step: int) -> optax.Schedule:
    """Linear warm-up over W updates, then constant or cosine decay reaching min_lr_ratio * lr at train.steps.

    Update c (0-based) uses lr * (c + 1) / W while c < W: the first update already moves the parameters and
    update W - 1 uses the full rate. The cosine runs from c = W (full rate) to c = train.steps (the floor).
    With train.cooldown_steps = N the constant rate instead falls linearly over the last N updates, from the
    full rate at c = steps - N to the floor at c = steps (warm-up, stable, decay).
    """
    peak, total = cfg.lr, cfg.steps
    warm = warmup_steps(cfg, tokens_per_step)
    floor = cfg.min_lr_ratio * peak
    cosine = cfg.decay == "cosine"

    def schedule(count):
        c = jnp.asarray(count, jnp.float32)
        if cosine:
            progress = jnp.clip((c - warm) / max(total - warm, 1), 0.0, 1.0)
            after = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        elif cfg.cooldown_steps:
            progress = jnp.clip((c - (total - cfg.cooldown_steps)) / cfg.cooldown_steps, 0.0, 1.0)
            after = peak + (floor - peak) * progress
        else:
            after = jnp.full_like(c, peak)
        if warm <= 0:
            return after
        return jnp.where(c < warm, peak * (c + 1.0) / warm, after)

    return schedule


def weight_decay(cfg: TrainConfig) -> optax.Schedule:
    """train.weight_decay, or train.weight_decay_after for every update from train.weight_decay_step on
    (when that is > 0): the paper lowers it at step 4,750, after the phase change, so it cannot cause it."""
    before, after, switch = cfg.weight_decay, cfg.weight_decay_after, cfg.weight_decay_step

    def schedule(count):
        c = jnp.asarray(count)
        if switch <= 0:
            return jnp.full(c.shape, before, jnp.float32)
        return jnp.where(c >= switch, jnp.float32(after), jnp.float32(before))

    return schedule


def decay_mask(params):
    """True for the parameters weight decay applies to: matrices and tensors only. LayerNorm scales and biases,
    MLP biases and the per-head smear logits are 1-D and shrinking them toward zero has no regularising role."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def optimizer(cfg: TrainConfig, tokens_per_step: int) -> optax.GradientTransformation:
    """Global-norm clipping (train.grad_clip; 0 = off), then AdamW with the schedules above.

    optax's AdamW multiplies the decay by the learning rate (PyTorch's convention), so the decay also warms up.
    """
    adamw = optax.adamw(learning_rate(cfg, tokens_per_step), b1=cfg.b1, b2=cfg.b2,
                        weight_decay=weight_decay(cfg), mask=decay_mask)
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
