"""Analysis at the scale of training: snapshots sharded over the run's mesh against replicated ones, bfloat16
forward passes, two processes against one, a killed multi-host analysis resumed, and work spread over parts
against one process doing it all (analysis/placement.py, analysis/parts.py, analysis/job.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from commands import free_port, multihost_env

import tiny_runs
from corpus import prepared_tiny
from induction_jax.analysis import parts, placement, scoring
from induction_jax.analysis.run import Run
from induction_jax.analysis.store import COMPOSITION, EVAL, ablation_name
from induction_jax.base.config import UserError
from induction_jax.measures import ablation, composition, evaluate

SHARDED = ["analysis.placement=sharded", "mesh.fsdp=4", "mesh.tensor=2"]
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    prepared_tiny(root)
    return tiny_runs.trained_run(root)


def test_sharded_and_replicated_analysis_of_one_snapshot_agree(trained, tmp_path):
    rep = Run(trained, tmp_path / "rep", ["analysis.placement=replicated"])
    shd = Run(trained, tmp_path / "shd", SHARDED)
    assert not rep.placement.sharded and shd.placement.sharded and shd.mesh.shape["tensor"] == 2
    step = rep.steps[-1]
    p_rep, p_shd = rep.params(step), shd.params(step)
    # The training's shardings: vocab over tensor, embed over fsdp.
    assert tuple(p_shd["W_U"].sharding.spec) == ("fsdp", "tensor") and p_rep["W_U"].sharding.is_fully_replicated

    losses_rep, losses_shd = rep.losses_of(p_rep), shd.losses_of(p_shd)
    np.testing.assert_allclose(losses_shd, losses_rep, atol=1e-5, rtol=0)
    early, late = rep.icl_indices
    assert abs(evaluate.icl_score(losses_shd, early, late) - evaluate.icl_score(losses_rep, early, late)) < 1e-5
    m_rep, m_shd = rep.measures_of(p_rep), shd.measures_of(p_shd)
    for name in m_rep:
        np.testing.assert_allclose(m_shd[name], m_rep[name], atol=1e-5, rtol=0, err_msg=name)
    cfg = rep.config.model
    np.testing.assert_allclose(composition.composition_scores(p_shd, cfg), composition.composition_scores(p_rep, cfg),
                               atol=1e-5, rtol=0)
    masks = ablation.single_head_masks(cfg.n_layers, cfg.n_heads)
    es = rep.eval_set
    out = []
    for run, params in ((rep, p_rep), (shd, p_shd)):
        import jax
        with jax.set_mesh(run.mesh):
            out.append(ablation.ablate_eval_set(run.model, params, es.tokens_NL, es.random_index_N, masks,
                                                run.config.eval, lanes=run.placement.lanes))
    (rec_rep, arr_rep), (rec_shd, arr_shd) = out
    np.testing.assert_allclose(rec_shd["delta_icl"], rec_rep["delta_icl"], atol=1e-5, rtol=0)
    for name in arr_rep:
        np.testing.assert_allclose(arr_shd[name], arr_rep[name], atol=1e-5, rtol=0, err_msg=name)


def test_bfloat16_forward_passes_keep_the_icl_score_within_a_hundredth_of_a_nat(trained, tmp_path):
    """The tolerance docs/scale.md states for analysis.dtype=bfloat16: the ICL score within 0.01 nats."""
    f32, bf16 = Run(trained, tmp_path / "a"), Run(trained, tmp_path / "b", ["analysis.dtype=bfloat16"])
    step = f32.steps[-1]
    params = bf16.params(step)
    assert str(params["W_E"].dtype) == "bfloat16"
    early, late = f32.icl_indices
    icl_f32 = evaluate.icl_score(f32.losses_of(f32.params(step)), early, late)
    icl_bf16 = evaluate.icl_score(bf16.losses_of(params), early, late)
    assert abs(icl_bf16 - icl_f32) < 0.01, (icl_f32, icl_bf16)


def test_the_placement_is_chosen_by_whether_the_parameters_fit_a_device(trained, monkeypatch):
    run = Run(trained)
    need = placement.param_bytes(run.config)
    monkeypatch.setattr(placement, "device_memory", lambda d: 3 * need)  # 33% > the default 25%: shard
    chosen = placement.choose(run.config)
    assert chosen.sharded and "exceed 25% of a device's" in chosen.why
    monkeypatch.setattr(placement, "device_memory", lambda d: 5 * need)
    chosen = placement.choose(run.config)
    assert not chosen.sharded and "fit 25% of a device's" in chosen.why
    monkeypatch.setattr(placement, "device_memory", lambda d: None)
    assert "no memory limit" in placement.choose(run.config).why


def test_an_analysis_may_change_only_where_and_how_it_runs(trained):
    with pytest.raises(UserError) as e:
        Run(trained, overrides=["model.n_layers=3"])
    assert "model.n_layers=3" in str(e.value) and "mesh.* and analysis.*" in str(e.value)
    with pytest.raises(UserError, match="analysis.dtype"):
        Run(trained, overrides=["analysis.dtype=float16"])


# ------------------------------------------------------------------------------------------ processes and parts

def _analyze(run_dir, out, *extra):
    return [sys.executable, "-m", "induction_jax.analyze", str(run_dir), "--out", str(out), "--no-progress",
            "--ablations", *map(str, extra)]


def _together(cmds_envs, timeout=TIMEOUT_S):
    procs = [subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for c, e in cmds_envs]
    outs = []
    try:
        for p in procs:
            o, err = p.communicate(timeout=timeout)
            outs.append(subprocess.CompletedProcess(p.args, p.returncode, o, err))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return outs


def _sections(run_dir, out):
    run = Run(run_dir, out)
    return run, [EVAL, COMPOSITION, ablation_name()]


def _assert_same_store(run_dir, got, want, atol=0.0, steps=None):
    """Every section's steps, records and arrays of two results directories agree (exactly, by default); `steps`:
    only those of `want`."""
    a, sections = _sections(run_dir, got)
    b, _ = _sections(run_dir, want)
    for section in sections:
        want_steps = sorted(s for s in b.store.steps(section) if steps is None or s in steps)
        assert sorted(a.store.steps(section)) == want_steps != [], section
        ra = a.store.sorted_records(section)
        rb = [r for r in b.store.sorted_records(section) if r["step"] in want_steps]
        for x, y in zip(ra, rb):
            assert x.keys() == y.keys()
            for k in x:
                if isinstance(x[k], str) or atol == 0:
                    assert x[k] == y[k], f"{section} {k}"
                else:
                    np.testing.assert_allclose(np.asarray(x[k], float), np.asarray(y[k], float), atol=atol, rtol=0,
                                               err_msg=f"{section} {k}")
        idx = a.store.index(section)
        for name in sorted(idx["digests"][0]):
            for step in want_steps:
                np.testing.assert_allclose(a.store.read(section, name, step), b.store.read(section, name, step),
                                           atol=atol, rtol=0, err_msg=f"{section}.{name} step {step}")


@pytest.fixture(scope="module")
def single(trained, tmp_path_factory):
    """One process x 8 devices analysing every snapshot (with ablations): the reference store."""
    out = tmp_path_factory.mktemp("single") / "out"
    [r] = _together([(_analyze(trained, out, "--no-report"), multihost_env(8))])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_parts_of_the_work_merge_into_the_store_one_process_writes(trained, single, tmp_path):
    """--part 0/2 and 1/2 (as the tasks of a job array run them) and a plain analyze that merges them: the union
    equals one process doing everything, bit for bit."""
    out = tmp_path / "out"
    for i in range(2):
        [r] = _together([(_analyze(trained, out, "--part", f"{i}/2", "--no-report"), multihost_env(8))])
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"part {i} of 2" in r.stdout
    steps = Run(trained).steps
    for i in range(2):  # the rule: the k-th snapshot goes to part k mod 2
        part = Run(trained, parts.directory(out, parts.Part(i, 2)))
        assert part.store.steps(EVAL) == steps[i::2]
    assert Run(trained, out).store.steps(EVAL) == []  # nothing lands in the run's store before the merge
    [r] = _together([(_analyze(trained, out, "--no-report"), multihost_env(8))])
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / parts.PARTS_DIR).exists()
    _assert_same_store(trained, out, single)


@pytest.mark.slow
def test_two_processes_of_four_devices_give_the_store_of_one_process_of_eight(trained, single, tmp_path):
    """Sharded over a 2 x 4 mesh spanning both processes, at the last snapshot: process 0 alone writes, the other
    waits."""
    out = tmp_path / "out"
    port = free_port()
    last = Run(trained).steps[-1]
    rs = _together([(_analyze(trained, out, "--steps", last, *SHARDED), multihost_env(4, i, port)) for i in range(2)])
    for i, r in enumerate(rs):
        assert r.returncode == 0, f"process {i}:\n{r.stderr[-3000:]}"
    assert "report: " in rs[0].stdout and "report: " not in rs[1].stdout
    _assert_same_store(trained, out, single, atol=1e-5, steps={last})


@pytest.mark.slow
def test_a_killed_multi_host_analysis_resumes_and_ends_with_the_same_store(trained, single, tmp_path):
    """Two processes spreading the snapshots are killed once the first results are committed; run again, they
    merge what the killed job committed, do the rest, and end with the store of one uninterrupted process."""
    out = tmp_path / "out"
    port = free_port()
    procs = [subprocess.Popen(_analyze(trained, out, "--no-report"), env=multihost_env(4, i, port),
                              start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
    index = out / Run(trained, out).store.key
    deadline = time.time() + TIMEOUT_S
    committed = 0
    try:
        while time.time() < deadline and all(p.poll() is None for p in procs):
            committed = sum(len(json.loads(f.read_text())["steps"]) for f in out.rglob(f"{EVAL}.index.json")
                            if f.stat().st_size)
            if committed:
                break
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert committed and committed < 2 * len(Run(trained).steps), "killed before or after the work"
    port = free_port()
    rs = _together([(_analyze(trained, out, "--no-report"), multihost_env(4, i, port)) for i in range(2)])
    for i, r in enumerate(rs):
        assert r.returncode == 0, f"process {i}:\n{r.stderr[-3000:]}"
    assert not (out / parts.PARTS_DIR).exists() and index.is_dir()
    _assert_same_store(trained, out, single, atol=1e-5)


def test_part_specs_and_job_arrays_are_read_or_refused_in_one_line():
    assert parts.parse("1/4") == parts.Part(1, 4)
    for bad in ("4/4", "1", "-1/2", "a/b"):
        with pytest.raises(UserError, match="--part"):
            parts.parse(bad)
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_MAX": "7",
           "SLURM_ARRAY_TASK_COUNT": "4"}
    assert parts.from_slurm_array(env) == parts.Part(1, 4)
    assert parts.from_slurm_array({}) is None
    with pytest.raises(UserError, match="consecutive"):
        parts.from_slurm_array({**env, "SLURM_ARRAY_TASK_MAX": "10"})


def test_a_sharded_run_cannot_be_split_into_parts(trained, tmp_path):
    run = Run(trained, tmp_path, SHARDED)
    with pytest.raises(UserError, match="multi-host job"):
        scoring.job_part(run, parts.Part(0, 2))


def test_overrides_may_follow_the_steps_on_the_command_line():
    from induction_jax.analysis import job
    values = [job.step_or_override(v) for v in ("8", "16", "mesh.fsdp=2")]
    assert job.steps_arg(values) == ([8, 16], ["mesh.fsdp=2"])
    assert job.steps_arg(None) == (None, [])
