"""The demo's corpus (the standard library plus the locked venv's site-packages) is the same on every machine with
the same Python version: its content digest matches the one recorded in configs/cpu/corpus-digests.json."""

import hashlib
import json
import platform
import re
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker

from induction_jax import demo
from induction_jax.base import config
from induction_jax.data import corpus, sources

ROOT = Path(__file__).resolve().parents[1]


def lock_mismatches(lock: str | Path = demo.LOCK) -> list[str]:
    """How this environment differs from the lock file ("name: installed X, locked Y"); empty when it matches.

    The demo's corpus includes the venv's site-packages, so only the locked environment reproduces the recorded
    corpus (and with it the recorded data order)."""
    out, locked = [], {"pip", "setuptools", "induction-jax"}  # the venv's own tools, and this package
    for line in Path(lock).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", line)
        if not m or (m[3] and not Marker(m[3]).evaluate()):
            continue
        locked.add(re.sub(r"[-_.]+", "-", m[1]).lower())
        try:
            have = metadata.version(m[1])
        except metadata.PackageNotFoundError:
            have = "none"
        if have != m[2]:
            out.append(f"{m[1]}: installed {have}, locked {m[2]}")
    # The corpus reads site-packages, not what PYTHONPATH adds (make test's zstandard, kept out of the corpus).
    site = list(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    for dist in metadata.distributions(path=site):
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()
        if name and name not in locked:
            out.append(f"{name}: installed {dist.version}, not in the lock")
    return sorted(set(out))


def test_lock_mismatches_names_what_differs(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("numpy==0.0.1 \\\n    --hash=sha256:00\npytest==0.0.2 ; python_version < '3'\n")
    found = lock_mismatches(lock)
    assert any(f.startswith("numpy: installed ") and f.endswith("locked 0.0.1") for f in found), found
    # what the lock does not name (here jax; pytest's line is for another Python) is named too
    assert any(f.startswith("jax: installed") and f.endswith("not in the lock") for f in found)
    assert any(f.startswith("pytest: installed") and f.endswith("not in the lock") for f in found)
    assert not any(f.startswith(("pip:", "setuptools:")) for f in found)


def test_demo_corpus_matches_the_recorded_digest(monkeypatch):
    key = f"python {platform.python_version()}"
    record = json.loads((ROOT / demo.DIGESTS).read_text()).get(key)
    if record is None:
        pytest.skip(f"{demo.DIGESTS} records no digest for {key}")
    monkeypatch.chdir(ROOT)
    mismatches = lock_mismatches()
    if mismatches:
        pytest.skip(f"not the environment of {demo.LOCK} (make test builds it): {mismatches[:3]}")
    cfg = config.load(ROOT / "configs/cpu/attn_only_2l.yaml")
    content = hashlib.sha256()  # what prepare records as content_sha256: every document's name and text, in order
    for piece in sources.plan(corpus.resolve(cfg.data), cfg.data):
        content.update(sources.read_piece(piece, cfg.data).digests)
    assert content.hexdigest() == record["content_sha256"]
