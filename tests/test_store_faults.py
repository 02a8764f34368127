"""The results store under two writers at once, damage and a full disk (docs/reliability.md, Analysis): one writer
per results directory, a damaged slot found and computed again, nothing committed lost. Real `analyze` processes
on a tiny run."""

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts

from commands import QUIET, TINY, cmd, env, one_line_error, run
from corpus import tiny_overrides
from induction_jax import Run, analyze
from induction_jax.analysis import scoring, store
from induction_jax.analysis.store import EVAL
from induction_jax.base import cli, config
from induction_jax.training import loop

ANALYZE = ("--no-report", "--no-progress")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny run with 12 snapshots: enough work that two analyses started together overlap."""
    root = tmp_path_factory.mktemp("store")
    cfg = config.load(TINY, tiny_overrides(root) + QUIET + ["train.steps=24", "snapshots.every=2"])
    loop.train(cfg, root / "run", progress=False)
    return root / "run"


def _copy(run_dir, where):
    dst = where / "run"
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("analysis"))
    return dst


def _stored(rd, out=None):
    """{step: (record, per-token losses, head scores)} as a reader sees them."""
    s = Run(rd, out).store
    return {r["step"]: (r, s.read(EVAL, "per_token_loss", r["step"]), s.read(EVAL, "head_scores", r["step"]))
            for r in s.sorted_records(EVAL)}


@pytest.fixture(scope="module")
def reference(run_dir, tmp_path_factory):
    """What one analysis alone stores (in a process like the ones under test: one CPU device)."""
    rd = _copy(run_dir, tmp_path_factory.mktemp("reference"))
    r = run(cmd("analyze", rd, *ANALYZE))
    assert r.returncode == 0, r.stderr[-3000:]
    return _stored(rd)


def _same(got, want):
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for step, (record, losses, scores) in want.items():
        assert got[step][0] == record, step
        np.testing.assert_array_equal(got[step][1], losses, err_msg=f"losses of step {step}")
        np.testing.assert_array_equal(got[step][2], scores, err_msg=f"head scores of step {step}")


def test_two_analyses_of_one_run_at_once(run_dir, reference, tmp_path):
    # Before the lock, both exited 0, and the index and the zarr slots could cross: a step's record went missing
    # and one step's losses read back as another's.
    refused = 0
    for attempt in range(3):
        rd = _copy(run_dir, tmp_path / str(attempt))
        procs = [subprocess.Popen(cmd("analyze", rd, *ANALYZE), env=env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
        codes = [p.returncode for p in procs]
        assert sorted(codes) in ([0, 0], [0, 2]), [(c, err[-2000:]) for c, (_, err) in zip(codes, outs)]
        if 2 in codes:
            refused += 1
            loser, winner = codes.index(2), codes.index(0)
            lines = outs[loser][1].strip().splitlines()
            assert len(lines) == 1, outs[loser][1]
            assert lines[0].startswith(f"error: {rd / 'analysis'}: in use by another analysis "
                                       f"(pid {procs[winner].pid} on "), lines[0]
        _same(_stored(rd), reference)
        # The demo's order: its analysers exit, then its own process analyses the same run, unrefused.
        scoring.analyze_run(Run(rd), progress=False)
        assert Run(rd).pending_steps(EVAL) == []
    assert refused, "two analyses started together never overlapped"


def test_a_damaged_slot_is_refused_on_read_and_analysed_again(run_dir, reference, tmp_path):
    rd = _copy(run_dir, tmp_path)
    assert run(cmd("analyze", rd, *ANALYZE)).returncode == 0
    s = Run(rd).store
    idx = json.loads((s.dir / f"{EVAL}.index.json").read_text())
    slots = idx.get("slots", list(range(len(idx["steps"]))))
    at = {step: slot for step, slot in zip(idx["steps"], slots)}
    arr = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(s.dir / "eval.per_token_loss.zarr")}},
                  open=True).result()
    arr[at[8]].write(arr[at[12]].read().result()).result()  # what crossed commits left: step 12's losses at 8
    with pytest.raises(config.UserError) as err:
        Run(rd).losses_at(8)
    assert "\n" not in str(err.value)
    assert "eval.per_token_loss.zarr: the stored results of step 8 do not match their digest" in str(err.value)
    r = run(cmd("analyze", rd, *ANALYZE))
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {s.dir}/eval.per_token_loss.zarr: the results of step 8 do not match their "
                        "digest; analysing it again"], r.stderr[-3000:]
    _same(_stored(rd), reference)


def test_a_second_writer_process_is_refused_naming_the_first(run_dir, tmp_path):
    # A process of the scripting API that holds the lock (a long Run-based analysis) against a real analyze.
    rd = _copy(run_dir, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from induction_jax import Run\n"
                               "with Run(sys.argv[1]).store.writing():\n"
                               "    print('held', flush=True)\n"
                               "    time.sleep(600)\n", str(rd)], env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run(cmd("analyze", rd, *ANALYZE))
        one_line_error(r, f"{rd / 'analysis'}: in use by another analysis (pid {holder.pid} on ")
        assert "pass --out DIR to write elsewhere" in r.stderr
        assert not Run(rd).store.steps(EVAL)
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the lock with its holder: nothing stale blocks the next analysis.
    assert run(cmd("analyze", rd, *ANALYZE, "--steps", 2)).returncode == 0


@contextlib.contextmanager
def _full_filesystem(path):
    """A tiny tmpfs at `path` holding an empty directory `out`, filled up; yields the filler file (delete it to
    free the space), or None where no file system can be mounted."""
    if os.geteuid() != 0:
        yield None
        return
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(path)]).returncode:
        yield None
        return
    try:
        (path / "out").mkdir()
        filler = path / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        yield filler
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_analyze_on_a_full_disk_is_one_line_and_loses_nothing(run_dir, reference, tmp_path, monkeypatch, capsys):
    rd = _copy(run_dir, tmp_path)
    with _full_filesystem(tmp_path / "small") as filler:
        if filler is not None:
            out = filler.parent / "out"
            line = one_line_error(run(cmd("analyze", rd, *ANALYZE, "--out", out)),
                                  "the disk is full (No space left on device)")
            assert line.startswith(f"error: {out}/eval-") and "a rerun goes on from there once space is freed" in line
            filler.unlink()
            r = run(cmd("analyze", rd, *ANALYZE, "--out", out))
            assert r.returncode == 0, r.stderr[-3000:]
            _same(_stored(rd, out), reference)
            return
    # No file system to fill: what tensorstore raises on one (a ValueError, not an OSError).
    def full(*args, **kwargs):
        raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "x/.zarray": Failed to write 213 bytes to '
                         "file 3: No space left on device [os_error_code='28']")
    monkeypatch.setattr(store.ts, "open", full)
    with pytest.raises(SystemExit) as e:
        cli.run(analyze.main, [str(rd), *ANALYZE])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "the disk is full (No space left on device)" in lines[0], lines

