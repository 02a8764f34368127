"""Running the package's commands in subprocesses, as a user does, and checking their one-line refusals."""

import os
import subprocess
import sys

TINY = "configs/cpu/tiny.yaml"
QUIET = ["train.probe_every=0"]


def cmd(module, *args):
    return [sys.executable, "-m", f"induction_jax.{module}", *map(str, args)]


def train_cmd(run_dir, ov, extra=(), flags=()):
    return cmd("train", "--config", TINY, "--run-dir", run_dir, "--no-progress", *flags, *ov, *extra)


def env(**extra):
    return {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu", **extra}


def run(command, timeout=300, **env_extra):
    return subprocess.run(command, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)


def one_line_error(r, needle):
    """The refusal's line: exit status 2 and a single `error: ` line on stderr that contains `needle`."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr[-3000:]
    return lines[0]


def free_port() -> int:
    """A localhost port nothing listens on, for a jax.distributed coordinator."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def multihost_env(devices: int, process: int | None = None, port: int | None = None) -> dict:
    """The environment of one local process of a 2-process job (or of a lone one, `process` None) with `devices`
    fake CPU devices; no launcher's variables leak in from the test's own environment."""
    out = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}
    for k in list(out):
        if k.startswith(("INDUCTION_JAX_", "SLURM_")):
            out.pop(k)
    if process is not None:
        out.update(INDUCTION_JAX_COORDINATOR=f"localhost:{port}", INDUCTION_JAX_NUM_PROCESSES="2",
                   INDUCTION_JAX_PROCESS_ID=str(process))
    return out
