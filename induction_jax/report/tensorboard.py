"""A run's analysis in its TensorBoard, next to the training curves: RUN_DIR/tensorboard/analysis.

At each analysed snapshot's training step: the ICL score (at single indices and ±window), the eval loss and the
largest prefix-matching score (`analysis/...`), every head's measures (`heads/<measure>/<layer>.<head>`), the
composition scores (`composition/<q|k|v>/<writer>-<reader>`, or each reader's strongest writer per mode,
`composition/<q|k|v>_max/<reader>`, in models with more than MAX_PAIRS head pairs) and, at each ablated snapshot,
the change of the windowed ICL score when each head is ablated, and when the induction heads are ablated
together (`ablation_<kind>/<path>/delta_icl/<head or induction_heads>`, nats), and the share of the score that
removes (`.../share/...`, where the clean score is negative). The report's figures come as images at the last
analysed step. Values that are not finite (the QK trace of layer-0 heads) are left out.

Each call rewrites the directory whole: the new events are written beside it and swapped in, under a lock, so a
re-analysis replaces the last one rather than adding to it, and two analyses at once leave one of them whole.
Its event file opens with a session start at step 0, so a TensorBoard that is already showing the old events
drops them when it reads the new file.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..analysis.results import RunResults
from ..analysis.store import ablation_name
from ..base import lock
from ..base.config import UserError
from ..measures import ablation, composition
from ..measures.heads import MEASURES

TENSORBOARD_DIR = "tensorboard"  # what the trainer writes (training/metrics.py), in the run directory
ANALYSIS_RUN = "analysis"  # this module's TensorBoard run, inside it
LOCK_FILE = ".analysis.lock"
LOCK_TIMEOUT_S = 300.0
MAX_PAIRS = 256  # head pairs (writer below reader) up to which every pair's composition score is written


def _head(layer: int, head: int) -> str:
    return f"{layer}.{head}"


def scalars(r: RunResults) -> Iterator[tuple[str, float, int]]:
    """(tag, value, training step) of every finite analysis scalar of the run."""
    for i, step in enumerate(int(s) for s in r.steps):
        yield "analysis/icl_score", r.icl[i], step
        yield "analysis/icl_score_window", r.icl_window[i], step
        yield "analysis/eval_loss", r.eval_loss[i], step
        yield "analysis/max_prefix_matching", np.nanmax(r.measure("prefix_matching")[i]), step
        n_layers, n_heads = r.scores_SLHM.shape[1:3]
        for j, m in enumerate(MEASURES):
            for layer in range(n_layers):
                for h in range(n_heads):
                    yield f"heads/{m}/{_head(layer, h)}", r.scores_SLHM[i, layer, h, j], step
    yield from _composition(r)
    yield from _ablations(r)


def _composition(r: RunResults) -> Iterator[tuple[str, float, int]]:
    if r.composition is None:
        return
    n_layers, n_heads = r.composition.shape[2:4]
    pairs = [(l1, h1, l2, h2) for l2 in range(1, n_layers) for h2 in range(n_heads) for l1 in range(l2)
             for h1 in range(n_heads)]
    for i, step in enumerate(int(s) for s in r.composition_steps):
        yield "composition/baseline", r.composition_baseline, step
        for k, mode in enumerate(composition.MODES):
            scores = r.composition[i, k]
            if len(pairs) <= MAX_PAIRS:
                for l1, h1, l2, h2 in pairs:
                    yield f"composition/{mode}/{_head(l1, h1)}-{_head(l2, h2)}", scores[l1, h1, l2, h2], step
            else:
                for l2 in range(1, n_layers):
                    for h2 in range(n_heads):
                        best = np.nanmax(scores[:l2, :, l2, h2])
                        yield f"composition/{mode}_max/{_head(l2, h2)}", best, step


def _ablations(r: RunResults) -> Iterator[tuple[str, float, int]]:
    store = r.run.store
    for kind in ablation.KINDS:
        for path in ablation.PATHS:
            section = ablation_name(kind, path)
            for rec in store.sorted_records(section):
                step = int(rec["step"])
                share, _ = ablation.shares(store.read(section, "delta_icl_window", step),
                                           store.read(section, "icl_window", step))
                delta_M = store.read(section, "delta_icl_window", step).mean(axis=1)
                # The last lane ablates the induction heads together.
                labels = [_head(layer, h) for layer, h in rec["heads"]] + ["induction_heads"]
                for label, value, delta in zip(labels, share, delta_M):
                    yield f"ablation_{kind}/{path}/share/{label}", value, step
                    yield f"ablation_{kind}/{path}/delta_icl/{label}", delta, step


def _last_step(r: RunResults) -> int:
    steps = list(r.steps) + [rec["step"] for kind in ablation.KINDS for path in ablation.PATHS
                             for rec in r.run.store.records(ablation_name(kind, path))]
    return int(max(steps, default=0))


def _image(path: Path) -> np.ndarray:
    """A PNG as uint8 [H, W, C]."""
    import matplotlib.image

    img = matplotlib.image.imread(path)
    return img if img.dtype == np.uint8 else (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _locked(path: Path) -> lock.DirLock:
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            return lock.DirLock(path)
        except lock.Held as e:
            if time.monotonic() > deadline:
                raise UserError(f"{path.parent}: another analysis ({e.holder}) has been writing its TensorBoard "
                                f"events for {LOCK_TIMEOUT_S:.0f} s; stop it or try again") from None
            time.sleep(0.2)


def directory(r: RunResults) -> Path:
    """Where the run's analysis events go: RUN_DIR/tensorboard/analysis, or the results directory's
    tensorboard/analysis when the run directory cannot be written (analysis with --out of a read-only run)."""
    for root in (r.run.path / TENSORBOARD_DIR, r.run.analysis_dir / TENSORBOARD_DIR):
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-")
            probe.close()
            return root / ANALYSIS_RUN
        except OSError:
            continue
    raise UserError(f"{r.run.path / TENSORBOARD_DIR} and {r.run.analysis_dir / TENSORBOARD_DIR}: cannot write the "
                    "analysis events to either")


def write(r: RunResults, figures: Sequence[Path] = ()) -> Path:
    """Rewrites the run's analysis events (module docstring) with `figures` (PNG files) as images; returns the
    directory."""
    from tensorboardX import SummaryWriter  # only writers of events import it, as in training/metrics.py

    target = directory(r)
    if target.parent != r.run.path / TENSORBOARD_DIR:
        print(f"note: {r.run.path / TENSORBOARD_DIR} cannot be written; analysis events go to {target}",
              file=sys.stderr, flush=True)
    # Written outside the tensorboard directory, so that a TensorBoard reading it never shows a half-written run.
    held = _locked(target.parent / LOCK_FILE)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".tensorboard-analysis-", dir=target.parent.parent))
        try:
            writer = SummaryWriter(str(tmp), purge_step=0, flush_secs=3600)
            for tag, value, step in scalars(r):
                if np.isfinite(value):
                    writer.add_scalar(tag, float(value), step)
            last = _last_step(r)
            for png in figures:
                writer.add_image(f"figures/{png.stem}", _image(png), last, dataformats="HWC")
            writer.close()
            old = None
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=".tensorboard-analysis-old-", dir=target.parent.parent))
                target.rename(old / ANALYSIS_RUN)
            tmp.rename(target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        held.release()
    return target
