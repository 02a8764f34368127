"""Scale without the hardware: ahead-of-time plans on fake CPU devices (and a TPU topology when libtpu is
installed), the analysis programs' device forms, the full-scale configs' mesh presets against their recommended
slices and their analysis rows, and the launchers' dry runs."""

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from induction_jax import plan
from induction_jax.base import config
from induction_jax.base.config import UserError
from induction_jax.measures import heads
from induction_jax.model import model as model_lib
from induction_jax.training import aot, aot_analysis, sharding

FULL = [f"configs/full_{n}l.yaml" for n in (4, 6, 10, 16, 24, 40)]
ENV_CPU = {"JAX_PLATFORMS": "cpu"}


HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
TRAIN_HEADER = "| config | slice | mesh d x f x t | batch |"
ANALYSIS_HEADER = "| config | slice | mesh d x f x t | eval batch |"


def _plan_table_width(header: str = TRAIN_HEADER) -> int:
    """The number of '|' in a row of one of docs/scale.md's plan tables (the rows `plan --markdown` prints)."""
    line = next(ln for ln in Path("docs/scale.md").read_text().splitlines() if ln.startswith(header))
    return line.count("|")


def _cli(*args, timeout=120):
    import os
    return subprocess.run([sys.executable, "-m", "induction_jax.plan", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **ENV_CPU})


def test_growing_the_fsdp_axis_shrinks_per_device_memory():
    # A mid-size model (full_6l's widths; 3 layers, context 512, vocab 4096 so the CPU compiles it in seconds).
    # The batch is split 8 ways either way, so only where parameters, gradients and activations live differs:
    # data=8 replicates the model and its gradients, fsdp=8 shards them. With activations replicated over fsdp
    # (no with_sharding_constraint) the fsdp=8 temporaries were 39% larger than data=8's instead of 5% smaller.
    small = ["model.n_layers=3", "model.context=512", "train.batch_size=64", "model.vocab_size=4096",
             "model.local_window=64"]
    out = {}
    for data, fsdp in ((8, 1), (1, 8)):
        cfg = config.load("configs/full_6l.yaml", small + [f"mesh.data={data}", f"mesh.fsdp={fsdp}", "mesh.tensor=1"])
        out[fsdp] = aot.plan(cfg, jax.devices()[:8], aot.CHIPS["v5e"], mfu=0.4, analysis=False)["train"]
    assert out[8].arguments * 7 < out[1].arguments  # the train state is split 8 ways
    assert out[8].temporaries < out[1].temporaries, (
        f"temporaries grew with the fsdp axis: {out[1].temporaries / 2**20:.0f} MiB at fsdp=1, "
        f"{out[8].temporaries / 2**20:.0f} MiB at fsdp=8; something big is replicated")


# 4 layers of full_6l's widths at context 1024, 16 sequences over 8 devices: the explicit path keeps every layer's
# [B, H, T, T] pattern for the backward (2 sequences x 12 heads x 1024^2 x 4 bytes = 96 MiB a layer per device).
SHRINK = ["model.n_layers=4", "model.context=1024", "train.batch_size=16", "model.vocab_size=4096",
          "model.local_window=64", "model.dtype=float32", "model.loss_chunk=0", "mesh.data=1", "mesh.fsdp=8",
          "mesh.tensor=1"]
PATTERN_MIB = 4 * 2 * 12 * 1024 ** 2 / 2**20


def _planned_temps_mib(devices, overrides) -> float:
    cfg = config.load("configs/full_6l.yaml", SHRINK + overrides)
    return aot.plan(cfg, devices, aot.CHIPS["v5e"], mfu=0.4, analysis=False)["train"].temporaries / 2**20


def test_fused_attention_shrinks_the_planned_step_and_the_cpu_compiler_undoes_remat():
    devices = jax.devices()[:8]
    explicit = _planned_temps_mib(devices, ["model.attention=explicit", "model.remat=none"])
    fused = _planned_temps_mib(devices, ["model.attention=fused", "model.remat=none"])
    assert explicit - fused > 3 * PATTERN_MIB, (explicit, fused)  # about one pattern per layer
    # What the plan prints for a CPU compile (aot.cpu_note: remat undone) must stay true.
    block = _planned_temps_mib(devices, ["model.attention=fused", "model.remat=block"])
    assert abs(block - fused) < 0.1 * fused, (block, fused)


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install 'jax[tpu]')")
def test_remat_shrinks_the_step_libtpu_compiles():
    devices, _ = aot.tpu_devices("v5e:2x4")
    none = _planned_temps_mib(devices, ["model.remat=none"])
    block = _planned_temps_mib(devices, ["model.remat=block"])
    dots = _planned_temps_mib(devices, ["model.remat=dots"])
    assert block < dots < none and block < 0.75 * none, (block, dots, none)


def _no_verdict(text: str) -> bool:
    return not re.search(r"\bfits\b|DOES NOT FIT|verdict: every", text)


def test_plan_on_fake_cpu_devices_lists_every_program_without_a_verdict(capsys):
    assert plan.main(["--config", "configs/cpu/tiny.yaml", "--devices", "8"]) == 0
    out = capsys.readouterr().out
    assert "8 x cpu" in out and "CPU compiler's estimate" in out
    for needle in ("train step, per device: arguments", "temporaries", "peak", "FLOPs per step", "analytic",
                   "compiled cost analysis", "step time at 40% MFU", "snapshots x"):
        assert needle in out, needle
    # Every analysis program, with the batch the analysis gives it: the eval batch (8) split over the 8 devices, the
    # measures' 2 draws and the previous-token batch whole, and the lane group of 4 lanes (one layer's heads) on
    # max(1, 8 // (8 heads + 1)) = 1 window, as ablate_eval_set splits the eval set for every head's lane.
    for program in ("per-token losses (8 x 32 tokens)", "prefix matching (2 x 29 tokens)",
                    "copying evaluator (2 x 8 tokens)", "previous token (8 x 32 tokens)", "QK trace (weights)",
                    "OV copying circuits (weights)", "composition scores (weights)", "alignment ceiling (weights)",
                    "ablation clean run (1 x 32 tokens)", "ablation lane group (4 lanes x 1 x 32 tokens)"):
        assert re.search(rf"^  {re.escape(program)} +arguments .* peak \d+\.\d+ GiB$", out, re.M), program
    # No verdict from the CPU code path, and one line that says why and how to get libtpu's.
    assert _no_verdict(out) and out.count(aot.cpu_note("v5e")) == 1
    assert "pip install 'jax[tpu]'" in aot.cpu_note("v5e") and "--topology v5e:2x2" in aot.cpu_note("v5e")


def test_plan_on_fake_cpu_devices_gives_no_verdict_past_the_chips_memory():
    # A 32768-wide model of 65536 tokens: 32 GiB of float32 parameters on one device before AdamW's moments, twice
    # a v5e's HBM. The plan still prints the figures only, and exits 0.
    r = _cli("--config", "configs/cpu/tiny.yaml", "--devices", "1", "--no-analysis", "model.vocab_size=65536",
             "model.d_model=32768", "model.n_layers=1", "mesh.fsdp=1")
    assert r.returncode == 0, r.stderr[-2000:]
    peak = float(re.search(r"train step, per device: .* peak ([\d.]+) GiB$", r.stdout, re.M).group(1))
    assert peak > 2 * aot.CHIPS["v5e"].hbm_gib and _no_verdict(r.stdout)


def test_plan_refuses_markdown_rows_from_fake_cpu_devices():
    r = _cli("--config", "configs/cpu/tiny.yaml", "--devices", "2", "--markdown")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "--markdown" in r.stderr and "--topology" in r.stderr


def test_plan_rows_have_the_docs_tables_width():
    cfg = config.load("configs/cpu/tiny.yaml")
    out = aot.plan(cfg, jax.devices()[:4], aot.CHIPS["v5e"], mfu=0.4)
    assert out["fits"] is None and len(out["analysis"]) == 10
    row = aot.markdown_row("tiny", cfg, out, "v5e:2x2")
    assert row.startswith("| tiny | v5e:2x2 | 1x4x1 | 8 |") and row.count("|") == _plan_table_width()
    row = aot.analysis_row("tiny", out, "v5e:2x2")
    assert row.startswith("| tiny | v5e:2x2 | 1x4x1 | 8 |") and "(4 lanes)" in row
    assert row.count("|") == _plan_table_width(ANALYSIS_HEADER)


def test_plan_reruns_itself_when_jax_has_another_device_count(capfd):
    # This process already has 8 CPU devices, fixed when jax started: plan must start a fresh interpreter.
    code = plan.main(["--config", "configs/cpu/tiny.yaml", "--devices", "2", "--no-analysis"])
    assert code == 0
    assert "2 x cpu" in capfd.readouterr().out


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed")
def test_plan_for_a_topology_without_libtpu_says_how_to_get_it():
    r = _cli("--config", "configs/cpu/tiny.yaml", "--topology", "v5e:2x2")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "needs libtpu" in r.stderr and "pip install 'jax[tpu]'" in r.stderr and "--devices" in r.stderr


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install 'jax[tpu]')")
def test_plan_for_a_tpu_topology_without_a_tpu():
    r = _cli("--config", "configs/cpu/tiny.yaml", "--topology", "v5e:2x2", "--no-analysis")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "4 x TPU v5 lite (compiled by libtpu" in r.stdout and "of 16 GiB: fits" in r.stdout
    assert "attention fused (blocked kernel)" in r.stdout  # context 32: splash's 128-position tiles do not divide
    # A TPU mesh gets the Pallas splash kernel, compiled by libtpu from this CPU host.
    r = _cli("--config", "configs/cpu/tiny.yaml", "--topology", "v5e:2x2", "--no-analysis", "model.context=128")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "attention fused (splash kernel)" in r.stdout
    # Every analysis program compiles for the slice, each with a verdict, and the rows of both tables come out.
    r = _cli("--config", "configs/cpu/tiny.yaml", "--topology", "v5e:2x2", "--markdown", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(re.findall(r"^  .* peak [\d.]+ GiB of 16 GiB: fits$", r.stdout, re.M)) == 10
    assert "verdict: every program fits 16 GiB per TPU v5e" in r.stdout
    train_row, analysis_row = r.stdout.strip().splitlines()[-2:]
    assert train_row.count("|") == _plan_table_width()
    assert analysis_row.count("|") == _plan_table_width(ANALYSIS_HEADER) and analysis_row.endswith("| yes |")


def test_out_of_memory_is_a_verdict_not_a_crash():
    class Lowered:
        def compile(self):
            raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                               "temporaries (92.48G) exceeds available HBM (15.75G).\nmore detail")

    with pytest.raises(aot.DoesNotFit) as e:
        aot.compile_or_oom(Lowered())
    assert "\n" not in str(e.value) and aot._needed_gib(str(e.value)) == pytest.approx(92.48)
    assert aot._needed_gib("E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of memory in memory "
                            "space hbm. Used 16.82G of 15.75G hbm.") == pytest.approx(16.82)


def test_kernel_vmem_overflow_is_a_one_line_error():
    class Lowered:
        def compile(self):
            raise RuntimeError("RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom: Scoped allocation with size "
                               "33.00M and limit 16.00M exceeded scoped vmem limit\nmore detail")

    with pytest.raises(UserError, match="VMEM.*model.attention_block") as e:
        aot.compile_or_oom(Lowered())
    assert "\n" not in str(e.value)


def test_plan_mistakes_are_one_line():
    r = _cli("--config", "configs/cpu/tiny.yaml", "--topology", "v9:2x2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "v9:2x2" in r.stderr
    with pytest.raises(UserError, match="train.batch_size"):
        plan.main(["--config", "configs/cpu/tiny.yaml", "--devices", "8", "train.batch_size=4"])


def _tiny_params(overrides, seed=0):
    """(model config, params) of the tiny model with random weights, its LayerNorm scales drawn away from 1 so
    that folding them in counts."""
    cfg = config.load("configs/cpu/tiny.yaml", overrides).model
    params = model_lib.init_params(cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return cfg, jax.tree_util.tree_map_with_path(
        lambda path, a: a * (1 + 0.5 * rng.standard_normal(a.shape)) if "scale" in jax.tree_util.keystr(path) else a,
        params)


def _f64(a):
    return np.asarray(a, np.float64)


def _folded_reference(params, cfg, layer, name):
    w_DHE = _f64(params[f"block_{layer}"]["attn"][name])
    if cfg.layer_norm:
        w_DHE = w_DHE * _f64(params[f"block_{layer}"]["ln1"]["scale"])[:, None, None]
        w_DHE = w_DHE - w_DHE.mean(0, keepdims=True)
    return w_DHE


@pytest.mark.parametrize("overrides", [[], ["model.layer_norm=false", "model.n_layers=3", "model.d_mlp=64"]])
def test_the_weight_measures_on_device_match_a_float64_reference(overrides):
    """The OV circuits and the QK trace, one device program each (what `plan` compiles and `analyze` runs),
    against float64 numpy written from their docstrings."""
    cfg, params = _tiny_params(overrides)
    w_e, w_u = _f64(params["W_E"]), _f64(params["W_U"])
    w_u = w_u - w_u.mean(1, keepdims=True)
    d = w_e.shape[1]
    if cfg.layer_norm:
        w_e = w_e - w_e.mean(1, keepdims=True)
        out_DD = (np.eye(d) - 1.0 / d) * _f64(params["ln_final"]["scale"])[None]
    else:
        out_DD = np.eye(d)
    loop_DD = out_DD @ w_u @ w_e
    # E_c diag(gamma_1) W_V W_O C diag(gamma_f) U_c's d_head x d_head twin: W_O (C diag(gamma_f) U_c E_c) diag(gamma_1) W_V
    def gamma(layer):
        return _f64(params[f"block_{layer}"]["ln1"]["scale"]) if cfg.layer_norm else np.ones(d)
    want = np.stack([np.einsum("hed,dc,c,chf->hef", _f64(params[f"block_{layer}"]["attn"]["W_O"]), loop_DD,
                               gamma(layer), _f64(params[f"block_{layer}"]["attn"]["W_V"]))
                     for layer in range(cfg.n_layers)])
    got = heads.ov_circuits(params, cfg).astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())

    prev_LH = np.random.default_rng(1).uniform(size=(cfg.n_layers, cfg.n_heads))
    gram_DD = _f64(params["W_E"]).T @ _f64(params["W_E"])
    want = np.full((cfg.n_layers, cfg.n_heads), np.nan)
    for layer in range(1, cfg.n_layers):
        q, k = (_folded_reference(params, cfg, layer, n) for n in ("W_Q", "W_K"))
        for h in range(cfg.n_heads):
            want[layer, h] = sum(
                prev_LH[m, g] * np.trace(k[:, h].T @ _f64(params[f"block_{m}"]["attn"]["W_O"])[g].T
                                         @ _folded_reference(params, cfg, m, "W_V")[:, g].T @ gram_DD @ q[:, h])
                for m in range(layer) for g in range(cfg.n_heads))
    got = heads.qk_trace(params, cfg, prev_LH.astype(np.float32))
    assert np.isnan(got[0]).all()
    np.testing.assert_allclose(got[1:], want[1:], rtol=1e-4, atol=1e-5 * np.abs(want[1:]).max())


def test_ov_circuits_on_a_mesh_never_form_vocab_by_vocab():
    # A vocabulary no other dimension shares (1000 = 8 x 125), split over a 4-way tensor axis: no array of the
    # compiled program, on any device, has two vocab-sized dimensions.
    cfg = config.load("configs/cpu/tiny.yaml", ["model.vocab_size=1000", "mesh.fsdp=2", "mesh.tensor=4"])
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:8])
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          model_lib.abstract_params(cfg.model), sharding.param_shardings(cfg.model, mesh))
    assert params["W_U"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    with jax.set_mesh(mesh):
        hlo = heads._ov_circuits.lower(params, cfg.model.layer_norm).compile().as_text()
    shapes = re.findall(r"\[([\d,]+)\]", hlo)
    assert any("250" in s.split(",") for s in shapes)  # the vocab's shard on each device, to show the search works
    assert not [s for s in shapes if sum(d in ("1000", "250") for d in s.split(",")) >= 2]


def _recommended(path: str) -> tuple[str, int]:
    text = Path(path).read_text()
    m = re.search(r"Recommended slice: (\S+) \(topology (\w+):([\dx]+), (\d+) chips of (\d+) GiB", text)
    assert m, f"{path}: no 'Recommended slice: NAME (topology CHIP:SHAPE, N chips of M GiB' comment"
    chips = math.prod(int(d) for d in m.group(3).split("x"))
    assert chips == int(m.group(4)), f"{path}: topology {m.group(2)}:{m.group(3)} is not {m.group(4)} chips"
    assert aot.CHIPS[m.group(2)].hbm_gib == int(m.group(5))
    return f"{m.group(2)}:{m.group(3)}", chips


@pytest.mark.parametrize("path", FULL)
def test_full_configs_mesh_fits_their_recommended_slice(path):
    cfg = config.load(path)
    topology, chips = _recommended(path)
    data, fsdp, tensor = sharding.mesh_shape(cfg.mesh, chips)
    assert cfg.train.batch_size % (data * fsdp) == 0 and cfg.model.n_heads % tensor == 0
    # docs/scale.md carries the plan row of exactly this config on exactly this slice
    name = Path(path).stem
    width = _plan_table_width()
    rows = [ln for ln in Path("docs/scale.md").read_text().splitlines()
            if ln.startswith(f"| {name} | {topology} |") and ln.count("|") == width]
    assert len(rows) == 1, f"docs/scale.md: expected one plan row for {name} on {topology}"
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert cells[2] == f"{data}x{fsdp}x{tensor}" and cells[8] == "yes"
    # ... whose peak keeps the 10% margin every recommendation keeps
    assert float(cells[6]) < 0.9 * aot.CHIPS[topology.split(":")[0]].hbm_gib


@pytest.mark.parametrize("path", FULL)
def test_full_configs_analysis_row(path):
    """docs/scale.md's analysis table has one row per full config, on a slice the config's mesh divides, whose
    every program keeps the 10% margin."""
    cfg = config.load(path)
    width = _plan_table_width(ANALYSIS_HEADER)
    rows = [ln for ln in Path("docs/scale.md").read_text().splitlines()
            if ln.startswith(f"| {Path(path).stem} | v5e:") and ln.count("|") == width]
    assert len(rows) == 1, f"docs/scale.md: expected one analysis row for {Path(path).stem}"
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    chip, shape = cells[1].split(":")
    data, fsdp, tensor = sharding.mesh_shape(cfg.mesh, math.prod(int(d) for d in shape.split("x")))
    assert cells[2] == f"{data}x{fsdp}x{tensor}" and cells[-1] == "yes"
    assert int(cells[3]) % (data * fsdp) == 0 and int(cells[3]) >= cfg.eval.batch_size
    peaks = [float(c.split()[0]) for c in cells[4:8]]
    assert max(peaks) < 0.9 * aot.CHIPS[chip].hbm_gib and f"({cfg.model.n_heads} lanes)" in cells[7]


def _bash(*args):
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=60)


def test_tpu_pod_dry_run_prints_every_step():
    r = _bash("launch/tpu_pod.sh", "--dry-run", "--name", "ij-6l", "--zone", "us-west4-a", "--type", "v5litepod-256",
              "--spot", "--", "--config", "configs/full_6l.yaml", "--run-dir", "/mnt/runs/full_6l")
    assert r.returncode == 0, r.stderr
    cmds = [ln[2:] for ln in r.stdout.splitlines() if ln.startswith("+ ")]
    assert cmds[0] == ("gcloud compute tpus tpu-vm create ij-6l --zone us-west4-a --accelerator-type v5litepod-256 "
                       "--version v2-alpha-tpuv5-lite --spot")
    assert any(c.startswith("gcloud compute tpus tpu-vm scp") and c.endswith("--worker=all") for c in cmds)
    install = [c for c in cmds if " ssh " in c and "--worker=all" in c]
    assert len(install) == 1 and "pip install" in install[0] and "induction_jax[tpu]" in install[0]
    starts = [c for c in cmds if " ssh " in c and "induction_jax.train" in c]
    assert len(starts) == 64  # v5litepod-256: 64 hosts of 4 chips, one process each
    for w, c in enumerate(starts):
        assert f"--worker={w} " in c and c.endswith(f">> launch_logs/ij-6l/worker-{w}.log 2>&1 &")
        assert ("python -m induction_jax.train --no-progress --config configs/full_6l.yaml "
                "--run-dir /mnt/runs/full_6l'") in c
    assert "resumes from the latest checkpoint" in r.stdout


def test_tpu_pod_refuses_incomplete_arguments():
    r = _bash("launch/tpu_pod.sh", "--dry-run", "--name", "x", "--zone", "z", "--type", "v5p-2048", "--",
              "--config", "configs/full_40l.yaml")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "--run-dir" in r.stderr
    r = _bash("launch/tpu_pod.sh", "--dry-run", "--name", "x", "--zone", "z", "--type", "v5p-2048", "--",
              "--config", "configs/full_40l.yaml", "--run-dir", "/mnt/r")
    assert r.returncode == 0 and "256 worker(s)" in r.stdout  # v5p-2048: 1024 chips, 4 per host


def test_slurm_dry_run_and_signal():
    script = Path("launch/slurm_gpu.sbatch").read_text()
    assert "#SBATCH --signal=TERM@300" in script and "#SBATCH --requeue" in script
    r = _bash("launch/slurm_gpu.sbatch", "--dry-run", "--config", "configs/full_10l.yaml", "--run-dir", "/shared/r")
    assert r.returncode == 0, r.stderr
    cmds = [ln[2:] for ln in r.stdout.splitlines() if ln.startswith("+ ")]
    assert any(c.startswith("srun ") and c.endswith("python -m induction_jax.train --no-progress --config "
                                                    "configs/full_10l.yaml --run-dir /shared/r") for c in cmds)
    assert "scontrol requeue" in r.stdout
    r = _bash("launch/slurm_gpu.sbatch", "--config", "configs/full_10l.yaml", "--run-dir", "/shared/r")
    assert r.returncode == 2 and "not inside a SLURM job" in r.stderr
