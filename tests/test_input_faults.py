"""Bad input gets one line naming the file, key or value, exit status 2, and writes nothing (docs/reliability.md):
command lines, config values, paths that cannot be directories, and corpora that cannot be read."""

import gzip
import os
import re
import zipfile

import pytest

from commands import QUIET, TINY, cmd, one_line_error, run, train_cmd
from corpus import make_corpus, one_line_error as one_line_config_error
from induction_jax import ablate, analyze, demo, export, plan, train
from induction_jax.base import config
from induction_jax.data import dataset
from induction_jax.data.__main__ import main as data_main
from induction_jax.training import loop


# -- the command line -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("main,argv,needle", [
    (train.main, ["--bogus"], "unrecognized arguments: --bogus"),
    (data_main, ["prepare", "--config", TINY, "--bogus"], "unrecognized arguments: --bogus"),
    (analyze.main, ["RUN", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (ablate.main, ["RUN", "--kind", "bogus"], "argument --kind: invalid choice: 'bogus'"),
    (demo.main, ["--data-seed", "abc"], "argument --data-seed: invalid int value: 'abc'"),
    (plan.main, ["--config", TINY], "one of the arguments --topology --devices is required"),
    (export.main, ["RUN"], "the following arguments are required: --step"),
])
def test_a_bad_flag_is_one_line_pointing_at_help(main, argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {needle}"), captured.err
    assert lines[0].endswith("--help)") and captured.out == "", captured.err


def test_an_override_that_is_not_yaml_is_one_line(tmp_path):
    r = run(train_cmd(tmp_path / "run", [], ["snapshots.steps=[1,"]))
    one_line_error(r, "'snapshots.steps=[1,': the value is not valid YAML")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,needle", [
    ("data.seed=-1", "data.seed: must be >= 0, got -1"),
    ("data.eval_seed=-2", "data.eval_seed: must be >= 0, got -2"),
    ("train.lr=-0.001", "train.lr: must be > 0, got -0.001"),
    ("snapshots.steps=[4,20,30]", "snapshots.steps: [20, 30] are beyond train.steps=10"),
])
def test_bad_values_are_refused_before_anything_is_written(base, override, needle, tmp_path):
    _, ov = base
    with pytest.raises(config.ConfigError, match=re.escape(needle)) as e:
        config.load(TINY, ov + [override])
    assert "\n" not in str(e.value)
    # The trainer, which accepted data.seed=-1 and failed at its first epoch with config.yaml, state/ and
    # snapshots/ written, now writes nothing.
    r = run(train_cmd(tmp_path / "run", ov, QUIET + [override]))
    one_line_error(r, needle)
    assert not (tmp_path / "run").exists()


def test_a_config_directory_is_named_as_one(tmp_path):
    with pytest.raises(config.ConfigError, match="is a directory, not a config file"):
        config.load(tmp_path)


# -- paths that cannot be directories ----------------------------------------------------------------------------

def _regular_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("mine\n")
    return path


def _dangling_symlink(tmp_path):
    path = tmp_path / "link"
    path.symlink_to(tmp_path / "gone")
    return path


@pytest.mark.parametrize("make,needle", [
    (_regular_file, "a-file: is a file, not a directory; choose another --run-dir"),
    (lambda tmp_path: tmp_path / ("r" * 300), "has 300 bytes, more than the file system allows"),
    (_dangling_symlink, "link: a dangling symlink (to "),
])
def test_a_run_dir_that_cannot_be_a_directory_is_one_line(base, make, needle, tmp_path):
    _, ov = base
    run_dir = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    one_line_error(run(train_cmd(run_dir, ov, QUIET + ["train.steps=2"])), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if run_dir.name == "a-file":
        assert run_dir.read_text() == "mine\n"


def test_a_cache_that_is_a_file_is_one_line(base, tmp_path):
    root, ov = base
    cache = _regular_file(tmp_path)
    no_cache_dir = [o for o in ov if not o.startswith("data.cache_dir=")]
    r = run(train_cmd(tmp_path / "run", no_cache_dir, QUIET), INDUCTION_JAX_CACHE=str(cache))
    one_line_error(r, f"INDUCTION_JAX_CACHE: {cache}: is a file, not a directory")
    assert cache.read_text() == "mine\n"


# -- corpora that cannot be read ---------------------------------------------------------------------------------

def test_a_truncated_parquet_is_refused_naming_it(base, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root, _ = base
    texts = [p.read_text() for p in sorted(make_corpus(root).rglob("*.py"))[:80]]
    src = tmp_path / "parquet"
    src.mkdir()
    pq.write_table(pa.table({"text": texts}), src / "good.parquet")
    whole = (src / "good.parquet").read_bytes()
    (src / "cut.parquet").write_bytes(whole[: len(whole) // 2])  # an interrupted download
    for source in (src / "cut.parquet", src):  # alone, and beside a good file
        cfg = config.load(TINY, [f"data.sources=[{source}]", f"data.cache_dir={tmp_path / 'cache'}",
                                 "data.eval_fraction=0.15", "data.workers=1"])
        one_line_config_error(cfg, f"{src / 'cut.parquet'}: not a readable parquet file (", "fetch it again")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize("suffix,needle", [
    ("txt", "3 file(s) are compressed (gzip) but not named .gz, e.g. {src}/part-0.txt; add the suffix"),
    ("zip", "3 file(s) are zip archives, e.g. {src}/part-0.zip, which are not read; unpack them"),
])
def test_a_directory_of_compressed_files_it_cannot_read_is_named_as_such(tmp_path, suffix, needle):
    src = tmp_path / "packed"
    src.mkdir()
    for i in range(3):
        text = f"def f{i}():\n    return {i}\n" * 200
        if suffix == "zip":
            with zipfile.ZipFile(src / f"part-{i}.zip", "w") as z:
                z.writestr(f"part-{i}.py", text)
        else:  # gzip data under a name that does not say so
            (src / f"part-{i}.txt").write_bytes(gzip.compress(text.encode()))
    cfg = config.load(TINY, [f"data.sources=[{src}]", f"data.cache_dir={tmp_path / 'cache'}", "data.workers=1"])
    one_line_config_error(cfg, f"'{src}': no readable text: " + needle.format(src=src))


# -- ablate's attribution ------------------------------------------------------------------------------------------

def test_ablate_refuses_a_reversed_before_and_after(base, tmp_path):
    _, ov = base
    run_dir = tmp_path / "run"
    loop.train(config.load(TINY, ov + QUIET + ["train.steps=4", "snapshots.every=2"]), run_dir, progress=False)
    r = run(cmd("ablate", run_dir, "--before", 4, "--after", 2, "--no-progress"))
    one_line_error(r, "--before 4 is not earlier than --after 2")
    assert not (run_dir / "analysis").exists()


def test_prepare_refuses_a_cache_root_that_is_a_file_before_hashing(tmp_path, monkeypatch):
    cache = _regular_file(tmp_path)
    monkeypatch.setenv(dataset.CACHE_ENV, str(cache))
    cfg = config.load(TINY, [f"data.sources=[{tmp_path / 'missing'}]"])
    # The cache is checked first: the missing source would otherwise be the error.
    with pytest.raises(config.ConfigError, match=re.escape(f"INDUCTION_JAX_CACHE: {cache}: is a file")):
        dataset.prepare(cfg, progress=False)
    assert os.path.isfile(cache)
