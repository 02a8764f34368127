"""Hand-set weights for a 2-layer attention-only model with a known induction circuit (test helper).

Residual stream (no LayerNorm, so every weight acts as written), with V = vocab:
  dims [0, V)      the current token, one-hot (W_E);
  dims [V, 2V)     the previous token, one-hot, written by the previous-token head (layer 0, head 0);
  dims [2V, 3V)    the predicted token, written by the induction head (layer 1, head 0) and read by W_U;
  dims 3V..3V+2    empty in the residual; the shortformer table W_pos puts (i/s, (i/s)^2, 1) there (s = context),
                   so positions reach queries and keys only, as in the paper's models.
Previous-token head: q_i . k_j = -g (j - (i - 1))^2, a quadratic in the table's coordinates peaking at j = i - 1
with a gap of g logits to its neighbours; its OV copies token dims into previous-token dims.
Induction head (K-composition): its query reads the current token, its key reads the previous-token dims, so
q_i . k_j = m [token_i == token_{j-1}]; its OV copies token dims into the output dims, which W_U reads with
strength `kappa`. Every other head keeps init_std-scale random weights.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from induction_jax.base.config import ModelConfig
from induction_jax.model import model


def planted_induction_model(vocab: int = 64, n_heads: int = 3, context: int = 128, *, anticopy: bool = False,
                            prev_gap: float = 12.0, match: float = 14.0, kappa: float = 12.0,
                            seed: int = 0) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params). `anticopy=True` also makes layer 1, head 1 an anti-copying head: random QK, OV that
    writes -one_hot(token) into the output dims, so after the evaluator's mean subtraction and ReLU it raises
    only the other tokens (copying score -1)."""
    d_head = max(vocab, math.ceil((3 * vocab + 3) / n_heads))
    d_model = d_head * n_heads
    cfg = ModelConfig(n_layers=2, d_model=d_model, n_heads=n_heads, d_mlp=0, positions="shortformer",
                      pos_table="learned", context=context, vocab_size=vocab, layer_norm=False, init_std=0.02)
    params = jax.tree.map(lambda a: np.array(a, np.float64), model.init_params(cfg, jax.random.key(seed)))
    tok, prev, out, pos = 0, vocab, 2 * vocab, 3 * vocab
    v_idx = np.arange(vocab)
    root = math.sqrt(d_head)  # undoes the model's 1/sqrt(d_head) on scores

    params["W_E"][:] = 0
    params["W_E"][v_idx, tok + v_idx] = 1
    params["W_U"][:] = 0
    params["W_U"][out + v_idx, v_idx] = kappa
    u = np.arange(context) / context
    params["W_pos"][:] = 0
    params["W_pos"][:, pos:pos + 3] = np.stack([u, u * u, np.ones(context)], axis=1)

    prev_head = params["block_0"]["attn"]
    for name in ("W_Q", "W_K", "W_V"):
        prev_head[name][:, 0] = 0
    prev_head["W_O"][0] = 0
    # With (p0, p1, p2) = (i/s, (i/s)^2, 1) and s = context: q = g * (2 s (s p0 - p2), -s^2 p2,
    # -(s^2 p1 - 2 s p0 + p2)) and k = (p0, p1, p2) give q_i . k_j = -g ((i-1)^2 - 2 (i-1) j + j^2).
    s, g = float(context), prev_gap * root
    prev_head["W_Q"][pos, 0, 0], prev_head["W_Q"][pos + 2, 0, 0] = 2 * g * s * s, -2 * g * s
    prev_head["W_Q"][pos + 2, 0, 1] = -g * s * s
    prev_head["W_Q"][pos + 1, 0, 2], prev_head["W_Q"][pos, 0, 2], prev_head["W_Q"][pos + 2, 0, 2] = (
        -g * s * s, 2 * g * s, -g)
    prev_head["W_K"][pos + np.arange(3), 0, np.arange(3)] = 1
    prev_head["W_V"][tok + v_idx, 0, v_idx] = 1
    prev_head["W_O"][0, v_idx, prev + v_idx] = 1

    induction = params["block_1"]["attn"]
    for name in ("W_Q", "W_K", "W_V"):
        induction[name][:, 0] = 0
    induction["W_O"][0] = 0
    induction["W_Q"][tok + v_idx, 0, v_idx] = match * root
    induction["W_K"][prev + v_idx, 0, v_idx] = 1
    induction["W_V"][tok + v_idx, 0, v_idx] = 1
    induction["W_O"][0, v_idx, out + v_idx] = 1

    if anticopy:
        induction["W_V"][:, 1] = 0
        induction["W_O"][1] = 0
        induction["W_V"][tok + v_idx, 1, v_idx] = 1
        induction["W_O"][1, v_idx, out + v_idx] = -1
    return cfg, jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def random_model(cfg: ModelConfig, seed: int = 0, scale: float = 0.3) -> dict:
    """Params with every weight drawn N(0, scale^2) and LayerNorm scales 1 + N(0, 0.2^2), far enough from init
    that attention patterns and LayerNorm statistics differ visibly between heads and positions."""
    rng = np.random.default_rng(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(model.init_params(cfg, jax.random.key(seed)))
    leaves = []
    for path, leaf in flat:
        noise = rng.normal(size=leaf.shape)
        name = jax.tree_util.keystr(path)
        leaves.append((1 + 0.2 * noise if name.endswith("['scale']") else scale * noise).astype(np.float32))
    return jax.tree_util.tree_unflatten(treedef, leaves)
