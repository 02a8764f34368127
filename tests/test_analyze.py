import dataclasses
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
from induction_jax.measures import ablation, evaluate, heads
from induction_jax.base import cli, config
from induction_jax.data import dataset, evalset
from induction_jax.report import markdown
from induction_jax.analysis import scoring
from induction_jax.training import loop
from induction_jax.analysis.store import EVAL, ablation_name

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
    run = Run.open(rd)
    scoring.analyze_run(run, steps, progress=False)
    return run


def test_analyze_every_snapshot_and_write_report(run_dir, tmp_path):
    rd = _copy(run_dir, tmp_path)
    run = _analyzed(rd)
    steps = run.store.sorted_steps(EVAL)
    assert steps == [4, 8, 12, 16, 20, 24]
    losses = run.store.read(EVAL, "per_token_loss")
    tokens_NL = run.eval_set()[0]
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
    steps = _analyzed(rd).store.sorted_steps(EVAL)
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
    run = Run.open(rd)
    assert run.steps == [4, 8, 12, 16, 20, 24]
    assert run.tokens_at(8) == 8 * run.config.train.batch_size * run.config.model.context
    stored = run.per_token_losses(24)
    fresh = evaluate.per_token_losses(run.model, run.params(24), run.eval_set()[0], 8)
    np.testing.assert_allclose(stored, fresh, rtol=1e-5, atol=1e-5)  # stored ones were sharded over 8 devices
    assert set(run.icl_scores()) == set(run.steps)
    steps, scores, measures = run.head_scores()
    assert scores.shape == (6, 2, 4, 5) and measures[0] == "prefix_matching"
    rows = run.head_scores(tidy=True)
    assert len(rows) == 6 * 2 * 4 * 5 and {"step", "layer", "head", "measure", "value"} <= set(rows[0])


def test_score_heads_gives_every_measure_from_the_snapshot(run_dir, tmp_path):
    """Run.score_heads recomputes the stored measures from a snapshot; the previous-token score is checked
    against attention patterns averaged by hand."""
    rd = _copy(run_dir, tmp_path)
    _analyzed(rd, steps=[24])
    run = Run.open(rd)
    fresh = run.score_heads(24)
    assert tuple(fresh) == heads.MEASURES
    tokens = run.eval_set()[0][:64]
    _, cap = run.model.apply({"params": run.params(24)}, tokens, capture=("patterns",))
    pat = np.asarray(cap["patterns"], np.float64)  # [L, B, H, Q, K]
    t = tokens.shape[1]
    by_hand = pat[..., np.arange(1, t), np.arange(t - 1)].mean(axis=(1, 3))
    np.testing.assert_allclose(fresh["previous_token"], by_hand, atol=1e-5)
    np.testing.assert_allclose(fresh["ov_copying"], run.head_scores()[1][-1, ..., heads.MEASURES.index("ov_copying")],
                               atol=1e-6)


def test_detect_window_ignores_an_early_transient():
    tokens = np.arange(1, 41) * 1e5
    icl = np.where(np.arange(40) < 25, 0.0, -0.4)
    icl[25:28] = [-0.1, -0.2, -0.3]  # the phase change: snapshots 24-28
    icl[0] = 0.15  # an untrained model's positive score that quickly vanishes
    w = markdown.detect_window(tokens, icl)
    assert 22 <= w["start_index"] <= 25 and 26 <= w["end_index"] <= 29
    assert markdown.detect_window(tokens, np.zeros(40)) is None


def test_ablate_run_every_path_evidence_and_report_section(run_dir, tmp_path):
    run = _analyzed(_copy(run_dir, tmp_path))
    cfg = run.config.model
    n_examples = len(run.eval_set()[0])
    n_heads = cfg.n_layers * cfg.n_heads
    for path in ablation.PATHS:
        section = scoring.ablate_run(run, steps=[20, 24], path=path, progress=False)
        assert section == ablation_name("pattern", path) and run.store.sorted_steps(section) == [20, 24]
        rec = run.store.sorted_records(section)[-1]
        assert len(rec["delta_icl"]) == len(rec["delta_icl_window"]) == n_heads and "induction_delta_icl" in rec
        icl_N, delta_MN = run.store.read(section, "icl_window", 24), run.store.read(section, "delta_icl_window", 24)
        assert icl_N.shape == (n_examples,) and delta_MN.shape == (n_heads + 1, n_examples)
        np.testing.assert_allclose(delta_MN.mean(1)[:n_heads], rec["delta_icl_window"], atol=1e-6)
    assert scoring.ablate_run(run, steps=[20, 24], progress=False) and \
        run.store.sorted_steps(ablation_name()) == [20, 24]  # done snapshots are not redone

    joint = scoring.ablate_run(run, steps=[24], joint=True, progress=False)
    assert joint == ablation_name("pattern", "total", joint=True) and run.store.sorted_steps(joint) == [24]

    r = markdown.RunResults(run)
    ev = markdown.ablation_evidence(r, 4, 24)
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
        raise AssertionError("data.prepare was called")

    monkeypatch.setattr(data, "prepare", no_data)
    run = Run.open(rd)
    tokens_NL, index_N = run.eval_set()
    want_NL, want_N = prepared.eval_set()
    np.testing.assert_array_equal(tokens_NL, want_NL)
    np.testing.assert_array_equal(index_N, want_N)
    assert run.eval.eval_hash == prepared.eval_hash and run.eval.bos_id == prepared.bos_id
    np.testing.assert_array_equal(run.eval.pool_P, prepared.candidate_tokens(cfg.eval.exclude_common))
    scoring.analyze_run(run, steps=[24], progress=False)
    assert run.store.steps(EVAL) == [24]


def test_a_run_directory_without_the_eval_set_file_still_opens(run_dir, tmp_path):
    """A run directory written before the eval set was stored: the same eval set comes from the prepared data, so
    its stored results are found under the same key."""
    rd = _copy(run_dir, tmp_path)
    stored = _analyzed(rd, steps=[24])
    (rd / evalset.FILE).unlink()
    run = Run.open(rd)
    assert run.store.key == stored.store.key and set(run.icl_scores()) == {24}
    np.testing.assert_array_equal(run.eval_set()[0], stored.eval_set()[0])
    np.testing.assert_array_equal(run.eval.pool_P, stored.eval.pool_P)


def test_a_damaged_eval_set_file_is_one_line(run_dir, tmp_path):
    rd = _copy(run_dir, tmp_path)
    es = evalset.load(rd)
    evalset.save(rd, dataclasses.replace(es, tokens_NL=es.tokens_NL[::-1].copy()))
    with pytest.raises(config.UserError, match="does not match its hash"):
        Run.open(rd).eval_set()
    (rd / evalset.FILE).write_bytes(b"not a zip")
    with pytest.raises(config.UserError, match="unreadable eval set") as e:
        Run.open(rd).eval_set()
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
    run = Run.open(rd)
    assert run.store.steps(EVAL) == [] and run.store.steps(ablation_name()) == [24]
    text = (rd / "analysis" / "report.md").read_text()
    assert "Argument 3" in text and "No snapshot is analysed yet" in text
    ablate_cmd("--steps", 24, "--before", 4, "--after", 24)
    assert run.store.sorted_steps(EVAL) == [4, 24]
    text = (rd / "analysis" / "report.md").read_text()
    assert "Before-and-after attribution (training change from step 4 to 24" in text
    # The classification computed for the ablation alone is the one the full analysis stores.
    induction = run.store.sorted_records(ablation_name())[-1]["induction"]
    np.testing.assert_array_equal(scoring.induction_heads(run, 24, None), induction)
    fresh = run.measure_heads(run.params(24), ("ov_copying", "prefix_matching"))
    scores = run.store.read(EVAL, "head_scores", 24)
    for m, value in fresh.items():
        np.testing.assert_allclose(value, scores[..., heads.MEASURES.index(m)], atol=1e-6)


# ------------------------------------------------------------------------------------------ composition scores

def test_analyze_stores_composition_scores_and_fills_them_in_for_an_analysed_run(run_dir, tmp_path):
    from induction_jax.measures import composition
    from induction_jax.analysis.store import COMPOSITION
    run = _analyzed(_copy(run_dir, tmp_path), steps=[20, 24])
    steps, scores, modes, baseline = run.composition_scores()
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
    assert run.store.sorted_steps(COMPOSITION) == [20, 24]

    r = markdown.RunResults(run)
    fig = tmp_path / "fig"
    lines = markdown.composition_lines(r, fig, "fig")
    pairs = [line for line in lines if line.startswith("| 0.")]
    assert len(pairs) == (cfg.n_layers - 1) * cfg.n_heads * cfg.n_heads  # every writer -> reader pair
    assert (fig / "run_composition.png").exists()
