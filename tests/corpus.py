"""A small real corpus for tests: a few standard-library packages copied into a directory (fast to tokenize)."""

import shutil
import sysconfig
from pathlib import Path

PACKAGES = ("json", "email", "importlib", "unittest")


def make_corpus(root: Path) -> Path:
    src = Path(sysconfig.get_paths()["stdlib"])
    out = root / "corpus"
    if not out.exists():
        for pkg in PACKAGES:
            shutil.copytree(src / pkg, out / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return out


def tiny_overrides(root: Path) -> list[str]:
    """Overrides that point configs/cpu/tiny.yaml at the test corpus and a private data cache."""
    corpus = make_corpus(root)
    return [f"data.sources=[{corpus}]", f"data.cache_dir={root / 'cache'}", "data.site_packages=false",
            "data.eval_fraction=0.15"]


def prepared_tiny(root: Path) -> tuple[Path, list[str]]:
    """(root, overrides) with configs/cpu/tiny.yaml's data already prepared, so subprocesses find it cached."""
    from induction_jax.base import config
    from induction_jax.data import dataset

    overrides = tiny_overrides(root)
    dataset.prepare(config.load("configs/cpu/tiny.yaml", overrides), progress=False)
    return root, overrides


def one_line_error(cfg, *needles) -> str:
    """Prepares `cfg`, expecting a one-line ConfigError that contains every needle; returns the message."""
    import pytest

    from induction_jax.base import config
    from induction_jax.data import dataset

    with pytest.raises(config.ConfigError) as e:
        dataset.prepare(cfg, progress=False)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg
