"""The TransformerLens export without TransformerLens: files, refusals, and logits of a numpy forward pass written
to TransformerLens's conventions (tests/test_export_tl.py loads the same exports into TransformerLens itself)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from induction_jax import Run, export
from induction_jax.base import cli
from tiny_runs import VARIANTS, all_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return all_runs(tmp_path_factory.mktemp("export"))


def _gelu_new(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _rotary(x_BTHE, base):
    """TransformerLens's rotary (rotary_adjacent_pairs=False): halves of d_head rotated, positions on axis 1."""
    t, e = x_BTHE.shape[1], x_BTHE.shape[-1]
    freq = np.tile(base ** (np.arange(e // 2) / (e / 2)), 2)
    angles_TE = np.arange(t)[:, None] / freq[None, :]
    flipped = np.concatenate([-x_BTHE[..., e // 2:], x_BTHE[..., : e // 2]], axis=-1)
    return x_BTHE * np.cos(angles_TE)[None, :, None] + flipped * np.sin(angles_TE)[None, :, None]


def tl_forward(sd, cfg, tokens_BT):
    """HookedTransformer's forward pass in float64 numpy, from its config and state dict: W_Q [H, D, E]; shortformer
    positions added after ln1 to the query/key inputs only, standard ones to the residual stream."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}

    def ln(x, name):
        if cfg["normalization_type"] is None:
            return x
        x = x - x.mean(-1, keepdims=True)
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg["eps"]) * sd[f"{name}.w"] + sd[f"{name}.b"]

    t = tokens_BT.shape[1]
    kind = cfg["positional_embedding_type"]
    resid = sd["embed.W_E"][tokens_BT]
    pos = sd["pos_embed.W_pos"][:t] if kind in ("standard", "shortformer") else 0.0
    if kind == "standard":
        resid = resid + pos
    q_pos, k_pos = np.arange(t)[:, None], np.arange(t)[None, :]
    mask = k_pos <= q_pos
    if cfg.get("use_local_attn"):
        mask &= k_pos > q_pos - cfg["window_size"]
    for layer in range(cfg["n_layers"]):
        p = f"blocks.{layer}"
        x = ln(resid, f"{p}.ln1")
        qk_in = x + pos if kind == "shortformer" else x
        q = np.einsum("btd,hde->bthe", qk_in, sd[f"{p}.attn.W_Q"]) + sd[f"{p}.attn.b_Q"]
        k = np.einsum("btd,hde->bthe", qk_in, sd[f"{p}.attn.W_K"]) + sd[f"{p}.attn.b_K"]
        v = np.einsum("btd,hde->bthe", x, sd[f"{p}.attn.W_V"]) + sd[f"{p}.attn.b_V"]
        if kind == "rotary":
            q, k = _rotary(q, cfg["rotary_base"]), _rotary(k, cfg["rotary_base"])
        s = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(cfg["d_head"])
        s = np.where(mask, s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        z = np.einsum("bhqk,bkhe->bqhe", a, v)
        resid = resid + np.einsum("bqhe,hed->bqd", z, sd[f"{p}.attn.W_O"]) + sd[f"{p}.attn.b_O"]
        if not cfg["attn_only"]:
            assert cfg["act_fn"] == "gelu_new"
            hidden = _gelu_new(ln(resid, f"{p}.ln2") @ sd[f"{p}.mlp.W_in"] + sd[f"{p}.mlp.b_in"])
            resid = resid + hidden @ sd[f"{p}.mlp.W_out"] + sd[f"{p}.mlp.b_out"]
    return ln(resid, "ln_final") @ sd["unembed.W_U"] + sd["unembed.b_U"]


def _export(run_dir, step, out):
    with pytest.raises(SystemExit) as e:
        cli.run(export.main, [str(run_dir), "--step", str(step), "--out", str(out)])
    assert e.value.code == 0
    return json.loads((out / "config.json").read_text()), dict(np.load(out / "weights.npz"))


@pytest.mark.parametrize("name", ["trained", *VARIANTS])
def test_export_gives_the_same_logits_under_transformer_lens_conventions(runs, name, tmp_path):
    run_dir, step = runs[name]
    cfg, sd = _export(run_dir, step, tmp_path / "tl")
    run = Run(run_dir)
    tokens = run.eval_set.tokens_NL[:4]
    ours = np.asarray(run.model.apply({"params": run.params(step)}, tokens))
    theirs = tl_forward(sd, cfg, tokens)
    assert np.abs(ours).max() > 1.0  # logits large enough for a misplaced weight to show
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_export_files_say_what_they_hold_and_how_to_load(runs, tmp_path):
    run_dir, step = runs["trained"]
    out = tmp_path / "tl"
    cfg, sd = _export(run_dir, step, out)
    assert cfg["positional_embedding_type"] == "shortformer" and cfg["normalization_type"] == "LN"
    assert cfg["n_ctx"] == 32 and cfg["d_head"] == 8 and cfg["attn_only"] is True
    assert sd["blocks.0.attn.W_Q"].shape == (4, 32, 8) and sd["pos_embed.W_pos"].shape == (32, 32)
    assert all(v.dtype == np.float32 for v in sd.values())
    meta = json.loads((out / "export.json").read_text())
    assert meta["step"] == step and meta["run"] == str(run_dir.resolve())
    assert "strict=True" in "\n".join(meta["load"]) and "process_weights_()" in meta["warning"]
    assert not list(out.glob(".*"))  # no temporary file left

    mlp_cfg, mlp_sd = _export(runs["mlp"][0], 0, tmp_path / "mlp")
    assert mlp_cfg["act_fn"] == "gelu_new" and mlp_cfg["d_mlp"] == 64 and mlp_sd["blocks.1.mlp.W_in"].shape == (32, 64)
    _export(runs["learned_positions"][0], 0, tmp_path / "learned")
    assert "warning" not in json.loads((tmp_path / "learned" / "export.json").read_text())
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "\n".join(export.LOAD) in readme  # the README's loading lines are the ones export.json gives


def _one_line_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(export.main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("name,edit,key", [
    ("learned_positions", ("smeared_key: false", "smeared_key: true"), "model.smeared_key=true"),
    ("local_heads", ("local_heads: 4", "local_heads: 2"), "model.local_heads=2 of model.n_heads=4")])
def test_export_refuses_what_transformer_lens_cannot_represent(runs, tmp_path, capsys, name, edit, key):
    run_dir = tmp_path / "run"
    shutil.copytree(runs[name][0], run_dir)
    text = (run_dir / "config.yaml").read_text()
    assert edit[0] in text
    (run_dir / "config.yaml").write_text(text.replace(edit[0], edit[1]))
    err = _one_line_error([str(run_dir), "--step", "0", "--out", str(tmp_path / "tl")], capsys)
    assert f"{run_dir / 'config.yaml'}: {key}" in err and "nothing exported" in err
    assert not (tmp_path / "tl").exists()


def test_export_of_a_step_without_snapshot_is_one_line(runs, tmp_path, capsys):
    run_dir, _ = runs["trained"]
    err = _one_line_error([str(run_dir), "--step", "5", "--out", str(tmp_path / "tl")], capsys)
    assert "no committed snapshot at step 5" in err
