"""Head ablations, one head mask per batch lane, and before-and-after attribution (docs/method.md §5): the maths
only; `scoring.ablate_run` applies it to a run's snapshots and `python -m induction_jax.ablate` is its command.

Pattern-preserving ablation (the paper's causal tool): a clean run records every attention pattern; the ablated run
zeroes the masked heads' result vectors while every pattern is forced to the clean one. Full ablation recomputes
the patterns. Structure we exploit, both exact:
- an ablation cannot change the layers before its first masked head, so each lane starts from the clean residual
  stream entering that layer (`Transformer.run_from`): masks are grouped by their first masked layer;
- with patterns frozen no query/key is recomputed at all; only values, W_O and the unembedding run per lane;
- in an attention-only model, the first layer a lane masks need not run either: nothing in it reads its own
  heads' outputs, so the stream leaving it is the clean one minus the masked heads' results (captured by the
  clean run). Such a lane starts at the next layer, and one that masks only last-layer heads runs nothing but
  ln_final and the unembedding. (An MLP reads the heads' outputs within their layer, so with MLPs lanes start
  at their first masked layer.)
All lanes of a group are one jitted call, `jax.vmap` over the mask axis; the lane axis is sharded over devices.

Paths (what the removed head output is taken out of; docs/method.md §5), with the same lanes:
- `total` (the paper's): the head's output is zeroed where it is written, so later layers read the ablated stream;
- `direct`: the head's output is subtracted from the final residual stream only (what the unembedding reads);
  later layers still read the clean stream;
- `frozen_ln`: as `total`, with every LayerNorm's 1/sigma frozen at the clean run's, so a head that sets the
  residual stream's scale does not rescale the other heads' contributions. With patterns frozen too, an
  attention-only model is then exactly linear in its head outputs.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..base.config import EvalConfig
from ..model import crossentropy
from ..model import model as model_lib
from . import evaluate
from .evaluate import host

KINDS = ("pattern", "full")
PATHS = ("total", "direct", "frozen_ln")


def single_head_masks(n_layers: int, n_heads: int) -> np.ndarray:
    """[L*H, L, H]: lane i zeroes head (i // H, i % H) only."""
    masks = np.ones((n_layers * n_heads, n_layers, n_heads), np.float32)
    for i in range(n_layers * n_heads):
        masks[i, i // n_heads, i % n_heads] = 0.0
    return masks


def first_masked_layer(mask_LH: np.ndarray) -> int:
    off = np.nonzero((np.asarray(mask_LH) != 1.0).any(axis=1))[0]
    return int(off[0]) if off.size else mask_LH.shape[0]


@partial(jax.jit, static_argnames=("model", "path"))
def clean_run(model: model_lib.Transformer, params, tokens_BT, path: str = "total"):
    """(per-token losses [B, T-1], patterns [L,B,H,Q,K], residual streams [L+1,B,T,D], extra) of the clean model;
    `extra` holds what `path` needs besides: head results [L,B,T,H,D] (direct, and every path of an
    attention-only model, whose lanes skip their first masked layer) and LayerNorm scales (frozen_ln)."""
    want = {"direct": ("head_results",), "frozen_ln": ("ln_scales",)}.get(path, ())
    if not model.cfg.d_mlp and path != "direct":
        want += ("head_results",)
    logits, cap = model.apply({"params": params}, tokens_BT, capture=("patterns", "resid", *want))
    extra = {k: cap[k] for k in want if k in cap}
    return crossentropy.token_losses(logits, tokens_BT), cap["patterns"], cap["resid"], extra


@partial(jax.jit, static_argnames=("model", "first_layer", "removed_layers", "kind", "path"))
def _lanes(model, params, tokens_BT, masks_MLH, resid_BTD, removed_LBTHD, patterns, extra, *, first_layer: int,
           removed_layers: tuple[int, ...], kind: str, path: str):
    """Per-token losses [M, B, T-1]: each lane takes the masked heads of `removed_layers` (whose results are
    removed_LBTHD) out of resid_BTD, the stream entering `first_layer`, and runs from there."""
    def one(mask_LH):
        x_BTD = resid_BTD
        if removed_layers:
            off_LH = 1.0 - mask_LH[jnp.asarray(removed_layers)]
            x_BTD = x_BTD - jnp.einsum("lbthd,lh->btd", removed_LBTHD, off_LH)
        if first_layer == model.cfg.n_layers:
            # Only the final residual stream changes: `kind` and the patterns do not matter.
            frozen = extra["ln_scales"]["ln_final"] if path == "frozen_ln" else None
            logits = model.apply({"params": params}, x_BTD, frozen, method=model_lib.Transformer.unembed)[0]
        else:
            logits = model.apply({"params": params}, first_layer, x_BTD, mask_LH,
                                 patterns if kind == "pattern" else None, (),
                                 extra.get("ln_scales") if path == "frozen_ln" else None,
                                 method=model_lib.Transformer.run_from)
        return crossentropy.token_losses(logits, tokens_BT)
    return jax.vmap(one)(masks_MLH)


@partial(jax.jit, static_argnames=("model", "kind", "path"))
def single_mask_losses(model, params, tokens_BT, mask_LH, kind: str = "pattern", path: str = "total"):
    """One mask, from scratch (clean run included): the unbatched reference the vmapped path is checked against."""
    _, cap = model.apply({"params": params}, tokens_BT, capture=("patterns", "head_results", "resid", "ln_scales"))
    if path == "direct":
        final_BTD = cap["resid"][-1] - jnp.einsum("lbthd,lh->btd", cap["head_results"], 1.0 - mask_LH)
        logits = model.apply({"params": params}, final_BTD, method=model_lib.Transformer.unembed)[0]
    else:
        logits = model.apply({"params": params}, tokens_BT, head_mask=mask_LH,
                             patterns=cap["patterns"] if kind == "pattern" else None,
                             ln_scales=cap.get("ln_scales") if path == "frozen_ln" else None)
    return crossentropy.token_losses(logits, tokens_BT)


def _lane_sharding() -> NamedSharding:
    return NamedSharding(Mesh(np.asarray(jax.devices()), ("lanes",)), P("lanes"))


def ablated_losses(model: model_lib.Transformer, params, tokens_BT, masks_MLH, kind: str = "pattern",
                   clean=None, path: str = "total", lanes: NamedSharding | None = None):
    """Per-token losses [M, B, T-1] (numpy) of the model with each mask applied (lane m uses masks_MLH[m]).

    `clean` may pass a precomputed `clean_run(..., path=path)` so several mask sets share one clean pass. `lanes`
    places the lane axis (default: split over every device); it must live on the parameters' devices.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {KINDS}")
    if path not in PATHS:
        raise ValueError(f"path: {path!r} is not one of {PATHS}")
    masks = np.asarray(masks_MLH, np.float32)
    _, patterns, resid, extra = clean if clean is not None else clean_run(model, params, tokens_BT, path)
    n_layers = model.cfg.n_layers
    skip_first = "head_results" in extra and not model.cfg.d_mlp  # the module docstring's last point
    groups: dict[int, list[int]] = defaultdict(list)
    for m, mask in enumerate(masks):
        groups[n_layers if path == "direct" else first_masked_layer(mask)].append(m)
    out = np.zeros((len(masks),) + tuple(tokens_BT.shape[:1]) + (tokens_BT.shape[1] - 1,), np.float32)
    lanes = lanes or _lane_sharding()
    ways = int(np.prod([lanes.mesh.shape[a] for a in jax.tree.leaves(tuple(lanes.spec)) if a]))
    for layer, members in sorted(groups.items()):
        # Pad the lane axis with clean (all-ones) lanes so it splits evenly over its devices.
        group = np.concatenate([masks[members], np.ones(((-len(members)) % ways,) + masks.shape[1:], np.float32)])
        group = evaluate.place(group, lanes)
        if path == "direct":  # every lane removes its heads from the clean final stream
            start, removed = n_layers, tuple(range(n_layers))
        elif skip_first and layer < n_layers:
            start, removed = layer + 1, (layer,)
        else:
            start, removed = layer, ()
        results = extra["head_results"][removed[0]: removed[-1] + 1] if removed else None
        losses = _lanes(model, params, tokens_BT, group, resid[start], results, patterns, extra,
                        first_layer=start, removed_layers=removed, kind=kind, path=path)
        out[members] = host(losses)[: len(members)]
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


def head_masks(heads: list[tuple[int, int]], n_layers: int, n_heads: int) -> np.ndarray:
    masks = np.ones((len(heads), n_layers, n_heads), np.float32)
    for i, (layer, head) in enumerate(heads):
        masks[i, layer, head] = 0.0
    return masks


def ablate_eval_set(model: model_lib.Transformer, params, tokens_NL: np.ndarray, random_index_N: np.ndarray,
                    masks_MLH: np.ndarray, eval_cfg: EvalConfig, kind: str = "pattern",
                    path: str = "total", lanes: NamedSharding | None = None) -> tuple[dict, dict]:
    """Over the whole eval set, for each lane: the change in ICL score and mean loss, the change at each example's
    random token, the mean change by token index, and each example's ±`eval.icl_window` ICL score (clean, and its
    change in every lane, for standard errors). Returns (record, arrays) for the results store. `lanes`: as in
    `ablated_losses`."""
    rnd_N = random_index_N
    early, late = evaluate.icl_indices(tokens_NL.shape[1], eval_cfg.icl_early, eval_cfg.icl_late)
    window = eval_cfg.icl_window
    m, n, p = len(masks_MLH), len(tokens_NL), tokens_NL.shape[1] - 1
    sum_delta_MP = np.zeros((m, p), np.float64)
    delta_random_MN = np.zeros((m, n), np.float32)
    icl_window_N = np.zeros(n, np.float32)
    delta_icl_window_MN = np.zeros((m, n), np.float32)
    icl_clean, icl_ablated_M = 0.0, np.zeros(m, np.float64)
    # Every lane materialises [B, T, V] logits: keep lanes x batch near one eval batch, or the job turns
    # memory-bound.
    bs = max(1, eval_cfg.batch_size // m)
    for lo in range(0, n, bs):
        toks = np.asarray(tokens_NL[lo: lo + bs], np.int32)
        rows = slice(lo, lo + len(toks))
        clean = clean_run(model, params, toks, path)
        clean_BP = host(clean[0])
        abl_MBP = ablated_losses(model, params, toks, masks_MLH, kind=kind, clean=clean, path=path, lanes=lanes)
        delta_MBP = abl_MBP - clean_BP[None]
        sum_delta_MP += delta_MBP.sum(axis=1)
        delta_random_MN[:, rows] = delta_MBP[:, np.arange(len(toks)), rnd_N[rows] - 1]
        icl_window_N[rows] = evaluate.icl_per_example(clean_BP, early, late, window)
        delta_icl_window_MN[:, rows] = evaluate.icl_per_example(abl_MBP, early, late, window) - icl_window_N[rows]
        icl_clean += float(evaluate.icl_score(clean_BP, early, late)) * len(toks)
        icl_ablated_M += np.array([float(evaluate.icl_score(a, early, late)) for a in abl_MBP]) * len(toks)
    icl_clean /= n
    icl_ablated_M /= n
    record = {"kind": kind, "path": path, "clean_icl": icl_clean, "delta_icl": (icl_ablated_M - icl_clean).tolist(),
              "clean_icl_window": float(icl_window_N.mean()),
              "delta_icl_window": delta_icl_window_MN.mean(axis=1).tolist(),
              "delta_loss": (sum_delta_MP.sum(axis=1) / (n * p)).tolist(),
              "masks": [[[int(v) for v in row] for row in mk] for mk in masks_MLH.astype(int)]}
    return record, {"delta_random": delta_random_MN, "delta_by_index": (sum_delta_MP / n).astype(np.float32),
                    "icl_window": icl_window_N, "delta_icl_window": delta_icl_window_MN}


def shares(delta_icl_MN: np.ndarray, clean_icl_N: np.ndarray, n_boot: int = 1000, seed: int = 0):
    """(share [M], standard error [M]): the fraction of the clean ICL score each lane removes,
    -mean(delta_icl) / mean(clean_icl) (NaN unless the clean score is negative), with a bootstrap over eval
    windows for its standard error (numerator and denominator resampled together)."""
    delta_MN, clean_N = np.asarray(delta_icl_MN, np.float64), np.asarray(clean_icl_N, np.float64)
    n = clean_N.size
    if n < 2 or clean_N.mean() >= 0:
        nan_M = np.full(len(delta_MN), np.nan)
        return (nan_M if clean_N.mean() >= 0 else -delta_MN.mean(axis=1) / clean_N.mean()), nan_M
    idx_BN = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    clean_B = clean_N[idx_BN].mean(axis=1)
    keep_B = clean_B < 0  # resamples with no ICL left have no share
    boot_MB = -delta_MN[:, idx_BN[keep_B]].mean(axis=2) / clean_B[keep_B][None]
    return -delta_MN.mean(axis=1) / clean_N.mean(), boot_MB.std(axis=1)
