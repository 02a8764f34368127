"""The TransformerLens export loaded into TransformerLens itself, exactly as export.json says, and compared with
our model: logits, attention patterns and a pattern-preserving head ablation. Needs the `tl` extra."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

transformer_lens = pytest.importorskip(
    "transformer_lens", reason="TransformerLens is not installed (pip install -e '.[tl]' installs torch with it)")
import torch  # noqa: E402  (TransformerLens brings torch)

from induction_jax import Run, ablate, export  # noqa: E402
from induction_jax.measures import composition
from tiny_runs import VARIANTS, all_runs  # noqa: E402

# HookedTransformer warns on construction that TransformerLens 4 replaces it; the extra pins 3.x.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ABLATED = (0, 1)  # layer, head: a layer-0 head, so the frozen layer-1 patterns matter


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return all_runs(tmp_path_factory.mktemp("export_tl"))


def load(out, monkeypatch, **config_changes):
    """The HookedTransformer built by running export.json's own loading lines in the export directory."""
    meta = json.loads((out / "export.json").read_text())
    if config_changes:
        cfg = json.loads((out / "config.json").read_text()) | config_changes
        (out / "config.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(out)
    namespace = {}
    exec("\n".join(meta["load"]), namespace)
    return namespace["model"].eval()


def exported(runs, name, tmp_path):
    run_dir, step = runs[name]
    run = Run(run_dir)
    out = export.transformer_lens(run, step, tmp_path / "tl")
    tokens = np.asarray(run.eval_set.tokens_NL[:4], np.int32)
    return run, step, out, tokens


def tl_losses(model, tokens, hooks=()):
    with torch.no_grad():
        return model.run_with_hooks(torch.from_numpy(tokens.astype(np.int64)), return_type="loss",
                                    loss_per_token=True, fwd_hooks=list(hooks)).numpy()


@pytest.mark.parametrize("name", ["trained", *VARIANTS])
def test_transformer_lens_gives_our_logits_patterns_and_ablation(runs, name, tmp_path, monkeypatch):
    run, step, out, tokens = exported(runs, name, tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    transformer_lens.HookedTransformerConfig(**cfg)  # as it is: an extra key would be a TypeError
    model = load(out, monkeypatch)
    params = run.params(step)
    n_layers = run.config.model.n_layers

    logits, cap = run.model.apply({"params": params}, jnp.asarray(tokens), capture=("patterns",))
    with torch.no_grad():
        tl_logits, cache = model.run_with_cache(torch.from_numpy(tokens.astype(np.int64)))
    logit_diff = np.abs(tl_logits.numpy() - np.asarray(logits)).max()
    tl_patterns = np.stack([cache[f"blocks.{layer}.attn.hook_pattern"].numpy() for layer in range(n_layers)])
    pattern_diff = np.abs(tl_patterns - np.asarray(cap["patterns"])).max()

    # Pattern-preserving ablation (docs/method.md §5): the head's output zeroed, every pattern the clean one.
    layer, head = ABLATED
    masks = ablate.head_masks([ABLATED], n_layers, run.config.model.n_heads)
    ours = ablate.ablated_losses(run.model, params, jnp.asarray(tokens), masks, kind="pattern")[0]

    def zero_head(z, hook):
        z[:, :, head] = 0.0
        return z

    keep_patterns = [(f"blocks.{i}.attn.hook_pattern", lambda p, hook: cache[hook.name]) for i in range(n_layers)]
    theirs = tl_losses(model, tokens, keep_patterns + [(f"blocks.{layer}.attn.hook_z", zero_head)])
    ablation_diff = np.abs(theirs - ours).max()
    clean = tl_losses(model, tokens)
    print(f"\n{name}: max |logit diff| {logit_diff:.1e}, |pattern diff| {pattern_diff:.1e}, "
          f"|ablated loss diff| {ablation_diff:.1e} (ablation moves losses by up to {np.abs(ours - clean).max():.2f})")
    assert np.abs(ours - clean).max() > 1e-3  # the ablation does something to compare, 10x the tolerance
    assert logit_diff < 1e-4 and pattern_diff < 1e-4 and ablation_diff < 1e-4


def test_gelu_new_is_our_gelu_and_erf_gelu_is_not(runs, tmp_path, monkeypatch):
    run, step, out, tokens = exported(runs, "mlp", tmp_path)
    ours = np.asarray(run.model.apply({"params": run.params(step)}, jnp.asarray(tokens)))
    tokens_t = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        erf = load(out, monkeypatch, act_fn="gelu")(tokens_t).numpy()
    assert np.abs(erf - ours).max() > 3e-4  # three times the tolerance above: that test tells the two apart


@pytest.mark.parametrize("name", ["trained", *VARIANTS])
def test_process_weights_breaks_shortformer_layernorm_models_only(runs, name, tmp_path, monkeypatch):
    """TransformerLens's weight processing folds ln1 into W_Q/W_K and centres W_pos: exact when positions enter
    the residual stream or no LayerNorm is there to fold, wrong when a shortformer table is added after ln1."""
    run, _, out, tokens = exported(runs, name, tmp_path)
    model = load(out, monkeypatch)
    before = tl_losses(model, tokens)
    model.process_weights_()
    change = np.abs(tl_losses(model, tokens) - before).max()
    m = run.config.model
    print(f"\n{name}: process_weights_() changes per-token loss by up to {change:.2e} nats on {tokens.size} tokens")
    if m.positions == "shortformer" and m.layer_norm:
        assert change > 1e-4  # beyond the tolerance the export is held to (the trained model: 16 steps from init)
    else:
        assert change < 1e-4


@pytest.mark.parametrize("name", ["trained", *VARIANTS])
def test_transformer_lens_composition_scores_equal_ours_after_fold_ln_and_centring(runs, name, tmp_path, monkeypatch):
    """HookedTransformer.all_composition_scores on weights processed as our scores assume (ln1 scale and centring
    folded into W_Q/W_K/W_V, W_O centred over d_model; TransformerLens skips both without LayerNorm). Biases and
    positions play no part in the scores, so processing is right here even for a shortformer model, where it
    changes the forward pass (test above). TransformerLens puts 0 where l1 >= l2, we put NaN."""
    run, step, out, _ = exported(runs, name, tmp_path)
    model = load(out, monkeypatch)
    model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    with torch.no_grad():
        theirs = np.stack([model.all_composition_scores(mode.upper()).numpy() for mode in composition.MODES])
    ours = composition.composition_scores(run.params(step), run.config.model)
    later = ~np.isnan(ours)
    assert later.any() and (theirs[~later] == 0).all()
    diff = np.abs(theirs[later] - ours[later]).max()
    print(f"\n{name}: max |composition score diff| {diff:.1e} "
          f"(scores {ours[later].min():.3f}..{ours[later].max():.3f})")
    assert diff < 1e-5
