"""Phase-adaptive snapshots: the decision on constructed probe values with a known answer, the trainer following it
from its own logged probes, a killed and resumed run taking the same snapshots, and two processes deciding alike."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from commands import free_port, multihost_env

from induction_jax.base import config
from induction_jax.base.config import AdaptiveConfig
from induction_jax.training import adaptive, checkpoint, metrics, schedule

TINY = "configs/cpu/tiny.yaml"
# Between probes the tiny model's ICL score moves by about 4-110 nats and its max prefix matching by 0.1-2 per
# million tokens (10th to 90th percentiles; the draw depends on the test corpus's held-out split), so these
# thresholds give dense stretches, and the budget runs out before the end.
ADAPTIVE = ["train.steps=60", "train.probe_every=2", "train.resume_every=4", "snapshots.every=20",
            "snapshots.adaptive.every=2", "snapshots.adaptive.prefix_rate=0.6", "snapshots.adaptive.icl_rate=35",
            "snapshots.adaptive.window=3", "snapshots.adaptive.settle=2", "snapshots.adaptive.budget=10"]


# A probe every 10 steps at 100,000 tokens a step: 1M tokens between probes.
TPS = 100_000
FLAT_RISE_FLAT = [(10, 0.0, 0.0), (20, 0.0, 0.0), (30, 0.0, 0.0), (40, -0.1, 0.2), (50, -0.2, 0.4),
                  (60, -0.3, 0.6), (70, -0.3, 0.6), (80, -0.3, 0.6), (90, -0.3, 0.6), (100, -0.3, 0.6)]


def test_dense_from_the_probe_that_sees_the_rise_until_it_settles():
    cfg = AdaptiveConfig(every=5, prefix_rate=0.05, window=2, settle=2, budget=100)
    # 40's probe sees +0.2 per M tokens: dense from 40 itself; 70 and 80 are calm; the second calm one ends it.
    assert adaptive.extra_steps(cfg, [50, 100], FLAT_RISE_FLAT, TPS, 100) == [40, 45, 55, 60, 65, 70, 75]
    # settle=1: the first calm probe (70) ends it.
    one = AdaptiveConfig(every=5, prefix_rate=0.05, window=2, settle=1, budget=100)
    assert adaptive.extra_steps(one, [50, 100], FLAT_RISE_FLAT, TPS, 100) == [40, 45, 55, 60, 65]
    # The budget caps the extra snapshots; base ones do not count.
    capped = AdaptiveConfig(every=5, prefix_rate=0.05, window=2, settle=2, budget=3)
    assert adaptive.extra_steps(capped, [50, 100], FLAT_RISE_FLAT, TPS, 100) == [40, 45, 55]


def test_rates_are_measured_across_the_window_per_million_tokens():
    assert adaptive.rates(FLAT_RISE_FLAT[2:5], TPS) == pytest.approx((0.1, 0.2))  # 30 -> 50: 2M tokens
    # Window 3: at 40 the rate is 0.2 over 2M tokens = 0.1, above 0.08; at 80 (60 -> 80) it is 0, the first calm
    # probe; at 70 (50 -> 70) 0.1 is still fast.
    cfg = AdaptiveConfig(every=10, prefix_rate=0.08, window=3, settle=1, budget=100)
    assert adaptive.extra_steps(cfg, [100], FLAT_RISE_FLAT, TPS, 100) == [40, 50, 60, 70]
    # Above 0.1 only the 40 -> 60 stretch of window 2 (0.2 per M) is fast; the ICL threshold alone sees -0.1 per M.
    icl = AdaptiveConfig(every=10, icl_rate=0.05, window=2, settle=1, budget=100)
    assert adaptive.extra_steps(icl, [100], FLAT_RISE_FLAT, TPS, 100) == [40, 50, 60]
    unwatched = AdaptiveConfig(every=10, icl_rate=0.5, prefix_rate=0.5, window=2, settle=1, budget=100)
    assert adaptive.extra_steps(unwatched, [100], FLAT_RISE_FLAT, TPS, 100) == []


def test_the_state_round_trips_through_json_at_any_probe():
    cfg = AdaptiveConfig(every=5, prefix_rate=0.05, icl_rate=0.03, window=3, settle=2, budget=6)
    probes = [(s, -0.1 * s ** 0.5 / 3, 0.013 * s + 1e-9 * s * s) for s in range(10, 101, 10)]
    whole = adaptive.extra_steps(cfg, [50], probes, TPS, 100)
    for cut in range(10, 100, 10):  # stop after step `cut`, save the state as a resume checkpoint does, go on
        first = adaptive.AdaptiveSchedule(cfg, [50], TPS)
        for step in range(1, cut + 1):
            if step % 10 == 0:
                first.observe(*probes[step // 10 - 1])
            first.take(step)
        second = adaptive.AdaptiveSchedule(cfg, [50], TPS, json.loads(json.dumps(first.state())))
        for step in range(cut + 1, 101):
            if step % 10 == 0:
                second.observe(*probes[step // 10 - 1])
            second.take(step)
        assert first.taken + second.taken == whole, cut


@pytest.mark.parametrize("override, needle", [
    ("snapshots.adaptive.every=-1", "snapshots.adaptive.every: must be >= 0"),
    ("snapshots.adaptive.every=2", "no threshold to watch"),
    ("snapshots.adaptive.icl_rate=-1", "snapshots.adaptive.icl_rate: must be a finite rate >= 0"),
    ("snapshots.adaptive.prefix_rate=inf", "snapshots.adaptive.prefix_rate: must be a finite rate >= 0"),
])
def test_bad_settings_are_one_line_errors(override, needle):
    with pytest.raises(config.ConfigError, match=needle) as e:
        config.load(TINY, [override])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, needle", [
    (["train.probe_every=0"], "set train.probe_every > 0"),
    (["snapshots.adaptive.window=1"], "snapshots.adaptive.window: must be >= 2"),
    (["snapshots.adaptive.settle=0"], "snapshots.adaptive.settle: must be >= 1"),
    (["snapshots.adaptive.budget=0"], "snapshots.adaptive.budget: must be >= 1"),
])
def test_bad_settings_of_an_adaptive_run_are_one_line_errors(overrides, needle):
    on = ["snapshots.adaptive.every=2", "snapshots.adaptive.prefix_rate=1"]
    with pytest.raises(config.ConfigError, match=needle):
        config.load(TINY, on + overrides)


def _snapshots(run_dir) -> dict[int, bool]:
    """{step: whether it is an adaptive snapshot} of a run's committed snapshots."""
    reader = checkpoint.SnapshotReader(run_dir)
    return {s: bool(reader.metadata(s).get("adaptive")) for s in reader.steps()}


def _replayed(cfg, run_dir) -> list[int]:
    base = schedule.snapshot_steps(cfg.snapshots, cfg.train.steps)
    probes = adaptive.logged_probes(metrics.read(run_dir))
    return adaptive.extra_steps(cfg.snapshots.adaptive, base, probes, cfg.train.batch_size * cfg.model.context,
                                cfg.train.steps)


def _train_cmd(run_dir, ov) -> list[str]:
    return [sys.executable, "-m", "induction_jax.train", "--config", TINY, "--run-dir", str(run_dir), "--no-progress",
            *ov, *ADAPTIVE]


@pytest.fixture(scope="module")
def reference(base):
    """(overrides, run dir, config) of the adaptive tiny run trained without interruption, on one device."""
    root, ov = base
    run_dir = root / "reference"
    r = subprocess.run(_train_cmd(run_dir, ov), env=multihost_env(1), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return ov, run_dir, config.load(TINY, ov + ADAPTIVE)


def test_the_trainer_takes_the_extra_snapshots_its_logged_probes_decide(reference):
    _, run_dir, cfg = reference
    extra = _replayed(cfg, run_dir)
    assert 0 < len(extra) == cfg.snapshots.adaptive.budget, "the budget should run out on this run"
    base = schedule.snapshot_steps(cfg.snapshots, cfg.train.steps)
    assert _snapshots(run_dir) == {**{s: False for s in base}, **{s: True for s in extra}}


@pytest.mark.slow
def test_a_run_killed_between_its_extra_snapshots_takes_the_same_snapshots(reference, tmp_path):
    ov, ref_dir, cfg = reference
    extra = _replayed(cfg, ref_dir)
    killed = tmp_path / "killed"
    cmd = _train_cmd(killed, ov)
    p = subprocess.Popen(cmd, env=multihost_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:  # past a third of the extra snapshots
        if any(s >= extra[len(extra) // 3] for s in checkpoint.committed_steps(killed / "state")):
            break
        time.sleep(0.01)
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    resume_at = checkpoint.committed_steps(killed / "state")[-1]
    assert extra[0] < resume_at < extra[-1], f"resumes at {resume_at}, outside the extra snapshots {extra}"
    # What the killed run saved after its resume point is dropped, so the rerun must decide it again.
    for step in checkpoint.committed_steps(killed / "snapshots"):
        if step > resume_at:
            shutil.rmtree(killed / "snapshots" / str(step))
    r = subprocess.run(cmd, env=multihost_env(1), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed from step {resume_at}" in r.stdout
    assert _snapshots(killed) == _snapshots(ref_dir)


AGREE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from induction_jax.base import cli
    from induction_jax.training import sharding

    def main(argv):
        sharding.initialize_distributed(timeout_s=60)
        mine = [0.25 + jax.process_index(), -1.5e-3 * (1 + jax.process_index())]
        print("AGREED " + json.dumps(sharding.agreed(mine)))
        return 0

    cli.run(main, sys.argv[1:])
""")

TRAIN_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from induction_jax.base import cli, config
    from induction_jax.training import loop, sharding

    def main(argv):
        sharding.initialize_distributed(timeout_s=60)
        cfg = config.load(argv[0], argv[2:])
        out = loop.train(cfg, Path(argv[1]), progress=False)
        print("ADAPTIVE " + json.dumps(out["adaptive_steps"]))
        return 0

    cli.run(main, sys.argv[1:])
""")


def _together(script, args, tmp_path) -> list[str]:
    """stdout of `script` run as process 0 and 1 of one job (one CPU device each)."""
    path = tmp_path / "script.py"
    path.write_text(script)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(path), *args], env=multihost_env(1, i, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    try:
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, f"process {i}:\n{err[-3000:]}"
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


@pytest.mark.slow
def test_every_process_takes_process_0s_probe_values(tmp_path):
    outs = _together(AGREE_SCRIPT, [], tmp_path)
    got = [json.loads(next(ln for ln in out.splitlines() if ln.startswith("AGREED "))[len("AGREED "):])
           for out in outs]
    want = [float(np.float32(v)) for v in (0.25, -1.5e-3)]  # process 1 holds [1.25, -3e-3]
    assert got == [want, want]


@pytest.mark.slow
def test_two_processes_decide_the_same_extra_snapshots(reference, tmp_path):
    ov, _, _ = reference
    run_dir = tmp_path / "two"
    outs = _together(TRAIN_SCRIPT, [TINY, str(run_dir), *ov, *ADAPTIVE], tmp_path)
    decided = [json.loads(next(ln for ln in out.splitlines() if ln.startswith("ADAPTIVE "))[len("ADAPTIVE "):])
               for out in outs]
    cfg = config.load(TINY, ov + ADAPTIVE)
    assert decided[0] == decided[1] == _replayed(cfg, run_dir) != []
    assert sorted(s for s, extra in _snapshots(run_dir).items() if extra) == decided[0]
