"""`python -m induction_jax.analyze RUN_DIR [RUN_DIR ...]`: every committed snapshot x every probe, then report.

Per snapshot: per-token losses on the fixed eval set, ICL score, and the four head measures for every (layer,
head), written to the run's results store (store.py). Re-running skips snapshots already analysed and picks up new
ones of a run still training; a killed job loses at most the snapshot in flight. A snapshot that cannot be read is
reported by path and skipped.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from . import checkpoint, cli, data, evaluate, heads, logs
from . import config as config_lib
from . import model as model_lib
from .config import Config, UserError
from .store import MEASURES, Store, store_key

SECTION = "eval"


class RunContext:
    """What every job on a run needs: its config, snapshots, eval set, model and results store."""

    def __init__(self, run_dir: str | Path, out: str | Path | None = None, progress: bool = True):
        self.run_dir = Path(run_dir)
        self.reader = checkpoint.SnapshotReader(self.run_dir)  # RunDirError if it is not a run
        cfg_path = self.run_dir / "config.yaml"
        if not cfg_path.exists():
            raise checkpoint.RunDirError(f"{self.run_dir}: not a run directory (no config.yaml)")
        self.cfg: Config = config_lib.load(cfg_path)
        self.prepared = data.prepare(self.cfg, progress=progress)
        self.tokens_NL, self.random_index_N = self.prepared.eval_set()
        self.eval_hash = self.prepared.eval_hash
        self.model = model_lib.make(self.cfg.model)
        root = Path(out) if out else self.run_dir / "analysis"
        self.store = Store(root, store_key(self.eval_hash))
        self.icl_indices = evaluate.icl_indices(self.tokens_NL.shape[1], self.cfg.eval.icl_early,
                                                self.cfg.eval.icl_late)
        # Eval batches are split over this process's devices; params are replicated on them. Snapshots restore
        # onto this job's devices whatever mesh trained them.
        devices = jax.local_devices()
        self.mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
        self.batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("batch"))
        n = len(devices)
        self.eval_batch = -(-self.cfg.eval.batch_size // n) * n

    def sampler(self):
        return lambda rng, shape: self.prepared.random_tokens(rng, shape, self.cfg.eval.exclude_common)

    def params(self, step: int):
        """Params of a snapshot, on this job's devices (replicated), whatever mesh trained them."""
        abstract = model_lib.abstract_params(self.cfg.model)
        rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abstract)
        return self.reader.restore(step, target)

    def tokens_at(self, step: int) -> int:
        return int(self.reader.metadata(step)["tokens_seen"])

    def pending_steps(self, section: str, steps=None) -> list[int]:
        done = set(self.store.steps(section))
        wanted = self.reader.steps() if steps is None else [s for s in self.reader.steps() if s in set(steps)]
        return [s for s in wanted if s not in done]

    def check_steps(self, steps=None) -> None:
        """Refuses a run with no committed snapshot, and asked-for steps that have none."""
        committed = self.reader.steps()
        if not committed:
            raise UserError(f"{self.run_dir}: nothing committed yet (no snapshot); run analyze again once "
                            "training has saved one")
        missing = sorted(set(steps or ()) - set(committed))
        if missing:
            shown = committed if len(committed) <= 8 else committed[:3] + ["..."] + committed[-3:]
            raise UserError(f"{self.run_dir}: no committed snapshot at step(s) {', '.join(map(str, missing))} "
                            f"(committed: {', '.join(map(str, shown))})")


def check_writable(directory: Path, hint: str = "") -> None:
    """Fails in one line, before any work, when results could not be written to `directory`."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"{directory}: cannot write analysis results ({e.strerror}){hint}") from None


def head_scores(ctx: RunContext, params) -> np.ndarray:
    """[L, H, len(MEASURES)] for one snapshot; the random draws use the same seed at every snapshot."""
    cfg = ctx.cfg
    sample, bos, seed = ctx.sampler(), ctx.prepared.bos_id, cfg.data.eval_seed
    prefix = heads.prefix_matching(ctx.model, params, cfg.eval, sample, bos, np.random.default_rng(seed))
    copying = heads.copying(ctx.model, params, cfg.eval, sample, bos, np.random.default_rng(seed + 1))
    n_prev = min(len(ctx.tokens_NL), 64)
    prev = heads.previous_token(ctx.model, params, ctx.tokens_NL[:n_prev], batch_size=cfg.eval.batch_size)
    qk = heads.qk_trace(params, cfg.model, prev)
    ov = heads.ov_copying(params, cfg.model)
    return np.stack([prefix, copying, prev, qk, ov], axis=-1).astype(np.float32)


def analyze_snapshot(ctx: RunContext, step: int) -> None:
    params = ctx.params(step)
    losses_NP = evaluate.per_token_losses(ctx.model, params, ctx.tokens_NL, ctx.eval_batch,
                                          sharding=ctx.batch_sharding)
    early, late = ctx.icl_indices
    scores = head_scores(ctx, params)
    record = {
        "tokens": ctx.tokens_at(step),
        "eval_loss": float(losses_NP.mean()),
        "icl": float(evaluate.icl_score(losses_NP, early, late)),
        "icl_window": float(evaluate.icl_score(losses_NP, early, late, ctx.cfg.eval.icl_window)),
        "max_prefix_matching": float(np.nanmax(scores[..., MEASURES.index("prefix_matching")])),
    }
    ctx.store.write(SECTION, step, record, {"per_token_loss": losses_NP.astype(np.float32),
                                            "head_scores": scores})


def analyze_run(run_dir, out=None, steps=None, progress: bool = True) -> RunContext:
    ctx = RunContext(run_dir, out, progress)
    ctx.check_steps(steps)
    check_writable(ctx.store.dir.parent, "" if out else "; pass --out DIR to write them elsewhere")
    todo = ctx.pending_steps(SECTION, steps)
    for step in tqdm(todo, desc=f"analyze {ctx.run_dir.name}", unit="snapshot", disable=not progress):
        try:
            analyze_snapshot(ctx, step)
        except checkpoint.SnapshotError as e:
            tqdm.write(f"skipped: {e}")
    return ctx


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m induction_jax.analyze", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, help="results and report directory (default: RUN_DIR/analysis; "
                                                 "with several runs, the joint report goes to runs' parent)")
    parser.add_argument("--steps", type=int, nargs="*", help="only these snapshot steps")
    parser.add_argument("--ablations", action="store_true", help="also run pattern-preserving head ablations")
    parser.add_argument("--no-report", action="store_true", help="compute results only")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    progress = not args.no_progress
    logs.divert()
    if len(args.run_dirs) > 1 and not args.out and not args.no_report:
        check_writable(args.run_dirs[0].parent / "analysis", "; pass --out DIR to write the joint report elsewhere")
    contexts = []
    for rd in args.run_dirs:
        out = args.out / rd.name if (args.out and len(args.run_dirs) > 1) else args.out
        ctx = analyze_run(rd, out, args.steps, progress)
        if args.ablations:
            from . import ablate
            ablate.ablate_run(ctx, steps=args.steps, progress=progress)
        contexts.append(ctx)
    if len({c.eval_hash for c in contexts}) > 1:
        raise UserError("runs use different eval sets (data configs); a joint report needs the same one")
    if not args.no_report:
        if not any(c.store.steps(SECTION) for c in contexts):
            raise UserError(f"{', '.join(map(str, args.run_dirs))}: nothing analysed (every snapshot was skipped)")
        from . import report
        out = report.write(contexts, args.out)
        print(f"report: {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
