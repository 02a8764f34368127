"""The analysis launchers without the hardware: launch/tpu_pod.sh --command analyze|ablate and
launch/slurm_analysis.sh through their dry runs, and their restart and submission logic against stand-in
gcloud, sbatch and srun commands that record what they were asked to do."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TPU = ["--name", "ij-40l", "--zone", "us-west4-a", "--type", "v5litepod-16"]  # 4 hosts of 4 chips


def _bash(*args, env=None):
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, **(env or {})})


def _commands(stdout: str) -> list[str]:
    return [ln[2:] for ln in stdout.splitlines() if ln.startswith("+ ")]


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("command", ["analyze", "ablate"])
def test_tpu_pod_dry_run_runs_the_command_on_every_worker(command):
    r = _bash("launch/tpu_pod.sh", "--dry-run", "--command", command, *TPU, "--",
              "/mnt/runs/full_40l", "analysis.placement=sharded")
    assert r.returncode == 0, r.stderr
    cmds = _commands(r.stdout)
    assert cmds[0].startswith("gcloud compute tpus tpu-vm create ij-40l ")
    install = [c for c in cmds if " ssh " in c and "--worker=all" in c]
    assert len(install) == 1 and "pip install" in install[0]
    starts = [c for c in cmds if " ssh " in c and "--worker=all" not in c]
    assert len(starts) == 4
    for w, c in enumerate(starts):
        assert f"--worker={w} " in c and c.endswith(f">> launch_logs/ij-40l/worker-{w}.log 2>&1 &")
        assert (f"python -m induction_jax.{command} --no-progress /mnt/runs/full_40l "
                "analysis.placement=sharded'") in c
    assert "induction_jax.train" not in r.stdout
    assert f"{command} resumes, skipping every result already stored" in r.stdout


def test_tpu_pod_refuses_bad_commands_and_paths():
    _one_line_error(_bash("launch/tpu_pod.sh", "--dry-run", "--command", "evaluate", *TPU, "--", "/mnt/r"),
                    "--command evaluate", "train, analyze or ablate")
    # options, overrides, option values and --steps' numbers are no RUN_DIR
    _one_line_error(_bash("launch/tpu_pod.sh", "--dry-run", "--command", "analyze", *TPU, "--", "--ablations",
                          "--out", "/mnt/out", "--steps", "512", "1024", "mesh.fsdp=16"), "no RUN_DIR")
    # a relative path would land in each worker's copy of the code
    _one_line_error(_bash("launch/tpu_pod.sh", "--dry-run", "--command", "analyze", *TPU, "--", "runs/full_40l"),
                    "runs/full_40l", "absolute path")
    _one_line_error(_bash("launch/tpu_pod.sh", "--dry-run", "--command", "ablate", *TPU, "--", "/mnt/r",
                          "--out", "out"), "out: give an absolute path")
    # train keeps its own check
    _one_line_error(_bash("launch/tpu_pod.sh", "--dry-run", *TPU, "--", "--config", "configs/full_40l.yaml"),
                    "--run-dir")


def _stand_ins(tmp_path, scripts: dict[str, str]) -> dict[str, str]:
    """A bin directory first on PATH holding the given bash scripts; env for the launcher."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls")}


# gcloud: the slice exists and is READY; worker 0 of the first attempt is lost (ssh exits 255), the next attempt
# prints what the command prints (OUTPUT) and exits with RC. Every call is recorded, one line each.
GCLOUD = r"""
echo "gcloud $*" >> "$CALLS"
case "$*" in
  *" describe "*) echo READY ;;
  *"--worker=0 --command"*)
    n=$(cat "$CALLS.attempts" 2>/dev/null || echo 0); echo $((n + 1)) > "$CALLS.attempts"
    if [[ $n -eq 0 ]]; then echo "connection to worker 0 lost"; exit 255; fi
    printf '%b' "$OUTPUT"; exit "$RC" ;;
esac
exit 0
"""
GIT = 'echo "git $*" >> "$CALLS"\n'


@pytest.mark.parametrize("extra, output, rc, finishes", [
    ([], "analysed 13 snapshots\\nreport: /mnt/runs/r/analysis/report.md\\n", 0, True),
    ([], "error: process 0 of 4: gave up after 600 s waiting for every process\\n", 2, False),
    (["--no-report"], "analysed 13 snapshots\\n", 0, True),
    (["--no-report"], "Killed\\n", 137, False),
    (["--part", "1/4"], "part 1 of 4: 3 snapshots of 1 run\\n", 0, True),
])
def test_tpu_pod_restarts_until_worker_0_says_the_analysis_finished(tmp_path, extra, output, rc, finishes):
    env = _stand_ins(tmp_path, {"gcloud": GCLOUD, "git": GIT})
    logs = tmp_path / "logs"
    r = _bash("launch/tpu_pod.sh", "--command", "analyze", *TPU, "--max-restarts", "2", "--logs", str(logs), "--",
              "/mnt/runs/r", *extra, env={**env, "OUTPUT": output, "RC": str(rc)})
    attempts = int(Path(env["CALLS"] + ".attempts").read_text())
    log0 = (logs / "worker-0.log").read_text()
    assert "=== attempt 0" in log0 and "connection to worker 0 lost" in log0
    if finishes:
        assert r.returncode == 0, r.stderr
        assert attempts == 2 and "finished: see" in r.stdout
        if not extra:
            assert "report: /mnt/runs/r/analysis/report.md" in r.stdout
    else:
        # the last attempt's output counts: neither a crash nor an earlier attempt ends the loop
        _one_line_error(r, "gave up after 2 restarts")
        assert attempts == 3
    calls = Path(env["CALLS"]).read_text().splitlines()
    assert sum("archive" in c for c in calls) == 1  # a reused READY slice is installed once
    starts = [c for c in calls if "induction_jax.analyze --no-progress /mnt/runs/r" in c]
    assert len(starts) == 4 * attempts and all(os.path.exists(logs / f"worker-{w}.log") for w in range(4))



@pytest.mark.parametrize("output, finishes", [("finished at step 131072\\n", True),
                                              ("preempted; saved at step 4096\\n", False)])
def test_tpu_pod_training_still_ends_only_at_its_last_step(tmp_path, output, finishes):
    env = _stand_ins(tmp_path, {"gcloud": GCLOUD, "git": GIT})
    r = _bash("launch/tpu_pod.sh", *TPU, "--max-restarts", "1", "--logs", str(tmp_path / "logs"), "--",
              "--config", "configs/full_40l.yaml", "--run-dir", "/mnt/r", env={**env, "OUTPUT": output, "RC": "0"})
    assert r.returncode == (0 if finishes else 2), r.stderr
    assert int(Path(env["CALLS"] + ".attempts").read_text()) == 2
    assert "induction_jax.train --no-progress --config configs/full_40l.yaml" in Path(env["CALLS"]).read_text()

def test_slurm_array_dry_run_submits_the_parts_then_a_merge_after_them():
    r = _bash("launch/slurm_analysis.sh", "--dry-run", "--array", "4", "--time", "2:00:00", "--",
              "analyze", "runs/a", "runs/b", "--ablations")
    assert r.returncode == 0, r.stderr
    sbatch = [c for c in _commands(r.stdout) if c.startswith("sbatch ")]
    assert len(sbatch) == 2
    parts, merge = sbatch
    tail = "launch/slurm_analysis_task.sbatch analyze runs/a runs/b --ablations"
    assert "--parsable" in parts and "--array=0-3 " in parts and "--nodes=1 " in parts and parts.endswith(tail)
    assert "--time=2:00:00" in parts and "--time=2:00:00" in merge and "--gpus-per-node=1 " in parts
    assert "--dependency=afterok:ARRAY_JOB_ID " in merge and "--array" not in merge and merge.endswith(tail)
    srun = [c for c in _commands(r.stdout) if c.startswith("srun ")]
    assert len(srun) == 1 and srun[0].endswith("python -m induction_jax.analyze --no-progress runs/a runs/b "
                                               "--ablations")


def test_slurm_nodes_dry_run_is_one_srun_job():
    r = _bash("launch/slurm_analysis.sh", "--dry-run", "--nodes", "2", "--partition", "gpu", "--",
              "ablate", "/shared/runs/full_24l", "--kind", "mean", "mesh.fsdp=16")
    assert r.returncode == 0, r.stderr
    cmds = _commands(r.stdout)
    sbatch = [c for c in cmds if c.startswith("sbatch ")]
    assert len(sbatch) == 1 and "--array" not in sbatch[0] and "--dependency" not in sbatch[0]
    for needle in ("--nodes=2 ", "--ntasks-per-node=1 ", "--gpus-per-node=8 ", "--partition=gpu "):
        assert needle in sbatch[0], needle
    srun = [c for c in cmds if c.startswith("srun ")]
    assert len(srun) == 1 and "--output=logs/ablate-JOB-task%t.log" in srun[0]
    assert srun[0].endswith("python -m induction_jax.ablate --no-progress /shared/runs/full_24l --kind mean "
                            "mesh.fsdp=16")


def test_slurm_mistakes_are_one_line():
    wrapper = ["launch/slurm_analysis.sh", "--dry-run"]
    _one_line_error(_bash(*wrapper, "--array", "4", "--"), "no command after --")
    _one_line_error(_bash(*wrapper, "--array", "4"), "no command after --")
    _one_line_error(_bash(*wrapper, "--array", "4", "--", "train", "runs/a"), "train", "analyze or ablate")
    _one_line_error(_bash(*wrapper, "--", "analyze", "runs/a"), "--array N", "--nodes N")
    _one_line_error(_bash(*wrapper, "--array", "4", "--nodes", "2", "--", "analyze", "runs/a"), "not both")
    _one_line_error(_bash(*wrapper, "--array", "0", "--", "analyze", "runs/a"), "--array 0")
    _one_line_error(_bash(*wrapper, "--array", "4", "--", "analyze", "--ablations"), "no RUN_DIR")
    _one_line_error(_bash(*wrapper, "--array", "4", "--", "analyze", "runs/a", "--part", "1/4"), "--part")
    _one_line_error(_bash(*wrapper, "--nodes", "2", "--bogus", "--", "analyze", "runs/a"), "--bogus")


# sbatch: records its arguments and prints the next job id as --parsable does (ID;CLUSTER).
SBATCH = r"""
echo "$*" >> "$CALLS"
n=$(wc -l < "$CALLS"); echo "$((4240 + n));cluster"
"""


def test_slurm_array_submits_the_merge_after_the_array_job_it_got(tmp_path):
    env = _stand_ins(tmp_path, {"sbatch": SBATCH})
    logs = tmp_path / "logs"
    r = _bash("launch/slurm_analysis.sh", "--array", "3", "--", "analyze", "runs/a", env={**env, "LOGS": str(logs)})
    assert r.returncode == 0, r.stderr
    parts, merge = Path(env["CALLS"]).read_text().splitlines()
    assert "--array=0-2 " in parts and "--dependency" not in parts
    assert "--dependency=afterok:4241 " in merge and "--kill-on-invalid-dep=yes" in merge
    assert f"--output={logs}/%x-%A_%a.out" in parts and logs.is_dir()
    assert "array job 4241 (3 tasks" in r.stdout and "merge job 4242" in r.stdout


def test_slurm_refuses_what_sbatch_did_not_submit(tmp_path):
    env = _stand_ins(tmp_path, {"sbatch": 'echo "sbatch: error: invalid partition specified: gpu" >&2; exit 1\n'})
    r = _bash("launch/slurm_analysis.sh", "--nodes", "2", "--", "analyze", "runs/a",
              env={**env, "LOGS": str(tmp_path / "logs")})
    assert r.returncode == 2 and "invalid partition" in r.stderr and "error: sbatch failed" in r.stderr


# srun: records its arguments.
SRUN = 'echo "$*" >> "$CALLS"\n'


def test_slurm_task_names_its_log_after_the_array_task(tmp_path):
    env = _stand_ins(tmp_path, {"srun": SRUN})
    job = {"SLURM_JOB_ID": "9001", "SLURM_ARRAY_JOB_ID": "9000", "SLURM_ARRAY_TASK_ID": "2",
           "LOGS": str(tmp_path / "logs"), "PYTHON": "/opt/env/bin/python"}
    r = _bash("launch/slurm_analysis_task.sbatch", "analyze", "runs/a", "--ablations", env={**env, **job})
    assert r.returncode == 0, r.stderr
    (call,) = Path(env["CALLS"]).read_text().splitlines()
    assert call == (f"--kill-on-bad-exit=1 --open-mode=append --output={tmp_path}/logs/analyze-9000_2-task%t.log "
                    "/opt/env/bin/python -m induction_jax.analyze --no-progress runs/a --ablations")
    r = _bash("launch/slurm_analysis_task.sbatch", "analyze", "runs/a", env={**env, "SLURM_JOB_ID": ""})
    _one_line_error(r, "not inside a SLURM job")


def test_docs_show_the_dry_run_as_it_prints():
    text = (REPO / "docs/scale.md").read_text()
    section = text.split("## Analysing a run at scale", 1)[1]
    shown = section.split("```text\n", 1)[1].split("```", 1)[0]
    r = _bash("launch/slurm_analysis.sh", "--dry-run", "--array", "4", "--", "analyze", "runs/a", "runs/b")
    assert r.returncode == 0 and r.stdout == shown, "docs/scale.md: update the dry run under 'Analysing a run'"
