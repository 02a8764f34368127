"""The fused attention paths against the explicit one: outputs, gradients, and the training loss built on them."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from induction_jax.base import config
from induction_jax.model import attention, crossentropy, model as model_lib

B, H, T, D = 2, 4, 19, 8  # T not a multiple of the blocks below


def _qkv(seed=0):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.standard_normal((B, H, T, D)), jnp.float32) for _ in range(4)]


def _numpy_attention(q, k, v, windows):
    s = np.einsum("bhqe,bhke->bhqk", q, k) / np.sqrt(D)
    qi, ki = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = (ki <= qi)[None] & (qi - ki < np.asarray(windows)[:, None, None])
    s = np.where(allowed[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhke->bhqe", p, v)


WINDOWS = [(T, T, T, T), (T, T, 3, 3), (1, 5, T, 2)]


@pytest.mark.parametrize("windows", WINDOWS)
def test_explicit_matches_numpy(windows):
    q, k, v, _ = _qkv()
    z, pattern = attention.explicit(q, k, v, windows)
    np.testing.assert_allclose(z, _numpy_attention(*map(np.asarray, (q, k, v)), windows), atol=1e-5)
    np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("windows", WINDOWS)
@pytest.mark.parametrize("block", [4, 7, 64])
@pytest.mark.parametrize("saved_bytes", [0, attention.SAVED_PATTERN_BYTES], ids=["recomputed", "saved"])
def test_blocked_matches_explicit_in_value_and_gradient(windows, block, saved_bytes, monkeypatch):
    """Both backward passes: patterns recomputed from the log-sum-exp, and patterns kept from the forward."""
    monkeypatch.setattr(attention, "SAVED_PATTERN_BYTES", saved_bytes)
    q, k, v, g = _qkv(1)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * g).sum()

    explicit = loss(lambda q, k, v: attention.explicit(q, k, v, windows)[0])
    blocked = loss(lambda q, k, v: attention.blocked(q / np.sqrt(D), k, v, windows, block))
    val_e, grads_e = jax.value_and_grad(explicit, argnums=(0, 1, 2))(q, k, v)
    val_b, grads_b = jax.value_and_grad(blocked, argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(val_b, val_e, rtol=1e-5)
    for name, a, b in zip("qkv", grads_b, grads_e):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("windows", WINDOWS)
def test_dot_product_path_matches_explicit(windows):
    """The GPU path's call of jax.nn.dot_product_attention (run here with its XLA implementation): the same
    causal mask and windows."""
    q, k, v, _ = _qkv(2)
    z = attention.dot_product(q / np.sqrt(D), k, v, windows, implementation="xla")
    np.testing.assert_allclose(z, attention.explicit(q, k, v, windows)[0], atol=1e-5)


def test_gpu_asks_for_cudnn_in_half_precision():
    # jax's default implementation (None) is the XLA one, which forms the T x T scores.
    assert attention.dot_implementations(jnp.bfloat16, "gpu") == ("cudnn", "xla")
    assert attention.dot_implementations(jnp.float16, "gpu") == ("cudnn", "xla")
    assert attention.dot_implementations(jnp.float32, "gpu") == ("xla",)  # cuDNN takes only fp16/bf16
    assert attention.dot_implementations(jnp.bfloat16, "cpu") == ("xla",)


def test_dot_product_falls_back_to_xla_where_cudnn_refuses(monkeypatch, caplog):
    """As on a GPU without cuDNN: the cuDNN call refuses as it traces ("cuDNN is not detected" here), the XLA
    implementation answers, and one warning says so."""
    monkeypatch.setattr(attention, "platform", lambda: "gpu")
    q, k, v, _ = _qkv(3)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    with caplog.at_level("WARNING", logger="induction_jax.model.attention"):
        z = jax.jit(lambda q, k, v: attention.dot_product(q / math.sqrt(D), k, v, WINDOWS[1]))(q, k, v)
    assert any("cudnn refused" in r.getMessage() for r in caplog.records)
    ref = attention.explicit(*(x.astype(jnp.float32) for x in (q, k, v)), WINDOWS[1])[0]
    np.testing.assert_allclose(np.asarray(z, np.float32), ref, atol=3e-2)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
def test_splash_matches_explicit_in_value_and_gradient(mesh_shape):
    """The TPU kernel through its interpreter, with two dense heads, a 33-token and a 128-token window, on one
    fake CPU device or on a 2 x 2 x 2 mesh (batch over data x fsdp; the tensor axis puts the dense heads on one
    shard and the windowed ones on the other)."""
    windows = (256, 256, 33, 128)
    r = np.random.default_rng(6)
    b, h, t, d = 4, 4, 256, 16
    q, k, v, g = [jnp.asarray(r.standard_normal((b, h, t, d)), jnp.float32) for _ in range(4)]

    def explicit(q, k, v):
        return attention.explicit(q, k, v, windows)[0]

    def splash(q, k, v):
        return attention.fused(q / np.sqrt(d), k, v, windows, 128, "splash", ("data", "fsdp"))

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: (fn(q, k, v) * g).sum(), argnums=(0, 1, 2)))(q, k, v)

    grads_e = grads(explicit)
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:math.prod(mesh_shape)])
    with jax.set_mesh(mesh):
        z_s, grads_s = jax.jit(splash)(q, k, v), grads(splash)
    np.testing.assert_allclose(z_s, explicit(q, k, v), atol=2e-6)
    for name, a, b_ in zip("qkv", grads_s, grads_e):
        np.testing.assert_allclose(a, b_, atol=2e-5, rtol=1e-5, err_msg=f"d{name}")


def test_auto_kernel_follows_the_mesh_platform():
    assert attention.kernel_for("auto", 256, "tpu") == "splash"
    assert attention.kernel_for("auto", 200, "tpu") == "blocked"  # splash's tiles do not divide 200
    assert attention.kernel_for("auto", 256, "gpu") == "dot_product"
    assert attention.kernel_for("auto", 256, "cpu") == "blocked"
    assert attention.kernel_for("splash", 256, "cpu") == "splash"
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        assert attention.platform() == "cpu"


def _model(**over):
    base = dict(n_layers=2, d_model=32, n_heads=4, context=24, vocab_size=61, init_std=0.3, attention_block=8)
    cfg = config.ModelConfig(**{**base, **over})
    m = model_lib.make(cfg)
    params = model_lib.init_params(cfg, jax.random.key(3))
    tokens = jax.random.randint(jax.random.key(4), (3, 24), 0, 61)
    return cfg, m, params, tokens


@pytest.mark.parametrize("over", [{}, {"local_heads": 2, "local_window": 5}, {"smeared_key": True},
                                  {"loss_chunk": 5, "remat": "dots"},
                                  {"d_mlp": 64, "positions": "learned"}, {"positions": "rotary"},
                                  {"layer_norm": False, "positions": "none"}])
def test_training_loss_fused_equals_explicit(over):
    cfg, m, params, tokens = _model(**over)
    explicit = model_lib.make(dataclasses.replace(cfg, attention="explicit"))

    def mean_loss(mod):
        return lambda p: mod.apply({"params": p}, tokens, method=model_lib.Transformer.losses).mean()

    ref = lambda p: crossentropy.token_losses(m.apply({"params": p}, tokens), tokens).mean()  # noqa: E731
    val_f, grad_f = jax.value_and_grad(mean_loss(m))(params)
    val_e, grad_e = jax.value_and_grad(mean_loss(explicit))(params)
    val_r, grad_r = jax.value_and_grad(ref)(params)
    np.testing.assert_allclose(val_f, val_r, rtol=1e-6)
    np.testing.assert_allclose(val_e, val_r, rtol=1e-6)
    for a, b, c in zip(jax.tree.leaves(grad_f), jax.tree.leaves(grad_e), jax.tree.leaves(grad_r)):
        np.testing.assert_allclose(a, c, atol=1e-6, rtol=1e-4)
        np.testing.assert_allclose(b, c, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("over", [{"local_heads": 2, "local_window": 40}, {"smeared_key": True}])
def test_training_loss_splash_equals_explicit(over):
    cfg, m, params, tokens = _model(context=128, **over)
    tokens = jax.random.randint(jax.random.key(4), (2, 128), 0, 61)
    splash = model_lib.make(dataclasses.replace(cfg, attention_kernel="splash"))
    explicit = model_lib.make(dataclasses.replace(cfg, attention="explicit"))

    def value_and_grad(mod):
        return jax.value_and_grad(
            lambda p: mod.apply({"params": p}, tokens, method=model_lib.Transformer.losses).mean())(params)

    (val_s, grad_s), (val_e, grad_e) = value_and_grad(splash), value_and_grad(explicit)
    np.testing.assert_allclose(val_s, val_e, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grad_s), jax.tree.leaves(grad_e)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_cross_entropy_gradient_is_softmax_minus_onehot():
    r = np.random.default_rng(5)
    logits = jnp.asarray(r.standard_normal((2, 3, 7)) * 3, jnp.float32)
    targets = jnp.asarray(r.integers(0, 7, (2, 3)))
    g = jnp.asarray(r.standard_normal((2, 3)), jnp.float32)
    grad = jax.grad(lambda x: (crossentropy.cross_entropy(x, targets) * g).sum())(logits)
    p = np.exp(np.asarray(logits) - np.log(np.exp(np.asarray(logits)).sum(-1, keepdims=True)))
    expect = (p - np.eye(7)[np.asarray(targets)]) * np.asarray(g)[..., None]
    np.testing.assert_allclose(grad, expect, atol=1e-6)
    loss = crossentropy.cross_entropy(logits, targets)
    np.testing.assert_allclose(loss, -np.log(np.take_along_axis(p, np.asarray(targets)[..., None], -1))[..., 0],
                               rtol=1e-6)


def test_unembed_cross_entropy_gradients_match_numpy():
    r = np.random.default_rng(6)
    x = r.standard_normal((2, 5, 4)).astype(np.float32)
    w = r.standard_normal((4, 9)).astype(np.float32)
    targets = r.integers(0, 9, (2, 5))
    g = r.standard_normal((2, 5)).astype(np.float32)
    loss, (dx, dw) = jax.value_and_grad(
        lambda x, w: (crossentropy.unembed_cross_entropy(x, w, jnp.asarray(targets)) * g).sum(), argnums=(0, 1))(
        jnp.asarray(x), jnp.asarray(w))
    logits = x @ w
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dlogits = (p - np.eye(9)[targets]) * g[..., None]
    np.testing.assert_allclose(loss, (-np.log(np.take_along_axis(p, targets[..., None], -1))[..., 0] * g).sum(),
                               rtol=1e-5)
    np.testing.assert_allclose(dx, dlogits @ w.T, atol=1e-5)
    np.testing.assert_allclose(dw, x.reshape(-1, 4).T @ dlogits.reshape(-1, 9), atol=1e-5)


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_keeps_parameters_losses_and_gradients(remat):
    cfg, m, params, tokens = _model(d_mlp=32, local_heads=1, local_window=4)
    rematted = model_lib.make(dataclasses.replace(cfg, remat=remat))
    assert jax.tree.structure(model_lib.init_params(rematted.cfg, jax.random.key(3))) == jax.tree.structure(params)

    def grad(mod):
        return jax.jit(jax.value_and_grad(
            lambda p: mod.apply({"params": p}, tokens, method=model_lib.Transformer.losses).mean()))(params)

    def loss_jaxpr(mod):
        return str(jax.make_jaxpr(jax.grad(
            lambda p: mod.apply({"params": p}, tokens, method=model_lib.Transformer.losses).mean()))(params))

    assert "remat" in loss_jaxpr(rematted) and "remat" not in loss_jaxpr(m)
    (val, g), (val_r, g_r) = grad(m), grad(rematted)
    np.testing.assert_allclose(val_r, val, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_r), jax.tree.leaves(g)):
        np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5)
    # Analysis calls (captures) run through the rematerialised blocks unchanged.
    np.testing.assert_allclose(rematted.apply({"params": params}, tokens, capture=("patterns",))[1]["patterns"],
                               m.apply({"params": params}, tokens, capture=("patterns",))[1]["patterns"], atol=1e-6)
