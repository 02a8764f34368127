"""`python -m induction_jax.train`: the training loop, snapshots on schedule, exact resume, live metrics.

The loop never waits on the step it just dispatched: metrics are fetched one step behind, except at snapshot and
resume steps, which must know the loss is finite before they commit anything.

Multi-host: every process runs this same loop on its own rows of each batch; Orbax writes from every process;
process 0 alone writes config.yaml, metrics and the progress bar. The few points where processes wait for each
other are named barriers with timeouts (sharding.barrier), so a lost worker ends the run with a message.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from . import checkpoint, cli, data, evaluate, heads, peak, schedule, sharding, step as step_lib
from . import config as config_lib
from . import model as model_lib
from .config import Config, UserError

DEFAULT_CONFIG = "configs/cpu/attn_only_2l.yaml"
SYNC_TIMEOUT_S = 600  # barriers between steps of the same run: every process is alive and doing the same work
# Process 0 builds the token store (tokenizer training included) while the others wait: allow for a big corpus.
PREPARE_TIMEOUT_S = float(os.environ.get("INDUCTION_JAX_PREPARE_TIMEOUT", 6 * 3600))


class DivergedError(UserError):
    """The loss became NaN or infinite."""


class Prober:
    """Live phase-change probes: windowed ICL score on a fixed eval subset and the max prefix-matching score."""

    def __init__(self, cfg: Config, prepared, mesh):
        tokens_NL, _ = prepared.eval_set()
        # Replicated over the whole mesh: the params span every process's devices, so must the probe's inputs.
        rep = sharding.replicated(mesh)
        self.tokens = jax.device_put(tokens_NL[: cfg.train.probe_examples], rep)
        sample = lambda rng, shape: prepared.random_tokens(rng, shape, cfg.eval.exclude_common)
        # Drawn once, so successive probes measure the same sequences.
        rng = np.random.default_rng(cfg.data.eval_seed)
        self.prefix = jax.device_put(heads.prefix_matching_tokens(cfg.eval, sample, prepared.bos_id, rng), rep)
        self.model = model_lib.make(cfg.model)
        self.eval_cfg = cfg.eval

    def __call__(self, params) -> dict:
        out = jax.device_get(evaluate.probe(self.model, params, self.tokens, self.prefix, self.eval_cfg))
        return {"probe_icl": float(out["icl"]), "probe_max_prefix": float(out["prefix_max"]),
                "probe_max_prev_token": float(out["prev_max"])}


def default_run_dir(config_path: str | None) -> Path:
    return Path("runs") / (Path(config_path).stem if config_path else "default")


def check_run_dir(run_dir: Path, cfg: Config, override: bool) -> None:
    """Refuses a run directory made with another config (one line listing the differences) unless overridden;
    then process 0 records the config.

    Every process checks before any writes (hence the barrier): each sees the same directory and so raises the
    same error, instead of one failing alone while the others wait on it.
    """
    _validate_run_dir(run_dir, cfg, override)
    sharding.barrier(f"run directory {run_dir} checked", SYNC_TIMEOUT_S)
    if sharding.is_main_process():
        saved = run_dir / "config.yaml"
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_suffix(".tmp")
        tmp.write_text(config_lib.to_yaml(cfg))
        tmp.replace(saved)


def _validate_run_dir(run_dir: Path, cfg: Config, override: bool) -> None:
    saved = run_dir / "config.yaml"
    if saved.exists():
        old = config_lib.load(saved)
        changed = config_lib.diff(old, cfg)
        if changed and not override:
            raise config_lib.ConfigError(
                f"{saved}: this run was made with a different config ({'; '.join(changed)}); "
                "pass --override-config to continue with the new one")
    elif run_dir.exists() and any(p.name not in ("config.yaml",) for p in run_dir.iterdir()):
        if not (run_dir / "snapshots").exists() and not (run_dir / "state").exists():
            raise UserError(f"{run_dir}: exists and is not a run directory (no config.yaml); choose another")


def prepare_data(cfg: Config, progress: bool):
    """The prepared data, built once: process 0 first, then the others, which find it in a shared cache (or, with
    a per-host cache, build the same bytes themselves) instead of racing to tokenize the same corpus."""
    if sharding.is_main_process():
        prepared = data.prepare(cfg, progress=progress)
    sharding.barrier("data prepared by process 0", PREPARE_TIMEOUT_S)
    if not sharding.is_main_process():
        prepared = data.prepare(cfg, progress=False)
    return prepared


class MetricsLog:
    """metrics.jsonl + TensorBoard, written by process 0; a resumed run drops lines past its restored step."""

    def __init__(self, run_dir: Path, start_step: int):
        self.enabled = sharding.is_main_process()
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not self.enabled:
            return
        if self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip()
                    and json.loads(ln).get("step", 0) <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self.file = self.path.open("a")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def train(cfg: Config, run_dir: Path, *, override_config: bool = False, progress: bool = True) -> dict:
    """Trains (or resumes) the run in `run_dir`; returns a summary dict (final step, loss, preempted...)."""
    check_run_dir(run_dir, cfg, override_config)
    prepared = prepare_data(cfg, progress)
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = step_lib.build(cfg, mesh)
    resume = checkpoint.ResumeCheckpointer(run_dir / "state")
    snaps = checkpoint.SnapshotWriter(run_dir / "snapshots")
    checkpoint.install_sigterm_handler()
    total = cfg.train.steps
    snapshot_at = set(schedule.snapshot_steps(cfg.snapshots, total))

    start = resume.latest_step()
    if start is not None:
        state, extra = resume.restore(start, trainer.abstract_state)
        wall_offset = float(extra.get("wall_time", 0.0))
        if sharding.is_main_process():
            print(f"resumed from step {start}", flush=True)
    else:
        start, wall_offset = 0, 0.0
        state = trainer.init_fn(jax.random.key(cfg.train.seed))
    loader = data.Loader(prepared, cfg.model.context, cfg.train.batch_size, cfg.data.seed)
    prober = Prober(cfg, prepared, mesh) if cfg.train.probe_every else None
    log = MetricsLog(run_dir, start)
    flops_tok = step_lib.flops_per_token(cfg)
    peak_flops, _ = peak.device_peak(cfg.model.dtype)
    peak_total = peak_flops * jax.device_count()

    t_start = time.perf_counter()
    wall = lambda: wall_offset + time.perf_counter() - t_start

    def meta(at: int) -> dict:
        return {"step": at, "tokens_seen": at * trainer.tokens_per_step, "wall_time": wall()}

    if start == 0 and 0 in snapshot_at:
        snaps.save(0, state["params"], meta(0))

    bar = tqdm(total=total, initial=start, disable=not (progress and sharding.is_main_process()),
               unit="step", dynamic_ncols=True)
    pending = None  # (step, metrics on device) of the step before the current one
    recent = collections.deque([(start, time.perf_counter())], maxlen=21)  # tokens/s over the last 20 logs
    postfix: dict = {}
    last_loss = float("nan")
    preempted = False

    def flush():
        nonlocal pending, last_loss
        if pending is None:
            return
        at, m = pending
        pending = None
        m = jax.device_get(m)
        loss = float(m["loss"])
        if not math.isfinite(loss):
            raise DivergedError(f"{run_dir}: loss became {loss} at step {at}; the last good snapshot is kept "
                                f"(committed steps: {checkpoint.SnapshotReader(run_dir).steps()[-3:]})")
        last_loss = loss
        if at % cfg.train.log_every == 0 or at == total:
            now = time.perf_counter()
            recent.append((at, now))
            steps_done, dt = at - recent[0][0], now - recent[0][1]
            tps = steps_done * trainer.tokens_per_step / dt if dt > 0 and steps_done > 0 else float("nan")
            log.write({"step": at, "loss": loss, "grad_norm": float(m["grad_norm"]),
                       "lr": float(trainer.lr(at - 1)), "tokens_seen": at * trainer.tokens_per_step,
                       "tokens_per_s": tps, "mfu": tps * flops_tok / peak_total, "wall_time": wall()})
            postfix["loss"] = f"{loss:.3f}"
            postfix["tok/s"] = f"{tps:,.0f}"
            bar.set_postfix(postfix, refresh=False)

    try:
        # The mesh in context switches on the model's activation constraints (model.shard_batch).
        with jax.set_mesh(mesh):
            for s in range(start, total):
                batch = loader.device_batch(s, trainer.batch_sharding)
                state, metrics = trainer.step_fn(state, batch)
                flush()  # the previous step's metrics: by now they are ready or nearly so
                done = s + 1
                pending = (done, metrics)
                preempted = resume.reached_preemption(done)
                is_snap = done in snapshot_at
                is_resume = done % cfg.train.resume_every == 0 or done == total or preempted
                if is_snap or is_resume:
                    flush()
                if is_snap:
                    snaps.save(done, state["params"], meta(done))
                if is_resume:
                    resume.save(done, state, {"wall_time": wall(), "tokens_seen": done * trainer.tokens_per_step},
                                force=preempted)
                if prober and (done % cfg.train.probe_every == 0 or done == total):
                    flush()
                    probe = prober(state["params"])
                    log.write({"step": done, **probe})
                    postfix.update(icl=f"{probe['probe_icl']:+.3f}", pm=f"{probe['probe_max_prefix']:.2f}",
                                   prev=f"{probe['probe_max_prev_token']:.2f}")
                    bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if preempted:
                    break
            flush()
    finally:
        bar.close()
        snaps.wait()
        resume.wait()
        snaps.close()
        resume.close()
        log.close()
    final = int(jax.device_get(state["step"]))
    # Process 0 hosts the coordination service: no process leaves while another is still finishing its saves.
    sharding.barrier(f"end of training at step {final}", SYNC_TIMEOUT_S)
    return {"run_dir": str(run_dir), "step": final, "loss": last_loss, "preempted": preempted,
            "wall_time": wall()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m induction_jax.train", description=__doc__.splitlines()[0])
    cli.add_config_args(parser, default=DEFAULT_CONFIG)
    parser.add_argument("--run-dir", type=Path, help="run directory (default: runs/<config name>)")
    parser.add_argument("--override-config", action="store_true",
                        help="continue a run directory even though its config differs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    multi = parser.add_argument_group("multi-host (TPU VMs and SLURM are detected without these)")
    multi.add_argument("--coordinator", metavar="HOST:PORT",
                       help="process 0's address (or env INDUCTION_JAX_COORDINATOR)")
    multi.add_argument("--num-processes", type=int, help="processes in the job (or INDUCTION_JAX_NUM_PROCESSES)")
    multi.add_argument("--process-id", type=int, help="this process, 0-based (or INDUCTION_JAX_PROCESS_ID)")
    args = parser.parse_args(argv)
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    cfg = cli.config_from_args(args)
    run_dir = args.run_dir or default_run_dir(args.config)
    if sharding.is_main_process():
        print(f"run directory: {run_dir}", flush=True)
    out = train(cfg, run_dir, override_config=args.override_config, progress=not args.no_progress)
    if sharding.is_main_process():
        what = "preempted; saved at" if out["preempted"] else "finished at"
        print(f"{what} step {out['step']} (loss {out['loss']:.4f}) in {run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
