"""Q-, K- and V-composition scores between every pair of heads in different layers, and their random baseline
(Elhage et al. 2021; docs/method.md §1.7).

Row-vector convention, as TransformerLens's: a head's OV circuit is OV = W_V W_O and its QK circuit
QK = W_Q W_K^T, both d_model x d_model. For a head h1 in an earlier layer and h2 in a later one:
    Q: |OV1 QK2|_F,   K: |OV1 QK2^T|_F,   V: |OV1 OV2|_F,   each divided by the two circuits' own norms,
so a score is in [0, 1]: 1 when what h1 writes lies entirely in the one subspace h2 reads, 0 when h2 reads
nothing of it. (The column-convention forms of docs/method.md §1.7 are these transposed; the Frobenius norm does
not see a transpose.)

LayerNorm is folded as TransformerLens's fold_ln and center_writing_weights do: each layer's ln1 scale and
centring go into the W_Q, W_K and W_V that read it (heads.folded), and W_O is centred over d_model (what a head
writes is read only through a LayerNorm's centring). Biases, positions (shortformer table, rotary) and smeared
keys are not token circuits and are left out.

Nothing d_model x d_model is formed either: with OV1 = V1 O1 and a right-hand circuit X2 Y2,
|V1 (O1 X2) Y2|_F^2 = sum((V1^T V1) (O1 X2) (Y2 Y2^T) * (O1 X2)), so each pair costs d_head x d_head products.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..base.config import ModelConfig
from ..model.model import stacked
from .evaluate import host
from .heads import folded

MODES = ("q", "k", "v")
BASELINE_DRAWS = 256


def _factors(params: dict, cfg: ModelConfig) -> dict[str, jax.Array]:
    """Each head's circuit factors, heads of all layers on one axis g = layer * H + head: Q, K, V [G, D, E] (ln1
    folded in) and O [G, E, D] (centred over D where the model has LayerNorm)."""
    def flat_read(name):
        w_LDHE = folded(params, cfg, name)
        return jnp.moveaxis(w_LDHE, 2, 1).reshape(-1, w_LDHE.shape[1], w_LDHE.shape[3])

    w_o_LHED = stacked(params, "attn", "W_O").astype(jnp.float32)
    if cfg.layer_norm:
        w_o_LHED = w_o_LHED - w_o_LHED.mean(axis=-1, keepdims=True)
    return {"Q": flat_read("W_Q"), "K": flat_read("W_K"), "V": flat_read("W_V"),
            "O": w_o_LHED.reshape(-1, *w_o_LHED.shape[2:])}


def _gram(a_GDE):
    return jnp.einsum("gde,gdf->gef", a_GDE, a_GDE)


@functools.partial(jax.jit, static_argnames=("n_heads",))
def _scores(q_GDE, k_GDE, v_GDE, o_GED, n_heads: int):
    """[3, G, G] scores of every (writer g1, reader g2) pair in the modes' order; rows are writers."""
    gram_v, gram_q, gram_k = _gram(v_GDE), _gram(q_GDE), _gram(k_GDE)
    gram_o = jnp.einsum("ged,gfd->gef", o_GED, o_GED)
    # |AB|_F^2 for a circuit A B with A [D, E], B [E, D]: sum((A^T A) * (B B^T)).
    ov_norm_G = jnp.sqrt(jnp.einsum("gef,gef->g", gram_v, gram_o))
    qk_norm_G = jnp.sqrt(jnp.einsum("gef,gef->g", gram_q, gram_k))
    # Right-hand circuits X Y of the reader: Q: Q K^T; K: K Q^T; V: V O (Y Y^T for Y = K^T is K^T K, etc.).
    left = {"q": q_GDE, "k": k_GDE, "v": v_GDE}
    right_gram = {"q": gram_k, "k": gram_q, "v": gram_o}
    right_norm = {"q": qk_norm_G, "k": qk_norm_G, "v": ov_norm_G}

    def reader_block(args):
        """Scores of every writer against one layer's readers (fixed shapes, so lax.map compiles it once)."""
        x_HDE, gram_HEE, norm_H = args
        m_GHEF = jnp.einsum("ged,hdf->ghef", o_GED, x_HDE)
        t_GHEF = jnp.einsum("gea,ghab,hbf->ghef", gram_v, m_GHEF, gram_HEE)
        norm2_GH = jnp.einsum("ghef,ghef->gh", m_GHEF, t_GHEF)
        return jnp.sqrt(jnp.maximum(norm2_GH, 0.0)) / (ov_norm_G[:, None] * norm_H[None, :])

    out = []
    for mode in MODES:
        n_layers = left[mode].shape[0] // n_heads
        blocks = (left[mode].reshape(n_layers, n_heads, *left[mode].shape[1:]),
                  right_gram[mode].reshape(n_layers, n_heads, *right_gram[mode].shape[1:]),
                  right_norm[mode].reshape(n_layers, n_heads))
        scores_LGH = jax.lax.map(reader_block, blocks)
        out.append(jnp.moveaxis(scores_LGH, 0, 1).reshape(o_GED.shape[0], -1))
    return jnp.stack(out)


def composition_scores(params: dict, model_cfg: ModelConfig) -> np.ndarray:
    """float32 [3, L, H, L, H]: scores[m, l1, h1, l2, h2] is head (l1, h1)'s composition into head (l2, h2) in
    mode MODES[m] (Q, K, V), NaN unless l1 < l2. Weights only: no tokens, no forward pass."""
    f = _factors(params, model_cfg)
    n_layers, n_heads = model_cfg.n_layers, model_cfg.n_heads
    scores_MGG = host(_scores(f["Q"], f["K"], f["V"], f["O"], n_heads)).astype(np.float32)
    scores = scores_MGG.reshape(len(MODES), n_layers, n_heads, n_layers, n_heads)
    earlier_LL = np.arange(n_layers)[:, None] < np.arange(n_layers)[None, :]
    return np.where(earlier_LL[None, :, None, :, None], scores, np.nan).astype(np.float32)


@jax.jit
def _singular_values(q_GDE, k_GDE, v_GDE, o_GED):
    """(OV [G, k], QK [G, k]) singular values of every head's two circuits, descending, from k x k or k x D
    factors only (k = min(D, E)): with A = Q_A R_A, A B and R_A B share their singular values."""
    r_v = jnp.linalg.qr(v_GDE, mode="r")
    r_q, r_k = jnp.linalg.qr(q_GDE, mode="r"), jnp.linalg.qr(k_GDE, mode="r")
    ov = jnp.linalg.svd(jnp.einsum("gae,ged->gad", r_v, o_GED), compute_uv=False)
    qk = jnp.linalg.svd(jnp.einsum("gae,gbe->gab", r_q, r_k), compute_uv=False)
    return ov, qk


def alignment_ceiling(params: dict, model_cfg: ModelConfig) -> np.ndarray:
    """float32 [3, L, H, L, H], laid out as `composition_scores`: the largest score each pair could reach with its
    two circuits' singular values, were their singular directions aligned (von Neumann's trace inequality:
    |A B|_F^2 <= sum_i s_i(A)^2 s_i(B)^2, both descending). A circuit spread over k equal directions scores at
    most 1/sqrt(k), so a score is read against its ceiling as well as against the random baseline."""
    f = _factors(params, model_cfg)
    ov_GK, qk_GK = (host(a).astype(np.float64) for a in _singular_values(f["Q"], f["K"], f["V"], f["O"]))
    n_layers, n_heads = model_cfg.n_layers, model_cfg.n_heads

    def ceiling(writer_GK, reader_GK):
        w2, r2 = writer_GK ** 2, reader_GK ** 2
        return np.sqrt(w2 @ r2.T) / np.sqrt(np.outer(w2.sum(1), r2.sum(1)))

    readers = {"q": qk_GK, "k": qk_GK, "v": ov_GK}  # QK^T has QK's singular values
    out = np.stack([ceiling(ov_GK, readers[m]) for m in MODES]).reshape(len(MODES), n_layers, n_heads, n_layers,
                                                                          n_heads)
    earlier_LL = np.arange(n_layers)[:, None] < np.arange(n_layers)[None, :]
    return np.where(earlier_LL[None, :, None, :, None], out, np.nan).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("d_model", "d_head", "draws"))
def _baseline_draws(key, d_model: int, d_head: int, draws: int):
    a, b, c, d = jax.random.normal(key, (4, draws, d_model, d_head))
    # Writer A B^T and reader C D^T, each a rank-d_head d_model x d_model product of Gaussian factors.
    m_NEF = jnp.einsum("nde,ndf->nef", b, c)
    t_NEF = jnp.einsum("nea,nab,nbf->nef", _gram(a), m_NEF, _gram(d))
    norm2 = jnp.einsum("nef,nef->n", m_NEF, t_NEF)
    w_norm = jnp.sqrt(jnp.einsum("nef,nef->n", _gram(a), _gram(b)))
    r_norm = jnp.sqrt(jnp.einsum("nef,nef->n", _gram(c), _gram(d)))
    return jnp.sqrt(norm2) / (w_norm * r_norm)


@functools.lru_cache(maxsize=None)
def random_baseline(d_model: int, d_head: int, draws: int = BASELINE_DRAWS, seed: int = 0) -> float:
    """The score of two circuits with i.i.d. Gaussian factors of the heads' shapes ([d_model, d_head] times
    [d_head, d_model], so the model's rank), averaged over `draws`. The Q, K and V scores share it: all three
    compare two such products."""
    return float(np.mean(np.asarray(_baseline_draws(jax.random.PRNGKey(seed), d_model, d_head, draws))))


def strongest_partner(scores_LHLH: np.ndarray, layer: int, head: int) -> tuple[tuple[int, int], float] | None:
    """((l1, h1), score) of the writer below head (layer, head) with the largest score in one mode's
    [L, H, L, H] array; None for a layer-0 head."""
    column_LH = np.asarray(scores_LHLH)[:layer, :, layer, head]
    if column_LH.size == 0 or not np.isfinite(column_LH).any():
        return None
    l1, h1 = np.unravel_index(int(np.nanargmax(column_LH)), column_LH.shape)
    return (int(l1), int(h1)), float(column_LH[l1, h1])
