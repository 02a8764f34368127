"""What the eval and composition sections of a results store hold per snapshot, written and read only here:
scoring writes them, Run and RunResults read them back.

Eval section (store.EVAL): a record {step, tokens, eval_loss, icl, icl_window, max_prefix_matching} and the arrays
`per_token_loss` [N, L-1] (column c = token index c+1) and `head_scores` [L, H, M] (M: heads.MEASURES). Composition
section (store.COMPOSITION): a record {step, tokens, baseline} and the arrays `scores` and `ceiling`
[3, L, H, L, H] each (composition.MODES; composition.alignment_ceiling).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..measures import evaluate, heads
from .store import COMPOSITION, EVAL, Store

LOSSES = "per_token_loss"
HEAD_SCORES = "head_scores"
SCORES = "scores"
CEILING = "ceiling"


def write_eval(store: Store, step: int, tokens: int, losses_NP: np.ndarray, measures: dict[str, np.ndarray],
               icl_indices: tuple[int, int], icl_window: int) -> None:
    """Stores one snapshot's per-token losses, ICL scores (at single indices and averaged over ±`icl_window`) and
    head measures ({measure: [L, H]}, every one of heads.MEASURES)."""
    early, late = icl_indices
    scores_LHM = np.stack([measures[m] for m in heads.MEASURES], axis=-1).astype(np.float32)
    record = {
        "tokens": tokens,
        "eval_loss": float(losses_NP.mean()),
        "icl": float(evaluate.icl_score(losses_NP, early, late)),
        "icl_window": float(evaluate.icl_score(losses_NP, early, late, icl_window)),
        "max_prefix_matching": float(np.nanmax(measures["prefix_matching"])),
    }
    store.write(EVAL, step, record, {LOSSES: losses_NP.astype(np.float32), HEAD_SCORES: scores_LHM})


@dataclass(frozen=True)
class EvalRecords:
    """The eval section's records in step order, one array [S] per field (empty when nothing is analysed)."""
    steps: np.ndarray  # int
    tokens: np.ndarray  # float
    icl: np.ndarray
    icl_window: np.ndarray
    eval_loss: np.ndarray


def read_eval(store: Store) -> EvalRecords:
    recs = store.sorted_records(EVAL)
    return EvalRecords(np.array([r["step"] for r in recs], int), np.array([r["tokens"] for r in recs], float),
                       np.array([r["icl"] for r in recs], float), np.array([r["icl_window"] for r in recs], float),
                       np.array([r["eval_loss"] for r in recs], float))


def losses(store: Store, step: int | None = None) -> np.ndarray:
    """Per-token losses: [S, N, L-1] over the analysed snapshots in step order, or [N, L-1] of `step`."""
    return store.read(EVAL, LOSSES, step)


def head_scores(store: Store, step: int | None = None) -> np.ndarray:
    """Head measures: [S, L, H, M] over the analysed snapshots in step order, or [L, H, M] of `step`."""
    return store.read(EVAL, HEAD_SCORES, step)


def write_composition(store: Store, step: int, tokens: int, scores: np.ndarray, ceiling: np.ndarray,
                      baseline: float) -> None:
    store.write(COMPOSITION, step, {"tokens": tokens, "baseline": baseline}, {SCORES: scores, CEILING: ceiling})


def read_composition(store: Store) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, float | None]:
    """(steps [S'], scores [S', 3, L, H, L, H], their alignment ceilings [S', 3, L, H, L, H], random baseline) of
    the snapshots that have composition scores; (empty, None, None, None) when none has."""
    recs = store.sorted_records(COMPOSITION)
    if not recs:
        return np.zeros(0, int), None, None, None
    return (np.array([r["step"] for r in recs], int), store.read(COMPOSITION, SCORES),
            store.read(COMPOSITION, CEILING), float(recs[-1]["baseline"]))
