"""Attention cores on heads-major [B, H, T, d] queries, keys and values (docs/method.md §7).

Two paths compute the same causal (optionally windowed) softmax attention:
- `explicit` materialises every pattern [B, H, Q, K]: analysis, ablations and `capture=("patterns",)` need them.
- `fused` never returns patterns, which lets training skip work. It runs one of three kernels
  (`model.attention_kernel`), by default the one made for the platform the program is compiled for (the mesh's
  devices, else jax's backend):
  - `splash` on TPU: the Pallas splash-attention kernel of jax.experimental, which skips the masked-out blocks
    of causal and windowed heads; under a mesh it runs per shard (batch over the batch axes, heads over tensor);
  - `dot_product` on GPU: `jax.nn.dot_product_attention` with cuDNN's fused kernel for bfloat16/float16 inputs,
    else (float32, or inputs cuDNN refuses) its XLA implementation, which forms the scores;
  - `blocked` elsewhere: a causal-blocked attention with its own backward pass (the flash-attention recurrence
    in plain XLA): query blocks skip the keys after them. The backward reuses the forward's patterns while they
    fit in `SAVED_PATTERN_BYTES`, and otherwise recomputes each block's pattern from the saved log-sum-exp
    instead of storing T x T patterns.

`windows` gives each head's window (a head attends to keys k with q - window < k <= q); dense heads have
window >= T. `fused` and `blocked` take queries already scaled by 1/sqrt(d_head).
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ..base.config import SPLASH_TILE

NEG = jnp.finfo(jnp.float32).min
log = logging.getLogger(__name__)


def mask_HQK(windows: tuple[int, ...], q0: int, n_q: int, n_k: int) -> jax.Array:
    """[H, n_q, n_k] True where query q0 + i may attend to key j. Built from iotas inside the traced function, so
    XLA fuses it into the masking rather than embedding an H x T x T constant in every layer's program."""
    q = q0 + jnp.arange(n_q)[:, None]
    k = jnp.arange(n_k)[None, :]
    window_H = jnp.asarray(windows, jnp.int32)[:, None, None]
    return (k <= q)[None] & (q - k < window_H)


def _scores(q_BHQd, k_BHKd, windows, q0: int, divisor: float = 1.0) -> jax.Array:
    s_BHQK = jnp.einsum("bhqe,bhke->bhqk", q_BHQd, k_BHKd).astype(jnp.float32)
    if divisor != 1.0:
        s_BHQK = s_BHQK / divisor
    return jnp.where(mask_HQK(windows, q0, q_BHQd.shape[2], k_BHKd.shape[2])[None], s_BHQK, NEG)


def explicit(q_BHTd, k_BHTd, v_BHTd, windows: tuple[int, ...], pattern_BHQK=None):
    """(z [B, H, T, d], pattern [B, H, Q, K] in float32) from unscaled queries. A given pattern replaces the
    computed one."""
    if pattern_BHQK is None:
        pattern_BHQK = jax.nn.softmax(_scores(q_BHTd, k_BHTd, windows, 0, math.sqrt(q_BHTd.shape[-1])), axis=-1)
    z_BHTd = jnp.einsum("bhqk,bhke->bhqe", pattern_BHQK.astype(v_BHTd.dtype), v_BHTd)
    return z_BHTd, pattern_BHQK


def _bounds(t: int, block: int) -> list[tuple[int, int]]:
    return [(a, min(a + block, t)) for a in range(0, t, block)]


# Up to this many bytes of float32 patterns per call, the backward pass reuses the forward's patterns instead of
# recomputing them from the log-sum-exp. On the 2-layer CPU model (batch 32, context 256, 4 heads, blocks of 64)
# that made attention's forward plus backward 1.3x faster; past the limit, memory matters more than the saved
# matmul.
SAVED_PATTERN_BYTES = 256 << 20


def _pattern_bytes(shape_BHTd, block: int) -> int:
    b, h, t, _ = shape_BHTd
    return 4 * b * h * sum((q1 - q0) * q1 for q0, q1 in _bounds(t, block))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def blocked(q_BHTd, k_BHTd, v_BHTd, windows: tuple[int, ...], block: int):
    """z [B, H, T, d]: causal attention by query blocks of `block`; block i reads only keys < its end."""
    return _blocked_lse(q_BHTd, k_BHTd, v_BHTd, windows, block)[0]


def _blocked_lse(q_BHTd, k_BHTd, v_BHTd, windows, block):
    zs, lses = [], []
    for q0, q1 in _bounds(q_BHTd.shape[2], block):
        s_BHQK = _scores(q_BHTd[:, :, q0:q1], k_BHTd[:, :, :q1], windows, q0)
        m_BHQ1 = s_BHQK.max(-1, keepdims=True)
        e_BHQK = jnp.exp(s_BHQK - m_BHQ1)
        l_BHQ1 = e_BHQK.sum(-1, keepdims=True)
        # Normalising the [Q, d] output instead of the [Q, K] pattern saves a pass over the pattern.
        z = jnp.einsum("bhqk,bhke->bhqe", e_BHQK.astype(v_BHTd.dtype), v_BHTd[:, :, :q1]).astype(jnp.float32)
        zs.append((z / l_BHQ1).astype(v_BHTd.dtype))
        lses.append(m_BHQ1 + jnp.log(l_BHQ1))
    return jnp.concatenate(zs, 2), jnp.concatenate(lses, 2)


def _blocked_fwd(q_BHTd, k_BHTd, v_BHTd, windows, block):
    if _pattern_bytes(q_BHTd.shape, block) > SAVED_PATTERN_BYTES:
        z_BHTd, lse_BHT1 = _blocked_lse(q_BHTd, k_BHTd, v_BHTd, windows, block)
        return z_BHTd, (q_BHTd, k_BHTd, v_BHTd, z_BHTd, lse_BHT1, None)
    zs, patterns = [], []
    for q0, q1 in _bounds(q_BHTd.shape[2], block):
        p_BHQK = jax.nn.softmax(_scores(q_BHTd[:, :, q0:q1], k_BHTd[:, :, :q1], windows, q0), axis=-1)
        zs.append(jnp.einsum("bhqk,bhke->bhqe", p_BHQK.astype(v_BHTd.dtype), v_BHTd[:, :, :q1]))
        patterns.append(p_BHQK)
    return jnp.concatenate(zs, 2), (q_BHTd, k_BHTd, v_BHTd, None, None, tuple(patterns))


def _blocked_bwd(windows, block, res, dz_BHTd):
    q_BHTd, k_BHTd, v_BHTd, z_BHTd, lse_BHT1, patterns = res
    t, cdt = q_BHTd.shape[2], v_BHTd.dtype
    if patterns is None:
        # rowsum(P * dP) equals rowsum(dz * z): a [T, d] product instead of a [T, T] one.
        delta_BHT1 = (dz_BHTd.astype(jnp.float32) * z_BHTd.astype(jnp.float32)).sum(-1, keepdims=True)
    dqs = []
    dk_BHTd = jnp.zeros(k_BHTd.shape, jnp.float32)
    dv_BHTd = jnp.zeros(v_BHTd.shape, jnp.float32)
    for i, (q0, q1) in enumerate(_bounds(t, block)):
        q_blk, dz_blk = q_BHTd[:, :, q0:q1], dz_BHTd[:, :, q0:q1]
        dp_BHQK = jnp.einsum("bhqe,bhke->bhqk", dz_blk, v_BHTd[:, :, :q1]).astype(jnp.float32)
        if patterns is None:
            p_BHQK = jnp.exp(_scores(q_blk, k_BHTd[:, :, :q1], windows, q0) - lse_BHT1[:, :, q0:q1])
            ds_BHQK = (p_BHQK * (dp_BHQK - delta_BHT1[:, :, q0:q1])).astype(cdt)
        else:
            # With the pattern at hand XLA fuses this row sum into ds; the dz * z form measured 1.2x slower here.
            p_BHQK = patterns[i]
            ds_BHQK = (p_BHQK * (dp_BHQK - (p_BHQK * dp_BHQK).sum(-1, keepdims=True))).astype(cdt)
        dqs.append(jnp.einsum("bhqk,bhke->bhqe", ds_BHQK, k_BHTd[:, :, :q1]))
        pad = ((0, 0), (0, 0), (0, t - q1), (0, 0))
        dv_BHTd += jnp.pad(jnp.einsum("bhqk,bhqe->bhke", p_BHQK.astype(cdt), dz_blk).astype(jnp.float32), pad)
        dk_BHTd += jnp.pad(jnp.einsum("bhqk,bhqe->bhke", ds_BHQK, q_blk).astype(jnp.float32), pad)
    return jnp.concatenate(dqs, 2), dk_BHTd.astype(k_BHTd.dtype), dv_BHTd.astype(cdt)


blocked.defvjp(_blocked_fwd, _blocked_bwd)


def platform() -> str:
    """The platform being compiled for: the devices of the mesh in context (`jax.set_mesh`), which may be a TPU
    slice compiled ahead of time from a CPU host, else jax's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh.abstract_device.platform
    return jax.default_backend()


def kernel_for(kernel: str, t: int, on: str | None = None) -> str:
    """The concrete kernel `fused` runs for `model.attention_kernel` = kernel at context t on platform `on`
    (default: `platform()`)."""
    if kernel == "auto":
        kernel = {"tpu": "splash", "gpu": "dot_product"}.get(on or platform(), "blocked")
        if kernel == "splash" and t % SPLASH_TILE:
            kernel = "blocked"
    return kernel


def fused(q_BHTd, k_BHTd, v_BHTd, windows: tuple[int, ...], block: int, kernel: str = "auto",
          batch_axes: tuple[str, ...] = ()):
    """z [B, H, T, d] without patterns, from `kernel` (`model.attention_kernel`; see `kernel_for`)."""
    kernel = kernel_for(kernel, q_BHTd.shape[2])
    if kernel == "dot_product":
        return dot_product(q_BHTd, k_BHTd, v_BHTd, windows)
    if kernel == "splash":
        return splash(q_BHTd, k_BHTd, v_BHTd, windows, block, batch_axes)
    return blocked(q_BHTd, k_BHTd, v_BHTd, windows, block)


# Larger splash tiles overflow the kernel's scoped VMEM on v5e (full_6l's step with 1,024 did not compile).
SPLASH_MAX_BLOCK = 512


def _splash_block(t: int, block: int) -> int:
    """The largest multiple of SPLASH_TILE that divides t and is at most clip(block, SPLASH_TILE,
    SPLASH_MAX_BLOCK)."""
    best = SPLASH_TILE
    for b in range(SPLASH_TILE, min(max(block, SPLASH_TILE), SPLASH_MAX_BLOCK, t) + 1, SPLASH_TILE):
        if t % b == 0:
            best = b
    return best


def splash(q_BHTd, k_BHTd, v_BHTd, windows: tuple[int, ...], block: int, batch_axes: tuple[str, ...] = ()):
    """z [B, H, T, d] from the Pallas splash-attention kernel (TPU; elsewhere its interpreter, for tests).

    Each head's mask is causal, or local with its window. Under a mesh the kernel runs in a shard_map: the batch
    over `batch_axes` and the heads over `tensor` where they divide, so each device runs it on its own sequences
    and heads and nothing is gathered. Queries come scaled by 1/sqrt(d_head)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, h, t, _ = q_BHTd.shape
    if t % SPLASH_TILE:
        raise ValueError(f"splash attention needs a context divisible by {SPLASH_TILE}, got {t}")
    mesh = jax.sharding.get_abstract_mesh()
    sharded = not mesh.empty and mesh.size > 1
    shape = (t, t)
    masks = sa.MultiHeadMask([sa.CausalMask(shape) if w >= t else sa.LocalMask(shape, (w - 1, 0), 0)
                              for w in windows])
    tile = _splash_block(t, block)
    sizes = sa.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile, block_q_dkv=tile,
                          block_kv_dkv=tile, block_kv_dkv_compute=tile, block_q_dq=tile, block_kv_dq=tile)
    head_axis = None
    if sharded and "tensor" in mesh.axis_names and mesh.shape["tensor"] > 1 and h % mesh.shape["tensor"] == 0:
        head_axis = "tensor"
    kernel = sa.make_splash_mha(masks, block_sizes=sizes, head_shards=mesh.shape[head_axis] if head_axis else 1,
                                q_seq_shards=1, interpret=platform() != "tpu")
    if not sharded:
        return jax.vmap(kernel)(q_BHTd, k_BHTd, v_BHTd)
    ways = math.prod(mesh.shape[a] for a in batch_axes)
    batch = batch_axes if batch_axes and b % ways == 0 else None
    spec = P(batch, head_axis, None, None)
    kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, P(head_axis, None)))
    run = jax.shard_map(lambda kern, q, k, v: jax.vmap(kern)(q, k, v), mesh=mesh,
                        in_specs=(kernel_spec, spec, spec, spec), out_specs=spec, check_vma=False)
    return run(kernel, q_BHTd, k_BHTd, v_BHTd)


def dot_implementations(dtype, on: str) -> tuple[str, ...]:
    """The `jax.nn.dot_product_attention` implementations to try, in order, for inputs of `dtype` on platform
    `on`. jax's default (None) is its XLA implementation, which forms the T x T scores: on GPU, half-precision
    inputs ask for cuDNN's fused kernel first, which takes only fp16/bf16."""
    if on == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return ("cudnn", "xla")
    return ("xla",)


def dot_product(q_BHTd, k_BHTd, v_BHTd, windows: tuple[int, ...], implementation: str | None = None):
    """z [B, H, T, d] from `jax.nn.dot_product_attention`: `implementation`, or the first of
    `dot_implementations` that accepts these inputs (cuDNN checks its version, dtypes and shapes as it traces)."""
    t = q_BHTd.shape[2]
    tries = (implementation,) if implementation else dot_implementations(q_BHTd.dtype, platform())
    zs = []
    # It takes one window for all heads: each run of heads with equal windows is one call.
    for h0, h1, window in _runs(windows):
        q, k, v = (x[:, h0:h1].transpose(0, 2, 1, 3) for x in (q_BHTd, k_BHTd, v_BHTd))  # [B, T, N, d]
        local = None if window >= t else (window - 1, 0)
        for i, impl in enumerate(tries):
            try:
                z = jax.nn.dot_product_attention(q, k, v, scale=1.0, is_causal=True, local_window_size=local,
                                                 implementation=impl)
                break
            except (RuntimeError, ValueError, NotImplementedError) as e:
                if i == len(tries) - 1:
                    raise
                _fallback_once(impl, str(e).splitlines()[0])
        zs.append(z.transpose(0, 2, 1, 3))
    return jnp.concatenate(zs, 1)


@functools.cache
def _fallback_once(impl: str, reason: str) -> None:
    log.warning("attention: %s refused these inputs (%s); using XLA's dot_product_attention, which forms the "
                "T x T scores", impl, reason)


def _runs(windows: tuple[int, ...]) -> list[tuple[int, int, int]]:
    runs, start = [], 0
    for h in range(1, len(windows) + 1):
        if h == len(windows) or windows[h] != windows[start]:
            runs.append((start, h, windows[start]))
            start = h
    return runs
