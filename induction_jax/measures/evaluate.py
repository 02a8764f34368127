"""Per-token losses on the fixed eval set, the ICL score and the loss views of docs/method.md §3.

Convention (as in crossentropy.token_losses): a loss array `losses_NL` has L = T - 1 columns and column c holds the loss
at token index c + 1, the 0-based index of the predicted token. Token index 0 has no loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..model.crossentropy import token_losses

PAPER_LENGTH = 512  # the paper's eval windows; its ICL indices 50 and 500 refer to this length


def icl_indices(length: int, early: int = 50, late: int = 500) -> tuple[int, int]:
    """The token indices of the ICL score for eval windows of `length` tokens.

    At length >= 512 the paper's (early, late); below, floor(early * T / 512) and floor(late * T / 512), so both keep
    their relative place in the window. Raises when the early index would fall on token 0, which has no loss.
    """
    if length >= PAPER_LENGTH:
        e, l = early, late
    else:
        e, l = early * length // PAPER_LENGTH, late * length // PAPER_LENGTH
    if not 1 <= e < l <= length - 1:
        raise ValueError(f"icl_indices: eval length {length} gives token indices ({e}, {l}); need 1 <= early < late "
                         f"<= {length - 1}")
    return e, l


def host(x) -> np.ndarray:
    """A device array's whole value as numpy in every process, also when its shards live on other processes' devices
    (a collective there: every process must call it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def place(x: np.ndarray, sharding: jax.sharding.Sharding | None = None):
    """A host array (the same in every process) on `sharding`, which may span other processes' devices; without
    one, the numpy array itself, which a jitted function places beside its other arguments."""
    x = np.asarray(x)
    if sharding is None:
        return x  # jit places it
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


@functools.partial(jax.jit, static_argnames=("model",))
def _batch_losses(model, params, tokens_BT):
    return token_losses(model.apply({"params": params}, tokens_BT), tokens_BT)


def padded_batches(tokens_NL, batch_size: int, sharding: jax.sharding.Sharding | None = None):
    """Yields (start, rows, batch_BT) over consecutive batches of `batch_size` examples: the last one padded with
    zeros, so a jitted function sees one shape (callers keep the first `rows` results). `sharding`, when given,
    places each batch (e.g. split over a data axis); `batch_size` must then divide evenly over it."""
    tokens_NL = np.asarray(tokens_NL, np.int32)
    n, t = tokens_NL.shape
    for start in range(0, n, batch_size):
        batch_BT = tokens_NL[start: start + batch_size]
        rows = batch_BT.shape[0]
        if rows < batch_size:
            batch_BT = np.concatenate([batch_BT, np.zeros((batch_size - rows, t), np.int32)])
        yield start, rows, place(batch_BT, sharding)


def per_token_losses(model, params, tokens_NL, batch_size: int, *, progress: bool = False,
                     sharding: jax.sharding.Sharding | None = None) -> np.ndarray:
    """float32 [N, T - 1]: the loss at every token index of every example; column c is token index c + 1.

    One jitted call per batch of `batch_size` examples (`padded_batches`, which `sharding` is passed to).
    """
    n, t = np.shape(tokens_NL)
    out_NL = np.empty((n, t - 1), np.float32)
    for start, rows, batch_BT in tqdm(padded_batches(tokens_NL, batch_size, sharding), total=-(-n // batch_size),
                                      desc="per-token losses", unit="batch", disable=not progress):
        out_NL[start: start + rows] = host(_batch_losses(model, params, batch_BT))[:rows]
    return out_NL


def _band(losses_NL, index: int, window: int):
    """Each example's mean loss at token indices index-window .. index+window, clipped to the valid 1..L."""
    n_indices = losses_NL.shape[-1]
    lo, hi = max(1, index - window), min(n_indices, index + window)
    return losses_NL[..., lo - 1: hi].mean(axis=-1)


def icl_per_example(losses_NL, early: int, late: int, window: int = 0):
    """[..., N]: each example's ICL score (`icl_score` before the mean over examples)."""
    n_indices = losses_NL.shape[-1]
    for name, idx in (("early", early), ("late", late)):
        if not 1 <= idx <= n_indices:
            raise ValueError(f"icl_score: {name} token index {idx} outside 1..{n_indices}")
    return _band(losses_NL, late, window) - _band(losses_NL, early, window)


def icl_score(losses_NL, early: int, late: int, window: int = 0):
    """Mean over examples of (loss at token index `late`) - (loss at token index `early`); more negative = more ICL.

    window > 0 replaces each single index by the mean over indices within +-window (clipped to the valid range),
    which the live probe uses to steady a score taken on few examples. Works on numpy and (under jit) jax arrays.
    """
    return icl_per_example(losses_NL, early, late, window).mean()


def icl_by_group(losses_NL, group_N, n_groups: int, early: int, late: int, window: int = 0) -> np.ndarray:
    """[..., G]: `icl_score` over the examples of each group (e.g. a mixture's sources, `group_N` in 0..G-1); NaN
    for a group without examples."""
    per_N = np.asarray(icl_per_example(np.asarray(losses_NL), early, late, window))
    group_N = np.asarray(group_N)
    return np.stack([per_N[..., group_N == g].mean(-1) if (group_N == g).any() else
                     np.full(per_N.shape[:-1], np.nan) for g in range(n_groups)], axis=-1)


def random_token_view(losses_NL, random_index_N) -> np.ndarray:
    """float32 [N]: view (b), each example's loss at its own fixed random token index."""
    losses_NL = np.asarray(losses_NL, np.float32)
    index_N = np.asarray(random_index_N)
    if index_N.min() < 1 or index_N.max() > losses_NL.shape[1]:
        raise ValueError(f"random_token_view: token indices must lie in 1..{losses_NL.shape[1]}")
    return losses_NL[np.arange(losses_NL.shape[0]), index_N - 1]


def dloss_dlog_index(loss_by_index_I, n_bins: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """View (d): d loss / d log(token index), on log-spaced bins of token indices.

    `loss_by_index_I` is [..., I] (entry c = token index c + 1; leading axes, e.g. snapshots, are kept). Indices are
    grouped into at most `n_bins` bins with geometric edges (the raw per-index curve is too noisy at large index
    to difference), each bin's mean loss is placed at the geometric mean of its indices, and np.gradient
    differentiates against log of those centres. Returns (centres [B], derivative [..., B]) in nats per unit
    log index (per factor e of context).
    """
    loss_I = np.asarray(loss_by_index_I, np.float64)
    n = loss_I.shape[-1]
    edges = np.unique(np.floor(np.geomspace(1, n + 1, n_bins + 1)).astype(np.int64))
    edges[0], edges[-1] = 1, n + 1  # the ends exactly, whatever geomspace rounds to
    if edges.size < 3:
        raise ValueError(f"dloss_dlog_index: {n} token indices give fewer than 2 bins")
    index_I = np.arange(1, n + 1)
    centres, binned = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        centres.append(np.exp(np.log(index_I[lo - 1: hi - 1]).mean()))
        binned.append(loss_I[..., lo - 1: hi - 1].mean(axis=-1))
    centres_B = np.asarray(centres)
    dloss_B = np.gradient(np.stack(binned, axis=-1), np.log(centres_B), axis=-1)
    return centres_B.astype(np.float32), dloss_B.astype(np.float32)
