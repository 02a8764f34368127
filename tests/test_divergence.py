"""After a divergence the trainer's advice works when followed, and one run directory never holds two trajectories
(docs/reliability.md, Training)."""

import json
import re
import shutil

import jax
import numpy as np
import pytest

from commands import QUIET, TINY, run, train_cmd

from induction_jax.base import config
from induction_jax.training import checkpoint, loop

# The reproduction: at lr 1e6 every update diverges; the loss of step 3 (that of the step-2 parameters) is
# still finite, its gradient is not.
EXPLODE = QUIET + ["train.steps=20", "train.lr=1e6", "snapshots.steps=[1,2,3]", "snapshots.every=0",
                   "train.resume_every=1"]
SANE = ["train.lr=1e-3"]


@pytest.fixture(scope="module")
def exploded(base, tmp_path_factory):
    """(run directory, the DivergedError's message) of the reproduction; tests change copies."""
    _, ov = base
    run_dir = tmp_path_factory.mktemp("exploded") / "run"
    with pytest.raises(loop.DivergedError) as err:
        loop.train(config.load(TINY, ov + EXPLODE), run_dir, progress=False)
    return run_dir, str(err.value)


def _copy(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def _finite_params(run_dir, step):
    return all(np.all(np.isfinite(np.asarray(x)))
               for x in jax.tree.leaves(checkpoint.SnapshotReader(run_dir).restore(step)))


def test_a_diverged_last_checkpoint_is_called_diverged_and_the_advice_to_start_over_works(exploded, base, tmp_path):
    _, ov = base
    src, message = exploded
    assert "\n" not in message
    assert "at step 3, which was not saved" in message, message
    # Before: "the last good resume checkpoint is step 2, where a rerun resumes", whose rerun fails the same way.
    assert "the last resume checkpoint, step 2, is finite but has diverged (loss " in message, message
    loss = float(re.search(r"step 2, is finite but has diverged \(loss (\S+);", message).group(1))
    best = float(re.search(r"the run's best logged loss ([^)]+)\)", message).group(1))
    norm = float(re.search(r"parameter norm (\S+);", message).group(1))
    assert loss > 1e6 * best and norm > 1e6, message
    assert "step 1 has diverged too; start over:" in message, message
    # Following the advice: delete what it names and rerun with a lower learning rate.
    run_dir = _copy(src, tmp_path)
    named = re.search(r"start over: delete (\S+) and (\S+) and rerun with .* and --override-config", message)
    assert named and named.groups() == (str(src / "state"), str(src / "snapshots")), message
    for path in named.groups():
        shutil.rmtree(path.replace(str(src), str(run_dir)))
    out = loop.train(config.load(TINY, ov + EXPLODE + SANE), run_dir, override_config=True, progress=False)
    assert out["step"] == 20 and np.isfinite(out["loss"])
    assert checkpoint.SnapshotReader(run_dir).steps() == [1, 2, 3, 20]
    assert all(_finite_params(run_dir, s) for s in (1, 2, 3, 20))


def test_the_advice_names_an_earlier_sound_checkpoint_and_resuming_there_works(base, tmp_path):
    _, ov = base
    run_dir = tmp_path / "run"
    steady = QUIET + ["train.resume_every=1", "snapshots.every=1", "train.warmup_steps=0"]
    loop.train(config.load(TINY, ov + steady + ["train.steps=2"]), run_dir, progress=False)
    # Then an lr that throws the parameters to 1e30 in one update: step 3 is saved finite, and diverged.
    jump = steady + ["train.steps=6", "train.lr=1e30"]
    with pytest.raises(loop.DivergedError) as err:
        loop.train(config.load(TINY, ov + jump), run_dir, override_config=True, progress=False)
    message = str(err.value)
    assert "the last resume checkpoint, step 3, is finite but has diverged" in message, message
    state, snaps = run_dir / "state", run_dir / "snapshots"
    assert f"step 2 is sound (loss " in message and f"delete {state}/3 and {snaps}/3, then rerun" in message, message
    assert "which resumes from step 2" in message, message
    shutil.rmtree(state / "3")
    shutil.rmtree(snaps / "3")
    out = loop.train(config.load(TINY, ov + jump + SANE), run_dir, override_config=True, progress=False)
    assert out["step"] == 6 and np.isfinite(out["loss"])
    assert checkpoint.SnapshotReader(run_dir).steps() == [1, 2, 3, 4, 5, 6]
    assert all(_finite_params(run_dir, s) for s in range(1, 7))


def test_restarting_beside_snapshots_of_another_config_is_refused(exploded, base, tmp_path):
    _, ov = base
    run_dir = _copy(exploded[0], tmp_path)
    shutil.rmtree(run_dir / "state")  # what a user might do after the divergence
    before = (run_dir / config.CONFIG_FILE).read_bytes()
    with pytest.raises(config.UserError) as err:
        loop.train(config.load(TINY, ov + EXPLODE + SANE), run_dir, override_config=True, progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{run_dir}: snapshot(s) 1, 2 lie beyond step 0, where this run starts"), message
    assert "train.lr: 1000000.0 -> 0.001" in message and f"delete {run_dir}/snapshots/{{1,2}}" in message, message
    assert (run_dir / config.CONFIG_FILE).read_bytes() == before
    assert checkpoint.SnapshotReader(run_dir).steps() == [1, 2]
    assert not (run_dir / "state").exists()
    # Under the same config the run retraces those snapshots, so they stay: a run killed before its first resume
    # save resumes as usual. Here that is the same divergence again.
    with pytest.raises(loop.DivergedError):
        loop.train(config.load(TINY, ov + EXPLODE), run_dir, progress=False)


def test_a_finished_run_rerun_reports_its_last_loss(base, tmp_path):
    _, ov = base
    run_dir = tmp_path / "run"
    extra = QUIET + ["train.steps=4", "snapshots.every=2", "train.resume_every=2"]
    loop.train(config.load(TINY, ov + extra), run_dir, progress=False)
    last = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    r = run(train_cmd(run_dir, ov, extra))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"finished at step 4 (loss {last['loss']:.4f}) in {run_dir}" in r.stdout, r.stdout
