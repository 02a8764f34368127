"""The package's layers hold, and its documents name only what exists.

- The import-linter contracts in pyproject.toml (docs/architecture.md) catch an upward import: planted in a
  copy of the package, between subpackages and between the modules of one subpackage, lint-imports fails on it.
- Every module and public name that README.md and docs/*.md mention resolves: `induction_jax.x.y` (a module, or
  a name in one), `from induction_jax[.x] import a, b`, `induction_jax/x/y.py` file paths, and a module's name
  used short in backticks (`heads.copying_rank`), where the short name is one module's and no config section's.
"""

import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the package copy under `root` (found first on the path, before the installed one)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache", "--no-logo", "pyproject.toml"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def package_copy(tmp_path):
    shutil.copytree(ROOT / "induction_jax", tmp_path / "induction_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.slow
def test_lint_imports_fails_on_an_upward_import(package_copy):
    r = _lint(package_copy)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]  # the copy itself keeps every contract
    planted = package_copy / "induction_jax" / "measures" / "heads.py"
    planted.write_text(planted.read_text() + "\n\nfrom ..analysis import results  # noqa: E402 - planted\n")
    r = _lint(package_copy)
    assert r.returncode != 0, r.stdout[-3000:]
    assert "induction_jax.measures.heads -> induction_jax.analysis.results" in r.stdout, r.stdout[-3000:]


@pytest.mark.slow
def test_lint_imports_fails_on_an_upward_import_inside_a_subpackage(package_copy):
    planted = package_copy / "induction_jax" / "data" / "corpus.py"
    planted.write_text(planted.read_text() + "\n\nfrom . import dataset  # noqa: E402 - planted\n")
    r = _lint(package_copy)
    assert r.returncode != 0, r.stdout[-3000:]
    assert "induction_jax.data.corpus -> induction_jax.data.dataset" in r.stdout, r.stdout[-3000:]


# ------------------------------------------------------------------------------------------- names in documents

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOTTED = re.compile(r"(?<![\w/.~-])induction_jax(?:\.\w+)+")
FROM_IMPORT = re.compile(r"from (induction_jax(?:\.\w+)*) import \(?([\w ,]+)\)?")
FILE = re.compile(r"(?<![\w/.~-])induction_jax(?:/\w+)+\.py\b")
SHORT = re.compile(r"`(\w+)\.(\w+)[`(]")
CONFIG_SECTIONS = {"model", "data", "train", "snapshots", "mesh", "eval", "analysis"}  # `model.n_layers` is a config key
FILE_SUFFIXES = {"csv", "json", "jsonl", "lock", "log", "md", "npz", "png", "py", "svg", "toml", "txt", "yaml", "zarr"}


def _modules_by_short_name() -> dict[str, str]:
    """{short name: module} for the package's modules whose short name is theirs alone and no config section's."""
    import induction_jax
    names: dict[str, list[str]] = {}
    for m in pkgutil.walk_packages(induction_jax.__path__, "induction_jax."):
        names.setdefault(m.name.rsplit(".", 1)[1], []).append(m.name)
    return {short: full[0] for short, full in names.items() if len(full) == 1 and short not in CONFIG_SECTIONS}


def _mentions() -> list[tuple[str, str]]:
    found = set()
    modules = _modules_by_short_name()
    for doc in DOCS:
        text = doc.read_text()
        found |= {(doc.name, f"{modules[m[1]]}.{m[2]}") for m in SHORT.finditer(text)
                  if m[1] in modules and m[2] not in FILE_SUFFIXES}  # not `metrics.jsonl`
        found |= {(doc.name, m[0]) for m in DOTTED.finditer(text)}
        found |= {(doc.name, m[0]) for m in FILE.finditer(text)}
        for m in FROM_IMPORT.finditer(text):
            for name in m[2].split(","):
                name = name.split(" as ")[0].strip()
                if name:
                    found.add((doc.name, f"{m[1]}.{name}"))
    return sorted(found)


MENTIONS = _mentions()


def test_the_documents_mention_modules_at_all():
    names = {name for _, name in MENTIONS}
    assert {"induction_jax.Run", "induction_jax/training/hostmem.py", "induction_jax.model.model.Transformer"} <= names


@pytest.mark.parametrize("doc,name", MENTIONS, ids=[f"{d}:{n}" for d, n in MENTIONS])
def test_every_name_a_document_mentions_resolves(doc, name):
    if name.endswith(".py"):
        assert (ROOT / name).is_file(), f"{doc} names {name}, which does not exist"
        return
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            assert hasattr(obj, attr), f"{doc} names {name}: {'.'.join(parts[:i])} has no {attr}"
            obj = getattr(obj, attr)
        return
    pytest.fail(f"{doc} names {name}, which is no module")
