import dataclasses
import inspect
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from corpus import tiny_overrides
from induction_jax import Run, ablate
from induction_jax.analysis import records, results, scoring
from induction_jax.analysis.store import EVAL, ablation_name
from induction_jax.base import cli, config
from induction_jax.data import dataset, evalset
from induction_jax.measures import ablation, evaluate, heads
from induction_jax.report import checks, headplots, markdown, plots
from induction_jax.training import loop

TINY = "configs/cpu/tiny.yaml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    cfg = config.load(TINY, tiny_overrides(root) + ["train.steps=24", "snapshots.every=4",
                                                    "train.probe_every=0"])
    out = root / "run"
    loop.train(cfg, out, progress=False)
    return out


def _copy(run_dir, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("analysis"))
    return dst


def _analyzed(rd, steps=None) -> Run:
    run = Run(rd)
    scoring.analyze_run(run, steps, progress=False)
    return run


def test_analyze_every_snapshot_and_write_report(run_dir, tmp_path):
    rd = _copy(run_dir, tmp_path)
    run = _analyzed(rd)
    steps = sorted(run.store.steps(EVAL))
    assert steps == [4, 8, 12, 16, 20, 24]
    losses = run.store.read(EVAL, "per_token_loss")
    tokens_NL = run.eval_set.tokens_NL
    assert losses.shape == (6,) + (tokens_NL.shape[0], tokens_NL.shape[1] - 1)
    assert run.store.read(EVAL, "head_scores").shape == (6, 2, 4, 5)
    path = markdown.write([run])
    text = path.read_text()
    assert "ICL score" in text and "Induction heads at the last snapshot" in text
    for png in ("icl", "pca", "run_heatmap", "run_scatter_ov_copying", "run_scatter_copying", "run_prefix_matching",
                "run_ov_copying"):
        assert (path.parent / "figures" / f"{png}.png").stat().st_size > 1000
    rows = (run.store.dir / "summary.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("step,tokens,eval_loss,icl")


def test_rerun_skips_done_snapshots_and_picks_up_new_ones(run_dir, tmp_path):
    rd = _copy(run_dir, tmp_path)
    run = _analyzed(rd, steps=[4, 8])
    first = run.store.read(EVAL, "per_token_loss")
    assert run.pending_steps(EVAL) == [12, 16, 20, 24]
    run = _analyzed(rd)
    np.testing.assert_array_equal(run.store.read(EVAL, "per_token_loss")[:2], first)
    assert run.pending_steps(EVAL) == []


def test_killed_job_resumes_to_identical_arrays(run_dir, tmp_path):
    ref = _copy(run_dir, tmp_path / "a")
    expect = _analyzed(ref).store.read(EVAL, "per_token_loss")
    rd = _copy(run_dir, tmp_path / "b")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.Popen([sys.executable, "-m", "induction_jax.analyze", str(rd), "--no-report", "--no-progress"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    index = None
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        found = list((rd / "analysis").glob("*/eval.index.json"))
        if found and len(json.loads(found[0].read_text())["steps"]) >= 2:
            index = found[0]
            break
        time.sleep(0.005)
    p.kill()
    p.wait()
    assert index is not None, "the job finished or never committed before it could be killed"
    done = json.loads(index.read_text())["steps"]
    assert 2 <= len(done) <= 6
    np.testing.assert_array_equal(_analyzed(rd).store.read(EVAL, "per_token_loss"), expect)


def test_uncommitted_and_corrupted_snapshots(run_dir, tmp_path, capsys):
    rd = _copy(run_dir, tmp_path)
    # What Orbax leaves while a save is in flight: never listed, never read.
    shutil.copytree(rd / "snapshots" / "24", rd / "snapshots" / "28.orbax-checkpoint-tmp-1234")
    # A truncated snapshot: reported by path and skipped; the job goes on.
    victim = max((rd / "snapshots" / "8").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
    victim.write_bytes(victim.read_bytes()[:10])
    steps = sorted(_analyzed(rd).store.steps(EVAL))
    assert 28 not in steps
    assert steps == [4, 12, 16, 20, 24]
    err = capsys.readouterr()
    assert "snapshots/8" in (err.out + err.err)


def test_not_a_run_dir_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "induction_jax.analyze", str(tmp_path)], capture_output=True,
                       text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(tmp_path) in r.stderr


def test_run_api(run_dir, tmp_path):
    rd = _copy(run_dir, tmp_path)
    _analyzed(rd)
    run = Run(rd)
    assert run.steps == [4, 8, 12, 16, 20, 24]
    assert run.tokens_at(8) == 8 * run.config.train.batch_size * run.config.model.context
    stored = run.losses_at(24)
    fresh = evaluate.per_token_losses(run.model, run.params(24), run.eval_set.tokens_NL, 8)
    np.testing.assert_allclose(stored, fresh, rtol=1e-5, atol=1e-5)  # stored ones were sharded over 8 devices
    assert set(run.stored_icl_scores()) == set(run.steps)
    steps, scores, measures = run.stored_head_scores()
    assert scores.shape == (6, 2, 4, 5) and measures[0] == "prefix_matching"
    rows = run.stored_head_scores(tidy=True)
    assert len(rows) == 6 * 2 * 4 * 5 and {"step", "layer", "head", "measure", "value"} <= set(rows[0])


def test_measures_of_gives_every_measure_from_the_snapshot(run_dir, tmp_path):
    """Run.measures_of recomputes the stored measures from a snapshot; the previous-token score is checked
    against attention patterns averaged by hand."""
    rd = _copy(run_dir, tmp_path)
    _analyzed(rd, steps=[24])
    run = Run(rd)
    fresh = run.measures_of(run.params(24))
    assert tuple(fresh) == heads.MEASURES
    tokens = run.eval_set.tokens_NL[:64]
    _, cap = run.model.apply({"params": run.params(24)}, tokens, capture=("patterns",))
    pat = np.asarray(cap["patterns"], np.float64)  # [L, B, H, Q, K]
    t = tokens.shape[1]
    by_hand = pat[..., np.arange(1, t), np.arange(t - 1)].mean(axis=(1, 3))
    np.testing.assert_allclose(fresh["previous_token"], by_hand, atol=1e-5)
    stored_ov = run.stored_head_scores()[1][-1, ..., heads.MEASURES.index("ov_copying")]
    np.testing.assert_allclose(fresh["ov_copying"], stored_ov, atol=1e-6)


def _with_a_phase_change(monkeypatch):
    """The stored windowed ICL scores replaced by a fall between the 3rd and 4th of 6 snapshots, so that the run
    has a phase-change window wherever the results are read."""
    real = records.read_eval

    def falling(store):
        rec = real(store)
        icl = np.array([0.0, 0.0, -0.05, -0.4, -0.45, -0.45])[-len(rec.steps):]
        return dataclasses.replace(rec, icl_window=icl)

    monkeypatch.setattr(records, "read_eval", falling)


def test_the_window_every_figure_shades_is_check_1s(run_dir, tmp_path, monkeypatch):
    """One phase-change window: every figure of the report shades the window check 1 judges (best_window)."""
    run = _analyzed(_copy(run_dir, tmp_path))
    _with_a_phase_change(monkeypatch)
    shaded = []
    for module in (plots, headplots):
        for name, fn in list(vars(module).items()):
            if inspect.isfunction(fn) and fn.__module__ == module.__name__ \
                    and "window" in inspect.signature(fn).parameters:
                def spy(*args, _fn=fn, **kwargs):
                    shaded.append(inspect.signature(_fn).bind(*args, **kwargs).arguments.get("window"))
                    return _fn(*args, **kwargs)
                monkeypatch.setattr(module, name, spy)
    markdown.write([run])
    r = results.RunResults(run)
    w = results.best_window(r)
    assert (w["i"], w["j"]) == (2, 3) and r.window == w
    want = (w["start_tokens"], w["end_tokens"])
    assert len(shaded) >= 8 and all(x in (want, {run.name: want}) for x in shaded), shaded
    check_1 = checks.demo_checks(r, r, r, None, None, None)[0]
    assert f"between {want[0]:,.0f} and {want[1]:,.0f} tokens" in check_1, check_1


def test_ablate_run_every_path_evidence_and_report_section(run_dir, tmp_path):
    run = _analyzed(_copy(run_dir, tmp_path))
    cfg = run.config.model
    n_examples = len(run.eval_set.tokens_NL)
    n_heads = cfg.n_layers * cfg.n_heads
    for path in ablation.PATHS:
        section = scoring.ablate_run(run, steps=[20, 24], path=path, progress=False)
        assert section == ablation_name("pattern", path) and sorted(run.store.steps(section)) == [20, 24]
        rec = run.store.sorted_records(section)[-1]
        assert len(rec["delta_icl"]) == len(rec["delta_icl_window"]) == n_heads and "induction_delta_icl" in rec
        icl_N, delta_MN = run.store.read(section, "icl_window", 24), run.store.read(section, "delta_icl_window", 24)
        assert icl_N.shape == (n_examples,) and delta_MN.shape == (n_heads + 1, n_examples)
        np.testing.assert_allclose(delta_MN.mean(1)[:n_heads], rec["delta_icl_window"], atol=1e-6)
    assert scoring.ablate_run(run, steps=[20, 24], progress=False) and \
        sorted(run.store.steps(ablation_name())) == [20, 24]  # done snapshots are not redone

    joint = scoring.ablate_run(run, steps=[24], joint=True, progress=False)
    assert joint == ablation_name("pattern", "total", joint=True) and sorted(run.store.steps(joint)) == [24]

    r = results.RunResults(run)
    ev = results.ablation_evidence(r, 4, 24)
    assert ev["step"] == 24 and set(ev["paths"]) == set(ablation.PATHS)
    assert all(len(ev["paths"][p]["undone"]) == n_heads for p in ablation.PATHS)
    total, direct = ev["paths"]["total"], ev["paths"]["direct"]
    last_layer = slice((cfg.n_layers - 1) * cfg.n_heads, n_heads)  # attention-only: direct == total there
    # float32 sums in another order: shares agree to a few parts in 10^5 of the ICL score
    np.testing.assert_allclose(direct["share"][last_layer], total["share"][last_layer], atol=1e-4)
    np.testing.assert_allclose(direct["undone"][last_layer], total["undone"][last_layer], atol=1e-4)
    # Joint lanes: an induction head adds nothing to the induction heads; with none, a lane is its head alone.
    induction = np.asarray(run.store.sorted_records(joint)[-1]["induction"]).ravel()
    added = ev["joint"]["added"]
    np.testing.assert_allclose(added[induction], 0.0, atol=1e-6)
    if not induction.any():
        np.testing.assert_allclose(added, total["share"], atol=1e-5)
    share, _ = ablation.shares(run.store.read("ablation-pattern", "delta_icl_window", 24),
                               run.store.read("ablation-pattern", "icl_window", 24))
    np.testing.assert_allclose(total["share"], share[:n_heads])

    fig = tmp_path / "fig"
    fig.mkdir()
    lines = markdown.ablation_section(r, fig, "fig", before_after=(4, 24))
    table = [line for line in lines if line.startswith("| 1.")]
    assert len(table) == cfg.n_heads and all(line.count("±") == 4 for line in table)  # 3 paths and the joint
    assert any("share removed, frozen_ln" in line for line in lines)
    assert (fig / "run_ablation.png").exists() and (fig / "run_attribution.png").exists()


# ------------------------------------------------------------------------- the run directory and its eval set

def test_open_and_analyze_use_the_stored_eval_set_not_the_data(run_dir, tmp_path, monkeypatch):
    """The eval set train stored is the prepared data's, and with it a run opens and analyses without ever
    preparing (or reading) the data."""
    rd = _copy(run_dir, tmp_path)
    cfg = config.load(rd / "config.yaml")
    prepared = dataset.prepare(cfg, progress=False)

    def no_data(*args, **kwargs):
        raise AssertionError("dataset.prepare was called")

    monkeypatch.setattr(dataset, "prepare", no_data)
    run = Run(rd)
    tokens_NL, index_N = run.eval_set.tokens_NL, run.eval_set.random_index_N
    want_NL, want_N = prepared.eval_set()
    np.testing.assert_array_equal(tokens_NL, want_NL)
    np.testing.assert_array_equal(index_N, want_N)
    assert run.eval_set.eval_hash == prepared.eval_hash and run.eval_set.bos_id == prepared.bos_id
    np.testing.assert_array_equal(run.eval_set.pool_P, prepared.candidate_tokens(cfg.eval.exclude_common))
    scoring.analyze_run(run, steps=[24], progress=False)
    assert run.store.steps(EVAL) == [24]


def test_a_run_directory_of_an_earlier_version_is_refused_in_one_line(run_dir, tmp_path, capsys):
    """A run directory written before the eval set was stored in it: refused, naming the directory, until the
    trainer is re-run on it, which writes the eval set (the same one, so stored results are found again)."""
    rd = _copy(run_dir, tmp_path)
    stored = _analyzed(rd, steps=[24])
    (rd / evalset.FILE).unlink()
    assert Run(rd).steps == stored.steps  # snapshots and config still read
    with pytest.raises(config.UserError) as e:
        Run(rd).eval_set
    assert str(rd) in str(e.value) and "earlier version" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as ex:
        cli.run(ablate.main, [str(rd), "--steps", "24", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 2 and len(err) == 1 and "re-run the trainer" in err[0], err
    loop.train(config.load(rd / config.CONFIG_FILE), rd, progress=False)  # what the message says to do
    run = Run(rd)
    assert run.store.key == stored.store.key and set(run.stored_icl_scores()) == {24}
    np.testing.assert_array_equal(run.eval_set.tokens_NL, stored.eval_set.tokens_NL)


def test_a_damaged_eval_set_file_is_one_line(run_dir, tmp_path):
    rd = _copy(run_dir, tmp_path)
    es = evalset.load(rd)
    evalset.save(rd, dataclasses.replace(es, tokens_NL=es.tokens_NL[::-1].copy()))
    with pytest.raises(config.UserError, match="does not match its hash"):
        Run(rd).eval_set
    (rd / evalset.FILE).write_bytes(b"not a zip")
    with pytest.raises(config.UserError, match="unreadable eval set") as e:
        Run(rd).eval_set
    assert "\n" not in str(e.value) and evalset.FILE in str(e.value)


def test_ablate_command_scores_only_what_it_needs(run_dir, tmp_path, capsys):
    """Without an analysis, ablate classifies the induction heads of the snapshots it ablates from two measures
    computed for them alone, and analyses only --before/--after; its report shows the ablations either way."""
    rd = _copy(run_dir, tmp_path)

    def ablate_cmd(*argv):
        with pytest.raises(SystemExit) as e:
            cli.run(ablate.main, [str(rd), "--no-progress", *map(str, argv)])
        assert e.value.code == 0, capsys.readouterr().err

    ablate_cmd("--steps", 24)
    run = Run(rd)
    assert run.store.steps(EVAL) == [] and run.store.steps(ablation_name()) == [24]
    text = (rd / "analysis" / "report.md").read_text()
    assert "Argument 3" in text and "No snapshot is analysed yet" in text
    ablate_cmd("--steps", 24, "--before", 4, "--after", 24)
    assert sorted(run.store.steps(EVAL)) == [4, 24]
    text = (rd / "analysis" / "report.md").read_text()
    assert "Before-and-after attribution, total path (training change from step 4 to 24" in text
    # The classification computed for the ablation alone is the one the full analysis stores.
    induction = run.store.sorted_records(ablation_name())[-1]["induction"]
    np.testing.assert_array_equal(scoring.induction_heads(run, 24, None), induction)
    fresh = run.measures_of(run.params(24), ("ov_copying", "prefix_matching"))
    scores = run.store.read(EVAL, "head_scores", 24)
    for m, value in fresh.items():
        np.testing.assert_allclose(value, scores[..., heads.MEASURES.index(m)], atol=1e-6)


def test_ablate_command_reports_an_ablation_along_another_path_alone(run_dir, tmp_path, capsys):
    """`ablate --path direct` on a run with nothing else in its store: the report shows that ablation."""
    rd = _copy(run_dir, tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.run(ablate.main, [str(rd), "--steps", "24", "--path", "direct", "--no-progress"])
    assert e.value.code == 0, capsys.readouterr().err
    text = (rd / "analysis" / markdown.REPORT_FILE).read_text()
    assert "Argument 3" in text and "share removed, direct" in text and "share removed, total" not in text


def test_demo_lines_build_every_check_from_the_runs_results(run_dir, tmp_path, monkeypatch):
    """The demo's checks section from one function of the runs' results (the same run standing in for all three):
    the five checks and the copying INFO lines, with the ablations at the ends of check 1's window."""
    run = _analyzed(_copy(run_dir, tmp_path))
    _with_a_phase_change(monkeypatch)
    r = results.RunResults(run)
    scoring.ablate_run(run, steps=[12, 16], progress=False)
    scoring.ablate_run(run, steps=[16], path="direct", progress=False)
    lines = checks.demo_lines(r, r, r)
    assert [line[5] for line in lines if not line.startswith("INFO")] == list("12345"), lines
    four = next(line for line in lines if line[5] == "4")
    assert "at step 16" in four and "steps 12 -> 16" in four, four
    assert sum(line.startswith("INFO head ") for line in lines) == 2


# ------------------------------------------------------------------------------------------ composition scores

def test_analyze_stores_composition_scores_and_fills_them_in_for_an_analysed_run(run_dir, tmp_path):
    from induction_jax.analysis.store import COMPOSITION
    from induction_jax.measures import composition
    run = _analyzed(_copy(run_dir, tmp_path), steps=[20, 24])
    steps, scores, modes, baseline = run.stored_composition_scores()
    cfg = run.config.model
    assert list(steps) == [20, 24] and modes == composition.MODES
    assert scores.shape == (2, 3, cfg.n_layers, cfg.n_heads, cfg.n_layers, cfg.n_heads)
    np.testing.assert_array_equal(scores[1], composition.composition_scores(run.params(24), cfg))
    assert baseline == composition.random_baseline(cfg.d_model, cfg.d_head)
    # A store analysed before the composition section existed: only that section is computed, eval stays.
    eval_index = (run.store.dir / f"{EVAL}.index.json").read_text()
    (run.store.dir / f"{COMPOSITION}.index.json").unlink()
    scoring.analyze_run(run, [20, 24], progress=False)
    assert (run.store.dir / f"{EVAL}.index.json").read_text() == eval_index
    assert sorted(run.store.steps(COMPOSITION)) == [20, 24]

    r = results.RunResults(run)
    fig = tmp_path / "fig"
    lines = markdown.composition_lines(r, fig, "fig")
    pairs = [line for line in lines if line.startswith("| 0.")]
    assert len(pairs) == (cfg.n_layers - 1) * cfg.n_heads * cfg.n_heads  # every writer -> reader pair
    assert (fig / "run_composition.png").exists()
