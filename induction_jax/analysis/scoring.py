"""Scores a run's committed snapshots into its results store: the eval section (per-token losses, ICL scores and
the head measures), the composition section (Q/K/V composition scores) and the head-ablation sections
(docs/method.md §3-5).

Both skip snapshots already stored and pick up new ones of a run still training; a killed job loses at most the
snapshot in flight. A snapshot that cannot be read is reported by path and skipped; one whose stored results do
not match their digests is reported and analysed again. Both hold the lock of the results directory they write.

In a multi-host job (or a SLURM job array, or with --part), snapshots that fit one device are spread: each process
analyses its part of them on its own devices and writes its part's store (analysis/parts.py), which process 0 (or
the next analyze) merges. Sharded snapshots are measured by every process together; process 0 decides which are
pending and alone writes the results.
"""

from __future__ import annotations

import contextlib
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from ..base.config import UserError
from ..measures import ablation, composition, heads
from ..training import checkpoint
from . import parts, records
from .run import Run
from .store import COMPOSITION, EVAL, Store, ablation_name


class _Discard:
    """The store of a process that computes with the others but does not write (sharded, not process 0)."""

    @staticmethod
    def write(*_args) -> None:
        pass


def _agree(run: Run, value: np.ndarray) -> np.ndarray:
    """Process 0's `value` in every process where they all measure one snapshot together; `value` unchanged
    otherwise. Every process's `value` must have process 0's shape and dtype."""
    if not run.placement.sharded or jax.process_count() == 1:
        return value
    return np.asarray(multihost_utils.broadcast_one_to_all(value))


def job_part(run: Run, part: parts.Part | None = None) -> parts.Part:
    """The share of the job's (run, snapshot) pairs this process takes (analysis/parts.py): all of them where every
    process measures each snapshot together (sharded), one part per process in a multi-host job otherwise, or
    `part` (--part, a SLURM job array)."""
    if run.placement.sharded:
        if part and not part.whole:
            raise UserError(f"{run.path}: --part (or a SLURM job array) spreads snapshots that fit one device over "
                            "workers; this run's are sharded (analysis.placement), so run one multi-host job, in "
                            "which every process takes part in each snapshot")
        return parts.Part()
    if jax.process_count() > 1:
        if part and not part.whole:
            raise UserError("--part or a SLURM job array cannot be combined with a multi-host job: its processes "
                            "are the parts")
        return parts.Part(jax.process_index(), jax.process_count())
    return part or parts.Part()


def output_store(run: Run, part: parts.Part) -> Store | None:
    """Where this process writes: the run's store, its part's (parts.directory), or nothing (a sharded
    analysis's processes other than 0)."""
    if run.placement.sharded:
        return run.store if jax.process_index() == 0 else None
    return run.store if part.whole else Store(parts.directory(run.analysis_dir, part), run.store.key)


def analyze_snapshot(run: Run, step: int, params, store=None) -> None:
    """Stores the snapshot's per-token losses, ICL scores and head measures in the eval section of `store` (the
    run's by default)."""
    records.write_eval(store or run.store, step, run.tokens_at(step), run.losses_of(params),
                       run.measures_of(params), run.icl_indices, run.config.eval.icl_window)


def compose_snapshot(run: Run, step: int, params, store=None) -> None:
    """Stores the snapshot's composition scores and their alignment ceilings, [3, L, H, L, H] each
    (composition.MODES), with the random baseline of the model's shapes."""
    cfg = run.config.model
    with jax.set_mesh(run.mesh):
        scores, ceiling = (composition.composition_scores(params, cfg), composition.alignment_ceiling(params, cfg))
    records.write_composition(store or run.store, step, run.tokens_at(step), scores, ceiling,
                              composition.random_baseline(cfg.d_model, cfg.d_head))


def repair(store: Store, sections: list[str]) -> None:
    """Drops from the store's indices the snapshots whose stored arrays do not match their digests, with a warning
    each, so that they count as pending: a store damaged on disk, or by two analyses at once before the writer's
    lock existed, is repaired by the next analysis rather than trusted."""
    for section in sections:
        for _, why in store.verify(section):
            print(f"warning: {why}; analysing it again", file=sys.stderr, flush=True)


def _plan(run: Run, sections: list[str], steps, part: parts.Part, offset: int, out: Store | None):
    """[(step, [sections it lacks])] of this process's committed snapshots that the run's store (and this
    process's own) lack, in step order."""
    done = {sec: set(run.store.steps(sec)) | (set(out.steps(sec)) if out is not None else set())
            for sec in sections}
    todo = []
    for k, step in enumerate(run.steps):
        if not part.takes(offset + k) or (steps is not None and step not in set(steps)):
            continue
        missing = [sec for sec in sections if step not in done[sec]]
        if missing:
            todo.append((step, missing))
    if run.placement.sharded and jax.process_count() > 1:
        # Process 0's plan, which it alone can see the store for: every process must measure the same snapshots.
        flags_SK = np.array([[step] + [sec in missing for sec in sections] for step, missing in todo], np.int64)
        n = int(_agree(run, np.array(len(todo), np.int64)))
        if not n:
            return []
        flags_SK = _agree(run, flags_SK if len(todo) == n else np.zeros((n, 1 + len(sections)), np.int64))
        todo = [(int(row[0]), [sec for sec, f in zip(sections, row[1:]) if f]) for row in flags_SK]
    return todo


def _each_pending(run: Run, sections: str | list[str], steps, what: str, progress: bool, score,
                  part: parts.Part | None = None, offset: int = 0) -> None:
    """score(step, params, missing sections, store) for each committed snapshot (of `steps`) of this process's
    part that one of `sections` lacks, holding the lock of the store it writes throughout; a snapshot that cannot
    be read is reported and skipped. `offset`: the index of the run's first snapshot among the job's (run,
    snapshot) pairs, which decides the parts."""
    sections = [sections] if isinstance(sections, str) else sections
    part = job_part(run, part)
    out = output_store(run, part)
    with out.writing() if out is not None else contextlib.nullcontext():
        if out is not None:
            repair(out, sections)
        todo = _plan(run, sections, steps, part, offset, out)
        label = f"{what} {run.name}" + ("" if part.whole else f" (part {part.index} of {part.count})")
        for step, missing in tqdm(todo, desc=label, unit="snapshot",
                                  disable=not progress or jax.process_index() != 0 and run.placement.sharded):
            try:
                score(step, run.params(step), missing, out if out is not None else _Discard())
            except checkpoint.SnapshotError as e:
                tqdm.write(f"skipped: {e}")


def analyze_run(run: Run, steps=None, progress: bool = True, part: parts.Part | None = None,
                offset: int = 0) -> None:
    """`analyze_snapshot` and `compose_snapshot` on every committed snapshot (or those of `steps`) that lacks
    them. The two sections keep their own indices (a run analysed before composition scores existed gets just
    those), and a snapshot missing both is restored once. `part`, `offset`: as in `_each_pending`."""
    sections = [EVAL] + ([COMPOSITION] if run.config.model.n_layers > 1 else [])

    def score(step: int, params, missing: list[str], store) -> None:
        if EVAL in missing:
            analyze_snapshot(run, step, params, store)
        if COMPOSITION in missing:
            compose_snapshot(run, step, params, store)

    _each_pending(run, sections, steps, "analyze", progress, score, part, offset)


def induction_heads(run: Run, step: int, params, store: Store | None = None) -> np.ndarray:
    """bool [L, H]: the snapshot's induction heads (heads.induction_heads), from its stored head measures when it
    has been analysed (in the run's store, or in `store`), else from the two measures the classification needs,
    computed now."""
    eval_cfg = run.config.eval
    copying = heads.copying_measure(eval_cfg)
    stored = next((s for s in (store, run.store) if isinstance(s, Store) and step in s.steps(EVAL)), None)
    if bool(_agree(run, np.array(stored is not None))):
        scores_LHM = _agree(run, records.head_scores(stored, step) if stored is not None else
                            np.zeros((run.config.model.n_layers, run.config.model.n_heads, len(heads.MEASURES)),
                                     np.float32))
        prefix_LH, copying_LH = (scores_LHM[..., heads.MEASURES.index(m)] for m in ("prefix_matching", copying))
    else:
        prefix_LH, copying_LH = run.measures_of(params, ("prefix_matching", copying)).values()
    return heads.induction_heads(prefix_LH, copying_LH, eval_cfg)


def ablate_run(run: Run, steps=None, kind: str = "pattern", head_list: list[tuple[int, int]] | None = None,
               progress: bool = True, path: str = "total", joint: bool = False, part: parts.Part | None = None,
               offset: int = 0) -> str:
    """Ablates each head (or those of `head_list`) at every committed snapshot (of `steps`) not done yet, plus one
    lane that ablates the snapshot's induction heads together; returns the store section.

    With `joint`, lane i ablates the induction heads together with head i instead (section
    `ablation_name(kind, path, joint=True)`): what each head adds on top of the induction heads, paired with the
    induction heads' own lane over the same eval windows. Lanes are split over the devices of a replicated
    placement; `part`, `offset`: as in `_each_pending`."""
    cfg = run.config.model
    head_list = head_list or [(layer, h) for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]
    masks_MLH = ablation.head_masks(head_list, cfg.n_layers, cfg.n_heads)
    section = ablation_name(kind, path, joint)
    tokens_NL, random_index_N = run.eval_set.tokens_NL, run.eval_set.random_index_N

    def ablate_snapshot(step: int, params, _missing, store) -> None:
        induction_LH = induction_heads(run, step, params, store)
        together_LH = 1.0 - induction_LH.astype(np.float32)  # all-ones: no induction head
        heads_MLH = masks_MLH * together_LH[None] if joint else masks_MLH
        lanes = np.concatenate([heads_MLH, together_LH[None]])
        with jax.set_mesh(run.mesh):
            record, arrays = ablation.ablate_eval_set(run.model, params, tokens_NL, random_index_N, lanes,
                                                      run.config.eval, kind, path, lanes=run.placement.lanes)
        record["induction_delta_icl"] = record["delta_icl"].pop()
        record["induction_delta_icl_window"] = record["delta_icl_window"].pop()
        record["induction_delta_loss"] = record["delta_loss"].pop()
        record["induction"] = [[bool(v) for v in row] for row in induction_LH]
        record["masks"].pop()
        record["heads"] = [list(h) for h in head_list]
        record["tokens"] = run.tokens_at(step)
        store.write(section, step, record, arrays)

    _each_pending(run, section, steps, f"ablate ({path}{', joint' if joint else ''})", progress, ablate_snapshot,
                  part, offset)
    return section
