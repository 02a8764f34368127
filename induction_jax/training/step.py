"""The pure train step and its abstract, sharded state.

Shared by loop.py (the training loop) and aot.py (ahead-of-time compilation), so neither imports the other. The state is
a dict {"params", "opt_state", "step"}; `step` counts optimizer updates already applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ..base.config import Config
from ..model import model as model_lib
from . import schedule, sharding


@dataclass(frozen=True)
class Trainer:
    """What a loop needs: the jitted step and init, their shardings, and the schedules behind them."""
    step_fn: Callable  # (state, tokens_BT) -> (state, metrics)
    init_fn: Callable  # (rng) -> state
    state_shardings: Any
    abstract_state: Any  # ShapeDtypeStructs carrying shardings (the restore target)
    batch_sharding: Any
    lr: optax.Schedule
    tokens_per_step: int


def loss_fn(params, model: model_lib.Transformer, tokens_BT):
    return model.apply({"params": params}, tokens_BT, method=model_lib.Transformer.losses).mean()


def train_step(state, tokens_BT, *, model, optimizer):
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], model, tokens_BT)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


def build(cfg: Config, mesh: Mesh) -> Trainer:
    tokens_per_step = cfg.train.batch_size * cfg.model.context
    sharding.check_batch(cfg.train.batch_size, mesh)
    optimizer = schedule.optimizer(cfg.train, tokens_per_step)
    model = model_lib.make(cfg.model)
    rep = sharding.replicated(mesh)

    p_shard = sharding.param_shardings(cfg.model, mesh)
    abs_params = model_lib.abstract_params(cfg.model)
    abs_opt = jax.eval_shape(optimizer.init, abs_params)
    # Optimizer moments live where their parameters live; counters and schedule state are replicated.
    opt_shard = optax.tree_map_params(optimizer, lambda _, s: s, abs_opt, p_shard,
                                      transform_non_params=lambda _: rep)
    state_shardings = {"params": p_shard, "opt_state": opt_shard, "step": rep}
    abs_state = {"params": abs_params, "opt_state": abs_opt, "step": jax.ShapeDtypeStruct((), jnp.int32)}
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state,
                            state_shardings)

    def init(rng):
        params = model_lib.init_params(cfg.model, rng)
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    batch = sharding.batch_sharding(mesh)
    step_fn = jax.jit(lambda s, t: train_step(s, t, model=model, optimizer=optimizer),
                      in_shardings=(state_shardings, batch), out_shardings=(state_shardings, rep),
                      donate_argnums=0)
    init_fn = jax.jit(init, out_shardings=state_shardings)
    return Trainer(step_fn, init_fn, state_shardings, abstract, batch,
                   schedule.learning_rate(cfg.train, tokens_per_step), tokens_per_step)


def flops_per_token(cfg: Config) -> float:
    """Analytic training FLOPs per token (forward + backward = 3x forward).

    Matmuls: 6 x (non-embedding params + unembedding). Attention scores and the weighted sum of values are counted
    causally: the average query attends to T/2 keys, so 2 matmuls x 2 FLOPs x (n_heads x d_head) x T/2 per layer
    forward, i.e. 6 * n_layers * T * n_heads * d_head for forward + backward. The embedding lookup is free.
    """
    m = cfg.model
    dense = model_lib.count_params(m, embedding=False) + m.d_model * m.vocab_size
    return 6.0 * dense + 6.0 * m.n_layers * m.context * m.n_heads * m.d_head
