import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from planted import planted_induction_model, random_model

from induction_jax.base.config import EvalConfig, ModelConfig
from induction_jax.measures import evaluate, heads
from induction_jax.model import model
from induction_jax.training import probe

TINY = ModelConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=0, positions="shortformer", pos_table="learned",
                   context=16, vocab_size=50, layer_norm=True, smeared_key=False)


def _np_layer_norm(x, ln, eps):
    x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * ln["scale"] + ln["bias"]


def _np_gelu(x):  # flax's default, the tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_losses(cfg: ModelConfig, params, tokens_NT) -> np.ndarray:
    """An independent float64 forward pass: pre-LN blocks, shortformer table on queries/keys only."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    n, t = tokens_NT.shape
    h, dh = cfg.n_heads, cfg.d_head
    x = p["W_E"][tokens_NT]
    pos = p["W_pos"][:t]
    causal = np.tril(np.ones((t, t), bool))
    for layer in range(cfg.n_layers):
        blk = p[f"block_{layer}"]
        a = _np_layer_norm(x, blk["ln1"], cfg.ln_eps)
        out = np.zeros_like(x)
        for head in range(h):
            q = (a + pos) @ blk["attn"]["W_Q"][:, head]
            k = (a + pos) @ blk["attn"]["W_K"][:, head]
            v = a @ blk["attn"]["W_V"][:, head]
            scores = q @ k.transpose(0, 2, 1) / np.sqrt(dh)
            scores = np.where(causal, scores, -np.inf)
            w = np.exp(scores - scores.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out += (w @ v) @ blk["attn"]["W_O"][head]
        x = x + out
        if cfg.d_mlp:
            m = _np_layer_norm(x, blk["ln2"], cfg.ln_eps)
            x = x + _np_gelu(m @ blk["mlp"]["W_in"] + blk["mlp"]["b_in"]) @ blk["mlp"]["W_out"] + blk["mlp"]["b_out"]
    logits = _np_layer_norm(x, p["ln_final"], cfg.ln_eps) @ p["W_U"]
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.take_along_axis(logp[:, :-1], tokens_NT[:, 1:, None], axis=-1)[..., 0]


@pytest.mark.parametrize("d_mlp", [0, 64])
def test_per_token_losses_match_numpy_forward(d_mlp):
    cfg = dataclasses.replace(TINY, d_mlp=d_mlp)
    params = random_model(cfg, seed=d_mlp)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (5, cfg.context))
    got = evaluate.per_token_losses(model.make(cfg), params, tokens, batch_size=2)  # 5 = 2 + 2 + padded 1
    assert got.dtype == np.float32 and got.shape == (5, cfg.context - 1)
    want = _np_losses(cfg, params, tokens)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert want.std() > 0.5  # the random model is far from uniform, so the comparison has teeth


def test_icl_indices():
    assert evaluate.icl_indices(512) == (50, 500)
    assert evaluate.icl_indices(1024) == (50, 500)
    assert evaluate.icl_indices(256) == (25, 250)
    assert evaluate.icl_indices(128) == (12, 125)  # floor(6.25 * 2), floor(62.5 * 2)
    assert evaluate.icl_indices(100) == (9, 97)
    assert evaluate.icl_indices(64, early=40, late=400) == (5, 50)
    with pytest.raises(ValueError, match="icl_indices"):
        evaluate.icl_indices(10)  # early index would be token 0


def test_icl_score_and_window():
    n_indices = 20
    index_I = np.arange(1, n_indices + 1, dtype=np.float32)
    offsets_N = np.array([0.0, 1.0, 5.0], np.float32)
    losses = (index_I[None, :] ** 3 + offsets_N[:, None]).astype(np.float32)  # loss at token index j = j^3 + off
    assert evaluate.icl_score(losses, 3, 10) == pytest.approx(1000 - 27)
    # window 2 around j: mean of (j+d)^3 for d = -2..2 is j^3 + 6 j -> 1060 at 10, 45 at 3
    assert evaluate.icl_score(losses, 3, 10, window=2) == pytest.approx(1060 - 45)
    # clipped at both ends: around 1 -> indices 1..3; around 20 -> 18..20
    assert evaluate.icl_score(losses, 1, 20, window=2) == pytest.approx((18**3 + 19**3 + 20**3) / 3 - 36 / 3)
    jitted = jax.jit(lambda x: evaluate.icl_score(x, 3, 10, window=2))(jnp.asarray(losses))
    assert float(jitted) == pytest.approx(1060 - 45)
    with pytest.raises(ValueError, match="late"):
        evaluate.icl_score(losses, 3, 21)


def test_loss_views():
    rng = np.random.default_rng(0)
    losses = rng.random((6, 30), dtype=np.float32)
    index_N = rng.integers(1, 31, size=6)
    view = evaluate.random_token_view(losses, index_N)
    np.testing.assert_array_equal(view, [losses[i, index_N[i] - 1] for i in range(6)])


def test_dloss_dlog_index_recovers_log_slope():
    index_I = np.arange(1, 512)
    curve_SI = np.stack([3.0 - 0.25 * np.log(index_I), 4.0 + 0.1 * np.log(index_I)])  # two "snapshots"
    centres, dloss = evaluate.dloss_dlog_index(curve_SI, n_bins=20)
    assert dloss.shape == (2, centres.size) and np.all(np.diff(centres) > 0)
    # bin means of a linear function of log(index) sit exactly on it at the geometric-mean centres
    np.testing.assert_allclose(dloss[0], -0.25, atol=1e-5)
    np.testing.assert_allclose(dloss[1], 0.1, atol=1e-5)


@pytest.fixture(scope="module")
def planted():
    cfg, params = planted_induction_model()
    return cfg, model.make(cfg), params


def _repeated_distinct(vocab, bos, n, half, seed):
    rng = np.random.default_rng(seed)
    block_NH = np.stack([rng.permutation(vocab - 1)[:half] for _ in range(n)])  # ids 0..vocab-2; bos = vocab-1
    return np.concatenate([np.full((n, 1), bos), block_NH, block_NH], axis=1)


def test_planted_icl_strongly_negative(planted):
    cfg, m, params = planted
    tokens = _repeated_distinct(cfg.vocab_size, cfg.vocab_size - 1, 4, 40, seed=2)
    losses = evaluate.per_token_losses(m, params, tokens, batch_size=4)
    first, second = losses[:, 1:40].mean(), losses[:, 41:].mean()  # token indices 2..40 and 42..80
    assert first > 3.0 and second < 0.05
    assert evaluate.icl_score(losses, 20, 60) < -3.0
    assert evaluate.icl_score(losses, 20, 60, window=10) < -3.0


def test_probe_on_planted(planted):
    cfg, m, params = planted
    bos = cfg.vocab_size - 1
    ec = EvalConfig(draws=2, icl_window=5)
    prefix_tokens = heads.prefix_matching_tokens(ec, heads.uniform_sampler(cfg.vocab_size, [bos]), bos, 0)
    tokens = _repeated_distinct(cfg.vocab_size, bos, 2, 50, seed=4)  # length 101: icl indices (9, 98)
    out = probe.probe(m, params, jnp.asarray(tokens), jnp.asarray(prefix_tokens), ec)
    assert float(out["icl"]) < -3.0
    assert float(out["prefix_max"]) > 0.9 and out["prefix"].shape == (2, cfg.n_heads)
    assert int(np.argmax(out["prefix"])) == cfg.n_heads  # layer 1, head 0
