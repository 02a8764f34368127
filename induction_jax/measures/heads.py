"""Per-head evaluators of Olsson et al. (2022), docs/method.md §4: prefix matching, copying, previous token, QK trace.

Every evaluator scores all heads of all layers at once (one forward pass per batch, head axes kept in the einsums)
and returns float32 [n_layers, n_heads]. The randomised ones average over `eval_cfg.draws` draws of random tokens
from a caller-supplied sampler `sample(rng, shape) -> int array` (rng: a numpy Generator), so a run's token pool
(data/evalset.py), which leaves out the most and least common tokens of the corpus, plugs in; `uniform_sampler` is the
plain default for tests and toy models. `score` computes any of the five measures of a snapshot (MEASURES).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..base.config import EvalConfig, ModelConfig
from ..model.model import stacked
from .evaluate import host, padded_batches

Sampler = Callable[[np.random.Generator, tuple], np.ndarray]
# The head measures of an analysed snapshot, in the order of the results store's last axis.
MEASURES = ("prefix_matching", "copying", "previous_token", "qk_trace", "ov_copying")


def pool_sampler(pool_P: np.ndarray) -> Sampler:
    """Uniform draws (int32) from the token ids in `pool_P`."""
    pool_P = np.asarray(pool_P)
    if pool_P.size == 0:
        raise ValueError("pool_sampler: no tokens to draw from")
    return lambda rng, shape: pool_P[rng.integers(0, pool_P.size, size=shape)].astype(np.int32)


def uniform_sampler(vocab_size: int, exclude=()) -> Sampler:
    """Uniform draws over [0, vocab_size) minus `exclude` (e.g. the BOS id)."""
    return pool_sampler(np.setdiff1d(np.arange(vocab_size), np.asarray(exclude, dtype=np.int64)))


def _generator(rng) -> np.random.Generator:
    return np.random.default_rng(rng)  # passes a Generator through unchanged, seeds one from an int


def _check_length(cfg: ModelConfig, t: int, what: str) -> None:
    if t > cfg.context:
        raise ValueError(f"{what}: needs {t} tokens but model.context={cfg.context}")


# --------------------------------------------------------------------------------------------- prefix matching

def prefix_matching_tokens(eval_cfg: EvalConfig, sample: Sampler, bos_id: int, rng) -> np.ndarray:
    """int32 [draws, 1 + prefix_tokens * repeats]: BOS, then `prefix_tokens` random tokens repeated `repeats` times."""
    seq_BN = np.asarray(sample(_generator(rng), (eval_cfg.draws, eval_cfg.prefix_tokens)), np.int32)
    bos_B1 = np.full((eval_cfg.draws, 1), bos_id, np.int32)
    return np.concatenate([bos_B1, np.tile(seq_BN, (1, eval_cfg.repeats))], axis=1)


def prefix_matching_from_patterns(patterns_LBHQK: jax.Array, tokens_BT: jax.Array, first_query: int) -> jax.Array:
    """[L, H]: mean over queries q >= first_query of the attention mass on {k + 1 : k < q, token k == token q}.

    Jittable (first_query static), so the training loop's live probe can reuse it. Position 0 (BOS) never counts
    as an earlier occurrence. Duplicates inside the random block are handled: every earlier occurrence counts.
    """
    t = tokens_BT.shape[1]
    q_Q, k_K = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    earlier_QK = (k_K < q_Q) & (k_K >= 1)
    occurrence_BQK = (tokens_BT[:, :, None] == tokens_BT[:, None, :]) & earlier_QK[None]
    # The target is the position after each earlier occurrence: shift the key axis right by one.
    target_BQK = jnp.pad(occurrence_BQK[:, :, :-1], ((0, 0), (0, 0), (1, 0)))
    mass_LBHQ = jnp.einsum("lbhqk,bqk->lbhq", patterns_LBHQK.astype(jnp.float32), target_BQK.astype(jnp.float32))
    n_queries = t - first_query
    return mass_LBHQ[..., first_query:].sum(axis=(1, 3)) / (tokens_BT.shape[0] * n_queries)


@functools.partial(jax.jit, static_argnames=("model", "first_query"))
def _prefix_matching(model, params, tokens_BT, first_query):
    patterns_LBHQK = model.apply({"params": params}, tokens_BT, capture=("patterns",))[1]["patterns"]
    return prefix_matching_from_patterns(patterns_LBHQK, tokens_BT, first_query)


def prefix_matching(model, params, eval_cfg: EvalConfig, sample: Sampler, bos_id: int, rng) -> np.ndarray:
    """float32 [L, H] prefix-matching scores (docs/method.md §4), averaged over `eval_cfg.draws` draws.

    Each draw is BOS followed by `prefix_tokens` (25) random tokens repeated `repeats` (4) times. For every query
    in repeats 2..4, the score is the attention mass on the positions right after earlier occurrences of the
    query's token; a perfect induction head scores ~1, a uniformly attending head about
    mean_q(#earlier occurrences / (q + 1)).
    """
    tokens_BT = prefix_matching_tokens(eval_cfg, sample, bos_id, rng)
    _check_length(model.cfg, tokens_BT.shape[1], "prefix_matching")
    first_query = 1 + eval_cfg.prefix_tokens
    return host(_prefix_matching(model, params, tokens_BT, first_query)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------- copying

def source_outputs(params: dict, attn_in_LBTD: jax.Array) -> jax.Array:
    """[L, B, T, H, D]: what each head would write if it attended only to source position t, i.e. LN1(x_t) W_V W_O.

    `attn_in_LBTD` is the model's "attn_inputs" capture (ln1's output at every layer). The head's result vector at
    query q is sum_t pattern[q, t] * this (positions never enter the value path, also not with shortformer
    positions, so this is exact for every position scheme).
    """
    value_LBTHE = jnp.einsum("lbtd,ldhe->lbthe", attn_in_LBTD.astype(jnp.float32),
                             stacked(params, "attn", "W_V").astype(jnp.float32))
    return jnp.einsum("lbthe,lhef->lbthf", value_LBTHE, stacked(params, "attn", "W_O").astype(jnp.float32))


def _direct_path(model, params, tokens_BT):
    """(o_LBKHD, pattern_LBHQK, inv_sigma_BQ): each head's per-source output in ln_final's frame (see `copying`),
    its attention pattern, and 1 / ln_final's normalisation at each query."""
    cfg = model.cfg
    cap = model.apply({"params": params}, tokens_BT, capture=("patterns", "attn_inputs", "ln_scales"))[1]
    pattern_LBHQK = cap["patterns"].astype(jnp.float32)
    # BOS (position 0) is where idle heads rest: it is neither a source nor one of the sample's tokens.
    out_LBKHD = source_outputs(params, cap["attn_inputs"])[:, :, 1:]
    if cfg.layer_norm:
        # Direct path through ln_final: the centring and learned scale act on the head's own vector; the
        # normalisation divides by the full residual's standard deviation at the query, sigma_q (the bias
        # belongs to no head).
        inv_sigma_BQ = cap["ln_scales"]["ln_final"].astype(jnp.float32)
        out_LBKHD = (out_LBKHD - out_LBKHD.mean(-1, keepdims=True)) * params["ln_final"]["scale"].astype(jnp.float32)
    else:
        inv_sigma_BQ = jnp.ones(tokens_BT.shape, jnp.float32)
    return out_LBKHD, pattern_LBHQK, inv_sigma_BQ


@functools.partial(jax.jit, static_argnames=("model",))
def _copying(model, params, tokens_BT):
    out_LBKHD, pattern_LBHQK, inv_sigma_BQ = _direct_path(model, params, tokens_BT)
    sample_BK = tokens_BT[:, 1:]
    w_u_DV = params["W_U"].astype(jnp.float32)
    # Only the logits of the sample's tokens and the mean logit are needed, so no [.., vocab] array is formed.
    logit_LBKHJ = jnp.einsum("lbkhd,dbj->lbkhj", out_LBKHD, w_u_DV[:, sample_BK])
    mean_LBKH = jnp.einsum("lbkhd,d->lbkh", out_LBKHD, w_u_DV.mean(axis=1))
    raise_LBKHJ = jax.nn.relu(logit_LBKHJ - mean_LBKH[..., None])

    n = sample_BK.shape[1]
    own_LBHK = jnp.diagonal(raise_LBKHJ, axis1=2, axis2=4)  # raise on the source's own token (j = k)
    j_J, k_K = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    repeated_BJ = ((sample_BK[:, :, None] == sample_BK[:, None, :]) & (k_K < j_J)[None]).any(-1)
    all_LBKH = jnp.einsum("lbkhj,bj->lbkh", raise_LBKHJ, (~repeated_BJ).astype(jnp.float32))

    # Each source counts with the attention it receives, in ln_final's scale at the query that reads it.
    weight_LBHK = jnp.einsum("lbhqk,bq->lbhk", pattern_LBHQK[..., 1:], inv_sigma_BQ)
    num_LBH = jnp.einsum("lbhk,lbhk->lbh", weight_LBHK, own_LBHK)
    den_LBH = num_LBH + jnp.einsum("lbhk,lbkh->lbh", weight_LBHK, all_LBKH)
    r_LBH = jnp.where(den_LBH > 0, num_LBH / jnp.where(den_LBH > 0, den_LBH, 1.0), jnp.nan)
    return (4.0 * r_LBH - 1.0).mean(axis=1)


def copying(model, params, eval_cfg: EvalConfig, sample: Sampler, bos_id: int, rng) -> np.ndarray:
    """float32 [L, H] copying scores in [-1, 1] (docs/method.md §4), averaged over `eval_cfg.draws` draws.

    Each draw is BOS followed by `prefix_tokens` (25) random tokens x_1..x_n. The paper omitted the BOS token here
    by mistake and says it should have been used; we use it, so that a head with nothing to do can rest on it
    rather than being forced onto the sample. For a head (l, h):

    - o_k = LN1_l(resid_l[k]) W_V W_O is what the head writes when it reads source k (k = 1..n); its result vector
      at query q is exactly sum_k A[q, k] o_k (A: the head's attention pattern; BOS's share is left out).
    - Direct path: d_k = ((o_k - mean_D o_k) * gamma_final) W_U is o_k's share of the logits through ln_final
      (its centring and learned scale; the residual's normalisation 1/sigma_q at the reading query is a positive
      per-query factor and goes into the weight below; ln_final's bias belongs to no head). Without LayerNorm,
      d_k = o_k W_U and sigma_q = 1.
    - Raise: rho_k = ReLU(d_k - mean_vocab d_k).
    - a_k = rho_k[x_k], the raise on the attended-to token; s_k = sum over the distinct tokens u of the sample of
      rho_k[u], the raise on all tokens of this sample (it contains a_k).
    - w_k = sum_q A[q, k] / sigma_q, how much of o_k actually reaches the logits.
    - r = sum_k w_k a_k / sum_k w_k (a_k + s_k), in [0, 0.5]: 0.5 when the head raises only the attended token
      (then s_k = a_k), 0 when it raises only other tokens of the sample.
    - score = (r - 0.25) / 0.25 = 4 r - 1, the linear map of [0, 0.5] onto [-1, 1]; averaged over draws.

    ReLU is applied to each source's share d_k rather than to the attention-weighted sum: a head that splits its
    attention between tokens still copies each of them, and should not be scored by how sharply it attends (on
    random tokens nothing tells it where to attend). Chance: a head with random OV raises the attended token like
    any other, r ~ 1 / (1 + #distinct sample tokens), score ~ -0.85 for 25 tokens. A head that writes nothing
    (w_k * (a_k + s_k) = 0 for all k) scores NaN.
    """
    tokens_BT = _copy_tokens(eval_cfg, sample, bos_id, rng)
    _check_length(model.cfg, tokens_BT.shape[1], "copying")
    return host(_copying(model, params, tokens_BT)).astype(np.float32)


def _copy_tokens(eval_cfg: EvalConfig, sample: Sampler, bos_id: int, rng) -> np.ndarray:
    """int32 [draws, 1 + prefix_tokens]: BOS, then `prefix_tokens` random tokens (the copying evaluators' input)."""
    sample_BN = np.asarray(sample(_generator(rng), (eval_cfg.draws, eval_cfg.prefix_tokens)), np.int32)
    return np.concatenate([np.full((eval_cfg.draws, 1), bos_id, np.int32), sample_BN], axis=1)


_direct_outputs = jax.jit(lambda model, params, tokens_BT: _direct_path(model, params, tokens_BT)[0],
                          static_argnames=("model",))


@jax.jit
def _own_token_rank(out_BKHD, w_u_DV, sample_BK):
    logit_BKHV = jnp.einsum("bkhd,dv->bkhv", out_BKHD, w_u_DV.astype(jnp.float32))
    own_BKH = jnp.take_along_axis(logit_BKHV, sample_BK[:, :, None, None], axis=-1)
    return (logit_BKHV > own_BKH).sum(-1)


def copying_rank(model, params, eval_cfg: EvalConfig, sample: Sampler, bos_id: int, rng) -> dict[str, np.ndarray]:
    """A companion to `copying` that does not depend on how the raise is normalised: for each head, where the
    token a source holds ranks among all vocabulary logits of that source's direct-path output o_k (0 = the head
    raises exactly the token it reads above every other). Same inputs and draws as `copying`.

    Returns {"top1": float32 [L, H] share of sources ranked first, "median_rank": float32 [L, H]}. With
    vocabulary V, a head with a random OV circuit has top1 ~ 1/V and median rank ~ V/2.
    """
    tokens_BT = _copy_tokens(eval_cfg, sample, bos_id, rng)
    _check_length(model.cfg, tokens_BT.shape[1], "copying_rank")
    out_LBKHD = _direct_outputs(model, params, tokens_BT)  # one forward pass for every layer
    # Logits one layer at a time: [B, K, H, vocab] each, never [L, B, K, H, vocab].
    ranks_LBKH = np.stack([host(_own_token_rank(out_BKHD, params["W_U"], tokens_BT[:, 1:]))
                           for out_BKHD in out_LBKHD])
    return {"top1": (ranks_LBKH == 0).mean(axis=(1, 2)).astype(np.float32),
            "median_rank": np.median(ranks_LBKH, axis=(1, 2)).astype(np.float32)}


# -------------------------------------------------------------------------------------------------- OV copying

def ov_circuits(params: dict, model_cfg: ModelConfig) -> np.ndarray:
    """float32 [L, H, E, E]: for each head a d_head x d_head matrix with the same non-zero eigenvalues as its full
    OV circuit (the vocab x vocab matrix, which is never formed).

    Row-vector convention: a token's embedding reaches the logits through the head as
        M = E_c diag(gamma_1) W_V W_O C diag(gamma_f) U_c   [vocab x vocab]
    with E_c = W_E centred over d_model (ln1's centring), gamma_1 / gamma_f the learned scales of the head's ln1
    and of ln_final, C = I - 11^T/d_model (ln_final's centring of what the head writes) and U_c = W_U centred
    over the vocabulary (a constant shift of every logit changes no prediction). LayerNorm's normalisation is a
    positive per-token factor and its biases belong to no head, so both are left out (TransformerLens's fold_ln
    and center_unembed conventions). With M = A B, A = E_c diag(gamma_1) W_V [vocab x E] and
    B = W_O C diag(gamma_f) U_c [E x vocab], M and B A = W_O (C diag(gamma_f) U_c E_c diag(gamma_1)) W_V share
    their non-zero eigenvalues, and the bracket is only d_model x d_model.

    Computed on the parameters' devices under their shardings (U_c E_c is d_model x vocab x d_model: about 3 TFLOP
    for a 13B model), at full float32 matmul precision; only the [L, H, E, E] result comes to the host.
    """
    return host(_ov_circuits(params, model_cfg.layer_norm))


@functools.partial(jax.jit, static_argnames=("layer_norm",))
def _ov_circuits(params: dict, layer_norm: bool):
    exact = jax.lax.Precision.HIGHEST
    w_e_VD, w_u_DV = params["W_E"].astype(jnp.float32), params["W_U"].astype(jnp.float32)
    w_u_DV = w_u_DV - w_u_DV.mean(axis=1, keepdims=True)
    d = w_e_VD.shape[1]
    n_layers = sum(key.startswith("block_") for key in params)
    if layer_norm:
        w_e_VD = w_e_VD - w_e_VD.mean(axis=1, keepdims=True)
        out_DD = (jnp.eye(d) - 1.0 / d) * params["ln_final"]["scale"].astype(jnp.float32)[None, :]  # C diag(g_f)
        gamma_LD = stacked(params, "ln1", "scale").astype(jnp.float32)
    else:
        out_DD, gamma_LD = jnp.eye(d), jnp.ones((n_layers, d), jnp.float32)
    # C diag(gamma_f) U_c E_c, shared by every head; vocab is contracted first, so nothing vocab-sized is formed.
    loop_DD = jnp.matmul(out_DD, jnp.matmul(w_u_DV, w_e_VD, precision=exact), precision=exact)
    w_o_LHED = stacked(params, "attn", "W_O").astype(jnp.float32)
    w_v_LDHE = stacked(params, "attn", "W_V").astype(jnp.float32)
    return jax.lax.map(lambda a: jnp.einsum("hed,dc,c,chf->hef", a[0], loop_DD, a[1], a[2], precision=exact),
                       (w_o_LHED, gamma_LD, w_v_LDHE))


def ov_copying(params: dict, model_cfg: ModelConfig) -> np.ndarray:
    """float32 [L, H]: sum(Re lambda) / sum(|lambda|) over the eigenvalues lambda of each head's full OV circuit
    (`ov_circuits`), in [-1, 1]: +1 when the circuit maps every token onto itself with a positive weight (a
    copier), -1 an anti-copier, about 0 a random map. Weights only: no tokens, no forward pass. A head whose
    circuit is zero scores NaN.

    Unlike `copying`, it does not compare the attended token's logit with a handful of other tokens' logits, so the
    off-target noise of a low-rank circuit does not cap it; every head of a freshly trained model tends to score
    high, so it classifies induction heads only together with prefix matching.
    """
    lam_LHE = np.linalg.eigvals(ov_circuits(params, model_cfg).astype(np.float64))
    total_LH = np.abs(lam_LHE).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        score_LH = np.where(total_LH > 0, lam_LHE.real.sum(-1) / total_LH, np.nan)
    return score_LH.astype(np.float32)


# ---------------------------------------------------------------------------------------------- previous token

def previous_token_from_patterns(patterns_LBHQK: jax.Array) -> jax.Array:
    """[L, B, H]: each example's mean attention from position i to i - 1 over i >= 1. Jittable: the training
    loop's live probe uses it too."""
    return jnp.diagonal(patterns_LBHQK.astype(jnp.float32), offset=-1, axis1=-2, axis2=-1).mean(-1)


@functools.partial(jax.jit, static_argnames=("model",))
def _previous_token(model, params, tokens_BT):
    patterns_LBHQK = model.apply({"params": params}, tokens_BT, capture=("patterns",))[1]["patterns"]
    return previous_token_from_patterns(patterns_LBHQK)


def previous_token(model, params, tokens_NL, batch_size: int = 8) -> np.ndarray:
    """float32 [L, H]: mean over examples and positions i >= 1 of the attention from position i to i - 1.

    `tokens_NL` should be real text from the training distribution (e.g. the start of the eval set). The last
    batch is padded and the padding rows dropped, so every batch has one compiled shape.
    """
    n, t = np.shape(tokens_NL)
    if t < 2:
        raise ValueError(f"previous_token: sequences need at least 2 tokens, got {t}")
    _check_length(model.cfg, t, "previous_token")
    total_LH = np.zeros((model.cfg.n_layers, model.cfg.n_heads), np.float64)
    for _, rows, batch_BT in padded_batches(tokens_NL, batch_size):
        total_LH += host(_previous_token(model, params, batch_BT))[:, :rows].sum(axis=1)
    return (total_LH / n).astype(np.float32)


# ------------------------------------------------------------------------------------------------- QK trace

def folded(params: dict, cfg: ModelConfig, name: str) -> jax.Array:
    """W_Q/W_K/W_V of every layer [L, D, H, E] with ln1's centring and learned scale folded in (C diag(gamma) W)."""
    w_LDHE = stacked(params, "attn", name).astype(jnp.float32)
    if not cfg.layer_norm:
        return w_LDHE
    w_LDHE = w_LDHE * stacked(params, "ln1", "scale").astype(jnp.float32)[:, :, None, None]
    return w_LDHE - w_LDHE.mean(axis=1, keepdims=True)  # C = I - 11^T/D, applied to the input side


def qk_trace(params: dict, model_cfg: ModelConfig, prev_token_scores) -> np.ndarray:
    """float32 [L, H]: the previous-token-weighted trace of the K-composition QK circuit (docs/method.md §4).

    For a head h in layer l >= 1 (0-based) and every head e in an earlier layer, with row-vector weights
    (q = x W_Q, o = x W_V W_O) the pure token-token K-composition term is the vocab x vocab matrix
        M_e = W_E W_Q^h (W_K^h)^T (W_O^e)^T (W_V^e)^T W_E^T
    (M_e[t, s]: how much a query on token t attends to a key whose previous position, read by e, holds token s;
    in the paper's column convention W_E^T W_QK^h W_OV^e W_E). We report sum_e p_e tr(M_e), p_e = e's
    previous-token score; positive = same-matching. tr(M_e) = tr(P1 P2) with P1 = (W_K^h)^T (W_O^e)^T
    [d_head x d_head] and P2 = (W_V^e)^T (W_E^T W_E) W_Q^h, so nothing larger than d_model x d_model is formed.

    Treatment, as in a weight-based analysis: each ln1's centring and learned scale are folded into the weights
    that read it (TransformerLens's fold_ln); its normalisation (a positive per-token factor) and biases are
    ignored. Positions (shortformer table, rotary) and smeared keys are ignored: they are not token-token terms.
    Layer-0 heads, and so every head of a 1-layer model, have no earlier head and get NaN.
    """
    n_layers, n_heads = model_cfg.n_layers, model_cfg.n_heads
    prev_LH = np.asarray(prev_token_scores, np.float32)
    if prev_LH.shape != (n_layers, n_heads):
        raise ValueError(f"qk_trace: prev_token_scores has shape {prev_LH.shape}, expected {(n_layers, n_heads)}")
    if n_layers < 2:
        return np.full((n_layers, n_heads), np.nan, np.float32)
    return host(_qk_traces(params, model_cfg.layer_norm, prev_LH)).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("layer_norm",))
def _qk_traces(params: dict, layer_norm: bool, prev_LH):
    """`qk_trace` as one device program, its d_head x d_head products formed for one (reader layer, writer layer)
    pair at a time, so that memory does not grow with depth (the [H, layers x H, E, E] products of a 40-layer
    model's last layer would be 4 GiB each)."""
    cfg = _LayerNormOnly(layer_norm)
    n_layers = sum(key.startswith("block_") for key in params)
    w_e_VD = params["W_E"].astype(jnp.float32)
    gram_DD = w_e_VD.T @ w_e_VD
    w_q_LDHE, w_k_LDHE = folded(params, cfg, "W_Q"), folded(params, cfg, "W_K")
    w_v_LDGF = folded(params, cfg, "W_V")
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


class _LayerNormOnly:
    """What `folded` reads of a model config, for a jitted function whose only static argument is that flag."""

    def __init__(self, layer_norm: bool):
        self.layer_norm = layer_norm


# ------------------------------------------------------------------------------------------- classification

def copying_measure(eval_cfg: EvalConfig) -> str:
    """The name of the copying score that classifies induction heads (`eval.copying_measure`)."""
    return "ov_copying" if eval_cfg.copying_measure == "ov" else "copying"


def induction_heads(prefix_LH, copying_LH, eval_cfg: EvalConfig) -> np.ndarray:
    """bool [L, H]: prefix matching above `prefix_threshold` and copying (the score `copying_measure` names) above
    `copying_threshold`; NaN counts as False."""
    prefix_LH, copying_LH = np.asarray(prefix_LH), np.asarray(copying_LH)
    with np.errstate(invalid="ignore"):
        return (prefix_LH > eval_cfg.prefix_threshold) & (copying_LH > eval_cfg.copying_threshold)


# -------------------------------------------------------------------------------------------- every measure

def score(model, params, eval_cfg: EvalConfig, sample: Sampler, bos_id: int, seed: int, prev_tokens_NL,
          measures=MEASURES) -> dict[str, np.ndarray]:
    """{measure: float32 [L, H]} of one snapshot, for the named `measures` (all of MEASURES by default).

    The random draws are seeded with `seed` (prefix matching) and `seed + 1` (copying), so every snapshot of a run
    is scored on the same tokens. The previous-token score, which the QK trace weights by, reads `prev_tokens_NL`
    (real text, e.g. the start of the eval set) in batches of `eval_cfg.batch_size`.
    """
    unknown = sorted(set(measures) - set(MEASURES))
    if unknown:
        raise ValueError(f"score: unknown measures {unknown}; choose from {MEASURES}")
    out = {}
    if "prefix_matching" in measures:
        out["prefix_matching"] = prefix_matching(model, params, eval_cfg, sample, bos_id,
                                                 np.random.default_rng(seed))
    if "copying" in measures:
        out["copying"] = copying(model, params, eval_cfg, sample, bos_id, np.random.default_rng(seed + 1))
    if {"previous_token", "qk_trace"} & set(measures):
        out["previous_token"] = previous_token(model, params, prev_tokens_NL, batch_size=eval_cfg.batch_size)
        if "qk_trace" in measures:
            out["qk_trace"] = qk_trace(params, model.cfg, out["previous_token"])
    if "ov_copying" in measures:
        out["ov_copying"] = ov_copying(params, model.cfg)
    return {m: out[m] for m in measures}
