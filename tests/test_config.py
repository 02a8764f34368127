import glob

import pytest

from induction_jax.base import config


def test_every_config_file_loads():
    files = glob.glob("configs/**/*.yaml", recursive=True)
    assert len(files) >= 20
    for f in files:
        config.load(f)


def test_paper_configs_exist():
    names = [f"attn_only_{n}l" for n in range(1, 7)] + [f"mlp_{n}l" for n in range(1, 7)]
    names += ["smeared_key_1l", "smeared_key_2l"] + [f"full_{n}l" for n in (4, 6, 10, 16, 24, 40)]
    for n in names:
        cfg = config.load(f"configs/{n}.yaml")
        if n.startswith("full"):
            assert cfg.model.d_model == 128 * cfg.model.n_layers
            assert cfg.model.d_mlp == 4 * cfg.model.d_model


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  n_layers: 3\n  d_model: 64\ntrain:\n  lr: 0.1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel:\n  n_layers: 1\n")
    cfg = config.load(tmp_path / "b.yaml", ["train.lr=1e-3", "model.n_heads=2"])
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.train.lr, cfg.model.n_heads) == (1, 64, 1e-3, 2)
    with pytest.raises(AttributeError):  # frozen
        cfg.model.n_layers = 5


@pytest.mark.parametrize("text,overrides,needle", [
    ("model:\n  n_layer: 2\n", [], "model.n_layer"),
    ("model:\n  n_layers: two\n", [], "model.n_layers"),
    ("model:\n  d_model: 100\n  n_heads: 3\n", [], "model.d_model"),
    ("model:\n  head_dim: -8\n", [], "model.head_dim"),
    ("train:\n  steps: 10\n  cooldown_steps: 11\n", [], "train.cooldown_steps"),
    ("train:\n  decay: cosine\n  cooldown_steps: 5\n", [], "train.cooldown_steps"),
    ("model:\n  local_heads: 1\n  local_window: 999\n  context: 64\n", [], "model.local_window"),
    ("model:\n  smeared_key: true\n  positions: rotary\n", [], "model.smeared_key"),
    ("model:\n  vocab_size: 70000\n", [], "model.vocab_size"),
    ("", ["model.attention_kernel=flash"], "model.attention_kernel"),
    ("model:\n  context: 200\n  attention_kernel: splash\n", [], "model.attention_kernel"),
    ("", ["train.nope=1"], "train.nope"),
    ("", ["model.d_model"], "model.d_model"),
])
def test_bad_configs_give_one_line_errors(tmp_path, text, overrides, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(f, overrides)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg
    assert (str(f) in msg) or ("command line" in msg)


def test_error_in_base_names_the_base_file(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  bogus: 1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(config.ConfigError, match="a.yaml"):
        config.load(tmp_path / "b.yaml")


def test_diff_lists_changed_keys():
    a = config.load(None)
    b = config.load(None, ["train.lr=0.5"])
    assert config.diff(a, b) == [f"train.lr: {a.train.lr!r} -> 0.5"]
