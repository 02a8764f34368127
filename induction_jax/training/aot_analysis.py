"""The analysis programs of one snapshot, lowered ahead of time for a mesh (`python -m induction_jax.plan`).

Each program is one of the jitted functions `analyze` and `ablate` call per snapshot of a sharded placement
(analysis/placement.py), lowered with the inputs they give it, as ShapeDtypeStructs that carry the same shardings,
so nothing is allocated: parameters sharded as in training (`sharding.param_shardings`); the per-token losses'
eval batch split over the batch axes (`sharding.batch_sharding`), its rows rounded up to a multiple of their size
(the analysis pads a batch and drops the padding rows); the head measures' and the ablation's token batches whole
on every device, as the analysis passes them (the model then pins its activations to the batch axes where the
rows divide over them); the ablation lane group reading the clean run's outputs as that program lays them out.
The mesh is set while lowering, so the model takes the code path of the mesh's platform (a TPU slice's, compiled
from a CPU host with libtpu).

- per-token losses: evaluate's forward, `eval.batch_size` windows of `data.eval_length` tokens;
- head measures (heads.MEASURES): prefix matching and the copying evaluator on their `eval.draws` random
  sequences, previous token on the eval batch, the QK trace and the OV circuits (weights only);
- composition: the Q/K/V scores and their alignment ceilings (weights only);
- ablation: the clean run and one lane group, one vmapped call of `ablation._lanes` for `lanes` lanes whose first
  masked head is in layer 0 (the group that runs every layer), on the max(1, eval.batch_size // (every head + 1))
  windows that `ablation.ablate_eval_set` gives each call when `ablate` runs every head and the induction heads'
  lane.

The OV circuits' eigenvalues (d_head x d_head matrices, on the host), the composition baseline (the same for every
snapshot) and `heads.copying_rank` (which the report does not store) are not compiled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..base.config import Config, ModelConfig
from ..measures import ablation, composition, evaluate, heads
from ..model import model as model_lib
from . import sharding

# Table columns the programs are grouped into (docs/scale.md's analysis table).
GROUPS = ("losses", "heads", "composition", "ablation")


@dataclass(frozen=True)
class Program:
    name: str
    group: str  # one of GROUPS
    inputs: str  # what it reads, e.g. "64 x 512 tokens" or "weights"
    lower: Callable[[], object]  # lowers the program (call with the mesh set); returns jax's Lowered


def _composition(params, cfg: ModelConfig):
    f = composition._factors(params, cfg)
    return composition._scores(f["Q"], f["K"], f["V"], f["O"], cfg.n_heads)


def _alignment(params, cfg: ModelConfig):
    f = composition._factors(params, cfg)
    return composition._singular_values(f["Q"], f["K"], f["V"], f["O"])


def batch_ways(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in sharding.BATCH)


def rows_for(n: int, mesh: Mesh) -> int:
    """n rounded up to a multiple of the batch axes' size, so the rows split evenly over them."""
    ways = batch_ways(mesh)
    return -(-n // ways) * ways


def programs(cfg: Config, mesh: Mesh, lanes: int | None = None) -> list[Program]:
    """The analysis programs of `cfg`'s model on `mesh`, in report order; `lanes` sets the ablation lane group's
    size (default: one layer's heads). Call it, and lower the programs, with the mesh set (`jax.set_mesh`)."""
    m, ev = cfg.model, cfg.eval
    model = model_lib.make(m)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          model_lib.abstract_params(m), sharding.param_shardings(m, mesh))
    batch = sharding.batch_sharding(mesh)
    rep = sharding.replicated(mesh)

    def tokens(rows: int, length: int):
        return jax.ShapeDtypeStruct((rows_for(rows, mesh), length), jnp.int32, sharding=batch)

    def whole(rows: int, length: int):
        return jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=rep)

    def shape(t) -> str:
        return f"{t.shape[0]} x {t.shape[1]} tokens"

    length = min(cfg.data.eval_length, m.context)
    eval_bt = tokens(ev.batch_size, length)
    prefix_bt = whole(ev.draws, 1 + ev.prefix_tokens * ev.repeats)
    copy_bt = whole(ev.draws, 1 + ev.prefix_tokens)
    prev_bt = whole(ev.batch_size, length)
    prev_lh = jax.ShapeDtypeStruct((m.n_layers, m.n_heads), jnp.float32, sharding=rep)
    out = [Program("per-token losses", "losses", shape(eval_bt),
                   lambda: evaluate._batch_losses.lower(model, params, eval_bt))]
    # The random-token measures need their sequences to fit the context (the measures refuse them otherwise).
    if prefix_bt.shape[1] <= m.context:
        out.append(Program("prefix matching", "heads", shape(prefix_bt),
                           lambda: heads._prefix_matching.lower(model, params, prefix_bt, 1 + ev.prefix_tokens)))
    if copy_bt.shape[1] <= m.context:
        out.append(Program("copying evaluator", "heads", shape(copy_bt),
                           lambda: heads._copying.lower(model, params, copy_bt)))
    out += [
        Program("previous token", "heads", shape(prev_bt), lambda: heads._previous_token.lower(model, params, prev_bt)),
        Program("QK trace", "heads", "weights", lambda: heads._qk_traces.lower(params, m.layer_norm, prev_lh)),
        Program("OV copying circuits", "heads", "weights", lambda: heads._ov_circuits.lower(params, m.layer_norm)),
    ]
    if m.n_layers > 1:  # analyze stores composition scores for models of 2 or more layers
        out += [Program("composition scores", "composition", "weights",
                        lambda: jax.jit(_composition, static_argnums=1).lower(params, m)),
                Program("alignment ceiling", "composition", "weights",
                        lambda: jax.jit(_alignment, static_argnums=1).lower(params, m))]
    lanes = lanes or m.n_heads
    # As ablation.ablate_eval_set splits the eval set for every head's lane and the induction heads' one.
    lane_bt = whole(max(1, ev.batch_size // (m.n_layers * m.n_heads + 1)), length)
    return out + _ablation(model, params, lane_bt, mesh, lanes)


def _ablation(model, params, tokens_bt, mesh: Mesh, lanes: int) -> list[Program]:
    """The clean run and one lane group of `ablate`'s default (pattern-preserving, total path) ablation, for
    the lanes that mask layer-0 heads. The group reads the clean run's outputs where the compiled clean run leaves
    them."""
    cfg = model.cfg
    path, kind = "total", "pattern"
    clean = ablation.clean_run.lower(model, params, tokens_bt, path)

    def placed(lowered):
        out = lowered.compile().output_shardings
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), lowered.out_info, out)

    def lane_group():
        _, patterns, resid, extra = placed(clean)
        # As ablation.ablated_losses: an attention-only model's layer-0 lanes start at layer 1, with the masked
        # heads' results taken out of the stream leaving layer 0.
        start, removed = (1, (0,)) if "head_results" in extra and not cfg.d_mlp else (0, ())
        results = jax.ShapeDtypeStruct((1, *extra["head_results"].shape[1:]), extra["head_results"].dtype,
                                       sharding=extra["head_results"].sharding) if removed else None
        spec = tuple(getattr(resid.sharding, "spec", ()))[1:]  # resid[start], sliced from the clean run's stream
        resid_btd = jax.ShapeDtypeStruct(resid.shape[1:], resid.dtype, sharding=NamedSharding(mesh, P(*spec)))
        # Lanes whole on every device: a sharded placement's lanes (placement.Placement.lanes).
        masks = jax.ShapeDtypeStruct((lanes, cfg.n_layers, cfg.n_heads), jnp.float32, sharding=sharding.replicated(mesh))
        return ablation._lanes.lower(model, params, tokens_bt, masks, resid_btd, results, patterns, extra,
                                     first_layer=start, removed_layers=removed, kind=kind, path=path)

    b, t = tokens_bt.shape
    return [Program("ablation clean run", "ablation", f"{b} x {t} tokens", lambda: clean),
            Program("ablation lane group", "ablation", f"{lanes} lanes x {b} x {t} tokens", lane_group)]
