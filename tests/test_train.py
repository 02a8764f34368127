import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from corpus import prepared_tiny
from induction_jax.base import config
from induction_jax.data import dataset, evalset
from induction_jax.training import checkpoint, loop

TINY = "configs/cpu/tiny.yaml"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return prepared_tiny(tmp_path_factory.mktemp("train"))


def _cmd(run_dir, overrides, extra=()):
    return [sys.executable, "-m", "induction_jax.train", "--config", TINY, "--run-dir", str(run_dir),
            "--no-progress", *overrides, *extra]


def _env(devices=8):
    return {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu"}


def _final_params(run_dir):
    reader = checkpoint.SnapshotReader(run_dir)
    step = reader.steps()[-1]
    return step, jax.tree.map(np.asarray, reader.restore(step))


def _run(run_dir, overrides, extra=(), devices=8):
    r = subprocess.run(_cmd(run_dir, overrides, extra), env=_env(devices), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


LONG = ["train.steps=300", "train.resume_every=20", "snapshots.every=100", "train.probe_every=0"]


def test_kill_minus_9_then_resume_is_bitwise_identical(base, tmp_path):
    root, ov = base
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    _run(ref_dir, ov, LONG)
    p = subprocess.Popen(_cmd(killed_dir, ov, LONG), env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        steps = [int(d.name) for d in (killed_dir / "state").glob("*") if d.name.isdigit()]
        if steps and max(steps) >= 40:
            break
        time.sleep(0.01)
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = _run(killed_dir, ov, LONG)
    assert "resumed from step" in r.stdout
    resumed_at = int(r.stdout.split("resumed from step")[1].split()[0])
    assert 0 < resumed_at < 300
    s1, a = _final_params(ref_dir)
    s2, b = _final_params(killed_dir)
    assert s1 == s2 == 300
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # metrics.jsonl holds each step once, even though the killed run logged past its resume point
    steps = [json.loads(ln)["step"] for ln in (killed_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(ln)]
    assert steps == sorted(set(steps)) and steps[-1] == 300


def test_sigterm_saves_and_exits_zero(base, tmp_path):
    root, ov = base
    run_dir = tmp_path / "term"
    p = subprocess.Popen(_cmd(run_dir, ov, LONG + ["train.resume_every=1000"]), env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        m = run_dir / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) > 20:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    assert "preempted" in out
    saved = checkpoint.ResumeCheckpointer(run_dir / "state").latest_step()
    assert saved is not None and 0 < saved < 300  # saved at the step it stopped, not at a scheduled one


def test_eight_devices_match_one_device(base, tmp_path):
    root, ov = base
    short = ["train.steps=8", "train.probe_every=0"]
    _run(tmp_path / "one", ov, short, devices=1)
    _run(tmp_path / "eight", ov, short, devices=8)
    _, a = _final_params(tmp_path / "one")
    _, b = _final_params(tmp_path / "eight")
    # Data parallelism sums the gradient in another order. AdamW turns a rounding-level gradient difference into a
    # visible one only where an element's gradient is near zero (its step, lr * m / sqrt(v), is then sensitive):
    # allow such elements (at most 0.1%), each within one learning-rate step (lr 1e-3).
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        off = ~np.isclose(x, y, atol=2e-5, rtol=1e-4)
        assert off.mean() <= 1e-3, f"{off.sum()} of {off.size} elements differ"
        np.testing.assert_allclose(x, y, atol=1e-3)
    la = [json.loads(ln)["loss"] for ln in (tmp_path / "one/metrics.jsonl").read_text().splitlines()
          if "loss" in ln]
    lb = [json.loads(ln)["loss"] for ln in (tmp_path / "eight/metrics.jsonl").read_text().splitlines()
          if "loss" in ln]
    np.testing.assert_allclose(la, lb, rtol=1e-5)


def test_nan_stops_the_run_and_keeps_the_last_good_snapshot(base, tmp_path):
    root, ov = base
    cfg = config.load(TINY, ov + ["train.lr=1e30", "train.grad_clip=0", "train.warmup_steps=0",
                                  "train.steps=40", "snapshots.every=1", "train.probe_every=0"])
    run_dir = tmp_path / "nan"
    with pytest.raises(loop.DivergedError, match="loss became"):
        loop.train(cfg, run_dir, progress=False)
    reader = checkpoint.SnapshotReader(run_dir)
    assert reader.steps(), "no snapshot was kept"
    last = jax.tree.leaves(reader.restore(reader.steps()[-1]))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in last)


def test_run_dir_with_another_config_is_refused(base, tmp_path):
    """What the trainer does before training: validate_run_dir, then record_config (the eval set, then
    config.yaml)."""
    root, ov = base
    run_dir = tmp_path / "mismatch"
    cfg = config.load(TINY, ov)
    es = evalset.from_prepared(dataset.prepare(cfg, progress=False), cfg.eval.exclude_common)
    loop.validate_run_dir(run_dir, cfg, override=False)  # a new directory
    loop.record_config(run_dir, cfg, es)
    other = config.load(TINY, ov + ["train.lr=0.123"])
    with pytest.raises(config.ConfigError) as e:
        loop.train(other, run_dir, progress=False)
    assert "train.lr" in str(e.value) and "\n" not in str(e.value)
    loop.validate_run_dir(run_dir, other, override=True)  # asked to override: accepted and recorded
    loop.record_config(run_dir, other, es)
    assert config.load(run_dir / config.CONFIG_FILE) == other
    np.testing.assert_array_equal(evalset.load(run_dir).tokens_NL, es.tokens_NL)


def test_cli_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "induction_jax.train", "--config", TINY, "model.d_model=30",
                        "--run-dir", str(tmp_path / "x")], capture_output=True, text=True, env=_env(1))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "model.d_model" in r.stderr


def test_relative_run_dir(base, tmp_path):
    root, ov = base
    r = subprocess.run(_cmd("rel_run", ov, ["train.steps=4", "train.probe_every=0"]), env=_env(1), cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert checkpoint.SnapshotReader(tmp_path / "rel_run").steps() == [4]
