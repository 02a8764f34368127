import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from induction_jax.base.config import SnapshotsConfig, TrainConfig
from induction_jax.training.schedule import learning_rate, optimizer, snapshot_steps, weight_decay


def test_every_until_and_final_step():
    assert snapshot_steps(SnapshotsConfig(every=50, until=200), 1000) == [50, 100, 150, 200, 1000]
    assert snapshot_steps(SnapshotsConfig(every=3), 10) == [3, 6, 9, 10]
    assert snapshot_steps(SnapshotsConfig(every=50, until=5000), 120) == [50, 100, 120]


def test_paper_small_model_schedule_has_200_snapshots():
    steps = snapshot_steps(SnapshotsConfig(every=50), 10_000)
    assert len(steps) == 200 and steps[0] == 50 and steps[-1] == 10_000


def test_powers_of_two_clipped_to_total():
    assert snapshot_steps(SnapshotsConfig(powers_of_two=(5, 17)), 100) == [32, 64, 100]
    full = snapshot_steps(SnapshotsConfig(powers_of_two=(5, 17)), 2**17 + 1000)
    assert full == [2**k for k in range(5, 18)] + [2**17 + 1000]  # the paper's 13 plus a final save


def test_union_with_explicit_steps():
    cfg = SnapshotsConfig(every=4, until=8, powers_of_two=(0, 2), steps=(0, 3, 4, 99))
    assert snapshot_steps(cfg, 20) == [0, 1, 2, 3, 4, 8, 20]


def test_final_step_only_and_no_init_unless_listed():
    assert snapshot_steps(SnapshotsConfig(), 7) == [7]
    assert 0 not in snapshot_steps(SnapshotsConfig(every=1), 3)


def _lr(cfg, step, tokens_per_step=1):
    return float(jax.jit(learning_rate(cfg, tokens_per_step))(jnp.int32(step)))


def test_warmup_then_cosine():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, decay="cosine", min_lr_ratio=0.1)
    assert _lr(cfg, 0) == pytest.approx(1e-4)
    assert _lr(cfg, 4) == pytest.approx(5e-4)
    assert _lr(cfg, 9) == pytest.approx(1e-3)
    assert _lr(cfg, 10) == pytest.approx(1e-3)
    assert _lr(cfg, 60) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert _lr(cfg, 110) == pytest.approx(1e-4)
    assert _lr(cfg, 500) == pytest.approx(1e-4)


def test_warmup_in_tokens_and_constant_decay():
    cfg = TrainConfig(lr=2e-3, warmup_steps=999, warmup_tokens=5_500, steps=100, decay="constant")
    assert _lr(cfg, 0, tokens_per_step=1000) == pytest.approx(2e-3 / 5)
    assert _lr(cfg, 4, tokens_per_step=1000) == pytest.approx(2e-3)
    assert _lr(cfg, 99, tokens_per_step=1000) == pytest.approx(2e-3)
    assert _lr(dataclasses.replace(cfg, warmup_tokens=0, warmup_steps=0), 0) == pytest.approx(2e-3)


def test_constant_with_linear_cooldown():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, decay="constant", cooldown_steps=40, min_lr_ratio=0.1)
    assert _lr(cfg, 9) == pytest.approx(1e-3)
    assert _lr(cfg, 70) == pytest.approx(1e-3)  # the cooldown starts at steps - cooldown_steps
    assert _lr(cfg, 90) == pytest.approx(1e-3 - 0.9e-3 * 0.5)
    assert _lr(cfg, 110) == pytest.approx(1e-4)
    assert _lr(cfg, 200) == pytest.approx(1e-4)


def test_weight_decay_switches_at_the_given_step():
    wd = jax.jit(weight_decay(TrainConfig(weight_decay=0.1, weight_decay_after=0.01, weight_decay_step=4750)))
    assert float(wd(jnp.int32(0))) == pytest.approx(0.1)
    assert float(wd(jnp.int32(4749))) == pytest.approx(0.1)
    assert float(wd(jnp.int32(4750))) == pytest.approx(0.01)
    assert float(weight_decay(TrainConfig(weight_decay=0.1))(10**6)) == pytest.approx(0.1)


def test_optimizer_decays_matrices_only_and_switches_decay():
    # Zero gradients leave Adam's step at 0, so each update is exactly -lr * wd * p on decayed parameters.
    cfg = TrainConfig(lr=0.5, warmup_steps=0, weight_decay=0.1, weight_decay_after=0.0, weight_decay_step=2)
    tx = optimizer(cfg, tokens_per_step=1)
    params = {"w": jnp.full((2, 3), 2.0), "ln": {"scale": jnp.ones(3), "bias": jnp.ones(3)}}
    state = tx.init(params)
    update = jax.jit(tx.update)
    zeros = jax.tree.map(jnp.zeros_like, params)
    expected_w = 2.0
    for step, wd in enumerate([0.1, 0.1, 0.0, 0.0]):
        updates, state = update(zeros, state, params)
        np.testing.assert_allclose(updates["w"], -0.5 * wd * expected_w, rtol=1e-6, err_msg=f"update {step}")
        np.testing.assert_array_equal(updates["ln"]["scale"], 0.0)
        np.testing.assert_array_equal(updates["ln"]["bias"], 0.0)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        expected_w *= 1 - 0.5 * wd


def test_optimizer_clips_gradients():
    cfg = TrainConfig(lr=1.0, warmup_steps=0, weight_decay=0.0, grad_clip=1.0, b1=0.0, b2=0.0)
    tx = optimizer(cfg, tokens_per_step=1)
    params = {"w": jnp.zeros((2, 2))}
    # With b1 = b2 = 0 Adam's step is g / |g| elementwise either way; clipping shows in its first-moment state.
    _, state = tx.update({"w": jnp.full((2, 2), 100.0)}, tx.init(params), params)
    clipped_mu = jax.tree.leaves(state[1][0].mu)[0]
    np.testing.assert_allclose(jnp.linalg.norm(clipped_mu), 1.0, rtol=1e-6)
