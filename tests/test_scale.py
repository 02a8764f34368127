"""Scale without the hardware: ahead-of-time plans on fake CPU devices (and a TPU topology when libtpu is
installed), the full-scale configs' mesh presets against their recommended slices, and the launchers' dry runs."""

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from induction_jax import plan
from induction_jax.base import config
from induction_jax.base.config import UserError
from induction_jax.training import aot, sharding

FULL = [f"configs/full_{n}l.yaml" for n in (4, 6, 10, 16, 24, 40)]
ENV_CPU = {"JAX_PLATFORMS": "cpu"}


def _plan_table_width() -> int:
    """The number of '|' in a row of docs/scale.md's plan tables, the rows `plan --markdown` prints."""
    header = next(ln for ln in Path("docs/scale.md").read_text().splitlines()
                  if ln.startswith("| config | slice | mesh d x f x t | batch |"))
    return header.count("|")


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
        out[fsdp] = aot.plan(cfg, jax.devices()[:8], aot.CHIPS["v5e"], mfu=0.4, forward=False)["train"]
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
    return aot.plan(cfg, devices, aot.CHIPS["v5e"], mfu=0.4, forward=False)["train"].temporaries / 2**20


def test_fused_attention_shrinks_the_planned_step_and_the_cpu_compiler_undoes_remat():
    devices = jax.devices()[:8]
    explicit = _planned_temps_mib(devices, ["model.attention=explicit", "model.remat=none"])
    fused = _planned_temps_mib(devices, ["model.attention=fused", "model.remat=none"])
    assert explicit - fused > 3 * PATTERN_MIB, (explicit, fused)  # about one pattern per layer
    # What the plan prints for a CPU compile with remat on (aot.CPU_UNDOES_REMAT) must stay true.
    block = _planned_temps_mib(devices, ["model.attention=fused", "model.remat=block"])
    assert abs(block - fused) < 0.1 * fused, (block, fused)
    r = _cli("--config", "configs/cpu/tiny.yaml", "--devices", "2", "--no-forward", "model.remat=block")
    assert r.returncode == 0 and aot.CPU_UNDOES_REMAT in r.stdout, r.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install 'jax[tpu]')")
def test_remat_shrinks_the_step_libtpu_compiles():
    devices, _ = aot.tpu_devices("v5e:2x4")
    none = _planned_temps_mib(devices, ["model.remat=none"])
    block = _planned_temps_mib(devices, ["model.remat=block"])
    dots = _planned_temps_mib(devices, ["model.remat=dots"])
    assert block < dots < none and block < 0.75 * none, (block, dots, none)


def test_plan_cli_on_fake_cpu_devices():
    r = _cli("--config", "configs/cpu/tiny.yaml", "--devices", "4", "--markdown")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "4 x cpu" in out and "CPU compiler's estimate" in out
    for needle in ("train step, per device: arguments", "temporaries", "peak", "analysis forward",
                   "FLOPs per step", "analytic", "compiled cost analysis", "step time at 40% MFU", "snapshots x"):
        assert needle in out, needle
    row = out.strip().splitlines()[-1]
    assert row.startswith("| tiny | 4 x CPU | 1x4x1 | 8 |") and row.count("|") == _plan_table_width()


def test_plan_reruns_itself_when_jax_has_another_device_count(capfd):
    # This process already has 8 CPU devices, fixed when jax started: plan must start a fresh interpreter.
    code = plan.main(["--config", "configs/cpu/tiny.yaml", "--devices", "2", "--no-forward"])
    assert code == 0
    assert "2 x cpu" in capfd.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install 'jax[tpu]')")
def test_plan_for_a_tpu_topology_without_a_tpu():
    r = _cli("--config", "configs/cpu/tiny.yaml", "--topology", "v5e:2x2", "--no-forward")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "4 x TPU v5 lite (compiled by libtpu" in r.stdout and "of 16 GiB: fits" in r.stdout
    assert "attention fused (blocked kernel)" in r.stdout  # context 32: splash's 128-position tiles do not divide
    # A TPU mesh gets the Pallas splash kernel, compiled by libtpu from this CPU host.
    r = _cli("--config", "configs/cpu/tiny.yaml", "--topology", "v5e:2x2", "--no-forward", "model.context=128")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "attention fused (splash kernel)" in r.stdout


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
