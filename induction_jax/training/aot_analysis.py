"""The analysis programs of one snapshot, lowered ahead of time for a mesh (`python -m induction_jax.plan`).

Each program is one jitted computation of what `analyze` and `ablate` run per snapshot, lowered on
ShapeDtypeStructs that carry shardings, so nothing is allocated: parameters sharded as in training
(`sharding.param_shardings`) and every token batch split over the batch axes (`sharding.batch_sharding`), its
rows rounded up to a multiple of their size (the analysis pads a batch and drops the padding rows). The mesh is
set while lowering, so the model takes the code path of the mesh's platform (a TPU slice's, compiled from a CPU
host with libtpu).

- per-token losses: evaluate's forward, `eval.batch_size` windows of `data.eval_length` tokens;
- head measures (heads.MEASURES): prefix matching and the copying evaluator on their `eval.draws` random
  sequences, previous token on the eval batch, and the two weight-only measures in the device forms below;
- composition: the Q/K/V scores and their alignment ceilings (weights only);
- ablation: the clean run and one lane group, one vmapped call of `ablation._lanes` for `lanes` lanes whose first
  masked head is in layer 0 (the group that runs every layer), on `eval.batch_size // lanes` windows (at least
  one per batch shard), as `ablation.ablate_eval_set` splits the eval set.

`heads.qk_trace` runs eagerly, one layer at a time, and `heads.ov_circuits` in float64 numpy on the host, so neither
is one program: `qk_trace` and `ov_circuits` here are their device forms (float32, the same d_head x d_head and
d_model x d_model products, every layer in one program, no vocab x vocab array), checked against them in
tests/test_scale.py.
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
from ..model.model import stacked
from . import sharding

# Table columns the programs are grouped into (docs/scale.md's analysis table).
GROUPS = ("losses", "heads", "composition", "ablation")


@dataclass(frozen=True)
class Program:
    name: str
    group: str  # one of GROUPS
    inputs: str  # what it reads, e.g. "64 x 512 tokens" or "weights"
    lower: Callable[[], object]  # lowers the program (call with the mesh set); returns jax's Lowered


def ov_circuits(params: dict, cfg: ModelConfig) -> jax.Array:
    """float32 [L, H, E, E]: heads.ov_circuits as one device program. The vocab only ever meets d_model: U_c E_c
    is [D, V] x [V, D], summed over a vocab axis that a mesh may shard."""
    w_e_VD, w_u_DV = params["W_E"].astype(jnp.float32), params["W_U"].astype(jnp.float32)
    w_u_DV = w_u_DV - w_u_DV.mean(axis=1, keepdims=True)
    d = w_e_VD.shape[1]
    if cfg.layer_norm:
        w_e_VD = w_e_VD - w_e_VD.mean(axis=1, keepdims=True)
        out_DD = (jnp.eye(d) - 1.0 / d) * params["ln_final"]["scale"].astype(jnp.float32)[None, :]
        gamma_LD = stacked(params, "ln1", "scale").astype(jnp.float32)
    else:
        out_DD = jnp.eye(d)
        gamma_LD = jnp.ones((cfg.n_layers, d), jnp.float32)
    loop_DD = out_DD @ (w_u_DV @ w_e_VD)
    w_o_LHED = stacked(params, "attn", "W_O").astype(jnp.float32)
    w_v_LDHE = stacked(params, "attn", "W_V").astype(jnp.float32)
    return jnp.einsum("lhed,dc,lc,lchf->lhef", w_o_LHED, loop_DD, gamma_LD, w_v_LDHE)


def qk_trace(params: dict, cfg: ModelConfig, prev_LH: jax.Array) -> jax.Array:
    """float32 [L, H]: heads.qk_trace as one device program (NaN for layer 0), with its d_head x d_head products
    formed for one (reader layer, writer layer) pair at a time, so that memory does not grow with depth: the
    measure's [H, layer x H, E, E] products of the last layer are 4 GiB each for full_40l."""
    n_layers = cfg.n_layers
    w_e_VD = params["W_E"].astype(jnp.float32)
    gram_DD = w_e_VD.T @ w_e_VD
    w_q_LDHE, w_k_LDHE = heads.folded(params, cfg, "W_Q"), heads.folded(params, cfg, "W_K")
    w_v_LDGF = heads.folded(params, cfg, "W_V")
    w_o_LGFD = stacked(params, "attn", "W_O").astype(jnp.float32)
    gq_LDHE = jnp.einsum("dc,lche->ldhe", gram_DD, w_q_LDHE)

    def reader(args):
        k_DHE, gq_DHE = args

        def writer(w_args):
            o_GFD, v_DGF = w_args
            p1_HGEF = jnp.einsum("dhe,gfd->hgef", k_DHE, o_GFD)
            p2_GHFE = jnp.einsum("dgf,dhe->ghfe", v_DGF, gq_DHE)
            return jnp.einsum("hgef,ghfe->hg", p1_HGEF, p2_GHFE)

        return jax.lax.map(writer, (w_o_LGFD, w_v_LDGF))

    trace_LMHG = jax.lax.map(reader, (w_k_LDHE, gq_LDHE))  # reader layer l, writer layer m
    earlier_LM = jnp.arange(n_layers)[:, None] > jnp.arange(n_layers)[None, :]
    out_LH = jnp.einsum("lmhg,mg->lh", jnp.where(earlier_LM[:, :, None, None], trace_LMHG, 0.0),
                        prev_LH.astype(jnp.float32))
    return jnp.where(jnp.arange(n_layers)[:, None] == 0, jnp.nan, out_LH)


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

    def shape(t) -> str:
        return f"{t.shape[0]} x {t.shape[1]} tokens"

    eval_bt = tokens(ev.batch_size, min(cfg.data.eval_length, m.context))
    prefix_bt = tokens(ev.draws, 1 + ev.prefix_tokens * ev.repeats)
    copy_bt = tokens(ev.draws, 1 + ev.prefix_tokens)
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
        Program("previous token", "heads", shape(eval_bt), lambda: heads._previous_token.lower(model, params, eval_bt)),
        Program("QK trace", "heads", "weights", lambda: jax.jit(qk_trace, static_argnums=1).lower(params, m, prev_lh)),
        Program("OV copying circuits", "heads", "weights",
                lambda: jax.jit(ov_circuits, static_argnums=1).lower(params, m)),
    ]
    if m.n_layers > 1:  # analyze stores composition scores for models of 2 or more layers
        out += [Program("composition scores", "composition", "weights",
                        lambda: jax.jit(_composition, static_argnums=1).lower(params, m)),
                Program("alignment ceiling", "composition", "weights",
                        lambda: jax.jit(_alignment, static_argnums=1).lower(params, m))]
    lanes = lanes or m.n_heads
    # As ablation.ablate_eval_set splits the eval set: lanes x sequences near one eval batch.
    lane_bt = tokens(max(1, ev.batch_size // lanes), eval_bt.shape[1])
    return out + _ablation(model, params, lane_bt, mesh, lanes)


def _ablation(model, params, tokens_bt, mesh: Mesh, lanes: int) -> list[Program]:
    """The clean run and one lane group of `ablate`'s default (pattern-preserving, total path) ablation, for
    the lanes that mask layer-0 heads. The group reads the clean run's outputs, split over the batch axes as the
    model pins its activations."""
    cfg = model.cfg
    path, kind = "total", "pattern"
    _, patterns, resid, extra = jax.eval_shape(lambda p, t: ablation.clean_run(model, p, t, path), params, tokens_bt)

    def on_batch(a, axis: int):
        spec = P(*([None] * axis), sharding.BATCH)
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))

    patterns = on_batch(patterns, 1)
    extra = jax.tree.map(lambda a: on_batch(a, 1), extra)
    # As ablation.ablated_losses: an attention-only model's layer-0 lanes start at layer 1, with the masked
    # heads' results taken out of the stream leaving layer 0.
    start, removed = (1, (0,)) if "head_results" in extra and not cfg.d_mlp else (0, ())
    resid_btd = on_batch(jax.ShapeDtypeStruct(resid.shape[1:], resid.dtype), 0)
    results = (on_batch(jax.ShapeDtypeStruct((1, *extra["head_results"].shape[1:]), extra["head_results"].dtype), 1)
               if removed else None)
    masks = jax.ShapeDtypeStruct((lanes, cfg.n_layers, cfg.n_heads), jnp.float32, sharding=sharding.replicated(mesh))
    b, t = tokens_bt.shape
    return [
        Program("ablation clean run", "ablation", f"{b} x {t} tokens",
                lambda: ablation.clean_run.lower(model, params, tokens_bt, path)),
        Program("ablation lane group", "ablation", f"{lanes} lanes x {b} x {t} tokens",
                lambda: ablation._lanes.lower(model, params, tokens_bt, masks, resid_btd, results, patterns, extra,
                                              first_layer=start, removed_layers=removed, kind=kind, path=path)),
    ]
