"""The training loop of `python -m induction_jax.train`: snapshots on schedule, exact resume, live metrics.

The loop never waits on the step it just dispatched: metrics are fetched one step behind, except at snapshot and
resume steps, which must know the loss is finite before they commit anything.

Multi-host: every process runs this same loop on its own rows of each batch; Orbax writes from every process;
process 0 alone writes config.yaml, metrics and the progress bar. The few points where processes wait for each
other are named barriers with timeouts (sharding.barrier), so a lost worker ends the run with a message.
"""

from __future__ import annotations

import collections
import math
import os
import time
from pathlib import Path

import jax
from tqdm import tqdm

from ..base import atomic, cli, lock, logs
from ..base import config as config_lib
from ..base.config import Config, UserError, first_line
from ..data import dataset, evalset
from ..model import model as model_lib
from . import adaptive as adaptive_lib, checkpoint, metrics, peak, schedule, sharding, step as step_lib
from .probe import Prober

SYNC_TIMEOUT_S = 600  # barriers between steps of the same run: every process is alive and doing the same work
# Process 0 builds the token store (tokenizer training included) while the others wait: allow for a big corpus.
PREPARE_TIMEOUT_S = float(os.environ.get("INDUCTION_JAX_PREPARE_TIMEOUT", 6 * 3600))
LOG_FILE = "train.log"  # what Orbax and friends log, kept out of the terminal (logs.py)
# Files a trainer may leave in a run directory before its first save.
_EARLY_FILES = (config_lib.CONFIG_FILE, evalset.FILE, checkpoint.LOCK_FILE, LOG_FILE)


class DivergedError(UserError):
    """The loss, the gradient norm or the parameters became NaN or infinite."""


class DiskFullError(UserError):
    """A save or a metrics write found the disk full."""


class RunLock:
    """An exclusive lock on RUN_DIR/.lock (base/lock.py), held for the whole run, so that two trainers never write
    the same run. The kernel drops it when its holder dies, however it dies: a stale lock file never blocks a rerun.
    """

    def __init__(self, run_dir: Path):
        try:
            self._lock = lock.DirLock(run_dir / checkpoint.LOCK_FILE)
        except lock.Held as e:
            raise UserError(f"{run_dir}: in use by another trainer ({e.holder}); wait for it to finish or stop it, "
                            "or choose another --run-dir") from None
        except OSError as e:
            raise UserError(f"{run_dir}: cannot write to the run directory ({e.strerror})") from None

    def release(self) -> None:
        self._lock.release()


def record_config(run_dir: Path, cfg: Config, es: evalset.EvalSet) -> None:
    """Process 0 writes the eval set and then config.yaml, each atomically (a reader sees the old file or the new
    one, whole): a directory with config.yaml has its eval set."""
    if not sharding.is_main_process():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    evalset.save(run_dir, es)
    atomic.write(run_dir / config_lib.CONFIG_FILE, config_lib.to_yaml(cfg), durable=True)


def validate_run_dir(run_dir: Path, cfg: Config, override: bool) -> None:
    """Refuses a run directory made with another config (one line listing the differences) unless overridden,
    and a directory that is not a run directory. Every process checks before any writes: each sees the same
    directory and so raises the same error, instead of one failing alone while the others wait on it."""
    cli.check_directory(run_dir, "choose another --run-dir")
    saved = run_dir / config_lib.CONFIG_FILE
    if saved.exists():
        old = config_lib.load(saved)
        changed = config_lib.diff(old, cfg)
        if changed and not override:
            raise config_lib.ConfigError(
                f"{saved}: this run was made with a different config ({'; '.join(changed)}); "
                "pass --override-config to continue with the new one")
    elif run_dir.exists() and any(p.name not in _EARLY_FILES for p in run_dir.iterdir()):
        if not (run_dir / checkpoint.SNAPSHOTS_DIR).exists() and not (run_dir / checkpoint.STATE_DIR).exists():
            raise UserError(f"{run_dir}: exists and is not a run directory (no config.yaml); choose another")


def _check_snapshots_fit(run_dir: Path, cfg: Config) -> None:
    """With --override-config and no resume state to restore, the new model must still have the shapes of the
    run's snapshots: config.yaml describes them to every reader, and they are never rewritten."""
    steps = checkpoint.committed_steps(run_dir / checkpoint.SNAPSHOTS_DIR)
    if not steps:
        return
    reader = checkpoint.SnapshotReader(run_dir)
    try:
        saved = reader.shapes(steps[-1])
    except checkpoint.SnapshotError:
        return  # an unreadable snapshot is reported by the analysis, which skips it
    new = {jax.tree_util.keystr(k): tuple(v.shape)
           for k, v in jax.tree_util.tree_flatten_with_path(model_lib.abstract_params(cfg.model))[0]}
    if new != saved:
        raise UserError(f"{reader.path(steps[-1])}: this run's snapshots have other parameter shapes than the new "
                        "config's model; config.yaml is unchanged; train the new model in another --run-dir")


# Settings that leave the parameters' trajectory as it was: a snapshot taken under the old value is one the new
# config would take too. train.steps joins them when the schedule does not depend on it (see _trajectory_diff).
_SAME_TRAJECTORY = {"train.log_every", "train.probe_every", "train.probe_examples", "train.resume_every",
                    "data.cache_dir", "data.workers"}
_SAME_TRAJECTORY_SECTIONS = ("snapshots.", "eval.", "mesh.")


def _trajectory_diff(old: Config, new: Config) -> list[str]:
    """The differences between two configs that change the parameters at a given step."""
    steps_matter = any(c.train.decay != "constant" or c.train.cooldown_steps for c in (old, new))
    return [d for d in config_lib.diff(old, new)
            if not (d.split(":")[0] in _SAME_TRAJECTORY or d.startswith(_SAME_TRAJECTORY_SECTIONS)
                    or (d.startswith("train.steps:") and not steps_matter))]


def _steps_text(directory: Path, steps: list[int]) -> str:
    """Paths of a checkpoint directory's steps, brace-expanded as a shell would take them."""
    if len(steps) == 1:
        return f"{directory}/{steps[0]}"
    if len(steps) > 12:
        return f"{directory}/N for every N > {steps[0] - 1}"
    return f"{directory}/{{{','.join(map(str, steps))}}}"


def _check_one_trajectory(run_dir: Path, cfg: Config, start: int) -> None:
    """Refuses to train from `start` under a config that changes the trajectory when snapshots beyond `start`
    exist: they were trained under the old config, and the run would hold two trajectories, silently (the new one
    skips the steps already saved). Under the same config the run retraces them, so they stay."""
    saved = run_dir / config_lib.CONFIG_FILE
    later = [s for s in checkpoint.committed_steps(run_dir / checkpoint.SNAPSHOTS_DIR) if s > start]
    if not later or not saved.exists():
        return
    changed = _trajectory_diff(config_lib.load(saved), cfg)
    if not changed:
        return
    where = f"step {start}, where this run resumes" if start else "step 0, where this run starts (no resume state)"
    raise UserError(f"{run_dir}: snapshot(s) {', '.join(map(str, later))} lie beyond {where}, and were trained "
                    f"with another config ({'; '.join(changed)}); training on would put two trajectories in one "
                    f"run directory: delete {_steps_text(run_dir / checkpoint.SNAPSHOTS_DIR, later)} to train "
                    "them again with the new config, or choose another --run-dir")


def _restore(resume: checkpoint.ResumeCheckpointer, step: int, trainer, run_dir: Path):
    """The resume state, checked: one that does not fit the config (after --override-config) or holds NaN is
    refused in one line, before config.yaml is touched."""
    path = run_dir / checkpoint.STATE_DIR / str(step)
    try:
        with logs.diverted():
            state, extra = resume.restore(step, trainer.abstract_state)
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for a mismatched or damaged state
        raise UserError(f"{path}: cannot restore the resume state with this config "
                        f"({first_line(e, with_type=True)}); config.yaml is unchanged") from None
    if not checkpoint.all_finite(state):
        raise DivergedError(f"{path}: the resume state holds NaN or infinite values; delete that directory to "
                            "resume from an earlier one")
    return state, extra


def _logged_loss(run_dir: Path, step: int) -> float:
    """The training loss metrics.jsonl holds for `step` (NaN when it holds none)."""
    return next((float(r["loss"]) for r in reversed(metrics.tail(run_dir)) if r.get("step") == step and "loss" in r),
                float("nan"))


def _last_good(run_dir: Path) -> str:
    """What a rerun starts from, from the directories themselves (pending saves already waited for)."""
    snaps = checkpoint.committed_steps(run_dir / checkpoint.SNAPSHOTS_DIR)
    states = checkpoint.committed_steps(run_dir / checkpoint.STATE_DIR)
    snap = f"the last good snapshot is step {snaps[-1]}" if snaps else "no snapshot is saved"
    state = (f"the last good resume checkpoint is step {states[-1]}, where a rerun resumes" if states
             else "no resume checkpoint is saved, so a rerun starts from step 0")
    return f"{snap}; {state}"


# A checkpoint whose loss is more than this many times the run's best logged loss has diverged; so has one whose
# root-mean-square parameter exceeds DIVERGED_RMS when its loss was not logged (a healthy model's are O(1)).
DIVERGED_LOSS_RATIO = 2.0
DIVERGED_RMS = 100.0


def _diverged_advice(run_dir: Path, resume: checkpoint.ResumeCheckpointer, state_loss: dict[int, float],
                     best: float, n_params: int) -> str:
    """What a user can do after a divergence: which resume checkpoint is sound, judged by its loss (logged one step
    after it) against the run's best logged loss and by its parameter norm; which files to delete; or to start over.
    `state_loss` has this session's losses of saved states, by step; metrics.jsonl has the earlier sessions'."""
    logged = {r["step"]: r["loss"] for r in metrics.read(run_dir) if isinstance(r.get("loss"), (int, float))}
    best = min([best] + [v for v in logged.values() if math.isfinite(v)])

    def judged(step: int) -> tuple[bool, str]:
        loss = state_loss.get(step, logged.get(step + 1))
        norm = resume.extra(step).get("param_norm")
        facts = [f"loss {loss:.4g}" if loss is not None else "loss not logged"]
        if norm is not None:
            facts.append(f"parameter norm {norm:.3g}")
        if loss is not None:
            sound = loss <= DIVERGED_LOSS_RATIO * best  # False for NaN
        else:
            sound = norm is None or norm / math.sqrt(max(n_params, 1)) <= DIVERGED_RMS
        if math.isfinite(best):
            facts.append(f"the run's best logged loss {best:.4g}")
        return sound, "; ".join(facts)

    snaps_dir, state_dir = run_dir / checkpoint.SNAPSHOTS_DIR, run_dir / checkpoint.STATE_DIR
    snaps = checkpoint.committed_steps(snaps_dir)
    states = checkpoint.committed_steps(state_dir)
    retry = "a lower train.lr or a longer warm-up (train.warmup_steps)"
    if not states:
        fresh = (f"delete {snaps_dir} and rerun" if snaps else "rerun") + f" with {retry} and --override-config"
        return f"no resume checkpoint is saved; start over: {fresh}, or train in another --run-dir"
    last = states[-1]
    sound, facts = judged(last)
    if sound:
        later = [s for s in snaps if s > last]
        delete = f"delete {_steps_text(snaps_dir, later)} (taken after it), then " if later else ""
        return (f"the last resume checkpoint, step {last}, is sound ({facts}): {delete}rerun with {retry} and "
                "--override-config, which resumes there")
    earlier = next((s for s in reversed(states[:-1]) if judged(s)[0]), None)
    why = (f"the last resume checkpoint, step {last}, is finite but has diverged ({facts}), so resuming there "
           "fails again")
    if earlier is None:
        others = ("no earlier one is kept" if len(states) == 1 else
                  f"step {', '.join(map(str, states[:-1]))} {'has' if len(states) == 2 else 'have'} diverged too")
        return (f"{why}, and {others}; start over: delete {state_dir} and {snaps_dir} and rerun with {retry} and "
                "--override-config, or train in another --run-dir")
    later = [s for s in snaps if s > earlier]
    delete = " and ".join([_steps_text(state_dir, [s for s in states if s > earlier])]
                          + ([_steps_text(snaps_dir, later)] if later else []))
    return (f"{why}; step {earlier} is sound ({judged(earlier)[1]}): delete {delete}, then rerun with {retry} "
            f"and --override-config, which resumes from step {earlier}")


def prepare_data(cfg: Config, progress: bool):
    """The prepared data, built once: process 0 first, then the others, which find it in a shared cache (or, with
    a per-host cache, build the same bytes themselves) instead of racing to tokenize the same corpus."""
    if sharding.is_main_process():
        prepared = dataset.prepare(cfg, progress=progress)
    sharding.barrier("data prepared by process 0", PREPARE_TIMEOUT_S)
    if not sharding.is_main_process():
        prepared = dataset.prepare(cfg, progress=False)
    return prepared


def train(cfg: Config, run_dir: Path, *, override_config: bool = False, progress: bool = True) -> dict:
    """Trains (or resumes) the run in `run_dir`; returns a summary dict (final step, loss, preempted...).

    config.yaml is written only once the data is prepared and the run's state restored under the new config, so
    a failed start (bad corpus, an --override-config the saved state cannot take) leaves the run as it was.
    """
    validate_run_dir(run_dir, cfg, override_config)  # before the lock creates anything in a foreign directory
    # Process 0 stands for the job: with several hosts the run directory may be a bucket, where flock means
    # nothing, and the other processes follow process 0's barriers anyway.
    lock = RunLock(run_dir) if sharding.is_main_process() else None
    try:
        validate_run_dir(run_dir, cfg, override_config)  # again: another trainer may have changed it meanwhile
        sharding.barrier(f"run directory {run_dir} checked", SYNC_TIMEOUT_S)
        return _train(cfg, run_dir, override_config, progress)
    finally:
        if lock:
            lock.release()


def _train(cfg: Config, run_dir: Path, override_config: bool, progress: bool) -> dict:
    prepared = prepare_data(cfg, progress)
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = step_lib.build(cfg, mesh)
    loader = dataset.make_loader(prepared, cfg.model.context, cfg.train.batch_size, cfg.data.seed,
                                 cfg.data.source_weights)
    es = evalset.from_prepared(prepared, cfg.eval.exclude_common)
    prober = Prober(cfg, es, mesh) if cfg.train.probe_every else None
    # Read from the directory, before the resume manager creates state/: a refusal here leaves the run as it was.
    saved_states = checkpoint.committed_steps(run_dir / checkpoint.STATE_DIR)
    if not saved_states and override_config:
        _check_snapshots_fit(run_dir, cfg)
    _check_one_trajectory(run_dir, cfg, saved_states[-1] if saved_states else 0)
    resume = checkpoint.ResumeCheckpointer(run_dir / checkpoint.STATE_DIR)
    start = resume.latest_step()
    try:
        if start is not None:
            state, extra = _restore(resume, start, trainer, run_dir)
    except BaseException:
        resume.close()
        raise
    record_config(run_dir, cfg, es)
    snaps = checkpoint.SnapshotWriter(run_dir / checkpoint.SNAPSHOTS_DIR)
    total = cfg.train.steps
    snapshot_at = set(schedule.snapshot_steps(cfg.snapshots, total))

    if start is not None:
        wall_offset = float(extra.get("wall_time", 0.0))
        if sharding.is_main_process():
            print(f"resumed from step {start}", flush=True)
    else:
        start, wall_offset, extra = 0, 0.0, {}
        state = trainer.init_fn(jax.random.key(cfg.train.seed))
    # The extra snapshots' decisions so far travel with the resume state (restored alike on every process).
    adaptive = (adaptive_lib.AdaptiveSchedule(cfg.snapshots.adaptive, snapshot_at, trainer.tokens_per_step,
                                              extra.get("adaptive")) if cfg.snapshots.adaptive.every else None)
    log = metrics.MetricsLog(run_dir, start)
    flops_tok = step_lib.flops_per_token(cfg)
    peak_flops, _ = peak.device_peak(cfg.model.dtype)
    peak_total = peak_flops * jax.device_count()

    t_start = time.perf_counter()
    wall = lambda: wall_offset + time.perf_counter() - t_start

    def meta(at: int, norm: float) -> dict:
        return {"step": at, "tokens_seen": at * trainer.tokens_per_step, "wall_time": wall(), "param_norm": norm}

    saved_at = {start} if start else set()  # steps whose state is on disk: the loss one step later is theirs
    state_loss: dict[int, float] = {}
    best_loss = math.inf
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))

    def diverged(what: str, at: int) -> DivergedError:
        # Saves still in flight are of earlier, checked steps: wait for them, so that the message lists what is
        # on disk rather than what had been committed by the time of the check.
        snaps.wait()
        resume.wait()
        advice = _diverged_advice(run_dir, resume, state_loss, best_loss, n_params)
        return DivergedError(f"{run_dir}: {what} at step {at}, which was not saved; {advice}")

    bar = tqdm(total=total, initial=start, disable=not (progress and sharding.is_main_process()),
               unit="step", dynamic_ncols=True)
    pending = None  # (step, metrics on device) of the step before the current one
    recent = collections.deque([(start, time.perf_counter())], maxlen=21)  # tokens/s over the last 20 logs
    postfix: dict = {}
    last_loss = _logged_loss(run_dir, start)  # a finished run rerun runs no step, and reports this one
    preempted = False

    def flush():
        nonlocal pending, last_loss, best_loss
        if pending is None:
            return
        at, m = pending
        pending = None
        m = jax.device_get(m)
        loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
        if at - 1 in saved_at:
            state_loss[at - 1] = loss
        if math.isfinite(loss):
            best_loss = min(best_loss, loss)
        if not math.isfinite(loss):
            raise diverged(f"loss became {loss}", at)
        # A finite loss with a NaN gradient still leaves NaN parameters after this step's update.
        if not math.isfinite(grad_norm):
            raise diverged(f"gradient norm became {grad_norm}", at)
        last_loss = loss
        if at % cfg.train.log_every == 0 or at == total:
            now = time.perf_counter()
            recent.append((at, now))
            steps_done, dt = at - recent[0][0], now - recent[0][1]
            tps = steps_done * trainer.tokens_per_step / dt if dt > 0 and steps_done > 0 else float("nan")
            log.write({"step": at, "loss": loss, "grad_norm": grad_norm,
                       "lr": float(trainer.lr(at - 1)), "tokens_seen": at * trainer.tokens_per_step,
                       "tokens_per_s": tps, "mfu": tps * flops_tok / peak_total, "wall_time": wall()})
            postfix["loss"] = f"{loss:.3f}"
            postfix["tok/s"] = f"{tps:,.0f}"
            bar.set_postfix(postfix, refresh=False)

    handlers = checkpoint.install_stop_handlers()
    error: BaseException | None = None
    try:
        if start == 0 and 0 in snapshot_at:
            snaps.save(0, state["params"], meta(0, checkpoint.norm(state["params"])))
        # The mesh in context switches on the model's activation constraints (model.shard_batch).
        with jax.set_mesh(mesh):
            for s in range(start, total):
                batch = loader.device_batch(s, trainer.batch_sharding)
                state, step_metrics = trainer.step_fn(state, batch)
                flush()  # the previous step's metrics: by now they are ready or nearly so
                done = s + 1
                pending = (done, step_metrics)
                preempted = resume.reached_preemption(done)
                # The probe comes before this step's snapshot decision, which it may change.
                if prober and (done % cfg.train.probe_every == 0 or done == total):
                    flush()
                    probe = prober(state["params"])
                    log.write({"step": done, **probe})
                    if adaptive is not None:
                        adaptive.observe(done, *sharding.agreed([probe["probe_icl"], probe["probe_max_prefix"]]))
                    postfix.update(icl=f"{probe['probe_icl']:+.3f}", pm=f"{probe['probe_max_prefix']:.2f}",
                                   prev=f"{probe['probe_max_prev_token']:.2f}")
                    bar.set_postfix(postfix, refresh=False)
                is_extra = adaptive is not None and done not in snapshot_at and adaptive.take(done)
                is_snap = done in snapshot_at or is_extra
                is_resume = done % cfg.train.resume_every == 0 or done == total or preempted
                if is_snap or is_resume:
                    flush()
                    # Only here, where a sync is due anyway: nothing non-finite is ever committed.
                    if not checkpoint.all_finite(state if is_resume else state["params"]):
                        raise diverged("the parameters or optimizer state became NaN or infinite", done)
                if is_snap or is_resume:
                    norm = checkpoint.norm(state["params"])  # judges the save if the run diverges later
                    saved_at.add(done)
                if is_snap:
                    snaps.save(done, state["params"], meta(done, norm) | ({"adaptive": True} if is_extra else {}))
                if is_resume:
                    kept = {"wall_time": wall(), "tokens_seen": done * trainer.tokens_per_step, "param_norm": norm}
                    if adaptive is not None:
                        kept["adaptive"] = adaptive.state()
                    resume.save(done, state, kept, force=preempted)
                bar.update(1)
                if preempted:
                    break
            flush()
    except BaseException as e:  # noqa: BLE001 - re-raised below, once every writer is shut down
        error = e
    finally:
        checkpoint.restore_handlers(handlers)
        # Every writer is closed even when another failed: a thread left running would print its own traceback
        # at interpreter exit.
        for close in (bar.close, snaps.wait, resume.wait, snaps.close, resume.close, log.close):
            try:
                close()
            except BaseException as e:  # noqa: BLE001
                error = error or e
    if error is not None:
        if isinstance(error, UserError) or not checkpoint.disk_full(error):
            raise error
        raise DiskFullError(f"{run_dir}: the disk is full (No space left on device); {_last_good(run_dir)} "
                            "once space is freed") from error
    final = int(jax.device_get(state["step"]))
    # Process 0 hosts the coordination service: no process leaves while another is still finishing its saves.
    sharding.barrier(f"end of training at step {final}", SYNC_TIMEOUT_S)
    return {"run_dir": str(run_dir), "step": final, "loss": last_loss, "preempted": preempted,
            "signal": checkpoint.stop_signal(), "wall_time": wall(),
            "adaptive_steps": adaptive.taken if adaptive is not None else []}

