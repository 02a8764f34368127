"""The transformer families of the paper, in flax.linen with pure init/apply.

`Transformer.__call__(tokens_BT, head_mask=None, patterns=None, capture=())`:
- `head_mask_LH` multiplies each head's result vector (its attention output after W_O) before the residual add;
- `patterns_LBHQK` replaces every attention pattern (pattern-preserving ablations freeze them this way);
- `capture` names intermediates to return: "patterns" [L,B,H,Q,K], "head_results" [L,B,T,H,D],
  "resid" [L+1,B,T,D] (the residual stream entering each layer, then the final one).
Returns logits_BTV, or (logits_BTV, captured dict) when `capture` is non-empty.

Positions: "shortformer" adds a table to the LayerNorm'd query and key inputs only (as TransformerLens's
`shortformer`), so nothing positional ever enters the residual stream or the value path; "learned" adds it to the
residual stream; "rotary" rotates queries and keys; "none" has no positional signal.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..base.config import ModelConfig
from . import attention
from .crossentropy import chunked_cross_entropy, unembed_cross_entropy

# attn_inputs: what each layer's heads read, ln1's output (the residual stream itself without LayerNorm).
CAPTURES = ("patterns", "head_results", "resid", "ln_scales", "attn_inputs")
# Mesh axes that split the batch (training/sharding.py builds meshes with these names); activations are
# constrained to them.
BATCH_AXES = ("data", "fsdp")


def _dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def sinusoidal_table(context: int, d_model: int) -> np.ndarray:
    pos = np.arange(context)[:, None]
    inv = 1.0 / (10_000 ** (np.arange(0, d_model, 2) / d_model))
    table = np.zeros((context, d_model), np.float32)
    table[:, 0::2] = np.sin(pos * inv)
    table[:, 1::2] = np.cos(pos * inv)[:, : d_model // 2]
    return table


def rotate(x_BHTd: jax.Array) -> jax.Array:
    """Rotary position embedding over the two halves of d_head (sequence on axis -2)."""
    t, d = x_BHTd.shape[-2], x_BHTd.shape[-1]
    inv = 1.0 / (10_000 ** (jnp.arange(0, d // 2) / (d // 2)))
    ang_TF = jnp.arange(t)[:, None] * inv[None, :]
    cos, sin = jnp.cos(ang_TF), jnp.sin(ang_TF)
    a, b = x_BHTd[..., : d // 2], x_BHTd[..., d // 2:]
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).astype(x_BHTd.dtype)


def head_windows(cfg: ModelConfig, t: int) -> tuple[int, ...]:
    """Each head's attention window: dense heads see all t keys, the last `local_heads` see `local_window`."""
    return tuple(cfg.local_window if h >= cfg.n_heads - cfg.local_heads else t for h in range(cfg.n_heads))


def shard_batch(x: jax.Array) -> jax.Array:
    """Pins an activation's leading (batch) dimension to the mesh's BATCH_AXES, the rest unsharded.

    Without it, XLA's propagation may follow the FSDP-sharded weights and replicate activations across the fsdp
    axis (docs/method.md §7: 4.5x larger temporaries). A no-op without a mesh in context (`jax.set_mesh`), when the
    mesh lacks those axes, or when the batch does not divide over them (e.g. a small probe batch). Under
    `jax.vmap` the constraint applies per lane, leaving the mapped axis free.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    ways = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if ways == 1 or x.shape[0] % ways:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(BATCH_AXES, *([None] * (x.ndim - 1))))


def _param(module: nn.Module, name: str, shape: Sequence[int], axes: tuple, init):
    cfg = module.cfg
    return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), _dtype(cfg.param_dtype))


class LayerNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, inv_sigma_BT=None):
        """(normalised x, 1/sigma [B, T]). A given `inv_sigma_BT` replaces the computed one: a frozen LayerNorm,
        which is affine in x (the `frozen_ln` ablation path). Without LayerNorm: (x, None)."""
        if not self.cfg.layer_norm:
            return x_BTD, None
        x = x_BTD.astype(jnp.float32)
        x = x - x.mean(-1, keepdims=True)
        if inv_sigma_BT is None:
            inv_sigma_BT = jax.lax.rsqrt((x * x).mean(-1) + self.cfg.ln_eps)
        x = x * inv_sigma_BT[..., None]
        w = _param(self, "scale", (self.cfg.d_model,), ("embed",), nn.initializers.ones)
        b = _param(self, "bias", (self.cfg.d_model,), ("embed",), nn.initializers.zeros)
        return (x * w + b).astype(_dtype(self.cfg.dtype)), inv_sigma_BT


def _heads_major(x_BTD: jax.Array, w_DHd: jax.Array) -> jax.Array:
    """[B, H, T, d] projections. On CPU, one [B*T, D] x [D, H*d] matmul and a transpose of whole d-rows: for
    "btd,dhe->bhte" XLA:CPU chose an [H*d, B*T] product and a transpose that reads it column by column.
    Elsewhere the einsum: on a sharded TPU mesh the reshapes raised libtpu's per-chip temporaries for full_16l
    on v5e:8x8 from 8.32 to 14.69 GiB."""
    if attention.platform() != "cpu":
        return jnp.einsum("btd,dhe->bhte", x_BTD, w_DHd)
    b, t, d = x_BTD.shape
    _, h, dh = w_DHd.shape
    y_BTHd = (x_BTD.reshape(b * t, d) @ w_DHd.reshape(d, h * dh)).reshape(b, t, h, dh)
    return y_BTHd.transpose(0, 2, 1, 3)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, pos_TD, head_mask_H, pattern_BHQK, want_results: bool, fused: bool = False):
        """(output [B, T, D], pattern [B, H, Q, K] (None from the fused path), head results or None)."""
        cfg = self.cfg
        d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head
        cdt = _dtype(cfg.dtype)
        init = nn.initializers.normal(cfg.init_std)
        w_q = _param(self, "W_Q", (d, h, dh), ("embed", "heads", "head_dim"), init).astype(cdt)
        w_k = _param(self, "W_K", (d, h, dh), ("embed", "heads", "head_dim"), init).astype(cdt)
        w_v = _param(self, "W_V", (d, h, dh), ("embed", "heads", "head_dim"), init).astype(cdt)
        w_o = _param(self, "W_O", (h, dh, d), ("heads", "head_dim", "embed"), init).astype(cdt)

        qk_in_BTD = x_BTD if pos_TD is None else x_BTD + pos_TD[None].astype(cdt)
        if cfg.smeared_key:
            s0 = math.log(cfg.smear_init / (1 - cfg.smear_init))
            alpha_H = _param(self, "smear", (h,), ("heads",), nn.initializers.constant(s0))
        # Heads-major [B, H, T, d] layout: scores and the weighted sum are plain batched matmuls, which XLA's CPU
        # backend runs ~3x faster than the same contractions with the head axis in the middle.
        v_BHTd = _heads_major(x_BTD, w_v)
        windows = head_windows(cfg, x_BTD.shape[1])
        q_BHTd = k_BHTd = None  # a given pattern needs neither
        if pattern_BHQK is None:
            q_BHTd = _heads_major(qk_in_BTD, w_q)
            k_BHTd = _heads_major(qk_in_BTD, w_k)
            if cfg.positions == "rotary":
                q_BHTd, k_BHTd = rotate(q_BHTd), rotate(k_BHTd)
            if cfg.smeared_key:
                s = jax.nn.sigmoid(alpha_H.astype(jnp.float32)).astype(cdt)[None, :, None, None]
                # j = 0 has no predecessor: pairing it with itself leaves it unmixed.
                prev_BHTd = jnp.concatenate([k_BHTd[:, :, :1], k_BHTd[:, :, :-1]], axis=2)
                k_BHTd = s * k_BHTd + (1 - s) * prev_BHTd
        if fused:
            # The 1/sqrt(d_head) scale goes on the [T, d] queries rather than the [T, T] scores.
            q_BHTd = q_BHTd * jnp.asarray(1 / math.sqrt(dh), cdt)
            z_BHTd = attention.fused(q_BHTd, k_BHTd, v_BHTd, windows, cfg.attention_block, cfg.attention_kernel,
                                     BATCH_AXES)
        else:
            z_BHTd, pattern_BHQK = attention.explicit(q_BHTd, k_BHTd, v_BHTd, windows, pattern_BHQK)
        if head_mask_H is not None:
            z_BHTd = z_BHTd * head_mask_H.astype(cdt)[None, :, None, None]
        out_BTD = jnp.einsum("bhqe,hed->bqd", z_BHTd, w_o)
        results_BTHD = None
        if want_results:
            # One [B*T, d] x [d, D] matmul per head: XLA:CPU ran the same contraction as one "bhqe,hed->bqhd"
            # einsum 3x slower, and feeding the layers' stack made that 2x worse again.
            b, t = z_BHTd.shape[0], z_BHTd.shape[2]
            per_head = jax.vmap(lambda z_BTd, w_dD: z_BTd.reshape(b * t, dh) @ w_dD, in_axes=(1, 0), out_axes=1)
            results_BTHD = per_head(z_BHTd, w_o).reshape(b, t, h, d)
        return out_BTD, pattern_BHQK, results_BTHD


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        cdt = _dtype(cfg.dtype)
        init = nn.initializers.normal(cfg.init_std)
        w_in = _param(self, "W_in", (cfg.d_model, cfg.d_mlp), ("embed", "mlp"), init).astype(cdt)
        b_in = _param(self, "b_in", (cfg.d_mlp,), ("mlp",), nn.initializers.zeros).astype(cdt)
        w_out = _param(self, "W_out", (cfg.d_mlp, cfg.d_model), ("mlp", "embed"), init).astype(cdt)
        b_out = _param(self, "b_out", (cfg.d_model,), ("embed",), nn.initializers.zeros).astype(cdt)
        hidden = nn.gelu(jnp.einsum("btd,dm->btm", x_BTD, w_in) + b_in)
        return jnp.einsum("btm,md->btd", hidden, w_out) + b_out


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, pos_TD, head_mask_H, pattern_BHQK, want_results: bool, ln_scales=(None, None),
                 fused: bool = False):
        """(x after the block, pattern, head results, (ln1's, ln2's 1/sigma), the heads' input ln1(x));
        `ln_scales` freezes the LayerNorms' normalisation."""
        ln1_BTD, s1_BT = LayerNorm(self.cfg, name="ln1")(x_BTD, ln_scales[0])
        attn_out, pattern, results = Attention(self.cfg, name="attn")(ln1_BTD, pos_TD, head_mask_H, pattern_BHQK,
                                                                      want_results, fused)
        x_BTD = x_BTD + attn_out
        s2_BT = None
        if self.cfg.d_mlp:
            ln2_BTD, s2_BT = LayerNorm(self.cfg, name="ln2")(x_BTD, ln_scales[1])
            x_BTD = x_BTD + MLP(self.cfg, name="mlp")(ln2_BTD)
        return x_BTD, pattern, results, (s1_BT, s2_BT), ln1_BTD


# model.remat: which of a block's intermediates the backward pass keeps; the rest it recomputes from the block's
# input. "dots" keeps the outputs of the weight matmuls (the projections, the MLP), which are costly to redo and
# small, and recomputes the attention and the elementwise work.
REMAT_POLICIES = {"block": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _block_class(remat: str):
    if remat == "none":
        return Block
    # Block.__call__(self, x, pos, head_mask, pattern, want_results, ln_scales, fused): the flags are static.
    return nn.remat(Block, policy=REMAT_POLICIES[remat], static_argnums=(5, 7))


class Transformer(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        init = nn.initializers.normal(cfg.init_std)
        self.W_E = _param(self, "W_E", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), init)
        if cfg.positions in ("shortformer", "learned") and cfg.pos_table == "learned":
            self.W_pos = _param(self, "W_pos", (cfg.context, cfg.d_model), (None, "embed"), init)
        self.blocks = [_block_class(cfg.remat)(cfg, name=f"block_{i}") for i in range(cfg.n_layers)]
        self.ln_final = LayerNorm(cfg, name="ln_final")
        self.W_U = _param(self, "W_U", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), init)

    def positions(self, t: int):
        """The table added to the query/key inputs of every layer (shortformer), or None."""
        cfg = self.cfg
        if cfg.positions not in ("shortformer", "learned"):
            return None
        if cfg.pos_table == "sinusoidal":
            return jnp.asarray(sinusoidal_table(cfg.context, cfg.d_model))[:t]
        return self.W_pos[:t]

    def embed(self, tokens_BT):
        """The residual stream entering layer 0."""
        cfg = self.cfg
        t = tokens_BT.shape[1]
        if t > cfg.context:
            raise ValueError(f"tokens: sequence length {t} exceeds model.context={cfg.context}")
        x_BTD = jnp.take(self.W_E, tokens_BT, axis=0).astype(_dtype(cfg.dtype))
        if cfg.positions == "learned":
            x_BTD = x_BTD + self.positions(t)[None].astype(x_BTD.dtype)
        return shard_batch(x_BTD)

    def __call__(self, tokens_BT, head_mask=None, patterns=None, capture: Sequence[str] = (), ln_scales=None):
        return self.run_from(0, self.embed(tokens_BT), head_mask, patterns, capture, ln_scales)

    def run_from(self, first_layer: int, x_BTD, head_mask=None, patterns=None, capture: Sequence[str] = (),
                 ln_scales=None):
        """Layers first_layer.. on the residual stream x_BTD entering first_layer, then the unembedding.

        head_mask and patterns are indexed by absolute layer (they cover all n_layers); captures cover the layers
        run. Ablations use this to skip the layers before the ablated head, which an ablation cannot change.
        `ln_scales` (what `capture=("ln_scales",)` returns from a full run: {"ln1": [L, B, T], "ln2": [L, B, T]
        with MLPs, "ln_final": [B, T]} of 1/sigma) freezes every LayerNorm's normalisation at those values.
        """
        cfg = self.cfg
        unknown = set(capture) - set(CAPTURES)
        if unknown:
            raise ValueError(f"capture: unknown {sorted(unknown)}; choose from {CAPTURES}")
        x_BTD, pats, results, resid, scales, inputs = self._layers(first_layer, x_BTD, head_mask, patterns,
                                                                   capture, ln_scales)
        want_results = "head_results" in capture
        logits_BTV, final_scale = self.unembed(x_BTD, None if ln_scales is None else ln_scales["ln_final"])
        if not capture:
            return logits_BTV
        out = {}
        if "patterns" in capture:
            out["patterns"] = jnp.stack(pats)
        if want_results:
            out["head_results"] = jnp.stack(results)
        if "resid" in capture:
            out["resid"] = jnp.stack(resid)
        if "attn_inputs" in capture:
            out["attn_inputs"] = jnp.stack(inputs)
        if "ln_scales" in capture and cfg.layer_norm:
            out["ln_scales"] = {"ln1": jnp.stack([s[0] for s in scales]), "ln_final": final_scale}
            if cfg.d_mlp:
                out["ln_scales"]["ln2"] = jnp.stack([s[1] for s in scales])
        return logits_BTV, out

    def _layers(self, first_layer: int, x_BTD, head_mask=None, patterns=None, capture: Sequence[str] = (),
                ln_scales=None, fused: bool = False):
        """(final residual stream, then per layer run: patterns, head results, residual inputs + final, LN scales,
        the heads' inputs)."""
        cfg = self.cfg
        pos_TD = self.positions(x_BTD.shape[1]) if cfg.positions == "shortformer" else None
        pats, results, resid, scales, inputs = [], [], [], [], []
        frozen_ln1 = frozen_ln2 = [None] * cfg.n_layers
        if ln_scales is not None:
            frozen_ln1, frozen_ln2 = ln_scales["ln1"], ln_scales.get("ln2", frozen_ln2)
        for layer in range(first_layer, cfg.n_layers):
            resid.append(x_BTD)
            frozen = (frozen_ln1[layer], frozen_ln2[layer])
            x_BTD, pat, res, scale, attn_in = self.blocks[layer](
                x_BTD, pos_TD,
                None if head_mask is None else head_mask[layer],
                None if patterns is None else patterns[layer],
                "head_results" in capture, frozen, fused)
            x_BTD = shard_batch(x_BTD)
            pats.append(pat)
            results.append(res)
            scales.append(scale)
            inputs.append(attn_in)
        resid.append(x_BTD)
        return x_BTD, pats, results, resid, scales, inputs

    def losses(self, tokens_BT):
        """Per-token cross-entropy [B, T-1], equal to `crossentropy.token_losses(model(tokens), tokens)`: the
        training loss.

        It runs the fused attention path (model.attention=fused): no pattern is materialised, so everything that
        reads patterns (analysis, ablations, captures) calls the model itself, on the explicit path. The last
        position predicts nothing, so its logits are never formed, and `cross_entropy`'s backward is one pass.
        """
        x_BTD = self._layers(0, self.embed(tokens_BT), fused=self.cfg.attention == "fused")[0]
        x_BTD = self.ln_final(x_BTD[:, :-1])[0]
        if not self.cfg.loss_chunk:
            return unembed_cross_entropy(x_BTD, self.W_U.astype(x_BTD.dtype), tokens_BT[:, 1:])
        return chunked_cross_entropy(x_BTD, self.W_U.astype(x_BTD.dtype), tokens_BT[:, 1:], self.cfg.loss_chunk)

    def unembed(self, x_BTD, inv_sigma_BT=None):
        """(logits [B, T, V] in float32, ln_final's 1/sigma [B, T]); `inv_sigma_BT` freezes that normalisation."""
        x_BTD, inv_sigma_BT = self.ln_final(x_BTD, inv_sigma_BT)
        return jnp.einsum("btd,dv->btv", x_BTD, self.W_U.astype(x_BTD.dtype)).astype(jnp.float32), inv_sigma_BT


def make(cfg: ModelConfig) -> Transformer:
    return Transformer(cfg)


def stacked(params: dict, module: str, name: str) -> jax.Array:
    """One weight of every block stacked on a leading layer axis, e.g. ("attn", "W_V") -> [L, D, H, E] and
    ("ln1", "scale") -> [L, D]: the per-layer weights as the head evaluators read them."""
    n_layers = sum(key.startswith("block_") for key in params)
    return jnp.stack([params[f"block_{layer}"][module][name] for layer in range(n_layers)])


def _abstract_boxed(cfg: ModelConfig):
    tokens = jax.ShapeDtypeStruct((1, min(cfg.context, 8)), jnp.int32)
    return jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens))["params"]


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Parameters as plain arrays (logical axis boxes removed)."""
    tokens = jnp.zeros((1, min(cfg.context, 8)), jnp.int32)
    return nn.unbox(Transformer(cfg).init(rng, tokens)["params"])


def abstract_params(cfg: ModelConfig) -> dict:
    """ShapeDtypeStructs of the parameters, computed without allocating them."""
    return nn.unbox(_abstract_boxed(cfg))


def logical_axes(cfg: ModelConfig) -> dict:
    """A PartitionSpec of logical axis names per parameter (embed, heads, head_dim, mlp, vocab)."""
    return nn.get_partition_spec(_abstract_boxed(cfg))


def count_params(cfg: ModelConfig, *, embedding: bool = True) -> int:
    """Parameter count from shapes alone; `embedding=False` leaves out W_E, W_U and W_pos (the paper's count)."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]
    total = 0
    for path, leaf in flat:
        name = jax.tree_util.keystr(path)
        if not embedding and any(k in name for k in ("W_E", "W_U", "W_pos")):
            continue
        total += int(np.prod(leaf.shape))
    return total
