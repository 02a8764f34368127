import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from induction_jax import ablate
from induction_jax.base import config
from induction_jax.measures import ablation
from induction_jax.model import crossentropy, model

CFG = config.ModelConfig(n_layers=2, d_model=32, n_heads=4, context=12, vocab_size=50, init_std=0.3)


def _setup(**kw):
    cfg = dataclasses.replace(CFG, **kw)
    return cfg, model.make(cfg), model.init_params(cfg, jax.random.key(2))


def _tokens(b=3, t=12, v=50, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, v, (b, t)), jnp.int32)


def test_all_ones_mask_is_the_clean_run():
    cfg, m, p = _setup()
    toks = _tokens()
    clean = ablation.clean_run(m, p, toks)
    for kind in ablation.KINDS:
        out = ablation.ablated_losses(m, p, toks, np.ones((1, 2, 4)), kind=kind, clean=clean)
        np.testing.assert_allclose(out[0], clean[0], atol=1e-6)


def test_vmapped_lanes_equal_one_at_a_time():
    cfg, m, p = _setup(d_mlp=64)
    toks = _tokens()
    masks = ablation.single_head_masks(2, 4)
    masks = np.concatenate([masks, np.ones((1, 2, 4)), np.zeros((1, 2, 4))])
    for kind in ablation.KINDS:
        lanes = ablation.ablated_losses(m, p, toks, masks, kind=kind)
        for i, mask in enumerate(masks):
            one = ablation.single_mask_losses(m, p, toks, jnp.asarray(mask), kind=kind)
            np.testing.assert_allclose(lanes[i], one, atol=2e-6, rtol=1e-6)


def _expanded_logits_without(p, toks, pats, ablated):
    """Logits of an attention-only, LayerNorm-free model as a sum of path terms, leaving out every term that
    passes through head `ablated` (layer, head). Independent of the model code: plain numpy over the weights."""
    we, wu = np.asarray(p["W_E"], np.float64), np.asarray(p["W_U"], np.float64)
    pats = np.asarray(pats, np.float64)  # [L, B, H, Q, K]
    x0 = we[np.asarray(toks)]  # [B, T, D]

    def head(layer, h, x):  # one head's result vector given its (frozen) pattern and input stream
        a = p[f"block_{layer}"]["attn"]
        ov = np.asarray(a["W_V"], np.float64)[:, h] @ np.asarray(a["W_O"], np.float64)[h]
        return np.einsum("bqk,bkd->bqd", pats[layer][:, h], x @ ov)

    terms = [x0]
    for h in range(4):
        if (0, h) == ablated:
            continue
        terms.append(head(0, h, x0))  # direct path of a layer-0 head
        for h1 in range(4):
            if (1, h1) != ablated:
                terms.append(head(1, h1, head(0, h, x0)))  # layer-0 head composed into a layer-1 head
    for h1 in range(4):
        if (1, h1) != ablated:
            terms.append(head(1, h1, x0))
    return sum(terms) @ wu


def test_pattern_preserving_equals_removing_every_path_through_the_head():
    cfg, m, p = _setup(layer_norm=False, positions="none", init_std=0.2)
    toks = _tokens(b=2)
    _, cap = m.apply({"params": p}, toks, capture=("patterns",))
    for layer, h in [(0, 1), (1, 2)]:
        mask = np.ones((2, 4), np.float32)
        mask[layer, h] = 0
        logits = m.apply({"params": p}, toks, head_mask=jnp.asarray(mask), patterns=cap["patterns"])
        expect = _expanded_logits_without(p, toks, cap["patterns"], (layer, h))
        np.testing.assert_allclose(np.asarray(logits, np.float64), expect, atol=1e-5)
        # and the vmapped job gives the same per-token losses
        lanes = ablation.ablated_losses(m, p, toks, mask[None])
        ref = crossentropy.token_losses(jnp.asarray(expect, jnp.float32), toks)
        np.testing.assert_allclose(lanes[0], ref, atol=1e-5)


def test_full_and_pattern_preserving_differ_when_a_later_head_reads_the_ablated_one():
    cfg, m, p = _setup(init_std=0.5)
    toks = _tokens()
    mask = np.ones((1, 2, 4), np.float32)
    mask[0, 0, 0] = 0  # layer-0 head: layer-1 queries/keys read its output, so full ablation moves patterns
    pattern = ablation.ablated_losses(m, p, toks, mask, kind="pattern")
    full = ablation.ablated_losses(m, p, toks, mask, kind="full")
    assert np.abs(np.asarray(pattern - full)).max() > 1e-3
    mask = np.ones((1, 2, 4), np.float32)
    mask[0, 1, 0] = 0  # last layer: nothing downstream reads it, so both kinds agree
    np.testing.assert_allclose(ablation.ablated_losses(m, p, toks, mask, kind="pattern"),
                               ablation.ablated_losses(m, p, toks, mask, kind="full"), atol=1e-6)


def test_attribution_cosine_and_fraction():
    train = np.array([-1.0, -1.0, 0.0, 0.0])
    abl = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [-0.5, -0.5, 0.0, 0.0]])
    out = ablation.attribution(abl, train)
    np.testing.assert_allclose(out["cosine"], [1.0, 0.0, -1.0], atol=1e-9)
    np.testing.assert_allclose(out["fraction_undone"], [1.0, 0.0, -0.5], atol=1e-9)


def test_planted_circuit_ablating_the_induction_head_removes_icl():
    from planted import planted_induction_model

    from induction_jax.measures import evaluate

    cfg, p = planted_induction_model(vocab=64, n_heads=3, context=128)
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
    m = model.make(cfg)
    rng = np.random.default_rng(0)
    half = np.stack([rng.permutation(64)[:60] for _ in range(4)])
    toks = jnp.asarray(np.concatenate([half, half], axis=1), jnp.int32)  # repeated random text, T = 120
    early, late = 30, 100  # first repeat vs second repeat
    clean = np.asarray(ablation.clean_run(m, p, toks)[0])
    icl_clean = evaluate.icl_score(clean, early, late)
    assert icl_clean < -2.0
    masks = ablation.head_masks([(1, 0), (1, 2), (0, 1)], 2, 3)
    lanes = ablation.ablated_losses(m, p, toks, masks)
    icl = [evaluate.icl_score(lane, early, late) for lane in lanes]
    assert abs(icl[0]) < 0.1 * abs(icl_clean)  # the induction head carries (almost) all of it
    for other in icl[1:]:
        assert abs(other - icl_clean) < 0.1 * abs(icl_clean)  # a random head does not


# --------------------------------------------------------------------------------------------------- paths

@pytest.mark.parametrize("d_mlp", [64, 0])
def test_vmapped_lanes_equal_one_at_a_time_on_every_path(d_mlp):
    """With MLPs every lane runs from its first masked layer; attention-only, from the layer after it (a
    last-layer lane from the final residual stream): both against the unbatched from-scratch reference."""
    cfg, m, p = _setup(d_mlp=d_mlp, n_layers=3)
    toks = _tokens()
    two_last = np.ones((1, 3, 4), np.float32)
    two_last[0, 2, :2] = 0.0
    masks = np.concatenate([ablation.single_head_masks(3, 4), np.zeros((1, 3, 4)), np.ones((1, 3, 4)), two_last])
    for path in ablation.PATHS:
        lanes = ablation.ablated_losses(m, p, toks, masks, path=path)
        for i, mask in enumerate(masks):
            one = ablation.single_mask_losses(m, p, toks, jnp.asarray(mask), path=path)
            # Float32 rounding only: removing all 12 heads from the final stream sums them in another order.
            np.testing.assert_allclose(lanes[i], one, atol=1e-5, rtol=1e-6, err_msg=f"{path} lane {i}")


def test_paths_agree_only_where_they_should():
    cfg, m, p = _setup(init_std=0.5)  # attention-only, with LayerNorm
    toks = _tokens()
    last = ablation.head_masks([(1, 2)], 2, 4)
    total = ablation.ablated_losses(m, p, toks, last, path="total")
    # A last-layer head writes straight into the final residual stream: removing it there is the whole effect.
    np.testing.assert_allclose(ablation.ablated_losses(m, p, toks, last, path="direct"), total, atol=1e-6)
    # ... but freezing ln_final's scale changes how the rest of the stream is read without it.
    assert np.abs(ablation.ablated_losses(m, p, toks, last, path="frozen_ln") - total).max() > 1e-4
    first = ablation.head_masks([(0, 1)], 2, 4)  # read by layer 1: direct leaves that out
    assert np.abs(ablation.ablated_losses(m, p, toks, first, path="direct")
                  - ablation.ablated_losses(m, p, toks, first, path="total")).max() > 1e-4
    clean = np.asarray(ablation.clean_run(m, p, toks)[0])
    for path in ablation.PATHS:  # an all-ones lane is the clean run on every path
        np.testing.assert_allclose(ablation.ablated_losses(m, p, toks, np.ones((1, 2, 4)), path=path)[0], clean,
                                   atol=1e-5)


def _numpy_frozen_ln_logits_without(cfg, p, toks, pats, ablated):
    """Logits of an attention-only model with LayerNorm once head `ablated` is removed, every LayerNorm's 1/sigma
    frozen at the clean run's and every pattern frozen: the clean logits minus every term the head's output
    reaches, propagated by hand in numpy (each frozen LayerNorm is affine, so the change passes through it as
    C dx * (1/sigma) * gamma, without the bias)."""
    f = lambda a: np.asarray(a, np.float64)
    pats = f(pats)  # [L, B, H, Q, K]
    eps, d = cfg.ln_eps, cfg.d_model

    def centre(x):
        return x - x.mean(-1, keepdims=True)

    def inv_sigma(x):
        return 1.0 / np.sqrt((centre(x) ** 2).mean(-1, keepdims=True) + eps)

    def ov(layer, h):
        a = p[f"block_{layer}"]["attn"]
        return f(a["W_V"])[:, h] @ f(a["W_O"])[h]

    def heads_out(layer, x_in):  # every head's result vector [H, B, T, D] given its LayerNorm'd input
        return np.stack([np.einsum("bqk,bkd->bqd", pats[layer][:, h], x_in @ ov(layer, h))
                         for h in range(cfg.n_heads)])

    x = f(p["W_E"])[np.asarray(toks)]
    scales, results = [], []
    for layer in range(cfg.n_layers):  # the clean run, for its LayerNorm scales and head results
        ln = p[f"block_{layer}"]["ln1"]
        s = inv_sigma(x)
        r = heads_out(layer, centre(x) * s * f(ln["scale"]) + f(ln["bias"]))
        scales.append(s)
        results.append(r)
        x = x + r.sum(0)
    s_f = inv_sigma(x)
    logits = (centre(x) * s_f * f(p["ln_final"]["scale"]) + f(p["ln_final"]["bias"])) @ f(p["W_U"])
    layer0, h0 = ablated
    dx = -results[layer0][h0]  # the head's own output, then everything downstream that reads it
    for layer in range(layer0 + 1, cfg.n_layers):
        dx = dx + heads_out(layer, centre(dx) * scales[layer] * f(p[f"block_{layer}"]["ln1"]["scale"])).sum(0)
    assert d == x.shape[-1]
    return logits + (centre(dx) * s_f * f(p["ln_final"]["scale"])) @ f(p["W_U"])


def test_frozen_ln_equals_subtracting_the_heads_terms():
    cfg, m, p = _setup(init_std=0.4, n_layers=3)
    toks = _tokens(b=2)
    _, cap = m.apply({"params": p}, toks, capture=("patterns",))
    heads = [(0, 1), (1, 3), (2, 0)]
    lanes = ablation.ablated_losses(m, p, toks, ablation.head_masks(heads, 3, 4), path="frozen_ln")
    for lane, head in zip(lanes, heads):
        expect = _numpy_frozen_ln_logits_without(cfg, p, toks, cap["patterns"], head)
        np.testing.assert_allclose(lane, crossentropy.token_losses(jnp.asarray(expect, jnp.float32), toks), atol=2e-5)


def test_shares_and_their_standard_errors():
    rng = np.random.default_rng(0)
    clean = rng.normal(-0.6, 0.5, size=4000)
    exact = np.stack([-0.5 * clean, 0.2 * clean])  # removes 50%, adds 20%: the ratio is exact in every window
    share, se = ablation.shares(exact, clean, n_boot=200)
    np.testing.assert_allclose(share, [0.5, -0.2], atol=1e-12)
    assert np.all(se < 1e-9)
    noisy = rng.normal(0.3, 1.0, size=(1, 4000))  # removes 0.3 / 0.6 = 50%, with noise of its own
    share, se = ablation.shares(noisy, clean, n_boot=400)
    # delta method: var(share) ~ var(delta - share * clean) / (n * mean(clean)^2)
    want = np.std(noisy[0] + share[0] * clean) / (np.sqrt(4000) * 0.6)
    assert 0.7 * want < se[0] < 1.3 * want and abs(share[0] - 0.5) < 4 * want
    assert np.isnan(ablation.shares(exact, -clean)[0]).all()  # no ICL to remove: no share


def test_parse_heads_and_its_errors():
    assert ablate.parse_heads("0.1, 1.3", 2, 4) == [(0, 1), (1, 3)]
    for bad, why in [("1", "is not LAYER.HEAD"), ("a.b", "is not LAYER.HEAD"), ("2.0", "outside 2 layers"),
                     ("0.4", "outside 2 layers x 4 heads"), ("-1.0", "outside")]:
        try:
            ablate.parse_heads(bad, 2, 4)
        except config.UserError as e:
            assert why in str(e) and bad in str(e), (bad, str(e))
        else:
            raise AssertionError(f"{bad!r} was accepted")
