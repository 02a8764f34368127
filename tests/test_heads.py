import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from planted import planted_induction_model, random_model

from induction_jax.base.config import EvalConfig, ModelConfig
from induction_jax.measures import heads
from induction_jax.model import model

EVAL = EvalConfig(draws=4)
TINY = ModelConfig(n_layers=3, d_model=32, n_heads=4, d_mlp=0, positions="shortformer", pos_table="learned",
                   context=128, vocab_size=32, layer_norm=True)


@pytest.fixture(scope="module")
def planted():
    """The planted circuit plus an anti-copying head at layer 1, head 1; random heads elsewhere."""
    cfg, params = planted_induction_model(anticopy=True)
    m = model.make(cfg)
    bos = cfg.vocab_size - 1
    sample = heads.uniform_sampler(cfg.vocab_size, exclude=[bos])
    real_text = sample(np.random.default_rng(5), (6, 64))
    prev = heads.previous_token(m, params, real_text, batch_size=4)
    return dict(cfg=cfg, params=params, prefix=heads.prefix_matching(m, params, EVAL, sample, bos, 0),
                copying=heads.copying(m, params, EVAL, sample, bos, 1), prev=prev, ov=heads.ov_copying(params, cfg),
                qk=heads.qk_trace(params, cfg, prev))


RANDOM_HEADS = [(0, 1), (0, 2), (1, 2)]


def test_planted_induction_head(planted):
    assert planted["prefix"].shape == planted["copying"].shape == (2, 3)
    assert planted["prefix"][1, 0] > 0.9
    assert planted["copying"][1, 0] > 0.8
    assert planted["prev"][0, 0] > 0.9


def test_planted_anticopy_head_scores_minus_one(planted):
    assert planted["copying"][1, 1] < -0.95


def test_random_heads_score_near_chance(planted):
    for head in RANDOM_HEADS:
        assert planted["prefix"][head] < 0.15, head  # uniform attention: ~0.04 here
        assert planted["prev"][head] < 0.15, head  # uniform attention over i + 1 keys: mean 1/(i+1) ~0.06
        assert -0.95 < planted["copying"][head] < -0.6, head  # chance: 4 / (1 + #distinct tokens) - 1
    # The previous-token head writes only to dims W_U never reads: no logit effect, so no copying score.
    assert np.isnan(planted["copying"][0, 0])


def test_induction_heads_classification(planted):
    found = heads.induction_heads(planted["prefix"], planted["copying"], EVAL)
    assert found.dtype == bool and found.sum() == 1 and found[1, 0]


def test_planted_qk_trace(planted):
    qk = planted["qk"]
    assert np.all(np.isnan(qk[0]))
    assert qk[1, 0] > 100 * np.abs(qk[1, 1:]).max()
    assert qk[1, 0] > 0


def _brute_force_qk_trace(cfg, params, prev_LH):
    """Materialise M_e[t, s] = q(t) . k(s) token by token, with ln1's centring and scale applied as linear maps."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def ln_linear(x, layer):
        x = x - x.mean(-1, keepdims=True)
        return x * p[f"block_{layer}"]["ln1"]["scale"]

    w_e = p["W_E"]
    out = np.full((cfg.n_layers, cfg.n_heads), np.nan)
    for layer in range(1, cfg.n_layers):
        attn = p[f"block_{layer}"]["attn"]
        for h in range(cfg.n_heads):
            q_VE = ln_linear(w_e, layer) @ attn["W_Q"][:, h]
            total = 0.0
            for le in range(layer):
                earlier = p[f"block_{le}"]["attn"]
                for he in range(cfg.n_heads):
                    written_VD = ln_linear(w_e, le) @ earlier["W_V"][:, he] @ earlier["W_O"][he]
                    k_VE = ln_linear(written_VD, layer) @ attn["W_K"][:, h]
                    m_VV = q_VE @ k_VE.T
                    total += prev_LH[le, he] * np.trace(m_VV)
            out[layer, h] = total
    return out


def test_qk_trace_matches_brute_force():
    params = random_model(TINY, seed=3)
    prev_LH = np.random.default_rng(0).random((TINY.n_layers, TINY.n_heads)).astype(np.float32)
    got = heads.qk_trace(params, TINY, prev_LH)
    want = _brute_force_qk_trace(TINY, params, prev_LH)
    assert np.all(np.isnan(got[0])) and np.all(np.isfinite(got[1:]))
    np.testing.assert_allclose(got[1:], want[1:], rtol=1e-4, atol=1e-4 * np.abs(want[1:]).max())
    one_layer = dataclasses.replace(TINY, n_layers=1)
    assert np.all(np.isnan(heads.qk_trace(random_model(one_layer), one_layer, prev_LH[:1])))


def test_prefix_matching_equals_per_head_loop():
    params = random_model(TINY, seed=1, scale=0.5)
    m = model.make(TINY)
    ec = EvalConfig(draws=3, prefix_tokens=10, repeats=3)
    sample = heads.uniform_sampler(TINY.vocab_size)  # BOS id may recur in the sample: it must not count
    got = heads.prefix_matching(m, params, ec, sample, 0, rng=7)

    tokens = heads.prefix_matching_tokens(ec, sample, 0, 7)
    assert tokens.shape == (3, 31) and np.all(tokens[:, 0] == 0)
    patterns = np.asarray(m.apply({"params": params}, jnp.asarray(tokens), capture=("patterns",))[1]["patterns"])
    want = np.zeros((TINY.n_layers, TINY.n_heads))
    for layer in range(TINY.n_layers):
        for h in range(TINY.n_heads):
            scores = []
            for b in range(tokens.shape[0]):
                for q in range(1 + ec.prefix_tokens, tokens.shape[1]):
                    targets = [k + 1 for k in range(1, q) if tokens[b, k] == tokens[b, q]]
                    scores.append(patterns[layer, b, h, q, targets].sum())
            want[layer, h] = np.mean(scores)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert want.std() > 0.01  # heads differ, so a mix-up of heads would show


def _reference_copying(cfg, params, tokens_BT):
    """Loop version of the copying formula, with full-vocab logits and the residual's ln_final statistics."""
    m = model.make(cfg)
    _, cap = m.apply({"params": params}, jnp.asarray(tokens_BT), capture=("patterns", "resid"))
    pattern = np.asarray(cap["patterns"], np.float64)
    resid = np.asarray(cap["resid"], np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    final = resid[-1] - resid[-1].mean(-1, keepdims=True)
    sigma_BT = np.sqrt((final ** 2).mean(-1) + cfg.ln_eps)
    out = np.zeros((cfg.n_layers, cfg.n_heads))
    for layer in range(cfg.n_layers):
        blk = p[f"block_{layer}"]
        x = resid[layer] - resid[layer].mean(-1, keepdims=True)
        ln_in = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.ln_eps) * blk["ln1"]["scale"] + blk["ln1"]["bias"]
        for h in range(cfg.n_heads):
            scores = []
            for b in range(tokens_BT.shape[0]):
                sample = tokens_BT[b, 1:]
                distinct = np.unique(sample)
                num = den = 0.0
                for k in range(1, tokens_BT.shape[1]):
                    o = ln_in[b, k] @ blk["attn"]["W_V"][:, h] @ blk["attn"]["W_O"][h]
                    d = ((o - o.mean()) * p["ln_final"]["scale"]) @ p["W_U"]
                    rho = np.maximum(d - d.mean(), 0)
                    w = (pattern[layer, b, h, :, k] / sigma_BT[b]).sum()
                    num += w * rho[tokens_BT[b, k]]
                    den += w * (rho[tokens_BT[b, k]] + rho[distinct].sum())
                scores.append(4 * num / den - 1)
            out[layer, h] = np.mean(scores)
    return out


def test_copying_matches_reference_loop():
    params = random_model(TINY, seed=2)
    m = model.make(TINY)
    ec = EvalConfig(draws=2, prefix_tokens=12)
    sample = heads.uniform_sampler(TINY.vocab_size, exclude=[31])
    got = heads.copying(m, params, ec, sample, 31, rng=np.random.default_rng(4))
    rng = np.random.default_rng(4)
    tokens = np.concatenate([np.full((2, 1), 31), sample(rng, (2, 12))], axis=1)
    np.testing.assert_allclose(got, _reference_copying(TINY, params, tokens), rtol=1e-4, atol=1e-5)
    assert np.all((got >= -1) & (got <= 1))


def test_source_outputs_sum_to_head_results():
    params = random_model(TINY, seed=5)
    m = model.make(TINY)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 20)))
    _, cap = m.apply({"params": params}, tokens, capture=("patterns", "attn_inputs", "head_results"))
    out_LBKHD = heads.source_outputs(params, cap["attn_inputs"])
    recombined_LBQHD = jnp.einsum("lbhqk,lbkhd->lbqhd", cap["patterns"], out_LBKHD)
    np.testing.assert_allclose(recombined_LBQHD, cap["head_results"], atol=2e-4, rtol=1e-4)


def test_previous_token_padding_does_not_change_result():
    params = random_model(TINY, seed=6)
    m = model.make(TINY)
    tokens = np.random.default_rng(2).integers(0, 32, (5, 12))
    np.testing.assert_allclose(heads.previous_token(m, params, tokens, batch_size=2),
                               heads.previous_token(m, params, tokens, batch_size=5), rtol=1e-5, atol=1e-6)


def test_copying_rank_of_planted_heads(planted):
    cfg, params = planted["cfg"], planted["params"]
    m = model.make(cfg)
    bos = cfg.vocab_size - 1
    out = heads.copying_rank(m, params, EVAL, heads.uniform_sampler(cfg.vocab_size, exclude=[bos]), bos, 1)
    assert out["top1"].shape == out["median_rank"].shape == (2, 3)
    assert out["top1"][1, 0] > 0.95 and out["median_rank"][1, 0] == 0  # the planted copier
    assert out["median_rank"][1, 1] >= cfg.vocab_size - 2  # the anti-copier puts the token it reads last
    for head in RANDOM_HEADS:  # chance: top1 ~ 1/V, median rank ~ V/2
        assert out["top1"][head] < 0.2 and cfg.vocab_size / 5 < out["median_rank"][head] < 4 * cfg.vocab_size / 5


def test_copying_rank_matches_numpy_ranks():
    cfg = dataclasses.replace(TINY, n_layers=2)
    m, params = model.make(cfg), model.init_params(cfg, jax.random.key(3))
    sample = heads.uniform_sampler(cfg.vocab_size, exclude=[0])
    tokens = heads._copy_tokens(EVAL, sample, 0, 7)
    out_LBKHD = np.asarray(heads._direct_path(m, params, jnp.asarray(tokens))[0])
    logits = out_LBKHD @ np.asarray(params["W_U"])  # [L, B, K, H, V]
    own = np.take_along_axis(logits, tokens[None, :, 1:, None, None], axis=-1)
    ranks = (logits > own).sum(-1)
    got = heads.copying_rank(m, params, EVAL, sample, 0, 7)
    np.testing.assert_allclose(got["top1"], (ranks == 0).mean(axis=(1, 2)))
    np.testing.assert_allclose(got["median_rank"], np.median(ranks, axis=(1, 2)))


# ------------------------------------------------------------------------------------------------- OV copying

def test_ov_copying_of_planted_heads(planted):
    ov = planted["ov"]
    assert ov.shape == (2, 3)
    assert ov[1, 0] > 0.999  # copies token dims to the dims W_U reads: kappa * I after centring
    assert ov[1, 1] < -0.999  # the same map negated
    for head in RANDOM_HEADS:
        assert abs(ov[head]) < 0.35, (head, ov[head])
    # The previous-token head writes only to dims W_U never reads: a zero circuit has no score.
    assert np.isnan(ov[0, 0])


def test_ov_copying_of_random_maps_is_near_zero():
    cfg = dataclasses.replace(TINY, n_layers=4, d_model=64, n_heads=8, vocab_size=256)
    scores = heads.ov_copying(random_model(cfg, seed=11), cfg)
    assert abs(float(np.mean(scores))) < 0.1 and float(np.max(np.abs(scores))) < 0.5, scores


def _explicit_ov_copying(cfg, params):
    """The vocab x vocab circuit of every head, formed and eigendecomposed: LayerNorm written out as matrices."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    d, v = cfg.d_model, cfg.vocab_size
    centre_DD = np.eye(d) - np.ones((d, d)) / d
    centre_VV = np.eye(v) - np.ones((v, v)) / v
    out = np.zeros((cfg.n_layers, cfg.n_heads))
    for layer in range(cfg.n_layers):
        attn = p[f"block_{layer}"]["attn"]
        for h in range(cfg.n_heads):
            circuit_VV = (p["W_E"] @ centre_DD @ np.diag(p[f"block_{layer}"]["ln1"]["scale"]) @ attn["W_V"][:, h]
                          @ attn["W_O"][h] @ centre_DD @ np.diag(p["ln_final"]["scale"]) @ p["W_U"] @ centre_VV)
            lam = np.linalg.eigvals(circuit_VV)
            out[layer, h] = lam.real.sum() / np.abs(lam).sum()
    return out


def test_ov_copying_matches_explicit_vocab_circuit():
    params = random_model(TINY, seed=4)
    np.testing.assert_allclose(heads.ov_copying(params, TINY), _explicit_ov_copying(TINY, params), atol=1e-5)


def test_ov_copying_sign_follows_the_circuit():
    """Negating W_O negates every eigenvalue; scaling it leaves the score unchanged."""
    params = random_model(TINY, seed=8)
    flipped = jax.tree.map(lambda a: a, params)
    for layer in range(TINY.n_layers):
        flipped[f"block_{layer}"] = dict(params[f"block_{layer}"],
                                         attn=dict(params[f"block_{layer}"]["attn"],
                                                   W_O=-3.0 * params[f"block_{layer}"]["attn"]["W_O"]))
    np.testing.assert_allclose(heads.ov_copying(flipped, TINY), -heads.ov_copying(params, TINY), atol=1e-5)


def test_copying_measure_selects_the_classifying_score(planted):
    assert heads.copying_measure(EVAL) == "ov_copying"
    assert heads.copying_measure(dataclasses.replace(EVAL, copying_measure="evaluator")) == "copying"
    found = heads.induction_heads(planted["prefix"], planted["ov"], EVAL)
    assert found.sum() == 1 and found[1, 0]
