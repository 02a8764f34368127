"""Faults and bad inputs (docs/reliability.md): nothing committed is lost or corrupted, and the user gets one line.

Tiny runs of configs/cpu/tiny.yaml; subprocesses where the terminal output or a signal is what is tested.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import jax
import numpy as np
import pytest

from commands import QUIET, TINY, cmd, env, one_line_error, run, train_cmd
from corpus import make_corpus
from induction_jax import Run, analyze
from induction_jax.base import cli, config
from induction_jax.data import dataset, evalset
from induction_jax.training import checkpoint, loop


def _wait_until_training(proc, run_dir, timeout: float = 120.0) -> None:
    """Returns once the trainer has logged a few steps (or has exited, or the timeout passed)."""
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") > 3:
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """A finished 4-step run with snapshots 2 and 4, copied by tests that change it."""
    _, ov = base
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    loop.train(config.load(TINY, ov + QUIET + ["train.steps=4", "snapshots.every=2", "train.resume_every=2"]),
                run_dir, progress=False)
    return run_dir


def _finite(tree):
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.inexact))


def _committed(directory):
    """Committed checkpoint steps: Orbax names a step's directory by its number only once it is complete."""
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def _state_steps(run_dir):
    return _committed(run_dir / "state")


def _restore_state(run_dir, cfg, step):
    trainer = loop.step_lib.build(cfg, loop.sharding.make_mesh(cfg.mesh))
    with checkpoint.ResumeCheckpointer(run_dir / "state") as ck:
        return ck.restore(step, trainer.abstract_state)


# -- data loss -----------------------------------------------------------------------------------------------------

def test_nan_is_never_saved_and_the_message_names_what_is(base, tmp_path):
    # lr=1e6: the loss of step 3 is still finite but its gradient is NaN, so the step-3 parameters are NaN.
    _, ov = base
    cfg = config.load(TINY, ov + QUIET + ["train.steps=50", "train.lr=1e6", "snapshots.steps=[1,2,3]",
                                          "train.resume_every=1"])
    run_dir = tmp_path / "nan"
    with pytest.raises(loop.DivergedError) as err:
        loop.train(cfg, run_dir, progress=False)
    reader = checkpoint.SnapshotReader(run_dir)
    snaps, states = reader.steps(), _state_steps(run_dir)
    assert snaps and states
    for s in snaps:
        assert _finite(reader.restore(s)), f"snapshot {s} is not finite"
    for s in states:
        assert _finite(_restore_state(run_dir, cfg, s)[0]), f"resume state {s} is not finite"
    message = str(err.value)
    assert "\n" not in message
    assert f"the last resume checkpoint, step {states[-1]}," in message  # judged: tests/test_divergence.py


def test_a_nan_resume_state_is_refused(trained, base, tmp_path):
    _, ov = base
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    cfg = config.load(run_dir / "config.yaml")
    state, extra = _restore_state(run_dir, cfg, 4)
    state["params"] = jax.tree.map(lambda x: x * np.nan, state["params"])
    with checkpoint.ResumeCheckpointer(run_dir / "state") as ck:  # what an older version could commit
        assert ck.save(5, state, extra, force=True)
        ck.wait()
    longer = config.load(TINY, ov + QUIET + ["train.steps=6", "snapshots.every=2", "train.resume_every=2"])
    with pytest.raises(loop.DivergedError, match="state/5: the resume state holds NaN"):
        loop.train(longer, run_dir, override_config=True, progress=False)


def test_failed_override_leaves_config_yaml_untouched(trained, base, tmp_path):
    _, ov = base
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    before = (run_dir / "config.yaml").read_bytes()
    original = config.load(run_dir / "config.yaml")
    wider = config.load(TINY, ov + QUIET + ["train.steps=4", "snapshots.every=2", "train.resume_every=2",
                                            "model.d_model=64"])
    with pytest.raises(config.UserError, match="config.yaml is unchanged") as err:
        loop.train(wider, run_dir, override_config=True, progress=False)
    assert "state/4" in str(err.value) and "\n" not in str(err.value)
    assert (run_dir / "config.yaml").read_bytes() == before
    # Without resume state, the snapshots still pin the model's shapes.
    shutil.rmtree(run_dir / "state")
    with pytest.raises(config.UserError, match="other parameter shapes"):
        loop.train(wider, run_dir, override_config=True, progress=False)
    assert (run_dir / "config.yaml").read_bytes() == before
    # ...and the original command still runs.
    assert loop.train(original, run_dir, progress=False)["step"] == 4


def test_a_second_trainer_is_refused_naming_the_first(base, tmp_path):
    _, ov = base
    run_dir = tmp_path / "shared"
    long = QUIET + ["train.steps=100000", "train.resume_every=100000", "snapshots.every=0"]
    first = subprocess.Popen(train_cmd(run_dir, ov, long), env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_until_training(first, run_dir)
        assert first.poll() is None, first.stderr.read()[-3000:]
        second = run(train_cmd(run_dir, ov, long), timeout=60)
        one_line_error(second, f"in use by another trainer (pid {first.pid}")
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    steps = [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "two trainers wrote the same metrics"


# -- tracebacks instead of one line --------------------------------------------------------------------------------

@contextlib.contextmanager
def _read_only_view(src, dst):
    if os.geteuid() != 0:
        pytest.skip("a read-only mount needs root (and root ignores chmod, so no other way to test it)")
    dst.mkdir()
    r = subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot bind-mount here: {r.stderr.strip()}")
    try:
        r = subprocess.run(["mount", "-o", "remount,ro,bind", str(dst)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot remount read-only here: {r.stderr.strip()}")
        yield dst
    finally:
        subprocess.run(["umount", str(dst)], check=True)


def test_read_only_run_directory(trained, tmp_path):
    with _read_only_view(trained.parent, tmp_path / "ro") as ro:
        rd = ro / trained.name
        with pytest.raises(OSError):
            (rd / "probe").write_text("")
        opened = Run(rd)
        assert opened.steps == [2, 4]
        assert _finite(opened.params(4)) and opened.tokens_at(4) > 0
        one_line_error(run(cmd("analyze", rd, "--no-progress", "--no-report")), "pass --out")
        r = run(cmd("analyze", rd, "--no-progress", "--steps", 4, "--out", tmp_path / "out"))
        assert r.returncode == 0, r.stderr[-3000:]
    assert Run(trained, tmp_path / "out").stored_icl_scores().keys() == {4}
    # The report's TensorBoard events go beside it, and say so.
    assert f"analysis events go to {tmp_path / 'out' / 'tensorboard' / 'analysis'}" in r.stderr
    assert list((tmp_path / "out" / "tensorboard" / "analysis").glob("events.out.tfevents.*"))


def test_analyze_with_nothing_committed_or_a_missing_step(trained, base, tmp_path, capsys):
    _, ov = base
    empty = tmp_path / "empty"
    loop.record_config(empty, config.load(TINY, ov), evalset.load(trained))  # a trainer before its first snapshot
    for argv in ([str(empty)], [str(empty), "--no-report"], [str(trained), "--steps", "999"]):
        with pytest.raises(SystemExit) as e:
            cli.run(analyze.main, argv + ["--no-progress"])
        assert e.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        assert ("nothing committed yet" if argv[0] == str(empty) else "no committed snapshot at step(s) 999 "
                "(committed: 2, 4)") in lines[0]


@contextlib.contextmanager
def _small_filesystem(path, size):
    if os.geteuid() != 0:
        yield None
        return
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_disk_full_is_one_line_naming_the_last_good_checkpoint(base, tmp_path, monkeypatch):
    _, ov = base
    extra = QUIET + ["train.steps=40", "snapshots.every=2", "train.resume_every=2"]
    with _small_filesystem(tmp_path / "small", "1500k") as fs:
        if fs is not None:  # a real full disk: room for a few saves of the tiny model, not for 20
            run_dir = fs / "run"
            r = run(train_cmd(run_dir, ov, extra))
            line = one_line_error(r, "the disk is full")
            snaps, states = _committed(run_dir / "snapshots"), _state_steps(run_dir)
            assert snaps and max(snaps) < 40
            assert f"last good snapshot is step {snaps[-1]};" in line
            assert f"last good resume checkpoint is step {states[-1]}," in line
            return
    # No small filesystem to fill: the error Orbax's save would raise.
    real_save = checkpoint.SnapshotWriter.save

    def save(self, step, params, meta):
        if step >= 6:
            raise OSError(28, "No space left on device", str(self.directory / str(step)))
        return real_save(self, step, params, meta)
    monkeypatch.setattr(checkpoint.SnapshotWriter, "save", save)
    run_dir = tmp_path / "run"
    with pytest.raises(config.UserError) as err:
        loop.train(config.load(TINY, ov + extra), run_dir, progress=False)
    assert "the disk is full" in str(err.value) and "last good snapshot is step 4;" in str(err.value)


def test_torn_metrics_line_does_not_block_resume(trained, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    metrics = run_dir / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text + text.splitlines()[-1][:25])  # a kill in the middle of a write
    # The report plots the training loss without the torn line (a trainer may be writing it right now).
    assert analyze.main([str(run_dir), "--steps", "4", "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert (tmp_path / "out" / "report.md").exists()
    loop.train(config.load(run_dir / "config.yaml"), run_dir, progress=False)
    assert [json.loads(ln) for ln in metrics.read_text().splitlines()] == [json.loads(ln) for ln in
                                                                           text.splitlines()]


@pytest.mark.parametrize("override,key", [
    ("train.log_every=0", "train.log_every"),
    ("snapshots.every=-3", "snapshots.every"),
    ("train.probe_examples=0", "train.probe_examples"),
    ("snapshots.steps=[4,-1]", "snapshots.steps"),
])
def test_bad_values_are_refused(override, key):
    with pytest.raises(config.ConfigError) as e:
        config.load(TINY, [override])
    assert key in str(e.value) and "\n" not in str(e.value)


def test_ctrl_c_saves_and_exits_130_quietly(base, tmp_path):
    _, ov = base
    run_dir = tmp_path / "int"
    p = subprocess.Popen(train_cmd(run_dir, ov, QUIET + ["train.steps=100000", "train.resume_every=100000"]),
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_until_training(p, run_dir)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert err.strip() == "", err[-3000:]
    assert "interrupted; saved at step" in out
    saved = _state_steps(run_dir)
    assert saved and 0 < saved[-1] < 100000


def _damage(run_dir, step):
    files = sorted((os.path.join(r, f) for r, _, fs in os.walk(run_dir / "snapshots" / str(step) / "params")
                    for f in fs), key=os.path.getsize)
    with open(files[-1], "r+b") as f:
        f.truncate(os.path.getsize(files[-1]) // 2)


def test_unreadable_snapshot_is_one_line(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    for step in (2, 4):
        _damage(run_dir, step)
    r = run(cmd("analyze", run_dir, "--no-progress", "--no-report"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr and r.stdout.count("skipped: ") == 2, r.stdout + r.stderr
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 3 and "snapshots restored replicated" in lines[0], r.stdout + r.stderr  # + the placement
    # The scripting API: the one-line SnapshotError, and nothing on the terminal, then or when Orbax's abandoned
    # reads finish later. In a subprocess: pytest would intercept what Python reports of them.
    script = """if True:
        import sys
        from induction_jax import Run
        from induction_jax.training.checkpoint import SnapshotError
        run = Run(sys.argv[1])
        for _ in range(5):  # the noise depends on thread timing: several reads make it show up
            for step in run.steps:
                try:
                    run.params(step)
                except SnapshotError as e:
                    last = e
        print(last)
    """
    r = run([sys.executable, "-c", script, run_dir])
    assert r.returncode == 0 and "unreadable snapshot" in r.stdout, r.stderr[-3000:]
    assert r.stderr == "", r.stderr[-3000:]


# -- accepted silently ----------------------------------------------------------------------------------------------

def test_skipped_records_are_reported(base, tmp_path, capfd):
    root, ov = base
    src = make_corpus(root)
    lines = [json.dumps({"text": p.read_text()}) for p in sorted(src.rglob("*.py"))[:60]]
    lines += ["{not json", json.dumps({"body": "no text field"}), json.dumps(["a", "list"])]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    cfg = config.load(TINY, ov + [f"data.sources=[{tmp_path / 'docs.jsonl'}]",
                                  f"data.cache_dir={tmp_path / 'cache'}"])
    capfd.readouterr()
    prepared = dataset.prepare(cfg, progress=False)
    err = capfd.readouterr().err
    assert "skipped 3 record(s) without a string 'text' field" in err and "docs.jsonl: 3" in err, err
    assert "3 records without a string text field" in dataset.summary(prepared)


def test_failed_data_preparation_leaves_no_config(base, tmp_path):
    _, ov = base
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "blob.bin").write_bytes(b"\0\1\2" * 100)
    run_dir = tmp_path / "run"
    with pytest.raises(config.ConfigError, match="no readable text"):
        loop.train(config.load(TINY, ov + QUIET + [f"data.sources=[{binary}]"]), run_dir, progress=False)
    assert not (run_dir / "config.yaml").exists()
    # The corrected command needs no --override-config.
    assert loop.train(config.load(TINY, ov + QUIET + ["train.steps=2"]), run_dir, progress=False)["step"] == 2


def test_killed_prepare_is_resumed_and_leaves_no_build_directory(base, tmp_path):
    _, base_ov = base
    cache = tmp_path / "cache"
    ov = base_ov + [f"data.cache_dir={cache}"]
    p = subprocess.Popen(cmd("data", "prepare", "--config", TINY, "--no-progress", *ov), env=env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not list(cache.glob(".*tmp-*")):
        time.sleep(0.01)
    p.kill()
    p.wait()
    assert list(cache.glob(".*tmp-*")), "the prepare finished before it could be killed"
    # A live prepare's directory (here: a process of this host that is still running) is not touched.
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = cache / f".{uuid.uuid4().hex[:20]}.tmp-{socket.gethostname()}-{live.pid}-abc123"
        busy.mkdir()
        resumed = dataset.prepare(config.load(TINY, ov), progress=False)
        assert [d.name for d in cache.glob(".*tmp-*")] == [busy.name]
        whole = dataset.prepare(config.load(TINY, base_ov), progress=False)  # prepared uninterrupted by the fixture
        assert resumed.path != whole.path and resumed.metadata["tokens_sha256"] == whole.metadata["tokens_sha256"]
    finally:
        live.kill()
        live.wait()
