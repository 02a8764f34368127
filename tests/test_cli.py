"""The shared command-line plumbing and the small helpers every module shares: one CLI style, one-line errors,
atomic writes, metrics.jsonl readers."""

import json
import os
import subprocess
import sys

import pytest

from induction_jax import ablate, analyze, demo, plan, train
from induction_jax.base import atomic, cli
from induction_jax.base.config import UserError, first_line
from induction_jax.data.__main__ import main as data_main
from induction_jax.training import metrics


@pytest.mark.parametrize("main,argv,want", [
    (train.main, [], ("--config", "key=value", "--no-progress")),
    (data_main, ["prepare"], ("--config", "key=value", "--no-progress")),
    (analyze.main, [], ("RUN_DIR", "--no-progress")),
    (ablate.main, [], ("RUN_DIR", "--no-progress")),
    (demo.main, [], ("key=value", "--no-progress")),
    (plan.main, [], ("--config", "key=value")),
])
def test_every_command_takes_the_shared_arguments(main, argv, want, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in want:
        assert flag in text, (flag, text)


def test_a_user_error_is_one_line_and_status_2(capsys):
    def main(argv):
        raise UserError("runs/x: something the user can fix")

    with pytest.raises(SystemExit) as e:
        cli.run(main, [])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: runs/x: something the user can fix\n"


def test_a_failure_that_abandons_async_work_still_exits_in_one_line():
    # A save that fails on a full disk leaves unstarted write coroutines, which Python collects at exit.
    prog = """
from induction_jax.base import cli
from induction_jax.base.config import UserError
async def write_fragment():
    pass
abandoned = []
def main(argv):
    abandoned.append(write_fragment())
    raise UserError("runs/x: the disk is full")
cli.run(main, [])
"""
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env={**os.environ,
                                                                                      "JAX_PLATFORMS": "cpu"})
    assert (r.returncode, r.stderr) == (2, "error: runs/x: the disk is full\n")


def test_check_writable_refuses_in_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write results") as e:
        cli.check_writable(blocker / "analysis", "; pass --out DIR")
    assert "\n" not in str(e.value) and str(e.value).endswith("; pass --out DIR")
    cli.check_writable(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())


def test_first_line():
    assert first_line(ValueError("bad value\nmore detail")) == "bad value"
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(OSError("x" * 500), limit=10) == "x" * 10 + "..."
    assert first_line(KeyError("k"), with_type=True) == "KeyError: 'k'"


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "index.json"
    atomic.write(path, "old")
    atomic.write(path, b"new", durable=True)
    assert path.read_text() == "new"
    with pytest.raises(TypeError):
        atomic.write(path, 12345)  # fails while writing the temporary
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_metrics_readers_skip_torn_lines(tmp_path):
    recs = [{"step": s, "loss": 5.0 - s / 10} for s in range(1, 200)]
    (tmp_path / metrics.FILE).write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 200, "lo')
    assert metrics.read(tmp_path) == recs
    tail = metrics.tail(tmp_path, 300)  # starts inside a line, which is dropped like the torn last one
    assert tail == recs[-len(tail):] and 3 <= len(tail) < 10
    assert metrics.read(tmp_path / "missing") == [] and metrics.tail(tmp_path / "missing") == []


def test_plan_leaves_jax_platforms_alone_on_import():
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-c", "import os, induction_jax.plan; "
                          "print(os.environ.get('JAX_PLATFORMS'))"], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["None"]
