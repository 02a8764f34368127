"""Head ablations, one head mask per batch lane, and before-and-after attribution (DESIGN.md §1.5).

Pattern-preserving ablation (the paper's causal tool): a clean run records every attention pattern; the ablated run
zeroes the masked heads' result vectors while every pattern is forced to the clean one. Full ablation recomputes
the patterns. Structure we exploit, both exact:
- an ablation cannot change the layers before its first masked head, so each lane starts from the clean residual
  stream entering that layer (`Transformer.run_from`): masks are grouped by their first masked layer;
- with patterns frozen no query/key is recomputed at all; only values, W_O and the unembedding run per lane.
All lanes of a group are one jitted call, `jax.vmap` over the mask axis; the lane axis is sharded over devices.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import model as model_lib

KINDS = ("pattern", "full")


def single_head_masks(n_layers: int, n_heads: int) -> np.ndarray:
    """[L*H, L, H]: lane i zeroes head (i // H, i % H) only."""
    masks = np.ones((n_layers * n_heads, n_layers, n_heads), np.float32)
    for i in range(n_layers * n_heads):
        masks[i, i // n_heads, i % n_heads] = 0.0
    return masks


def first_masked_layer(mask_LH: np.ndarray) -> int:
    off = np.nonzero((np.asarray(mask_LH) != 1.0).any(axis=1))[0]
    return int(off[0]) if off.size else mask_LH.shape[0]


@partial(jax.jit, static_argnames=("model",))
def clean_run(model: model_lib.Transformer, params, tokens_BT):
    """Per-token losses [B, T-1], patterns [L,B,H,Q,K] and the residual streams [L+1,B,T,D] of the clean model."""
    logits, cap = model.apply({"params": params}, tokens_BT, capture=("patterns", "resid"))
    return model_lib.token_losses(logits, tokens_BT), cap["patterns"], cap["resid"]


@partial(jax.jit, static_argnames=("model", "first_layer", "kind"))
def _lanes(model, params, tokens_BT, masks_MLH, resid_BTD, patterns, *, first_layer: int, kind: str):
    def one(mask_LH):
        logits = model.apply({"params": params}, first_layer, resid_BTD, mask_LH,
                             patterns if kind == "pattern" else None, method=model_lib.Transformer.run_from)
        return model_lib.token_losses(logits, tokens_BT)
    return jax.vmap(one)(masks_MLH)


@partial(jax.jit, static_argnames=("model", "kind"))
def single_mask_losses(model, params, tokens_BT, mask_LH, kind: str = "pattern"):
    """One mask, from scratch (clean run included): the unbatched reference the vmapped path is checked against."""
    patterns = None
    if kind == "pattern":
        _, cap = model.apply({"params": params}, tokens_BT, capture=("patterns",))
        patterns = cap["patterns"]
    logits = model.apply({"params": params}, tokens_BT, head_mask=mask_LH, patterns=patterns)
    return model_lib.token_losses(logits, tokens_BT)


def _lane_sharding() -> NamedSharding:
    return NamedSharding(Mesh(np.asarray(jax.devices()), ("lanes",)), P("lanes"))


def ablated_losses(model: model_lib.Transformer, params, tokens_BT, masks_MLH, kind: str = "pattern",
                   clean=None):
    """Per-token losses [M, B, T-1] (numpy) of the model with each mask applied (lane m uses masks_MLH[m]).

    `clean` may pass a precomputed `clean_run(...)` so several mask sets share one clean pass.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {KINDS}")
    masks = np.asarray(masks_MLH, np.float32)
    _, patterns, resid = clean if clean is not None else clean_run(model, params, tokens_BT)
    groups: dict[int, list[int]] = defaultdict(list)
    for m, mask in enumerate(masks):
        groups[first_masked_layer(mask)].append(m)
    out = np.zeros((len(masks),) + tuple(tokens_BT.shape[:1]) + (tokens_BT.shape[1] - 1,), np.float32)
    n_dev = jax.device_count()
    for layer, lanes in sorted(groups.items()):
        # Pad the lane axis with clean (all-ones) lanes so it shards evenly over every device.
        group = np.concatenate([masks[lanes], np.ones(((-len(lanes)) % n_dev,) + masks.shape[1:], np.float32)])
        group = jax.device_put(group, _lane_sharding())
        start = min(layer, model.cfg.n_layers - 1)
        losses = _lanes(model, params, tokens_BT, group, resid[start], patterns, first_layer=start, kind=kind)
        out[lanes] = np.asarray(losses)[: len(lanes)]
    return out


def attribution(delta_ablation_HN: np.ndarray, delta_training_N: np.ndarray) -> dict[str, np.ndarray]:
    """Compares each ablation's per-token loss change with the training change from before to after the window.

    The training change (after - before) is negative where the phase change helped; an ablation that "reverses"
    it has a positive loss change on the same tokens, so we compare against -delta_training:
    cosine = cos(delta_ablation_h, -delta_training); projection = <delta_ablation_h, -u> / |u| ... expressed as the
    fraction of the training change undone: <delta_ablation_h, -delta_training> / |delta_training|^2.
    """
    a = np.asarray(delta_ablation_HN, np.float64)
    t = -np.asarray(delta_training_N, np.float64)
    tn = np.linalg.norm(t)
    cos = (a @ t) / (np.linalg.norm(a, axis=-1) * tn + 1e-12)
    frac = (a @ t) / (tn ** 2 + 1e-12)
    return {"cosine": cos, "fraction_undone": frac}
