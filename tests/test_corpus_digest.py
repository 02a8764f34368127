"""The demo's corpus (the standard library plus the locked venv's site-packages) is the same on every machine with
the same Python version: its content digest matches the one recorded in configs/cpu/corpus-digests.json."""

import hashlib
import json
import platform
from pathlib import Path

import pytest

from induction_jax.base import config
from induction_jax.data import corpus, sources
from induction_jax import demo

ROOT = Path(__file__).resolve().parents[1]


def test_lock_mismatches_names_what_differs(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("numpy==0.0.1 \\\n    --hash=sha256:00\npytest==0.0.2 ; python_version < '3'\n")
    found = demo.lock_mismatches(lock)
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
    mismatches = demo.lock_mismatches()
    if mismatches:
        pytest.skip(f"not the environment of {demo.LOCK} (make test builds it): {mismatches[:3]}")
    cfg = config.load(ROOT / "configs/cpu/attn_only_2l.yaml")
    content = hashlib.sha256()  # what prepare records as content_sha256: every document's name and text, in order
    for piece in sources.plan(corpus.resolve(cfg.data), cfg.data):
        content.update(sources.read_piece(piece, cfg.data).digests)
    assert content.hexdigest() == record["content_sha256"]
