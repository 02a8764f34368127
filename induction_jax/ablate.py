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

from . import heads as heads_lib
from . import model as model_lib
from .config import UserError

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


def parse_heads(spec: str, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """"0.1,1.3" -> [(0, 1), (1, 3)]; one-line error for anything else."""
    out = []
    for item in spec.split(","):
        try:
            layer, head = (int(x) for x in item.strip().split("."))
        except ValueError:
            raise UserError(f"--heads: {item!r} is not LAYER.HEAD (e.g. 1.3)") from None
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise UserError(f"--heads: {item!r} is outside {n_layers} layers x {n_heads} heads")
        out.append((layer, head))
    return out


def head_masks(heads: list[tuple[int, int]], n_layers: int, n_heads: int) -> np.ndarray:
    masks = np.ones((len(heads), n_layers, n_heads), np.float32)
    for i, (layer, head) in enumerate(heads):
        masks[i, layer, head] = 0.0
    return masks


def ablate_snapshot(ctx, params, masks_MLH: np.ndarray, kind: str) -> tuple[dict, dict]:
    """Over the whole eval set: per-head change in ICL score and mean loss, the change at each example's random
    token and the mean change by token index. Returns (record, arrays) for the results store."""
    from . import evaluate
    model, tokens_NL, rnd_N = ctx.model, ctx.tokens_NL, ctx.random_index_N
    early, late = ctx.icl_indices
    m, n, p = len(masks_MLH), len(tokens_NL), tokens_NL.shape[1] - 1
    sum_delta_MP = np.zeros((m, p), np.float64)
    delta_random_MN = np.zeros((m, n), np.float32)
    icl_clean, icl_ablated_M = 0.0, np.zeros(m, np.float64)
    # Every lane materialises [B, T, V] logits: keep lanes x batch near one eval batch, or the job turns
    # memory-bound.
    bs = max(1, ctx.cfg.eval.batch_size // m)
    for lo in range(0, n, bs):
        toks = jnp.asarray(tokens_NL[lo: lo + bs])
        clean = clean_run(model, params, toks)
        clean_BP = np.asarray(clean[0])
        abl_MBP = ablated_losses(model, params, toks, masks_MLH, kind=kind, clean=clean)
        delta_MBP = abl_MBP - clean_BP[None]
        sum_delta_MP += delta_MBP.sum(axis=1)
        rows = np.arange(len(toks))
        delta_random_MN[:, lo: lo + len(toks)] = delta_MBP[:, rows, rnd_N[lo: lo + len(toks)] - 1]
        icl_clean += float(evaluate.icl_score(clean_BP, early, late)) * len(toks)
        icl_ablated_M += np.array([float(evaluate.icl_score(a, early, late)) for a in abl_MBP]) * len(toks)
    icl_clean /= n
    icl_ablated_M /= n
    record = {"kind": kind, "clean_icl": icl_clean, "delta_icl": (icl_ablated_M - icl_clean).tolist(),
              "delta_loss": (sum_delta_MP.sum(axis=1) / (n * p)).tolist(),
              "masks": [[[int(v) for v in row] for row in mk] for mk in masks_MLH.astype(int)]}
    return record, {"delta_random": delta_random_MN, "delta_by_index": (sum_delta_MP / n).astype(np.float32)}


def ablate_run(ctx, steps=None, kind: str = "pattern", heads: list[tuple[int, int]] | None = None,
               progress: bool = True) -> str:
    """Ablates each head (or `heads`) at every committed snapshot not yet done; returns the store section."""
    from tqdm import tqdm
    cfg = ctx.cfg.model
    heads = heads or [(layer, h) for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]
    masks = head_masks(heads, cfg.n_layers, cfg.n_heads)
    section = f"ablation-{kind}"
    from . import checkpoint
    for step in tqdm(ctx.pending_steps(section, steps), desc=f"ablate {ctx.run_dir.name}", unit="snapshot",
                     disable=not progress):
        try:
            params = ctx.params(step)
        except checkpoint.SnapshotError as e:
            tqdm.write(f"skipped: {e}")
            continue
        # One more lane ablates every induction head of this snapshot at once (all-ones when there is none).
        scores = ctx.store.read("eval", "head_scores", step)
        induction = heads_lib.induction_heads(scores[..., 0], scores[..., 1], ctx.cfg.eval)
        lanes = np.concatenate([masks, (1.0 - induction.astype(np.float32))[None]])
        record, arrays = ablate_snapshot(ctx, params, lanes, kind)
        record["induction_delta_icl"] = record["delta_icl"].pop()
        record["induction_delta_loss"] = record["delta_loss"].pop()
        record["masks"].pop()
        record["heads"] = [list(h) for h in heads]
        record["tokens"] = ctx.tokens_at(step)
        ctx.store.write(section, step, record, arrays)
    return section


def main(argv=None) -> int:
    import argparse
    from pathlib import Path

    from . import analyze, report

    parser = argparse.ArgumentParser(prog="python -m induction_jax.ablate",
                                     description="Head ablations at every committed snapshot of a run.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--steps", type=int, nargs="*", help="only these snapshot steps")
    parser.add_argument("--kind", choices=KINDS, default="pattern")
    parser.add_argument("--heads", help="comma-separated LAYER.HEAD list (default: every head)")
    parser.add_argument("--out", type=Path, help="results directory (default: RUN_DIR/analysis)")
    parser.add_argument("--before", type=int, help="snapshot step before the phase change (attribution)")
    parser.add_argument("--after", type=int, help="snapshot step after the phase change (attribution)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    ctx = analyze.analyze_run(args.run_dir, args.out, args.steps, progress=not args.no_progress)
    heads = parse_heads(args.heads, ctx.cfg.model.n_layers, ctx.cfg.model.n_heads) if args.heads else None
    ablate_run(ctx, args.steps, args.kind, heads, progress=not args.no_progress)
    out = report.write([ctx], args.out, before_after=(args.before, args.after))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    from . import cli as _cli
    _cli.run(main)
