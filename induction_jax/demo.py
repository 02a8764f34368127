"""`python -m induction_jax.demo`: the paper's Arguments 1, 2, 3 and 5 on a laptop CPU.

Prepares the corpus (by default the embedded one: the interpreter's own standard library and site-packages),
trains a 2-layer and a 1-layer
attention-only model and a 1-layer smeared-key model side by side (one single-threaded process per core, same data
order), analyzes all three (joint PCA), ablates every head of the 2-layer model at snapshots before, during and
after its phase change (and, at the last snapshot, along the direct and frozen_ln paths and together with the
induction heads), and writes runs/demo/report.md ending with PASS/FAIL checks. Every stage resumes: run it
again after an interruption and finished work is skipped; run it when everything is done and it only rebuilds
the report.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .analysis import scoring
from .analysis.results import RunResults
from .analysis.run import ANALYSIS_DIR, Run
from .base import cli, config
from .data import dataset
from .report import checks, markdown
from .training import checkpoint, metrics

RUNS = {"attn_only_2l": "configs/cpu/attn_only_2l.yaml", "attn_only_1l": "configs/cpu/attn_only_1l.yaml",
        "smeared_key_1l": "configs/cpu/smeared_key_1l.yaml"}
SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
ABLATION_SNAPSHOTS = 8
LOCK = "requirements.lock"
DIGESTS = "configs/cpu/corpus-digests.json"  # the demo corpus's digests, per Python version, in the locked venv


def corpus_digest_note(prepared) -> str:
    """One line: whether the prepared corpus is the one recorded for this Python version."""
    import platform
    key = f"python {platform.python_version()}"
    want = json.loads(Path(DIGESTS).read_text()).get(key) if Path(DIGESTS).exists() else None
    got = prepared.metadata.get("tokens_sha256", "")
    if want is None:
        return f"no recorded corpus digest for {key}: the data order differs from the documented runs"
    if got == want["tokens_sha256"]:
        return f"token store sha256 {got[:16]}: the corpus recorded for {key} (the documented runs' data)"
    return (f"token store sha256 {got[:16]} differs from the one recorded for {key} ({want['tokens_sha256'][:16]}); "
            f"install from {LOCK} (make demo) to reproduce the documented runs")


def is_embedded(cfg) -> bool:
    """Whether the demo reads its embedded corpus (the interpreter's own sources), the one with recorded digests."""
    return tuple(cfg.data.sources) == ("python-stdlib",)


def corpus_label(cfg) -> str:
    """What the demo's corpus is, in words: the embedded one, or the sources a user named."""
    if is_embedded(cfg):
        return "the Python standard library" + (" and site-packages" if cfg.data.site_packages else "")
    weights = cfg.data.source_weights
    if weights is None:
        return ", ".join(cfg.data.source_paths)
    return ", ".join(f"{path} (weight {w:g})" for path, w in zip(cfg.data.source_paths, weights))


def _steps_done(run_dir: Path) -> int:
    """The last step logged in metrics.jsonl (read from the file's tail: it grows by a line per step)."""
    return max((rec.get("step", 0) for rec in metrics.tail(run_dir, 4096)), default=0)


def _pinned(cpu: int | None):
    """preexec_fn pinning a child to one core (Linux); independent models train fastest one per core."""
    if cpu is None or not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def single_device_env() -> dict:
    """Environment for a child jax process: one single-threaded CPU device.

    One model per core, not one model data-parallel over every core: on this 2-core machine 2 single-threaded
    devices in one process trained 1.8x faster than one, but XLA:CPU's cross-device all-reduce deadlocked
    (rendezvous termination timeout, SIGABRT) in 6 of 6 runs of 200 steps (jax 0.10.2).
    """
    return dict(os.environ, XLA_FLAGS=SINGLE_THREAD, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")


def _last_probe(run_dir: Path) -> dict:
    """The newest live-probe record of a run (ICL, max prefix matching), read from metrics.jsonl's tail."""
    return next((rec for rec in reversed(metrics.tail(run_dir)) if "probe_icl" in rec), {})


def train_all(out: Path, overrides: list[str], progress: bool = True) -> None:
    """One single-threaded training process per model, with an overall progress bar (ETA over all three).

    The 2-layer model (the longest) gets a core of its own; the two 1-layer models share the other. Each run that
    finishes is analysed there, and then that core analyses the 2-layer model's snapshots as they are committed,
    so little analysis is left when its training ends.
    """
    cfgs = {name: config.load(path, overrides) for name, path in RUNS.items()}
    total = sum(c.train.steps for c in cfgs.values())
    env = single_device_env()
    cores = {"attn_only_2l": 0, "attn_only_1l": 1, "smeared_key_1l": 1}
    out.mkdir(parents=True, exist_ok=True)
    procs, analysers = {}, {}
    reported: set[str] = set()

    def analyse(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "induction_jax.analyze", str(out / name), "--out",
                                 str(out / name / ANALYSIS_DIR), "--no-report", "--no-progress"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=_pinned(1))

    for name, path in RUNS.items():
        run_dir = out / name
        if _steps_done(run_dir) >= cfgs[name].train.steps and (run_dir / checkpoint.SNAPSHOTS_DIR).exists():
            continue
        log = (out / f"{name}.train.log").open("a")
        procs[name] = (subprocess.Popen([sys.executable, "-m", "induction_jax.train", "--config", path,
                                         "--run-dir", str(run_dir), "--no-progress", *overrides],
                                        env=env, stdout=log, stderr=subprocess.STDOUT,
                                        preexec_fn=_pinned(cores[name])), log)
    try:
        with tqdm(total=total, desc="train 3 models", unit="step", dynamic_ncols=True, disable=not progress) as bar:
            while True:
                done = {n: min(_steps_done(out / n), cfgs[n].train.steps) for n in RUNS}
                bar.n = sum(done.values())
                probe = _last_probe(out / "attn_only_2l")
                post = {n.replace("attn_only_", "").replace("smeared_key_", "sk"): d for n, d in done.items()}
                if probe:  # the 2-layer model's phase change, live
                    post.update(icl2=f"{probe['probe_icl']:+.2f}", prefix2=f"{probe['probe_max_prefix']:.2f}")
                bar.set_postfix(post, refresh=False)
                bar.refresh()
                one_layer_done = all(p.poll() is not None for n, (p, _) in procs.items() if n != "attn_only_2l")
                for name, (p, _) in procs.items():
                    if p.poll() is not None and name not in reported:
                        reported.add(name)  # a line per model, also in a log written with --no-progress
                        tqdm.write(f"{name}: training {'finished' if p.returncode == 0 else 'failed'} at step "
                                   f"{_steps_done(out / name)}")
                    if p.poll() == 0 and name != "attn_only_2l" and name not in analysers:
                        analysers[name] = analyse(name)
                two = procs.get("attn_only_2l")
                others_idle = all(a.poll() is not None for n, a in analysers.items() if n != "attn_only_2l")
                if two and two[0].poll() is None and one_layer_done and others_idle:
                    a = analysers.get("attn_only_2l")
                    if a is None or a.poll() is not None:  # a pass ended: start another on the new snapshots
                        analysers["attn_only_2l"] = analyse("attn_only_2l")
                if all(p.poll() is not None for p, _ in procs.values()):
                    break
                time.sleep(2)
    except KeyboardInterrupt:
        for p, _ in procs.values():
            p.terminate()  # train saves a resume checkpoint on SIGTERM, so a rerun goes on from there
        raise
    finally:
        for a in analysers.values():
            a.wait()  # resumable: whatever it did not finish, the main analysis does
    for name, (p, log) in procs.items():
        log.close()
        if p.returncode != 0:
            log_path = out / f"{name}.train.log"
            tail = log_path.read_text().strip().splitlines()[-1:]
            raise config.UserError(f"{out / name}: training failed ({tail[0] if tail else p.returncode}); "
                                   f"see {log_path}")


def ablation_steps(steps: list[int], window: dict | None, n: int = ABLATION_SNAPSHOTS) -> list[int]:
    """Snapshots before, during and after the phase-change window (`RunResults.window`: the snapshots `window["i"]`
    to `window["j"]`), or spread over training without one."""
    steps = sorted(steps)
    if not window:
        idx = np.unique(np.linspace(0, len(steps) - 1, n).round().astype(int))
        return [steps[i] for i in idx]
    i0, i1 = window["i"], window["j"]
    inside = list(np.unique(np.linspace(i0, i1, max(n - 4, 2)).round().astype(int)))
    picks = {0, max(i0 - 1, 0), min(i1 + 1, len(steps) - 1), len(steps) - 1, *inside}
    return [steps[i] for i in sorted(picks)]


def main(argv=None) -> int:
    parser = cli.Parser(prog="python -m induction_jax.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="demo directory (default runs/demo, or runs/demo-seed-N with "
                                                 "--data-seed N)")
    parser.add_argument("--data-seed", type=int, metavar="N",
                        help="data order (data.seed) of all three models; the corpus, tokenizer, eval set and "
                             "initialisation stay the same")
    cli.add_overrides(parser, help="applied to all three CPU configs, e.g. train.steps=3000")
    cli.add_progress_arg(parser)
    args = parser.parse_args(argv)
    progress = not args.no_progress
    t0 = time.time()
    if args.data_seed is not None:
        args.overrides = [*args.overrides, f"data.seed={args.data_seed}"]
    out = args.out or Path("runs/demo" if not args.data_seed else f"runs/demo-seed-{args.data_seed}")
    cfg = config.load(RUNS["attn_only_2l"], args.overrides)

    print(f"1/4 preparing the corpus ({corpus_label(cfg)})", flush=True)
    prepared = dataset.prepare(cfg, progress=progress)
    print("    " + dataset.summary(prepared).replace("\n", "\n    "), flush=True)
    if is_embedded(cfg):  # only the embedded corpus has a recorded digest to compare with
        print("    " + corpus_digest_note(prepared), flush=True)

    print("2/4 training three models side by side (one single-threaded process per core)", flush=True)
    train_all(out, args.overrides, progress)

    print("3/4 analyzing every snapshot", flush=True)
    runs = {name: Run(out / name) for name in RUNS}
    # The analysers train_all started have all exited, releasing their locks; from here to the report this process
    # alone writes the three results directories.
    with contextlib.ExitStack() as held:
        for run in runs.values():
            held.enter_context(run.store.writing())
        return _analyse_ablate_report(out, runs, progress, t0)


def _analyse_ablate_report(out: Path, runs: dict[str, Run], progress: bool, t0: float) -> int:
    for run in runs.values():
        scoring.analyze_run(run, progress=progress)
    results = {name: RunResults(run) for name, run in runs.items()}
    two, run2 = results["attn_only_2l"], runs["attn_only_2l"]
    # Check 1's window (the figures shade the same): the ablations bracket it, and its two ends are the
    # before/after of the attribution.
    picks = ablation_steps(two.steps.tolist(), two.window)
    print(f"4/4 ablating every head of the 2-layer model at steps {picks} (and along the direct and frozen_ln "
          f"paths, and together with the induction heads, at step {picks[-1]})", flush=True)
    scoring.ablate_run(run2, steps=picks, kind="pattern", progress=progress)
    for path_name in ("direct", "frozen_ln"):
        scoring.ablate_run(run2, steps=picks[-1:], kind="pattern", progress=progress, path=path_name)
    scoring.ablate_run(run2, steps=picks[-1:], kind="pattern", progress=progress, joint=True)

    lines = checks.demo_lines(two, results["attn_only_1l"], results["smeared_key_1l"])
    appendix = ("\n## Checks of the paper's claims (measured in this run)\n\n```\n" + "\n".join(lines) + "\n```\n"
                f"\nDemo wall time (this invocation): {(time.time() - t0) / 60:.1f} min.\n")
    path = markdown.write(list(runs.values()), out, appendix=appendix)
    print("\n".join(lines))
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    cli.run(main)
