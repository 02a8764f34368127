"""A training run directory as one object, and the scripting API: its config, committed snapshots, eval set and
stored analysis results.

    from induction_jax import Run
    run = Run.open("runs/attn_only_2l")
    params = run.params(run.steps[-1])
    logits, cap = run.model.apply({"params": params}, tokens, capture=("patterns",))

Opening a run reads config.yaml only. The eval set comes from the run directory (evalset.py) on first use; only a
run directory that predates it reads the prepared data, the data cache, then.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from ..training import checkpoint
from ..measures import composition, evaluate, heads
from ..data import evalset
from ..base import config as config_lib
from ..model import model as model_lib
from ..base.config import Config, UserError
from .store import COMPOSITION, EVAL, Store, store_key


class Run:
    """A run directory: config, committed snapshots, eval set, and the results store under its analysis directory
    (RUN_DIR/analysis unless `analysis_dir` says otherwise). Snapshots restore onto this process's devices,
    whatever mesh trained them."""

    def __init__(self, path: str | Path, analysis_dir: str | Path | None = None, *, progress: bool = False):
        self.path = Path(path)
        self.reader = checkpoint.SnapshotReader(self.path)  # RunDirError if it is not a run
        cfg_path = self.path / "config.yaml"
        if not cfg_path.exists():
            raise checkpoint.RunDirError(f"{self.path}: not a run directory (no config.yaml)")
        self.config: Config = config_lib.load(cfg_path)
        self.model = model_lib.make(self.config.model)
        self.analysis_dir = Path(analysis_dir) if analysis_dir else self.path / "analysis"
        self.progress = progress  # of the data preparation an old run directory may need
        self._eval: evalset.EvalSet | None = None
        self._store: Store | None = None
        # Eval batches are split over this process's devices; params are replicated on them.
        devices = jax.local_devices()
        self.mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
        self.eval_batch = -(-self.config.eval.batch_size // len(devices)) * len(devices)

    @classmethod
    def open(cls, path: str | Path, analysis_dir: str | Path | None = None, *, progress: bool = False) -> "Run":
        return cls(path, analysis_dir, progress=progress)

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

    def params(self, step: int):
        """The snapshot's parameters, replicated on this process's devices."""
        abstract = model_lib.abstract_params(self.config.model)
        rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abstract)
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
    def eval(self) -> evalset.EvalSet:
        """The eval set and the head evaluators' token pool (evalset.py), read on first use."""
        if self._eval is None:
            self._eval = evalset.for_run(self.path, self.config, self.progress)
        return self._eval

    def eval_set(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [N, L], random token index per example [N]) — the fixed eval set every snapshot is scored on."""
        return self.eval.tokens_NL, self.eval.random_index_N

    @property
    def icl_indices(self) -> tuple[int, int]:
        """(early, late) token indices of the ICL score for this run's eval windows."""
        return evaluate.icl_indices(self.eval.tokens_NL.shape[1], self.config.eval.icl_early,
                                    self.config.eval.icl_late)

    # -- measuring a snapshot now ------------------------------------------------------------------------
    def losses(self, params) -> np.ndarray:
        """[N, L-1] per-token losses of `params` on the eval set, batches split over this process's devices."""
        batch = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("batch"))
        return evaluate.per_token_losses(self.model, params, self.eval.tokens_NL, self.eval_batch, sharding=batch)

    def measure_heads(self, params, measures=heads.MEASURES) -> dict[str, np.ndarray]:
        """{measure: [layers, heads]} of `params` (heads.score): the random draws use the same seed at every
        snapshot, and the previous-token score reads the first 64 eval windows."""
        es = self.eval
        return heads.score(self.model, params, self.config.eval, heads.pool_sampler(es.pool_P), es.bos_id,
                           self.config.data.eval_seed, es.tokens_NL[:64], measures)

    def score_heads(self, step: int) -> dict[str, np.ndarray]:
        """Computes the head measures of one snapshot now: {measure: [layers, heads]}."""
        return self.measure_heads(self.params(step))

    # -- stored results ----------------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        """The results store, keyed by the eval set's hash and the analysis version (store.py)."""
        if self._store is None:
            self._store = Store(self.analysis_dir, store_key(self.eval.eval_hash))
        return self._store

    def pending_steps(self, section: str, steps=None) -> list[int]:
        """Committed steps (of `steps`, when given) that `section` of the store does not hold yet."""
        done = set(self.store.steps(section))
        return [s for s in self.steps if s not in done and (steps is None or s in set(steps))]

    def per_token_losses(self, step: int) -> np.ndarray:
        """[N, L-1] losses on the eval set (column c = token index c+1); from the store when analysed."""
        if step in self.store.steps(EVAL):
            return self.store.read(EVAL, "per_token_loss", step)
        return self.losses(self.params(step))

    def icl_scores(self) -> dict[int, float]:
        """{step: ICL score} over analysed snapshots (run `python -m induction_jax.analyze` first)."""
        return {r["step"]: r["icl"] for r in self.store.sorted_records(EVAL)}

    def head_scores(self, tidy: bool = False):
        """Analysed head measures: (steps [S], scores [S, L, H, M], heads.MEASURES), or a list of tidy row dicts."""
        steps = self.store.sorted_steps(EVAL)
        if not steps:
            raise UserError(f"{self.path}: no analysed snapshots; run python -m induction_jax.analyze {self.path}")
        scores = self.store.read(EVAL, "head_scores")
        if not tidy:
            return np.asarray(steps), scores, heads.MEASURES
        return [{"step": s, "layer": layer, "head": h, "measure": m, "value": float(scores[i, layer, h, j])}
                for i, s in enumerate(steps) for layer in range(scores.shape[1])
                for h in range(scores.shape[2]) for j, m in enumerate(heads.MEASURES)]

    def composition_scores(self) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], float]:
        """Analysed composition scores: (steps [S], scores [S, 3, L, H, L, H], modes ("q", "k", "v"), random
        baseline). scores[s, m, l1, h1, l2, h2] is how much head l2.h2's queries, keys or values read what head
        l1.h1 writes (NaN unless l1 < l2); docs/method.md §1.7."""
        recs = self.store.sorted_records(COMPOSITION)
        if not recs:
            raise UserError(f"{self.path}: no composition scores (a model of 2 or more layers gets them from "
                            f"python -m induction_jax.analyze {self.path})")
        return (np.asarray([r["step"] for r in recs]), self.store.read(COMPOSITION, "scores"), composition.MODES,
                float(recs[-1]["baseline"]))

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, {len(self.steps)} snapshots)"
