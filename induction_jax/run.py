"""The scripting API: open a run directory and read its snapshots and analysis results from a notebook.

    from induction_jax import Run
    run = Run.open("runs/attn_only_2l")
    params = run.params(run.steps[-1])
    logits, cap = run.model.apply({"params": params}, tokens, capture=("patterns",))
"""

from __future__ import annotations

import json
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

    def export_transformer_lens(self, step: int, path: str | Path) -> Path:
        """Writes `path.npz` (HookedTransformer state-dict keys and shapes) and `path.json` (config fields).

        Only attention-only shortformer models with LayerNorm map onto TransformerLens; anything else is refused.
        """
        m = self.config.model
        why = [w for w, bad in [("smeared key", m.smeared_key), ("MLPs", m.d_mlp > 0),
                                (f"positions={m.positions}", m.positions != "shortformer"),
                                ("local heads", m.local_heads > 0), ("no LayerNorm", not m.layer_norm)] if bad]
        if why:
            raise UserError(f"{self.path}: TransformerLens cannot express this model ({', '.join(why)})")
        p = self.params(step)
        sd = {"embed.W_E": p["W_E"], "unembed.W_U": p["W_U"],
              "unembed.b_U": np.zeros(m.vocab_size, np.float32),
              "ln_final.w": p["ln_final"]["scale"], "ln_final.b": p["ln_final"]["bias"]}
        from .model import sinusoidal_table
        sd["pos_embed.W_pos"] = p["W_pos"] if m.pos_table == "learned" else sinusoidal_table(m.context, m.d_model)
        for layer in range(m.n_layers):
            a, ln = p[f"block_{layer}"]["attn"], p[f"block_{layer}"]["ln1"]
            pre = f"blocks.{layer}"
            sd[f"{pre}.ln1.w"], sd[f"{pre}.ln1.b"] = ln["scale"], ln["bias"]
            for name in ("Q", "K", "V"):  # ours [D, H, E] -> TL [H, D, E]
                sd[f"{pre}.attn.W_{name}"] = np.transpose(np.asarray(a[f"W_{name}"]), (1, 0, 2))
                sd[f"{pre}.attn.b_{name}"] = np.zeros((m.n_heads, m.d_head), np.float32)
            sd[f"{pre}.attn.W_O"] = a["W_O"]  # [H, E, D] in both
            sd[f"{pre}.attn.b_O"] = np.zeros(m.d_model, np.float32)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path.with_suffix(".npz"), **{k: np.asarray(v, np.float32) for k, v in sd.items()})
        tl_cfg = {"n_layers": m.n_layers, "d_model": m.d_model, "n_heads": m.n_heads, "d_head": m.d_head,
                  "n_ctx": m.context, "d_vocab": m.vocab_size, "attn_only": True, "act_fn": None,
                  "normalization_type": "LN", "positional_embedding_type": "shortformer",
                  "eps": m.ln_eps, "original_architecture": "induction_jax", "step": step}
        path.with_suffix(".json").write_text(json.dumps(tl_cfg, indent=1))
        return path.with_suffix(".npz")

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, {len(self.steps)} snapshots)"
