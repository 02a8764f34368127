"""Composition scores (induction_jax/composition.py) on hand-built attention-only models with known answers, against
a dense d_model x d_model reference with LayerNorm folded explicitly, and the random baseline against an
independent simulation."""

import dataclasses

import jax
import numpy as np
import pytest
from planted import planted_induction_model, random_model

from induction_jax.base.config import ModelConfig
from induction_jax.measures import composition
from induction_jax.model import model

MODE = {name: i for i, name in enumerate(composition.MODES)}  # q, k, v: the scores' leading axis
TOL = 1e-5


def two_layers(d_model: int, n_heads: int, head_dim: int, layer_norm: bool) -> ModelConfig:
    return ModelConfig(n_layers=2, d_model=d_model, n_heads=n_heads, head_dim=head_dim, d_mlp=0,
                       layer_norm=layer_norm, context=8, vocab_size=16)


def init64(cfg: ModelConfig) -> dict:
    """Init params as writable float64 numpy arrays: heads not overwritten keep init_std-scale random weights, so
    each known answer is read from one pair among unrelated ones."""
    return jax.tree.map(lambda a: np.array(a, np.float64), model.init_params(cfg, jax.random.key(0)))


def scores_of(params: dict, cfg: ModelConfig) -> np.ndarray:
    return composition.composition_scores(jax.tree.map(lambda a: np.asarray(a, np.float32), params), cfg)


def orthonormal(d: int, n: int, seed: int, zero_mean: bool) -> np.ndarray:
    """[d, n] orthonormal columns in general position (not axis-aligned). zero_mean: also orthogonal to the
    all-ones vector, so LayerNorm's centring (C = I - 11^T/d, folded into every read and write) leaves them as
    they are and the known answers hold with LayerNorm too."""
    g = np.random.default_rng(seed).normal(size=(d, n))
    if zero_mean:
        g -= g.mean(axis=0)
    return np.linalg.qr(g)[0]


def set_head(params: dict, layer: int, head: int, *, q=None, k=None, v=None, o=None):
    """Overwrites one head's W_Q/W_K/W_V [D, E] and W_O [E, D] (ours are [D, H, E] and [H, E, D])."""
    attn = params[f"block_{layer}"]["attn"]
    for name, w in (("W_Q", q), ("W_K", k), ("W_V", v)):
        if w is not None:
            attn[name][:, head] = w
    if o is not None:
        attn["W_O"][head] = o


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("reads_b", ["q", "k", "v"])
def test_rank_one_writer_scores_one_in_the_mode_that_reads_its_direction_and_zero_elsewhere(reads_b, layer_norm):
    """Head 0.0 writes one direction b (OV = a b^T). Head 1.0 reads b with one of its inputs and directions
    orthogonal to b with the other two, each circuit rank 1, so exactly that mode scores 1 and the others 0."""
    cfg = two_layers(d_model=16, n_heads=2, head_dim=4, layer_norm=layer_norm)
    params = init64(cfg)
    a, b, c, d, e = orthonormal(16, 5, seed=1, zero_mean=layer_norm).T
    unit = np.eye(4)
    set_head(params, 0, 0, v=np.outer(a, unit[0]), o=np.outer(unit[0], b))  # W_V W_O = a b^T
    # The reader's inputs: b for the mode under test, c / d (both orthogonal to b) for the others. Q and K share
    # head dim 1, so W_Q W_K^T = (read_q)(read_k)^T is rank 1 and non-zero; its OV writes e.
    read = {"q": c, "k": d, "v": d} | {reads_b: b}
    set_head(params, 1, 0, q=np.outer(read["q"], unit[1]), k=np.outer(read["k"], unit[1]),
             v=np.outer(read["v"], unit[2]), o=np.outer(unit[2], e))
    got = scores_of(params, cfg)[:, 0, 0, 1, 0]
    want = np.eye(3)[MODE[reads_b]]
    np.testing.assert_allclose(got, want, atol=TOL)


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("k", [1, 4, 16])
def test_aligned_rank_k_projections_score_one_over_sqrt_k_and_orthogonal_ones_zero(k, layer_norm):
    """Writer OV = P_U, the projection onto a k-dim subspace U; reader 1.0 has QK = QK^T = OV = P_U, reader 1.1
    the same on a subspace orthogonal to U. |P_U P_U|_F / |P_U|_F^2 = sqrt(k) / k; P_U P_U' = 0."""
    cfg = two_layers(d_model=64, n_heads=2, head_dim=16, layer_norm=layer_norm)
    params = init64(cfg)
    basis = orthonormal(64, 2 * k, seed=k, zero_mean=layer_norm)
    embed = np.eye(16)[:k]  # [k, E]: the subspace onto the first k head dims, so U S (U S)^T = U U^T
    for layer, head, u in ((0, 0, basis[:, :k]), (1, 0, basis[:, :k]), (1, 1, basis[:, k:])):
        set_head(params, layer, head, q=u @ embed, k=u @ embed, v=u @ embed, o=embed.T @ u.T)
    scores = scores_of(params, cfg)
    np.testing.assert_allclose(scores[:, 0, 0, 1, 0], np.full(3, 1 / np.sqrt(k)), atol=TOL)
    np.testing.assert_allclose(scores[:, 0, 0, 1, 1], np.zeros(3), atol=TOL)
    # Both pairs have the same singular values, so the same ceiling; the aligned one reaches it.
    ceiling = composition.alignment_ceiling(params, cfg)
    np.testing.assert_allclose(ceiling[:, 0, 0, 1, :2], np.full((3, 2), 1 / np.sqrt(k)), atol=TOL)


def dense_reference(params: dict, cfg: ModelConfig) -> np.ndarray:
    """[3, L, H, L, H] in float64 from explicit d_model x d_model circuits: with LayerNorm, every read weight is
    C diag(gamma) W (fold_ln) and every W_O is centred over d_model (center_writing_weights), then
    |OV1 QK2|, |OV1 QK2^T|, |OV1 OV2| over the two norms for l1 < l2, NaN elsewhere."""
    n_layers, n_heads, d = cfg.n_layers, cfg.n_heads, cfg.d_model
    centre = np.eye(d) - np.ones((d, d)) / d
    qk, ov = {}, {}
    for layer in range(n_layers):
        block = params[f"block_{layer}"]
        w = {name: np.asarray(block["attn"][name], np.float64) for name in ("W_Q", "W_K", "W_V", "W_O")}
        fold = (centre @ np.diag(np.asarray(block["ln1"]["scale"], np.float64)) if cfg.layer_norm
                else np.eye(d))
        for h in range(n_heads):
            w_o = w["W_O"][h] @ (centre if cfg.layer_norm else np.eye(d))  # row-centring W_O = W_O C
            qk[layer, h] = fold @ w["W_Q"][:, h] @ (fold @ w["W_K"][:, h]).T
            ov[layer, h] = fold @ w["W_V"][:, h] @ w_o
    out = np.full((3, n_layers, n_heads, n_layers, n_heads), np.nan)
    norm = np.linalg.norm
    for (l1, h1), ov1 in ov.items():
        for (l2, h2) in ov:
            if l1 < l2:
                for mode, right in (("q", qk[l2, h2]), ("k", qk[l2, h2].T), ("v", ov[l2, h2])):
                    out[MODE[mode], l1, h1, l2, h2] = norm(ov1 @ right) / (norm(ov1) * norm(right))
    return out


@pytest.mark.parametrize("layer_norm", [True, False])
def test_scores_equal_dense_reference_with_layernorm_folded(layer_norm):
    """Three layers (so 0 -> 2 pairs too), head_dim not d_model / n_heads, random weights and ln1 scales far from
    1; NaN exactly where l1 >= l2 (same layer included)."""
    cfg = ModelConfig(n_layers=3, d_model=24, n_heads=3, head_dim=5, d_mlp=0, layer_norm=layer_norm, context=8,
                      vocab_size=16)
    params = jax.tree.map(lambda a: np.array(a, np.float64), random_model(cfg, seed=4))
    rng = np.random.default_rng(4)
    for layer in range(3 if layer_norm else 0):  # 1 + N(0, 0.5^2): the folding must get them right, signs too
        params[f"block_{layer}"]["ln1"]["scale"] = 1 + 0.5 * rng.normal(size=24)
    got = scores_of(params, cfg)
    want = dense_reference(params, cfg)
    assert got.shape == (3, 3, 3, 3, 3)
    later = np.arange(3)[:, None, None, None] < np.arange(3)[None, None, :, None]
    np.testing.assert_array_equal(np.isnan(got), np.broadcast_to(~later, got.shape))
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)  # NaNs compare equal
    if layer_norm:  # the comparison sees the folding: without it the scores move by far more than TOL
        unfolded = dense_reference(params, dataclasses.replace(cfg, layer_norm=False))
        assert np.nanmax(np.abs(unfolded - got)) > 1e-2


def test_planted_induction_head_strongest_k_partner_is_previous_token_head():
    """tests/planted.py: the previous-token head 0.0 writes token t into the previous-token dims, which head 1.0's
    keys read. Both are rank-vocab (64) partial permutations, so OV1 QK2^T is a rank-64 projection: K score
    1/sqrt(64). 1.0's queries and values read the token dims, which 0.0 never writes: Q and V scores 0."""
    cfg, params = planted_induction_model()
    scores = composition.composition_scores(params, cfg)
    partner, score = composition.strongest_partner(scores[MODE["k"]], 1, 0)
    assert partner == (0, 0)
    assert score == pytest.approx(1 / 8, abs=TOL)
    assert scores[MODE["q"], 0, 0, 1, 0] == pytest.approx(0, abs=TOL)
    assert scores[MODE["v"], 0, 0, 1, 0] == pytest.approx(0, abs=TOL)
    assert composition.strongest_partner(scores[MODE["k"]], 0, 0) is None  # nothing below layer 0


@pytest.mark.parametrize("d_model, d_head", [(16, 4), (48, 8)])
def test_random_baseline_matches_independent_simulation(d_model, d_head):
    """The same quantity by a different route (numpy, dense d_model x d_model products, its own draws): the two
    means agree within 3 standard errors of their difference."""
    rng = np.random.default_rng(d_model)
    draws = 400
    sims = np.empty(draws)
    norm = np.linalg.norm
    for i in range(draws):
        a, b, c, d = rng.normal(size=(4, d_model, d_head))
        writer, reader = a @ b.T, c @ d.T
        sims[i] = norm(writer @ reader) / (norm(writer) * norm(reader))
    ours = composition.random_baseline(d_model, d_head)
    stderr = sims.std(ddof=1) * np.sqrt(1 / draws + 1 / composition.BASELINE_DRAWS)
    assert abs(ours - sims.mean()) < 3 * stderr, (ours, sims.mean(), stderr)


def test_alignment_ceiling_equals_the_dense_singular_value_bound_and_bounds_every_score():
    """Von Neumann: |A B|_F^2 <= sum_i s_i(A)^2 s_i(B)^2 with both spectra descending; the dense circuits'
    singular values (numpy, float64) give the same ceilings, and no score exceeds its ceiling."""
    cfg = ModelConfig(n_layers=3, d_model=24, n_heads=3, head_dim=5, d_mlp=0, layer_norm=True, context=8,
                      vocab_size=16)
    params = jax.tree.map(lambda a: np.array(a, np.float64), random_model(cfg, seed=5))
    d = cfg.d_model
    centre = np.eye(d) - np.ones((d, d)) / d
    circuits = {}
    for layer in range(3):
        block = params[f"block_{layer}"]
        fold = centre @ np.diag(np.asarray(block["ln1"]["scale"], np.float64))
        w = {name: np.asarray(block["attn"][name], np.float64) for name in ("W_Q", "W_K", "W_V", "W_O")}
        for h in range(3):
            circuits[layer, h] = {"qk": fold @ w["W_Q"][:, h] @ (fold @ w["W_K"][:, h]).T,
                                  "ov": fold @ w["W_V"][:, h] @ w["W_O"][h] @ centre}
    got = composition.alignment_ceiling(params, cfg)
    scores = scores_of(params, cfg)
    for (l1, h1), writer in circuits.items():
        for (l2, h2), reader in circuits.items():
            if l1 >= l2:
                assert np.isnan(got[:, l1, h1, l2, h2]).all()
                continue
            for mode, right in (("q", reader["qk"]), ("k", reader["qk"].T), ("v", reader["ov"])):
                sa, sb = np.linalg.svd(writer["ov"], compute_uv=False), np.linalg.svd(right, compute_uv=False)
                want = np.sqrt((sa ** 2 * sb ** 2).sum()) / (np.linalg.norm(sa) * np.linalg.norm(sb))
                np.testing.assert_allclose(got[MODE[mode], l1, h1, l2, h2], want, atol=TOL)
                assert scores[MODE[mode], l1, h1, l2, h2] <= got[MODE[mode], l1, h1, l2, h2] + TOL
