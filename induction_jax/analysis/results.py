"""The results of analysed runs, read from their stores: RunResults (one run's analysed arrays), its one
phase-change window (`best_window`, check 1's, which the figures shade and the ablations bracket), the joint PCA
of several runs, the ablation evidence and attribution, and the training loss from metrics.jsonl.

ICL improvement = ICL score at the first snapshot minus at the last (positive = the run learned to use context),
using the ±window-averaged score (single indices are too noisy on a small eval set; docs/method.md §3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..measures import ablation, composition, evaluate, heads
from ..training import metrics
from . import records
from .run import Run
from .store import ablation_name


def training_loss(run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens seen, training loss, learning rate) of every logged step, from metrics.jsonl."""
    recs = [r for r in metrics.read(run_dir) if "loss" in r]
    return (np.asarray([r["tokens_seen"] for r in recs], float), np.asarray([r["loss"] for r in recs], float),
            np.asarray([r.get("lr", np.nan) for r in recs], float))


class RunResults:
    """One run's analysed arrays (the eval section of its store), in step order; empty when nothing is analysed.

    `window` is the run's phase-change window, the one check 1 judges (`best_window`), which every figure shades
    and the ablations bracket; None where no span holds any ICL improvement (too few analysed snapshots, or no
    improvement)."""

    def __init__(self, run: Run):
        self.run = run
        self.name = run.name
        rec = records.read_eval(run.store)
        self.steps, self.tokens, self.icl, self.icl_window, self.eval_loss = (
            rec.steps, rec.tokens, rec.icl, rec.icl_window, rec.eval_loss)
        self.window = None
        self.composition, self.composition_steps, self.composition_baseline = None, np.zeros(0, int), None
        self.composition_ceiling = None
        # A mixture's eval set is per source: its sources' names and the ±window ICL score of each, [S, K] (None
        # for an unweighted corpus or a single source).
        self.source_names: tuple[str, ...] = ()
        self.icl_window_by_source = None
        if not len(self.steps):
            return
        self.losses_SNP = records.losses(run.store)
        es = run.eval_set
        if len(es.source_names) > 1:
            self.source_names = es.source_names
            self.icl_window_by_source = evaluate.icl_by_group(self.losses_SNP, es.source_N, len(es.source_names),
                                                              *run.icl_indices, run.config.eval.icl_window)
        self.scores_SLHM = records.head_scores(run.store)
        random_index_N = run.eval_set.random_index_N
        self.random_SN = np.stack([evaluate.random_token_view(x, random_index_N) for x in self.losses_SNP])
        # Composition scores [S', 3, L, H, L, H] (composition.MODES) at the snapshots that have them (S' steps).
        (self.composition_steps, self.composition, self.composition_ceiling,
         self.composition_baseline) = records.read_composition(run.store)
        window = best_window(self)
        self.window = window if window["share"] > 0 else None

    def measure(self, name: str) -> np.ndarray:
        return self.scores_SLHM[..., heads.MEASURES.index(name)]

    def composition_at(self, step: int, mode: str, ceiling: bool = False) -> np.ndarray | None:
        """[L, H, L, H] scores of one mode (composition.MODES) at `step`, or their alignment ceilings; None where
        none are stored."""
        if self.composition is None or step not in self.composition_steps:
            return None
        arr = self.composition_ceiling if ceiling else self.composition
        return arr[list(self.composition_steps).index(step), composition.MODES.index(mode)]

    def induction_mask(self, i: int = -1) -> np.ndarray:
        eval_cfg = self.run.config.eval
        return heads.induction_heads(self.measure("prefix_matching")[i],
                                     self.measure(heads.copying_measure(eval_cfg))[i], eval_cfg)


def joint_pca(results: list[RunResults]):
    """PCA of the random-token loss vectors of every snapshot of every run: (per-run [S, 2], explained [2])."""
    stacked = np.concatenate([r.random_SN for r in results]).astype(np.float64)
    centred = stacked - stacked.mean(0, keepdims=True)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    explained = (sv ** 2) / max((sv ** 2).sum(), 1e-12)
    proj = centred @ vt[:2].T
    out, i = [], 0
    for r in results:
        out.append(proj[i: i + len(r.steps)])
        i += len(r.steps)
    return out, explained[:2]


def improvement(r: RunResults) -> float:
    return float(r.icl_window[0] - r.icl_window[-1])


def best_window(r: RunResults, max_share: float = 0.3, min_share: float = 0.6, pm_low: float = 0.2,
                pm_high: float = 0.5) -> dict:
    """Check 1 (a)'s window: among windows of snapshots spanning at most `max_share` of the training tokens that
    hold at least `min_share` of the run's ICL improvement while max prefix matching rises from below `pm_low` to
    above `pm_high` across them, the one holding the largest share (`qualifies` True); when none does, the
    largest-share window of any kind (`qualifies` False). `largest` is always the largest-share window.

    Not simply the largest-share window: windows one snapshot apart hold shares that differ by less than the ICL
    score's noise (on the demo, the top three within 1.5 points), so which of them is largest, and the prefix
    matching at its ends, would be decided by noise."""
    t, icl = r.tokens, r.icl_window
    total = improvement(r)
    pm_S = np.nanmax(r.measure("prefix_matching").reshape(len(t), -1), axis=1)
    span = max_share * (t[-1] - t[0]) if len(t) > 1 else 0.0

    def window(i: int, j: int, share: float) -> dict:
        return {"share": float(share), "i": i, "j": j, "start_tokens": float(t[i]), "end_tokens": float(t[j]),
                "pm_start": float(pm_S[i]), "pm_end": float(pm_S[j]),
                "span": float((t[j] - t[i]) / max(t[-1] - t[0], 1))}

    largest, chosen = window(0, 0, float("-inf")), None
    for i in range(len(t)):
        for j in range(i + 1, len(t)):
            if t[j] - t[i] > span + 1e-9:
                break
            share = (icl[i] - icl[j]) / total if total > 0 else 0.0
            if share > largest["share"]:
                largest = window(i, j, share)
            if (share >= min_share and pm_S[i] < pm_low and pm_S[j] > pm_high
                    and (chosen is None or share > chosen["share"])):
                chosen = window(i, j, share)
    return {**(chosen or largest), "qualifies": chosen is not None, "largest": largest}


def ablated_paths(run: Run, kind: str = "pattern") -> list[str]:
    """The ablation paths (in ablation.PATHS order) along which the store holds `kind` ablations of any snapshot."""
    return [path for path in ablation.PATHS if run.store.steps(ablation_name(kind, path))]


def ablation_evidence(r: RunResults, before: int | None, after: int | None, kind: str = "pattern") -> dict | None:
    """What check 4 judges, at the last snapshot ablated along the first path of `ablated_paths` (the total path
    when there is one; None when nothing is ablated): the induction heads; on every ablation path stored, each
    head's share of the ±`eval.icl_window` ICL score removed with its bootstrap standard error, the share removed
    by ablating the induction heads together, and each head's share of the phase change undone (before-and-after
    attribution from step `before` to `after`, None without both); and, where the joint lanes were run, the
    share each head adds when ablated together with the induction heads (paired standard error)."""
    store = r.run.store
    paths = ablated_paths(r.run, kind)
    if not paths:
        return None
    recs = store.sorted_records(ablation_name(kind, paths[0]))
    last = recs[-1]
    step = int(last["step"])
    labels = [f"{l}.{h}" for l, h in last["heads"]]
    n = len(labels)
    induction = last.get("induction") or r.induction_mask(list(r.steps).index(step)).tolist()
    out = {"step": step, "labels": labels, "clean_icl_window": last["clean_icl_window"], "before": before,
           "after": after, "induction": [lab for lab, (l, h) in zip(labels, last["heads"]) if induction[l][h]],
           "paths": {}, "joint": None}
    for path in ablation.PATHS:
        sec = ablation_name(kind, path)
        if step not in store.steps(sec):
            continue
        share, se = ablation.shares(store.read(sec, "delta_icl_window", step), store.read(sec, "icl_window", step))
        att = attribution(r, before, after, step, n, kind, path)
        out["paths"][path] = {"share": share[:n], "se": se[:n], "induction_share": float(share[n]),
                              "induction_se": float(se[n]),
                              "undone": None if att is None else att["fraction_undone"]}
    joint = ablation_name(kind, "total", joint=True)
    if step in store.steps(joint):
        delta_MN = store.read(joint, "delta_icl_window", step)
        added, se = ablation.shares(delta_MN[:n] - delta_MN[n][None], store.read(joint, "icl_window", step))
        out["joint"] = {"added": added, "se": se}
    return out


def attribution(r: RunResults, before: int | None, after: int | None, step: int, n: int,
                kind: str = "pattern", path: str = "total") -> dict | None:
    """ablation.attribution of the first `n` lanes ablated at `step` along `path` against the training change of
    the random-token losses from step `before` to `after`; None unless both are analysed."""
    steps = list(r.steps)
    if before not in steps or after not in steps:
        return None
    train_delta = r.random_SN[steps.index(after)] - r.random_SN[steps.index(before)]
    return ablation.attribution(r.run.store.read(ablation_name(kind, path), "delta_random", step)[:n],
                                train_delta)
