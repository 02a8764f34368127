"""analyze and ablate write their results into the run's TensorBoard (RUN/tensorboard/analysis), read back here
from the event files themselves: after both have written them, one value per tag and step, equal to the stored
results."""

import collections
import io
import shutil
import struct
import subprocess
import sys
import textwrap

import matplotlib.image
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from induction_jax import ablate, analyze
from induction_jax.analysis import records
from induction_jax.analysis.run import Run
from induction_jax.analysis.store import COMPOSITION, EVAL, ablation_name
from induction_jax.base import cli, config
from induction_jax.measures import heads
from induction_jax.training import loop

TINY = "configs/cpu/tiny.yaml"


def read_events(directory) -> tuple[list[tuple[str, int, float]], dict[tuple[str, int], np.ndarray], int]:
    """(scalars as (tag, step, value), images {(tag, step): uint8 [H, W, C]}, number of event files) of every
    event file under `directory`, read as TFRecords: length, its CRC, the Event, its CRC."""
    scalars, images, files = [], {}, sorted(directory.rglob("events.out.tfevents.*"))
    for path in files:
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for v in event.summary.value:
                if v.HasField("image"):
                    images[(v.tag, event.step)] = matplotlib.image.imread(io.BytesIO(v.image.encoded_image_string))
                else:
                    scalars.append((v.tag, event.step, v.simple_value))
    return scalars, images, len(files)


@pytest.fixture(scope="module")
def analysed(base):
    """(run directory, its training events' bytes): a tiny run ablated at its last snapshot, then analysed: both
    commands write every result stored so far into its TensorBoard."""
    root, ov = base
    cfg = config.load(TINY, ov + ["train.steps=24", "snapshots.every=8", "train.probe_every=8"])
    rd = root / "run"
    loop.train(cfg, rd, progress=False)
    training_events = {p: p.read_bytes() for p in (rd / "tensorboard").glob("events.*")}
    for main, argv in ((ablate.main, [rd, "--steps", 24]), (analyze.main, [rd])):
        with pytest.raises(SystemExit) as e:
            cli.run(main, [*map(str, argv), "--no-progress"])
        assert e.value.code == 0
    return rd, training_events


def test_each_value_once_after_ablating_and_analysing(analysed):
    rd, training_events = analysed
    assert training_events
    scalars, images, n_files = read_events(rd / "tensorboard" / "analysis")
    assert n_files == 1
    counts = collections.Counter((tag, step) for tag, step, _ in scalars)
    assert counts and max(counts.values()) == 1, [k for k, n in counts.items() if n > 1][:5]
    got = {(tag, step): value for tag, step, value in scalars}
    # The training curves are left as they were, beside the analysis.
    assert {p: p.read_bytes() for p in (rd / "tensorboard").glob("events.*")} == training_events

    run = Run(rd)
    rec = {r["step"]: r for r in run.store.sorted_records(EVAL)}
    assert sorted(rec) == [8, 16, 24]
    scores = records.head_scores(run.store)
    for i, step in enumerate(sorted(rec)):
        assert got[("analysis/icl_score", step)] == pytest.approx(rec[step]["icl"], abs=1e-6)
        assert got[("analysis/icl_score_window", step)] == pytest.approx(rec[step]["icl_window"], abs=1e-6)
        assert got[("analysis/eval_loss", step)] == pytest.approx(rec[step]["eval_loss"], rel=1e-6)
        for j, m in enumerate(heads.MEASURES):
            for layer, h in np.ndindex(*scores.shape[1:3]):
                value = scores[i, layer, h, j]
                assert ((f"heads/{m}/{layer}.{h}", step) in got) == bool(np.isfinite(value))
                if np.isfinite(value):
                    assert got[(f"heads/{m}/{layer}.{h}", step)] == pytest.approx(value, abs=1e-6)
    k = run.store.read(COMPOSITION, "scores", 16)[1]  # [L, H, L, H] of K-composition
    assert got[("composition/k/0.2-1.3", 16)] == pytest.approx(k[0, 2, 1, 3], abs=1e-6)
    assert not any(tag.startswith("composition/k/1.") for tag, _ in got)  # only writers below their reader
    section = ablation_name()
    delta = run.store.read(section, "delta_icl_window", 24).mean(axis=1)
    ablated = [(tag, step) for tag, step in got if tag.startswith("ablation_pattern/total/delta_icl/")]
    assert {step for _, step in ablated} == {24} and len(ablated) == len(delta)  # every head and the induction lane
    assert got[("ablation_pattern/total/delta_icl/1.2", 24)] == pytest.approx(delta[4 + 2], abs=1e-6)
    assert got[("ablation_pattern/total/delta_icl/induction_heads", 24)] == pytest.approx(delta[-1], abs=1e-6)
    clean = run.store.read(section, "icl_window", 24).mean()
    shares = [tag for tag, _ in got if tag.startswith("ablation_pattern/total/share/")]
    assert len(shares) == (len(delta) if clean < 0 else 0)  # a share needs a negative clean ICL score

    assert {tag for tag, _ in images} >= {"figures/icl", "figures/run_prefix_matching", "figures/run_ablation"}
    assert {step for _, step in images} == {24}
    png = matplotlib.image.imread(rd / "analysis" / "figures" / "icl.png")
    assert images[("figures/icl", 24)].shape[:2] == png.shape[:2]


CONCURRENT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from induction_jax.analysis.results import RunResults
    from induction_jax.analysis.run import Run
    from induction_jax.report import tensorboard

    run = Run(sys.argv[1])
    figures = sorted(Path(sys.argv[1], "analysis", "figures").glob("*.png"))
    for _ in range(2):
        tensorboard.write(RunResults(run), figures)
""")


@pytest.mark.slow
def test_two_writers_at_once_leave_one_whole_set_of_events(analysed, tmp_path):
    rd = tmp_path / "run"
    shutil.copytree(analysed[0], rd)
    want, want_images, _ = read_events(rd / "tensorboard" / "analysis")
    script = tmp_path / "writer.py"
    script.write_text(CONCURRENT)
    procs = [subprocess.Popen([sys.executable, str(script), str(rd)], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=240) == 0, p.stderr.read()[-2000:]
    got, images, n_files = read_events(rd / "tensorboard" / "analysis")
    assert n_files == 1 and sorted(got) == sorted(want) and images.keys() == want_images.keys()
    # Nothing is left of the writers' temporary directories.
    assert sorted(p.name for p in rd.iterdir() if p.name.startswith(".tensorboard")) == []
