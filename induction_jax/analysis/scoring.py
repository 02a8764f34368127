"""Scores a run's committed snapshots into its results store: the eval section (per-token losses, ICL scores and
the head measures), the composition section (Q/K/V composition scores) and the head-ablation sections
(docs/method.md §3-5).

Both skip snapshots already stored and pick up new ones of a run still training; a killed job loses at most the
snapshot in flight. A snapshot that cannot be read is reported by path and skipped; one whose stored results do
not match their digests is reported and analysed again. Both hold the results directory's lock while they write.
"""

from __future__ import annotations

import sys

import numpy as np
from tqdm import tqdm

from ..measures import ablation, composition, heads
from ..training import checkpoint
from . import records
from .run import Run
from .store import COMPOSITION, EVAL, ablation_name


def analyze_snapshot(run: Run, step: int, params) -> None:
    """Stores the snapshot's per-token losses, ICL scores and head measures in the eval section."""
    records.write_eval(run.store, step, run.tokens_at(step), run.losses_of(params), run.measures_of(params),
                       run.icl_indices, run.config.eval.icl_window)


def compose_snapshot(run: Run, step: int, params) -> None:
    """Stores the snapshot's composition scores and their alignment ceilings, [3, L, H, L, H] each
    (composition.MODES), with the random baseline of the model's shapes."""
    cfg = run.config.model
    records.write_composition(run.store, step, run.tokens_at(step), composition.composition_scores(params, cfg),
                              composition.alignment_ceiling(params, cfg),
                              composition.random_baseline(cfg.d_model, cfg.d_head))


def repair(run: Run, sections: list[str]) -> None:
    """Drops from the store's indices the snapshots whose stored arrays do not match their digests, with a warning
    each, so that they count as pending: a store damaged on disk, or by two analyses at once before the writer's
    lock existed, is repaired by the next analysis rather than trusted."""
    for section in sections:
        for _, why in run.store.verify(section):
            print(f"warning: {why}; analysing it again", file=sys.stderr, flush=True)


def _each_pending(run: Run, sections: str | list[str], steps, what: str, progress: bool, score) -> None:
    """score(step, params) for each committed snapshot (of `steps`) that one of `sections` lacks, holding the
    results directory's lock throughout; a snapshot that cannot be read is reported and skipped."""
    sections = [sections] if isinstance(sections, str) else sections
    with run.store.writing():
        repair(run, sections)
        todo = sorted(set().union(*(run.pending_steps(section, steps) for section in sections)))
        for step in tqdm(todo, desc=f"{what} {run.name}", unit="snapshot", disable=not progress):
            try:
                score(step, run.params(step))
            except checkpoint.SnapshotError as e:
                tqdm.write(f"skipped: {e}")


def analyze_run(run: Run, steps=None, progress: bool = True) -> None:
    """`analyze_snapshot` and `compose_snapshot` on every committed snapshot (or those of `steps`) that lacks
    them. The two sections keep their own indices (a run analysed before composition scores existed gets just
    those), and a snapshot missing both is restored once."""
    sections = [EVAL] + ([COMPOSITION] if run.config.model.n_layers > 1 else [])

    def score(step: int, params) -> None:
        # Asked per snapshot, not once before the loop: the pending steps are known only once the store has been
        # verified, under the lock.
        if step not in run.store.steps(EVAL):
            analyze_snapshot(run, step, params)
        if COMPOSITION in sections and step not in run.store.steps(COMPOSITION):
            compose_snapshot(run, step, params)

    _each_pending(run, sections, steps, "analyze", progress, score)


def induction_heads(run: Run, step: int, params) -> np.ndarray:
    """bool [L, H]: the snapshot's induction heads (heads.induction_heads), from its stored head measures when it
    has been analysed, else from the two measures the classification needs, computed now."""
    eval_cfg = run.config.eval
    copying = heads.copying_measure(eval_cfg)
    if step in run.store.steps(EVAL):
        scores_LHM = records.head_scores(run.store, step)
        prefix_LH, copying_LH = (scores_LHM[..., heads.MEASURES.index(m)] for m in ("prefix_matching", copying))
    else:
        prefix_LH, copying_LH = run.measures_of(params, ("prefix_matching", copying)).values()
    return heads.induction_heads(prefix_LH, copying_LH, eval_cfg)


def ablate_run(run: Run, steps=None, kind: str = "pattern", head_list: list[tuple[int, int]] | None = None,
               progress: bool = True, path: str = "total", joint: bool = False) -> str:
    """Ablates each head (or those of `head_list`) at every committed snapshot (of `steps`) not done yet, plus one
    lane that ablates the snapshot's induction heads together; returns the store section.

    With `joint`, lane i ablates the induction heads together with head i instead (section
    `ablation_name(kind, path, joint=True)`): what each head adds on top of the induction heads, paired with the
    induction heads' own lane over the same eval windows."""
    cfg = run.config.model
    head_list = head_list or [(layer, h) for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]
    masks_MLH = ablation.head_masks(head_list, cfg.n_layers, cfg.n_heads)
    section = ablation_name(kind, path, joint)
    tokens_NL, random_index_N = run.eval_set.tokens_NL, run.eval_set.random_index_N

    def ablate_snapshot(step: int, params) -> None:
        induction_LH = induction_heads(run, step, params)
        together_LH = 1.0 - induction_LH.astype(np.float32)  # all-ones: no induction head
        heads_MLH = masks_MLH * together_LH[None] if joint else masks_MLH
        lanes = np.concatenate([heads_MLH, together_LH[None]])
        record, arrays = ablation.ablate_eval_set(run.model, params, tokens_NL, random_index_N, lanes,
                                                  run.config.eval, kind, path)
        record["induction_delta_icl"] = record["delta_icl"].pop()
        record["induction_delta_icl_window"] = record["delta_icl_window"].pop()
        record["induction_delta_loss"] = record["delta_loss"].pop()
        record["induction"] = [[bool(v) for v in row] for row in induction_LH]
        record["masks"].pop()
        record["heads"] = [list(h) for h in head_list]
        record["tokens"] = run.tokens_at(step)
        run.store.write(section, step, record, arrays)

    _each_pending(run, section, steps, f"ablate ({path}{', joint' if joint else ''})", progress, ablate_snapshot)
    return section
