"""A training run directory as one object, and the scripting API: its config, committed snapshots, eval set and
stored analysis results.

    from induction_jax import Run
    run = Run("runs/attn_only_2l")
    params = run.params(run.steps[-1])
    logits, cap = run.model.apply({"params": params}, run.eval_set.tokens_NL[:8], capture=("patterns",))

Opening a run reads config.yaml only; the eval set is read from the run directory (eval_set.npz, data/evalset.py)
on first use. Methods that compute now take params (`losses_of`, `measures_of`); those that read the results
store start with `stored_`. Snapshots restore replicated on every device, or sharded over the run's mesh when
they would not fit one (`analysis.placement`, analysis/placement.py); `Run(path, overrides=["mesh.fsdp=8",
"analysis.dtype=bfloat16"])` changes the mesh, the placement and the dtype, the only keys an analysis may change.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from ..base import config as config_lib
from ..base.config import Config, UserError
from ..data import evalset
from ..measures import composition, evaluate, heads
from ..model import model as model_lib
from ..training import checkpoint
from . import placement as placement_lib
from . import records
from .store import EVAL, Store, store_key

ANALYSIS_DIR = "analysis"  # a run's results store, figures and report.md, unless told otherwise
OVERRIDABLE = ("mesh.", "analysis.")  # what an analysis may change of the run's config: where and how it runs


class Run:
    """A run directory: config, committed snapshots, eval set, and the results store under its analysis directory
    (RUN_DIR/analysis unless `analysis_dir` says otherwise). Snapshots restore onto the devices of `placement`,
    whatever mesh trained them; `overrides` (dotted key=value) may change the run's mesh.* and analysis.* keys."""

    def __init__(self, path: str | Path, analysis_dir: str | Path | None = None, overrides=()):
        self.path = Path(path)
        self.reader = checkpoint.SnapshotReader(self.path)  # RunDirError if it is not a run
        cfg_path = self.path / config_lib.CONFIG_FILE
        if not cfg_path.exists():
            raise checkpoint.RunDirError(f"{self.path}: not a run directory (no {config_lib.CONFIG_FILE})")
        fixed = [o for o in overrides if not o.startswith(OVERRIDABLE)]
        if fixed:
            raise UserError(f"{fixed[0]}: an analysis reads the run's own config; only mesh.* and analysis.* keys "
                            "may be changed")
        self.config: Config = config_lib.load(cfg_path, overrides)
        # The forward passes compute in analysis.dtype (the logits and losses stay float32).
        self.model = model_lib.make(dataclasses.replace(self.config.model, dtype=self.config.analysis.dtype))
        self.analysis_dir = Path(analysis_dir) if analysis_dir else self.path / ANALYSIS_DIR
        self._eval: evalset.EvalSet | None = None
        self._store: Store | None = None
        self._placement: placement_lib.Placement | None = None

    @property
    def name(self) -> str:
        return self.path.name

    # -- snapshots -----------------------------------------------------------------------------------------
    @property
    def steps(self) -> list[int]:
        """Committed snapshot steps (a snapshot still being written never appears)."""
        return self.reader.steps()

    def tokens_at(self, step: int) -> int:
        return int(self.reader.metadata(step)["tokens_seen"])

    @property
    def placement(self) -> placement_lib.Placement:
        """Where snapshots are restored and measured (analysis/placement.py), chosen on first use and said once on
        stdout."""
        if self._placement is None:
            self._placement = placement_lib.choose(self.config)
            self.reader.local = not self._placement.sharded  # each process restores its own snapshots
            if jax.process_index() == 0:
                print(f"{self.name}: {self._placement.why}", flush=True)
        return self._placement

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.placement.mesh

    @property
    def eval_batch(self) -> int:
        """`eval.batch_size` rounded up to split evenly over the devices a batch is split over."""
        ways = self.placement.batch_ways
        return -(-self.config.eval.batch_size // ways) * ways

    def params(self, step: int):
        """The snapshot's parameters in `analysis.dtype`, placed as `placement` says (replicated, or sharded over
        the mesh with the training's parameter shardings)."""
        dtype = jax.numpy.dtype(self.config.analysis.dtype)
        abstract = model_lib.abstract_params(self.config.model)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s), abstract,
                              self.placement.param_shardings(self.config))
        return self.reader.restore(step, target)

    def check_steps(self, steps=None) -> None:
        """Refuses a run with no committed snapshot, and asked-for steps that have none."""
        committed = self.steps
        if not committed:
            raise UserError(f"{self.path}: nothing committed yet (no snapshot); run again once training has saved "
                            "one")
        missing = sorted(set(steps or ()) - set(committed))
        if missing:
            shown = committed if len(committed) <= 8 else committed[:3] + ["..."] + committed[-3:]
            raise UserError(f"{self.path}: no committed snapshot at step(s) {', '.join(map(str, missing))} "
                            f"(committed: {', '.join(map(str, shown))})")

    # -- eval set ------------------------------------------------------------------------------------------
    @property
    def eval_set(self) -> evalset.EvalSet:
        """The fixed eval set every snapshot is scored on (`.tokens_NL` [N, L], `.random_index_N` [N]) with its hash,
        BOS id and the head evaluators' token pool (data/evalset.py), read on first use."""
        if self._eval is None:
            self._eval = evalset.for_run(self.path, self.config)
        return self._eval

    @property
    def icl_indices(self) -> tuple[int, int]:
        """(early, late) token indices of the ICL score for this run's eval windows."""
        return evaluate.icl_indices(self.eval_set.tokens_NL.shape[1], self.config.eval.icl_early,
                                    self.config.eval.icl_late)

    # -- measuring a snapshot now ------------------------------------------------------------------------
    def losses_of(self, params) -> np.ndarray:
        """[N, L-1] per-token losses of `params` on the eval set, computed now: each batch split over the placement's
        batch axes, through the fused attention where the model trains with it (no pattern is kept)."""
        with jax.set_mesh(self.mesh):
            return evaluate.per_token_losses(self.model, params, self.eval_set.tokens_NL, self.eval_batch,
                                             sharding=self.placement.batch)

    def measures_of(self, params, measures=heads.MEASURES) -> dict[str, np.ndarray]:
        """{measure: [layers, heads]} of `params` (heads.score), computed now: the random draws use the same seed
        at every snapshot, and the previous-token score reads the first 64 eval windows."""
        es = self.eval_set
        with jax.set_mesh(self.mesh):
            return heads.score(self.model, params, self.config.eval, heads.pool_sampler(es.pool_P), es.bos_id,
                               self.config.data.eval_seed, es.tokens_NL[:64], measures)

    # -- stored results ----------------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        """The results store, keyed by the eval set's hash and the analysis version (store.py)."""
        if self._store is None:
            self._store = Store(self.analysis_dir, store_key(self.eval_set.eval_hash))
        return self._store

    def pending_steps(self, section: str, steps=None) -> list[int]:
        """Committed steps (of `steps`, when given) that `section` of the store does not hold yet."""
        done = set(self.store.steps(section))
        return [s for s in self.steps if s not in done and (steps is None or s in set(steps))]

    def losses_at(self, step: int) -> np.ndarray:
        """[N, L-1] losses of the snapshot at `step` on the eval set (column c = token index c+1): the stored ones
        when it is analysed, else computed now."""
        if step in self.store.steps(EVAL):
            return records.losses(self.store, step)
        return self.losses_of(self.params(step))

    def stored_icl_scores(self) -> dict[int, float]:
        """{step: ICL score} over analysed snapshots (run `python -m induction_jax.analyze` first)."""
        rec = records.read_eval(self.store)
        return dict(zip(rec.steps.tolist(), rec.icl.tolist()))

    def stored_head_scores(self, tidy: bool = False):
        """Analysed head measures: (steps [S], scores [S, L, H, M], heads.MEASURES), or a list of tidy row dicts."""
        steps = records.read_eval(self.store).steps
        if not len(steps):
            raise UserError(f"{self.path}: no analysed snapshots; run python -m induction_jax.analyze {self.path}")
        scores = records.head_scores(self.store)
        if not tidy:
            return steps, scores, heads.MEASURES
        return [{"step": s, "layer": layer, "head": h, "measure": m, "value": float(scores[i, layer, h, j])}
                for i, s in enumerate(steps.tolist()) for layer in range(scores.shape[1])
                for h in range(scores.shape[2]) for j, m in enumerate(heads.MEASURES)]

    def stored_composition_scores(self) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], float]:
        """Analysed composition scores: (steps [S], scores [S, 3, L, H, L, H], modes ("q", "k", "v"), random
        baseline). scores[s, m, l1, h1, l2, h2] is how much head l2.h2's queries, keys or values read what head
        l1.h1 writes (NaN unless l1 < l2); docs/method.md §4.2. Their alignment ceilings are in the report."""
        steps, scores, _, baseline = records.read_composition(self.store)
        if scores is None:
            raise UserError(f"{self.path}: no composition scores (a model of 2 or more layers gets them from "
                            f"python -m induction_jax.analyze {self.path})")
        return steps, scores, composition.MODES, baseline

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, {len(self.steps)} snapshots)"
