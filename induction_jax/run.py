"""The scripting API: open a run directory and read its snapshots and analysis results from a notebook.

    from induction_jax import Run
    run = Run.open("runs/attn_only_2l")
    params = run.params(run.steps[-1])
    logits, cap = run.model.apply({"params": params}, tokens, capture=("patterns",))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import evaluate
from .analyze import SECTION, RunContext
from .config import UserError
from .store import MEASURES


class Run:
    """A training run directory: config, committed snapshots, eval set and whatever analysis has been stored."""

    def __init__(self, ctx: RunContext):
        self._ctx = ctx

    @classmethod
    def open(cls, path: str | Path, analysis_dir: str | Path | None = None) -> "Run":
        return cls(RunContext(path, analysis_dir, progress=False))

    @property
    def path(self) -> Path:
        return self._ctx.run_dir

    @property
    def config(self):
        return self._ctx.cfg

    @property
    def model(self):
        """The flax module: `model.apply({"params": p}, tokens, head_mask=, patterns=, capture=)`."""
        return self._ctx.model

    @property
    def steps(self) -> list[int]:
        """Committed snapshot steps (a snapshot still being written never appears)."""
        return self._ctx.reader.steps()

    def tokens_at(self, step: int) -> int:
        return self._ctx.tokens_at(step)

    def params(self, step: int):
        """The snapshot's parameters, restored onto this process's devices."""
        return self._ctx.params(step)

    def eval_set(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [N, L], random token index per example [N]) — the fixed eval set every snapshot is scored on."""
        return self._ctx.tokens_NL, self._ctx.random_index_N

    def per_token_losses(self, step: int) -> np.ndarray:
        """[N, L-1] losses on the eval set (column c = token index c+1); from the store when analysed."""
        if step in self._ctx.store.steps(SECTION):
            return self._ctx.store.read(SECTION, "per_token_loss", step)
        return evaluate.per_token_losses(self.model, self.params(step), self._ctx.tokens_NL,
                                         self.config.eval.batch_size)

    def score_heads(self, step: int) -> dict[str, np.ndarray]:
        """Computes the four head measures of one snapshot now: {measure: [layers, heads]}."""
        from .analyze import head_scores
        scores = head_scores(self._ctx, self.params(step))
        return {m: scores[..., i] for i, m in enumerate(MEASURES)}

    def icl_scores(self) -> dict[int, float]:
        """{step: ICL score} over analysed snapshots (run `python -m induction_jax.analyze` first)."""
        return {r["step"]: r["icl"] for r in self._ctx.store.sorted_records(SECTION)}

    def head_scores(self, tidy: bool = False):
        """Analysed head measures: (steps [S], scores [S, L, H, M], MEASURES), or a list of tidy row dicts."""
        steps = self._ctx.store.sorted_steps(SECTION)
        if not steps:
            raise UserError(f"{self.path}: no analysed snapshots; run python -m induction_jax.analyze {self.path}")
        scores = self._ctx.store.read(SECTION, "head_scores")
        if not tidy:
            return np.asarray(steps), scores, MEASURES
        return [{"step": s, "layer": layer, "head": h, "measure": m, "value": float(scores[i, layer, h, j])}
                for i, s in enumerate(steps) for layer in range(scores.shape[1])
                for h in range(scores.shape[2]) for j, m in enumerate(MEASURES)]

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, {len(self.steps)} snapshots)"
