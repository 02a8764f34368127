"""Figures: files written, axes promised (log scales, labels with units), NaN and single-snapshot inputs."""

import matplotlib
import matplotlib.text
import numpy as np
import pytest

from induction_jax.report import headplots, plots, plotstyle

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402

S, L, H, T = 12, 2, 3, 64
WINDOW = (3e5, 2e6)



def _figure_fn(name):
    return getattr(plots, name, None) or getattr(headplots, name)

def _tokens(s=S):
    return np.geomspace(1e4, 1e8, s)


def _phase(tok):
    return 1.0 / (1.0 + np.exp(-(np.log10(np.maximum(tok, 1.0)) - 6.0) / 0.15))


def _labels(n_layers=L, n_heads=H):
    return [f"{l}.{h}" for l in range(n_layers) for h in range(n_heads)]


def _inputs(s=S, seed=0):
    """Keyword arguments (minus path) for every figure function, from a synthetic run with a phase change."""
    rng = np.random.default_rng(seed)
    tok = _tokens(s)
    ph = _phase(tok)
    idx = np.arange(1, T + 1)
    loss_SI = 6.0 - ph[:, None] * 0.1 * np.log(idx) + 0.01 * rng.normal(size=(s, T))
    prefix = np.clip(0.05 + 0.8 * ph[:, None, None] * (np.arange(L * H).reshape(L, H) == 4), 0, 1)
    copying = rng.uniform(-0.5, 0.5, size=(s, L, H))
    m = L * H
    return {
        "loss_curve": dict(tokens_S=tok, loss_S=6.0 - 0.3 * np.log10(tok), window=WINDOW),
        "icl_curve": dict(runs={"a": (tok, -0.4 * ph), "b": (tok, -0.05 + 0 * ph)}, window=WINDOW,
                          indices=(6, 62)),
        "loss_heatmap": dict(tokens_S=tok, loss_SI=loss_SI, index_I=idx),
        "dloss_dlog_index": dict(tokens_S=tok, centres_B=np.geomspace(1.5, 50, 8),
                                 dloss_SB=rng.normal(size=(s, 8)) - ph[:, None]),
        "pca_trajectories": dict(runs={"a": (tok, rng.normal(size=(s, 2))), "b": (tok, rng.normal(size=(s, 2)))},
                                 window=WINDOW),
        "measure_curves": dict(tokens_S=tok, scores_SLH=prefix, measure="prefix_matching", window=WINDOW),
        "copying_vs_prefix": dict(prefix_LH=prefix[-1], copying_LH=copying[-1], thresholds=(0.4, 0.0)),
        "ablation_heatmap": dict(tokens_S=tok, delta_icl_SM=rng.normal(size=(s, m)) * 0.1,
                                 head_labels_M=_labels()),
        "attribution_scatter": dict(cosine_M=rng.uniform(-1, 1, m), fraction_M=rng.uniform(-0.2, 1, m),
                                    head_labels_M=_labels(), induction_M=np.arange(m) == 4),
        "probe_snapshots": dict(tokens_P=tok, icl_P=-0.4 * ph, prefix_P=0.05 + 0.6 * ph, window=WINDOW,
                                schedules={"base schedule": tok[::4], "adaptive": tok[5:8]}),
    }


FUNCTIONS = list(_inputs())


def _draw(name, tmp_path, **overrides):
    kwargs = _inputs()[name]
    kwargs.update(overrides)
    paths, fig = _figure_fn(name)(tmp_path / "sub" / name, return_fig=True, **kwargs)
    return paths, fig


def _main_axes(fig):
    """The plotting axes, not the colour bar's (colour bars have no title)."""
    return next(a for a in fig.axes if a.get_title())


@pytest.mark.parametrize("name", FUNCTIONS)
def test_writes_nonempty_png_and_svg_and_closes(name, tmp_path):
    before = set(plt.get_fignums())
    paths = _figure_fn(name)(tmp_path / "nested" / "dir" / name, **_inputs()[name])
    assert [p.name for p in paths] == [f"{name}.png", f"{name}.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[0].stat().st_size > 5000
    assert b"<svg" in paths[1].read_bytes()[:2000]
    assert set(plt.get_fignums()) == before  # no figure left open across a long analysis job


@pytest.mark.parametrize("name", FUNCTIONS)
def test_single_snapshot(name, tmp_path):
    kwargs = _inputs(s=1)[name]
    paths = _figure_fn(name)(tmp_path / name, **kwargs)
    assert all(p.stat().st_size > 0 for p in paths)


@pytest.mark.parametrize("name", ["loss_curve", "icl_curve", "measure_curves", "ablation_heatmap", "loss_heatmap",
                                  "dloss_dlog_index"])
def test_training_tokens_on_log_x(name, tmp_path):
    _, fig = _draw(name, tmp_path)
    ax = _main_axes(fig)
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() == "training tokens"


@pytest.mark.parametrize("name", ["loss_heatmap", "dloss_dlog_index"])
def test_heatmaps_token_index_on_log_y_with_geometric_cells(name, tmp_path):
    _, fig = _draw(name, tmp_path)
    ax = _main_axes(fig)
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "token index"
    mesh = ax.collections[0]
    x_edges = np.unique(mesh.get_coordinates()[..., 0])
    assert x_edges.size == S + 1
    # log-spaced snapshots get equal-width cells on the log axis: edges are geometric midpoints
    np.testing.assert_allclose(np.diff(np.log(x_edges)), np.diff(np.log(x_edges))[0], rtol=1e-6)


def test_axis_labels_carry_units(tmp_path):
    _, fig = _draw("loss_curve", tmp_path)
    assert _main_axes(fig).get_ylabel() == "loss (nats)"
    _, fig = _draw("icl_curve", tmp_path)
    assert "loss@62 − loss@6 (nats)" in _main_axes(fig).get_ylabel()
    _, fig = _draw("loss_heatmap", tmp_path)
    assert fig.axes[-1].get_ylabel() == "loss (nats)"  # the colour bar
    _, fig = _draw("ablation_heatmap", tmp_path)
    assert fig.axes[-1].get_ylabel().startswith("Δ ICL score (nats)")
    _, fig = _draw("dloss_dlog_index", tmp_path)
    assert "(nats)" in fig.axes[-1].get_ylabel()
    _, fig = _draw("pca_trajectories", tmp_path)
    assert fig.axes[-1].get_ylabel() == "training tokens"
    assert _main_axes(fig).get_xlabel().startswith("PC 1 (nats)")


@pytest.mark.parametrize("name", ["dloss_dlog_index", "ablation_heatmap"])
def test_diverging_maps_centred_at_zero(name, tmp_path):
    _, fig = _draw(name, tmp_path)
    mesh = _main_axes(fig).collections[0]
    assert mesh.get_cmap().name.startswith("RdBu")
    assert mesh.norm.vmin == pytest.approx(-mesh.norm.vmax)


def test_window_is_shaded_and_in_legend(tmp_path):
    for name in ["loss_curve", "icl_curve", "measure_curves"]:
        _, fig = _draw(name, tmp_path)
        legend = [t.get_text() for t in _main_axes(fig).get_legend().get_texts()]
        assert plotstyle.WINDOW_LABEL in legend, name
    _, fig = _draw("loss_curve", tmp_path, window=None)
    assert plotstyle.WINDOW_LABEL not in [t.get_text() for t in _main_axes(fig).get_legend().get_texts()]


def test_zero_token_snapshot_left_out_of_log_axis(tmp_path):
    tok = _tokens()
    tok[0] = 0.0
    _, fig = _draw("loss_curve", tmp_path, tokens_S=tok)
    ax = _main_axes(fig)
    line = next(l for l in ax.get_lines() if l.get_label() == "loss")
    assert np.all(line.get_xdata() > 0) and line.get_xdata().size == S - 1
    assert any("not shown" in t.get_text() for t in ax.texts)


def test_unsorted_and_duplicate_snapshots_plot_in_token_order(tmp_path):
    tok = _tokens()
    loss = np.arange(S, dtype=float)
    perm = np.random.default_rng(1).permutation(S)
    tok_dup, loss_dup = np.append(tok[perm], tok[3]), np.append(loss[perm], 99.0)
    _, fig = _draw("loss_curve", tmp_path, tokens_S=tok_dup, loss_S=loss_dup)
    line = next(l for l in _main_axes(fig).get_lines() if l.get_label() == "loss")
    np.testing.assert_array_equal(line.get_xdata(), tok)
    expected = loss.copy()
    expected[3] = 99.0  # the later record of a re-recorded snapshot wins
    np.testing.assert_array_equal(line.get_ydata(), expected)


def test_measure_curves_handles_nan_layers_and_labels_high_heads(tmp_path):
    qk = np.random.default_rng(0).normal(size=(S, L, H))
    qk[:, 0] = np.nan  # layer 0 has no QK trace
    _, fig = _draw("measure_curves", tmp_path, scores_SLH=qk, measure="qk_trace")
    ax = _main_axes(fig)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [plotstyle.WINDOW_LABEL, "layer 1"]
    assert any(f"{H} head(s) without a finite score" in t.get_text() for t in ax.texts)

    _, fig = _draw("measure_curves", tmp_path)  # head 1.1 (flat index 4) rises to ~0.85, the rest stay ~0.05
    names = {t.get_text() for t in _main_axes(fig).texts}
    assert "1.1" in names and "0.0" not in names


def test_measure_curves_all_nan_model(tmp_path):
    """A 1-layer model's QK trace is NaN everywhere: the figure says so instead of crashing."""
    nan = np.full((S, 1, H), np.nan)
    _, fig = _draw("measure_curves", tmp_path, scores_SLH=nan, measure="qk_trace")
    assert any("no finite" in t.get_text() for t in _main_axes(fig).texts)


def test_heatmaps_and_scatters_tolerate_nan(tmp_path):
    inp = _inputs()
    loss = inp["loss_heatmap"]["loss_SI"].copy()
    loss[2, :10] = np.nan
    _draw("loss_heatmap", tmp_path, loss_SI=loss)
    _draw("loss_heatmap", tmp_path, loss_SI=np.full_like(loss, np.nan))
    d = inp["ablation_heatmap"]["delta_icl_SM"].copy()
    d[:, 0] = np.nan
    _draw("ablation_heatmap", tmp_path, delta_icl_SM=d)
    prefix = inp["copying_vs_prefix"]["prefix_LH"].copy()
    prefix[0] = np.nan  # e.g. a layer an evaluator skipped
    _, fig = _draw("copying_vs_prefix", tmp_path, prefix_LH=prefix)
    labelled = {t.get_text() for t in _main_axes(fig).texts}
    assert "0.0" not in labelled and {"1.0", "1.1", "1.2"} <= labelled
    cos = inp["attribution_scatter"]["cosine_M"].copy()
    cos[1] = np.nan
    _draw("attribution_scatter", tmp_path, cosine_M=cos)
    xy = inp["pca_trajectories"]["runs"]["a"][1].copy()
    xy[3] = np.nan
    _draw("pca_trajectories", tmp_path, runs={"a": (_tokens(), xy)})


def test_pca_marks_window_points_and_shares_one_colorbar(tmp_path):
    tok = _tokens()
    runs = {"a": (tok, np.column_stack([np.arange(S), np.zeros(S)])),
            "b": (tok, np.column_stack([np.arange(S), np.ones(S)]))}
    _, fig = _draw("pca_trajectories", tmp_path, runs=runs, window={"a": WINDOW})
    assert len(fig.axes) == 2  # main axes and one shared colour bar
    ax = _main_axes(fig)
    inside = int(((tok >= WINDOW[0]) & (tok <= WINDOW[1])).sum())
    ringed = [c for c in ax.collections if c.get_offsets().shape[0] == inside and c.get_facecolors().size == 0]
    assert inside > 0 and len(ringed) == 1  # only run "a" has a window
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"a", "b", "first snapshot", "last snapshot"} <= set(legend)


def test_copying_vs_prefix_shades_the_induction_quadrant(tmp_path):
    prefix = np.array([[0.1, 0.9], [0.8, 0.2]])
    copying = np.array([[0.5, 0.7], [-0.4, -0.1]])
    _, fig = _draw("copying_vs_prefix", tmp_path, prefix_LH=prefix, copying_LH=copying, thresholds=(0.4, 0.0))
    ax = _main_axes(fig)
    quad = ax.collections[0]  # fill_between comes first
    verts = quad.get_paths()[0].vertices
    assert verts[:, 0].min() == pytest.approx(0.4) and verts[:, 1].min() == pytest.approx(0.0)
    labels = {t.get_text() for t in ax.texts}
    assert {"0.0", "0.1", "1.0", "1.1"} <= labels


def test_scatter_labels_do_not_overlap(tmp_path):
    """A crowded cluster (most heads sit near (0, 0)) must still give separate labels."""
    rng = np.random.default_rng(3)
    prefix = np.abs(rng.normal(0.03, 0.02, size=(3, 4)))
    copying = rng.normal(0.0, 0.08, size=(3, 4))
    _, fig = _draw("copying_vs_prefix", tmp_path, prefix_LH=prefix, copying_LH=copying)
    canvas = FigureCanvasAgg(fig)  # a closed figure has lost its Agg canvas; the labels' positions have not
    canvas.draw()
    r = canvas.get_renderer()
    head_texts = [t for t in _main_axes(fig).texts if t.get_text() in set(_labels(3, 4))]
    assert len(head_texts) == 12
    # Text's own extent: an Annotation's would include its leader line, which may cross other labels
    boxes = [matplotlib.text.Text.get_window_extent(t, r) for t in head_texts]
    overlaps = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    assert not overlaps


def test_attribution_highlights_induction_heads(tmp_path):
    _, fig = _draw("attribution_scatter", tmp_path)
    ax = _main_axes(fig)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "induction heads" in legend
    red = [t for t in ax.texts if t.get_text() == "1.1"]
    assert red and matplotlib.colors.same_color(red[0].get_color(), "crimson")


def test_log_edges_are_geometric_midpoints():
    c = np.array([1.0, 4.0, 16.0])
    np.testing.assert_allclose(plotstyle.log_edges(c), [0.5, 2.0, 8.0, 32.0])
    one = plotstyle.log_edges(np.array([10.0]))
    assert one[0] < 10.0 < one[1]


def test_mismatched_shapes_raise(tmp_path):
    with pytest.raises(ValueError, match="loss_S"):
        plots.loss_curve(tmp_path / "x", _tokens(), np.zeros(S - 1))
    with pytest.raises(ValueError, match="head labels"):
        headplots.ablation_heatmap(tmp_path / "x", _tokens(), np.zeros((S, 4)), ["0.0"])


def test_probe_snapshots_draws_one_row_of_ticks_per_schedule(tmp_path):
    tok = _tokens()
    schedules = {"base schedule": tok[::4], "adaptive": tok[5:8]}
    _, fig = _draw("probe_snapshots", tmp_path, schedules=schedules)
    rows = fig.axes[1]
    assert rows.get_xlabel() == "training tokens" and rows.get_xscale() == "linear"
    assert [t.get_text() for t in rows.get_yticklabels()] == ["adaptive (3)", "base schedule (3)"]
    for k, (label, want) in enumerate(schedules.items()):
        segments = rows.collections[k].get_segments()
        np.testing.assert_allclose(sorted(seg[0, 0] for seg in segments), want)
        assert {round(seg[0, 1] + 0.35, 6) for seg in segments} == {len(schedules) - 1 - k}  # its own row
