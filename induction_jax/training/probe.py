"""The training loop's live phase-change probe: the windowed ICL score on a fixed subset of the eval set, and the
largest prefix-matching and previous-token scores of any head, in one jitted call (docs/method.md §3-4)."""

from __future__ import annotations

import functools

import jax
import numpy as np

from ..base.config import Config, EvalConfig
from ..data.evalset import EvalSet
from ..measures import evaluate, heads
from ..model import crossentropy
from ..model import model as model_lib
from . import sharding


@functools.partial(jax.jit, static_argnames=("model", "eval_cfg"))
def probe(model, params, tokens_NL, prefix_tokens_BT, eval_cfg: EvalConfig) -> dict:
    """ICL score (+-icl_window), prefix matching and previous-token scores of one set of params.

    tokens_NL: a small fixed subset of the eval set; prefix_tokens_BT: from `heads.prefix_matching_tokens` (drawn
    once, so successive probes are comparable). Returns {"icl": scalar, "prefix_max": scalar, "prefix": [L, H],
    "prev_max": the largest previous-token score of any head on tokens_NL}.
    """
    early, late = evaluate.icl_indices(tokens_NL.shape[1], eval_cfg.icl_early, eval_cfg.icl_late)
    logits, cap = model.apply({"params": params}, tokens_NL, capture=("patterns",))
    losses_NL = crossentropy.token_losses(logits, tokens_NL)
    # The previous-token head forms before the induction heads that read it.
    prev_LH = heads.previous_token_from_patterns(cap["patterns"]).mean(axis=1)
    patterns_LBHQK = model.apply({"params": params}, prefix_tokens_BT, capture=("patterns",))[1]["patterns"]
    prefix_LH = heads.prefix_matching_from_patterns(patterns_LBHQK, prefix_tokens_BT, 1 + eval_cfg.prefix_tokens)
    return {"icl": evaluate.icl_score(losses_NL, early, late, eval_cfg.icl_window), "prefix_max": prefix_LH.max(),
            "prefix": prefix_LH, "prev_max": prev_LH.max()}


class Prober:
    """`probe` on the run's first `train.probe_examples` eval windows and one fixed draw of prefix-matching tokens;
    returns the metrics.jsonl fields."""

    def __init__(self, cfg: Config, es: EvalSet, mesh):
        # Replicated over the whole mesh: the params span every process's devices, so must the probe's inputs.
        rep = sharding.replicated(mesh)
        self.tokens = jax.device_put(es.tokens_NL[: cfg.train.probe_examples], rep)
        rng = np.random.default_rng(cfg.data.eval_seed)
        sample = heads.pool_sampler(es.pool_P)
        self.prefix = jax.device_put(heads.prefix_matching_tokens(cfg.eval, sample, es.bos_id, rng), rep)
        self.model = model_lib.make(cfg.model)
        self.eval_cfg = cfg.eval

    def __call__(self, params) -> dict:
        out = jax.device_get(probe(self.model, params, self.tokens, self.prefix, self.eval_cfg))
        return {"probe_icl": float(out["icl"]), "probe_max_prefix": float(out["prefix_max"]),
                "probe_max_prev_token": float(out["prev_max"])}
