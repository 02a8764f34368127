"""Cross-entropy of next-token predictions, in float32: per-token losses from logits, and the training loss's
fused forms (the unembedding with its own backward, or chunked over positions for large vocabularies)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


@jax.custom_vjp
def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per position [B, T], in float32."""
    return _cross_entropy_fwd(logits_BTV, targets_BT)[0]


def _cross_entropy_fwd(logits_BTV, targets_BT):
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse_BT - target_BT, (logits_BTV, lse_BT, targets_BT)


def _cross_entropy_bwd(res, g_BT):
    logits_BTV, lse_BT, targets_BT = res
    onehot_BTV = jnp.arange(logits_BTV.shape[-1]) == targets_BT[..., None]
    dlogits_BTV = (jnp.exp(logits_BTV - lse_BT[..., None]) - onehot_BTV) * g_BT[..., None]
    return dlogits_BTV, np.zeros(targets_BT.shape, jax.dtypes.float0)


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


@jax.custom_vjp
def unembed_cross_entropy(x_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """`cross_entropy(x @ w, targets)` [B, T] with a backward pass that lays its products out for XLA:CPU."""
    return _unembed_ce_fwd(x_BTD, w_DV, targets_BT)[0]


def _unembed_ce_fwd(x_BTD, w_DV, targets_BT):
    losses_BT, (logits_BTV, lse_BT, _) = _cross_entropy_fwd(
        jnp.einsum("btd,dv->btv", x_BTD, w_DV), targets_BT)
    return losses_BT, (x_BTD, w_DV, targets_BT, logits_BTV, lse_BT)


def _unembed_ce_bwd(res, g_BT):
    x_BTD, w_DV, targets_BT, logits_BTV, lse_BT = res
    dlogits_BTV = _cross_entropy_bwd((logits_BTV, lse_BT, targets_BT), g_BT)[0].astype(x_BTD.dtype)
    b, t, d = x_BTD.shape
    dx_BTD = jnp.einsum("btv,dv->btd", dlogits_BTV, w_DV)
    # Transposing x ([N, D]) rather than dlogits ([N, V]): left to itself, XLA:CPU transposed the larger operand
    # column by column, 30 ms of a 500 ms step at the demo's shape.
    xT_DN = jax.lax.optimization_barrier(x_BTD.reshape(b * t, d).T)
    dw_DV = (xT_DN @ dlogits_BTV.reshape(b * t, -1)).astype(w_DV.dtype)
    return dx_BTD, dw_DV, np.zeros(targets_BT.shape, jax.dtypes.float0)


unembed_cross_entropy.defvjp(_unembed_ce_fwd, _unembed_ce_bwd)


def chunked_cross_entropy(x_BTD, w_DV, targets_BT, chunk: int) -> jax.Array:
    """`cross_entropy(x @ w, targets)` [B, T], unembedding `chunk` positions at a time.

    Each chunk's logits are recomputed in the backward pass instead of kept, so the [B, T, V] logits (17 GiB in
    float32 for 8 sequences of 8192 tokens over a 65,536 vocabulary) never exist at once.
    """
    b, t, d = x_BTD.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    x_NBCD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).transpose(1, 0, 2, 3)
    targets_NBC = jnp.pad(targets_BT, ((0, 0), (0, pad))).reshape(b, n, chunk).transpose(1, 0, 2)

    @jax.checkpoint
    def one(args):
        x_BCD, targets_BC = args
        return cross_entropy(jnp.einsum("bcd,dv->bcv", x_BCD, w_DV).astype(jnp.float32), targets_BC)

    return jax.lax.map(one, (x_NBCD, targets_NBC)).transpose(1, 0, 2).reshape(b, n * chunk)[:, :t]


def token_losses(logits_BTV: jax.Array, tokens_BT: jax.Array) -> jax.Array:
    """Per-token cross-entropy [B, T-1]; column i is the loss of predicting token index i+1 from tokens 0..i.

    Throughout the project a "token index" is the 0-based index of the predicted token, so the loss at token
    index j is column j-1 (see `loss_at`).
    """
    return cross_entropy(logits_BTV[:, :-1], tokens_BT[:, 1:])


def loss_at(losses_BT, index: int):
    """The column of `token_losses` holding the loss at (predicted) token index `index`."""
    return losses_BT[..., index - 1]
