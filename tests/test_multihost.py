"""Multi-host training on localhost: 2 processes x 4 CPU devices against 1 process x 8 devices.

The two-process job joins through induction_jax.sharding.initialize_distributed (env vars, as a launcher sets
them), shares one run directory, and must give the same loss curve and parameters as the one-process run; a
one-process run then resumes from its resume checkpoint, and its snapshots restore onto 1 and onto 2 devices.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from commands import free_port, multihost_env
from jax.sharding import PartitionSpec as P

from corpus import tiny_overrides
from induction_jax.base import config
from induction_jax.base.config import UserError
from induction_jax.data import dataset
from induction_jax.training import checkpoint, sharding

TINY = "configs/cpu/tiny.yaml"
RUN = ["train.steps=6", "train.resume_every=3", "snapshots.every=2", "train.probe_every=3"]
TIMEOUT_S = 240

pytestmark = pytest.mark.slow


def _train_cmd(run_dir, overrides, extra=()):
    return [sys.executable, "-m", "induction_jax.train", "--config", TINY, "--run-dir", str(run_dir), "--no-progress",
            *overrides, *RUN, *extra]


def _run_together(cmds_envs) -> list[subprocess.CompletedProcess]:
    """Starts every command at once and waits for all; if one fails or hangs, the others are stopped too."""
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, env in cmds_envs]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            outs.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def _losses(run_dir) -> dict[int, float]:
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice (by two processes?): {steps}"
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_params_match(got, want):
    """Parameters trained on two device layouts agree to float32 rounding, except where Adam magnifies it.

    The layouts sum the gradient in different orders. Where an element's per-example terms nearly cancel, that
    rounding is a large part of the sum, and Adam's division by sqrt(v) turns it into a difference of up to one
    step (lr). So all but a rare few elements must agree closely, and none may be further apart than one step.
    """
    lr = config.load(TINY).train.lr
    for x, y in zip(_leaves(got), _leaves(want)):
        off = ~np.isclose(x, y, atol=2e-5, rtol=1e-4)
        assert off.sum() <= max(1, off.size // 1000), f"{off.sum()} of {off.size} elements differ beyond rounding"
        np.testing.assert_allclose(x, y, atol=lr, rtol=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process run dir, two-process run dir, overrides), both trained for 6 steps."""
    root = tmp_path_factory.mktemp("multihost")
    ov = tiny_overrides(root)
    dataset.prepare(config.load(TINY, ov), progress=False)
    one, two = root / "one", root / "two"
    # The one-process run goes first: it also leaves the CPU peak-FLOP/s probe cached for the two processes.
    [r] = _run_together([(_train_cmd(one, ov), multihost_env(8))])
    assert r.returncode == 0, r.stderr[-3000:]
    port = free_port()
    results = _run_together([(_train_cmd(two, ov), multihost_env(4, i, port)) for i in range(2)])
    for i, r in enumerate(results):
        assert r.returncode == 0, f"process {i}:\n{r.stderr[-3000:]}"
    assert "finished at step 6" in results[0].stdout
    # Process 1's stdout also carries Gloo's C++ chatter; none of our own messages may be there.
    ours = [ln for ln in results[1].stdout.splitlines()
            if ln.startswith(("run directory", "finished at", "resumed from", "preempted"))]
    assert ours == [], "only process 0 prints"
    return one, two, ov


def test_two_processes_match_one_process(runs):
    one, two, _ = runs
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
    ra, rb = checkpoint.SnapshotReader(one), checkpoint.SnapshotReader(two)
    assert ra.steps() == rb.steps() == [2, 4, 6]
    _assert_params_match(rb.restore(6), ra.restore(6))
    # metadata comes from process 0 alone, and the probes ran on the params spread over both processes
    assert rb.metadata(6)["tokens_seen"] == 6 * 8 * 32
    probes = [json.loads(ln) for ln in (two / "metrics.jsonl").read_text().splitlines() if "probe_icl" in ln]
    assert [p["step"] for p in probes] == [3, 6]


def test_snapshots_of_two_processes_restore_on_one_and_two_devices(runs):
    one, two, _ = runs
    reader, ref = checkpoint.SnapshotReader(two), checkpoint.SnapshotReader(one)
    expected = ref.restore(4)
    single = reader.restore(4)  # default target: whole arrays on the first device
    assert {d for x in jax.tree.leaves(single) for d in x.devices()} == {jax.devices()[0]}
    mesh = jax.make_mesh((1, 2, 1), sharding.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:2])
    shardings = sharding.param_shardings(config.load(TINY).model, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), single), shardings)
    two_dev = reader.restore(4, abstract)
    split = [x for x in jax.tree.leaves(two_dev) if x.sharding.spec != P()]
    assert split, "no parameter was split over the 2 devices"
    for x, s in zip(jax.tree.leaves(two_dev), jax.tree.leaves(shardings)):
        assert x.sharding == s and len(x.devices()) == 2
    for got in (single, two_dev):
        _assert_params_match(got, expected)


def test_one_process_resumes_the_two_process_run(runs, tmp_path):
    one, two, ov = runs
    run_dir = tmp_path / "resumed"
    shutil.copytree(two, run_dir)
    # Drop the final step, so the resume starts from the two-process checkpoint of step 3.
    for d in ("state/6", "snapshots/6"):
        shutil.rmtree(run_dir / d)
    [r] = _run_together([(_train_cmd(run_dir, ov), multihost_env(8))])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step 3" in r.stdout
    a, b = _losses(one), _losses(run_dir)
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-5)
    ref, got = checkpoint.SnapshotReader(one), checkpoint.SnapshotReader(run_dir)
    _assert_params_match(got.restore(6), ref.restore(6))


BARRIER_SCRIPT = textwrap.dedent("""
    import sys, time
    from induction_jax.base import cli
    from induction_jax.training import sharding

    def main(argv):
        sharding.initialize_distributed(timeout_s=60)
        sharding.barrier("everyone", 60)
        if sharding.is_main_process():
            time.sleep(6)  # never arrives at the next barrier
        else:
            sharding.barrier("process 0 skips this one", 2)
        return 0

    cli.run(main)
""")


def test_a_barrier_gives_up_with_a_message_naming_it(tmp_path):
    script = tmp_path / "barrier.py"
    script.write_text(BARRIER_SCRIPT)
    port = free_port()
    p0, p1 = _run_together([([sys.executable, str(script)], multihost_env(1, i, port)) for i in range(2)])
    assert p1.returncode == 2, p1.stderr[-2000:]
    last = p1.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "barrier 'process 0 skips this one'" in last and "2 s" in last


def test_incomplete_coordinator_settings_are_one_line_errors(monkeypatch):
    monkeypatch.setenv("INDUCTION_JAX_COORDINATOR", "localhost:1")
    monkeypatch.setenv("INDUCTION_JAX_NUM_PROCESSES", "2")
    monkeypatch.delenv("INDUCTION_JAX_PROCESS_ID", raising=False)
    with pytest.raises(UserError, match="INDUCTION_JAX_PROCESS_ID"):
        sharding.initialize_distributed()
    monkeypatch.setenv("INDUCTION_JAX_PROCESS_ID", "2")
    with pytest.raises(UserError, match=r"not in 0\.\.1"):
        sharding.initialize_distributed()
    monkeypatch.setenv("INDUCTION_JAX_PROCESS_ID", "one")
    with pytest.raises(UserError, match="not an integer"):
        sharding.initialize_distributed()


WRITERS_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from induction_jax.base import cli
    from induction_jax.training import checkpoint, sharding

    def main(argv):
        sharding.initialize_distributed(timeout_s=60)
        run = argv[0]
        x = jax.device_put(jnp.zeros((4, 256)), NamedSharding(jax.make_mesh((4,), ("d",)), P("d")))
        resume = checkpoint.ResumeCheckpointer(f"{run}/state")
        snaps = checkpoint.SnapshotWriter(f"{run}/snapshots")
        for step in range(1, 9):
            x = x + 1
            snaps.save(step, {"x": x}, {"tokens_seen": step})
            resume.save(step, {"x": x}, {"step": step}, force=True)
        for w in (snaps, resume):
            w.wait()
            w.close()
        sharding.barrier("writers closed", 60)
        return 0

    cli.run(main, sys.argv[1:])
""")


def test_snapshot_and_resume_writers_saving_at_one_step_on_two_processes(tmp_path):
    """Both writers' background commits overlap at every step here; each save must still wait for both
    processes' shards, so every step restores whole."""
    script = tmp_path / "writers.py"
    script.write_text(WRITERS_SCRIPT)
    port = free_port()
    results = _run_together([([sys.executable, str(script), str(tmp_path / "run")], multihost_env(2, i, port))
                             for i in range(2)])
    for i, r in enumerate(results):
        assert r.returncode == 0, f"process {i}:\n{r.stderr[-3000:]}"
    reader = checkpoint.SnapshotReader(tmp_path / "run")
    assert reader.steps() == list(range(1, 9))
    for step in (1, 8):
        np.testing.assert_array_equal(np.asarray(reader.restore(step)["x"]), np.full((4, 256), float(step)))
    resume = checkpoint.ResumeCheckpointer(tmp_path / "run" / "state")
    assert resume.all_steps() == [7, 8]
    resume.close()
