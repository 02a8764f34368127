"""Per-head figures: each head's measure over training, copying against prefix matching, ablation effects over
training, and the before-and-after attribution. Conventions as in plots.py."""

from __future__ import annotations

from typing import Sequence

import matplotlib.colors as mcolors
import matplotlib.transforms as mtransforms
import numpy as np

from . import plotstyle as st

MEASURE_LABELS = {
    "prefix_matching": "prefix-matching score (attention mass)",
    "copying": "copying score (scaled to [-1, 1])",
    "previous_token": "previous-token score (attention mass)",
    "qk_trace": "QK-eigenvalue trace (logit units)",
    "ov_copying": "OV copying (eigenvalue positivity, [-1, 1])",
}
MEASURE_TITLES = {
    "prefix_matching": "Prefix matching of every head over training",
    "copying": "Copying of every head over training",
    "previous_token": "Previous-token attention of every head over training",
    "qk_trace": "Trace of QK eigenvalues (K-composition) over training",
    "ov_copying": "OV-circuit copying of every head over training",
}



@st.styled
def measure_curves(path, tokens_S, scores_SLH, measure: str, window=None, label_above: float | None = None,
                max_labels: int = 10, title: str = "", *, return_fig: bool = False):
    """One line per (layer, head) of a head measure over training tokens (log x), coloured by layer.

    `measure`: 'prefix_matching', 'copying', 'previous_token', 'qk_trace' (others are used as the axis label).
    Heads whose last finite score is above `label_above` are labelled 'L.H' at the right edge (at most
    `max_labels`, highest first); when none is, the top three are, so the figure always names its leaders.
    `label_above` defaults to 0.5 for the bounded measures (prefix matching, previous token, copying) and to
    'top three only' for the QK trace and unknown measures, whose scale is model-dependent. All-NaN heads
    (layer 0 of the QK trace) are skipped, and the figure says how many."""
    if label_above is None:
        label_above = 0.5 if measure in ("prefix_matching", "previous_token", "copying") else np.inf
    tokens_S = st.as_1d(tokens_S, "tokens_S")
    scores = np.asarray(scores_SLH, np.float64)
    if scores.ndim == 2:
        scores = scores[None]
    if scores.ndim != 3:
        raise ValueError(f"scores_SLH: expected [snapshots, layers, heads], got shape {scores.shape}")
    st.check_rows(tokens_S, scores, "scores_SLH")
    n_layers, n_heads = scores.shape[1:]
    tok, sc, dropped = st.positive_sorted(tokens_S, scores)
    colors = st.layer_colors(n_layers)

    fig, ax = st.new_figure()
    st.shade(ax, window)
    marker = "o" if tok.size <= 2 else None  # lines of one or two points need markers to be seen
    finals, labels, label_colors = [], [], []
    layers_drawn = set()
    n_empty = 0
    for layer in range(n_layers):
        for head in range(n_heads):
            y = sc[:, layer, head]
            ok = np.isfinite(y)
            if not ok.any():
                n_empty += 1
                continue
            ax.plot(tok, y, color=colors[layer], lw=1.2, alpha=0.85, marker=marker, ms=3,
                    label=f"layer {layer}" if layer not in layers_drawn else None)
            layers_drawn.add(layer)
            finals.append((tok[ok][-1], y[ok][-1]))
            labels.append(st.head_label(layer, head))
            label_colors.append(colors[layer])
    if measure in ("prefix_matching", "previous_token"):
        ax.set_ylim(-0.03, 1.03)  # attention mass: the whole [0, 1] range, so runs compare at a glance
    elif measure in ("copying", "ov_copying"):
        ax.set_ylim(-1.05, 1.05)
    if measure in ("copying", "ov_copying", "qk_trace"):
        ax.axhline(0.0, color="k", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(MEASURE_LABELS.get(measure, measure))
    ax.set_title(title or MEASURE_TITLES.get(measure, f"{measure} of every head over training"))
    ax.grid(True, which="major", alpha=0.3)
    if not finals:
        why = "only snapshots at 0 tokens" if tok.size == 0 else \
            f"no finite {measure} scores (e.g. QK trace of a 1-layer model)"
        ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center")
    else:
        ax.legend(loc="upper left", framealpha=0.85)
        last_y = np.array([f[1] for f in finals])
        chosen = np.flatnonzero(last_y > label_above)
        chosen = chosen[np.argsort(-last_y[chosen])][:max_labels]
        if chosen.size == 0:
            chosen = np.argsort(-last_y)[: min(3, last_y.size)]
        y0, y1 = ax.get_ylim()
        gap = 0.06 * (y1 - y0)  # about one 8-pt text line on a ~3-in axes
        targets = np.clip(st.spread(last_y[chosen], gap), y0, y1 + 0.5 * gap)
        blend = mtransforms.blended_transform_factory(ax.transAxes, ax.transData)
        for k, i in enumerate(chosen):
            ax.annotate(labels[i], xy=finals[i], xytext=(1.015, targets[k]), textcoords=blend, va="center",
                        fontsize=st.FONTSIZE - 1, color=label_colors[i],
                        arrowprops=dict(arrowstyle="-", color=label_colors[i], lw=0.5, alpha=0.6))
    notes = [f"{dropped} snapshot(s) at 0 not shown (log axis)"] if dropped else []
    if finals and n_empty:
        notes.append(f"{n_empty} head(s) without a finite score not shown")
    if notes:
        st.note(ax, "; ".join(notes))
    return st.save(fig, path, return_fig)


@st.styled
def copying_vs_prefix(path, prefix_LH, copying_LH, thresholds: tuple[float, float] = (0.4, 0.0), title: str = "",
                      *, measure: str = "copying", return_fig: bool = False):
    """Copying score against prefix-matching score for every head at one snapshot (the paper's per-head scatter).

    Dashed lines at the thresholds (prefix, copying) of the induction-head classification; the induction-head
    quadrant (both above) is shaded. Points are labelled 'L.H' and coloured by layer; NaN heads are dropped."""
    prefix = np.asarray(prefix_LH, np.float64)
    copying = np.asarray(copying_LH, np.float64)
    if prefix.shape != copying.shape:
        raise ValueError(f"prefix_LH {prefix.shape} and copying_LH {copying.shape} differ in shape")
    prefix, copying = np.atleast_2d(prefix), np.atleast_2d(copying)
    n_layers, n_heads = prefix.shape
    layer_M = np.repeat(np.arange(n_layers), n_heads)
    labels_M = [st.head_label(l, h) for l in range(n_layers) for h in range(n_heads)]
    x, y = prefix.ravel(), copying.ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    p_thr, c_thr = map(float, thresholds)
    colors = st.layer_colors(n_layers)

    fig, ax = st.new_figure()
    fx = np.concatenate([x[ok], [0.0, 1.0]])
    fy = np.concatenate([y[ok], [-1.0, 1.0]])
    xlim = (min(fx.min(), p_thr) - 0.06, max(fx.max(), p_thr) + 0.06)
    ylim = (min(fy.min(), c_thr) - 0.1, max(fy.max(), c_thr) + 0.1)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.fill_between([p_thr, xlim[1]], c_thr, ylim[1], color="gold", alpha=0.18, lw=0, label="induction heads")
    ax.axvline(p_thr, color="0.3", ls="--", lw=0.9)
    ax.axhline(c_thr, color="0.3", ls="--", lw=0.9)
    # threshold labels at the axis ends: most heads cluster near prefix 0, copying 0
    ax.text(p_thr, ylim[1], f"prefix threshold {p_thr:g} ", rotation=90, va="top", ha="right",
            fontsize=st.FONTSIZE - 1, color="0.3")
    ax.text(xlim[1], c_thr, f"copying threshold {c_thr:g} ", va="top", ha="right", fontsize=st.FONTSIZE - 1,
            color="0.3")
    for layer in range(n_layers):
        sel = ok & (layer_M == layer)
        if sel.any():
            ax.scatter(x[sel], y[sel], color=colors[layer], s=32, zorder=3, edgecolors="k", lw=0.4,
                       label=f"layer {layer}")
    ax.set_xlabel("prefix-matching score (attention mass)")
    ax.set_ylabel(MEASURE_LABELS.get(measure, measure))
    ax.set_title(title or "Copying vs prefix matching per head (last snapshot)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", framealpha=0.85)
    if not ok.any():
        ax.text(0.5, 0.5, "no head with finite scores", transform=ax.transAxes, ha="center", va="center")
    else:
        idx = np.flatnonzero(ok)
        in_quadrant = (x[idx] > p_thr) & (y[idx] > c_thr)
        # small models: every head; big ones: the induction quadrant and the five highest prefix matchers always,
        # the rest where there is room
        required = np.ones(idx.size, bool) if idx.size <= st.ALL_LABELS_UP_TO else in_quadrant.copy()
        required[np.argsort(-x[idx])[:5]] = True
        skipped = st.place_labels(ax, x[idx], y[idx], [labels_M[i] for i in idx], [colors[layer_M[i]] for i in idx],
                                priority=in_quadrant * 10.0 + x[idx], required=required)
        if skipped:
            st.note(ax, f"{skipped} crowded head label(s) left out", loc="lower left")
    return st.save(fig, path, return_fig)


@st.styled
def ablation_heatmap(path, tokens_S, delta_icl_SM, head_labels_M: Sequence[str], window=None, title: str = "", *,
                     return_fig: bool = False):
    """Heads x snapshots heat map of the change in ICL score when each head is ablated.

    Training tokens on a log x axis (geometric cell edges), one row per head in the given order. Red (> 0) means
    the ablation raises the ICL score towards 0, i.e. removes in-context learning; the colour scale is symmetric
    about 0, clipped at the 99th percentile of |Δ|."""
    tokens_S = st.as_1d(tokens_S, "tokens_S")
    delta = np.asarray(delta_icl_SM, np.float64).reshape(tokens_S.size, -1)
    labels = [str(s) for s in head_labels_M]
    if delta.shape[1] != len(labels):
        raise ValueError(f"delta_icl_SM: {delta.shape[1]} heads but {len(labels)} head labels")
    tok, d, dropped = st.positive_sorted(tokens_S, delta)
    n = len(labels)
    fig, ax = st.new_figure((st.FIGSIZE[0], max(st.FIGSIZE[1], 1.5 + 0.16 * n)))
    if tok.size and n:
        v = st.symmetric_limit(d)
        mesh = ax.pcolormesh(st.log_edges(tok), np.arange(n + 1) - 0.5, np.ma.masked_invalid(d.T),
                             cmap=st.grey_bad("RdBu_r"), norm=mcolors.Normalize(-v, v), shading="flat",
                             rasterized=True)
        cb = fig.colorbar(mesh, ax=ax, extend=st.extend(d, -v, v))
        cb.set_label("Δ ICL score (nats)\n(> 0: ablation removes in-context learning)")
        st.window_lines(ax, window)
        if st.valid_window(window):
            ax.legend(loc="upper left", bbox_to_anchor=(0.0, 1.0), framealpha=0.85, fontsize=st.FONTSIZE - 1)
    step = max(1, int(np.ceil(n / 48)))  # beyond ~48 rows tick labels would collide; show every step-th
    ax.set_yticks(np.arange(0, n, step))
    ax.set_yticklabels(labels[::step], fontsize=st.FONTSIZE if n <= 24 else st.FONTSIZE - 1)
    ax.set_ylim(n - 0.5, -0.5)  # first head at the top, as a table reads
    # thin rules between layers (labels 'L.H'), so rows are easy to find in a tall map
    layers = [lab.split(".")[0] for lab in labels]
    for k in range(1, n):
        if layers[k] != layers[k - 1]:
            ax.axhline(k - 0.5, color="0.2", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("ablated head (layer.head)")
    ax.set_title(title or "Change in ICL score from ablating each head")
    st.note_dropped(ax, (dropped, "snapshot(s)"))
    return st.save(fig, path, return_fig)


@st.styled
def attribution_scatter(path, cosine_M, fraction_M, head_labels_M: Sequence[str], induction_M, title: str = "",
                        *, return_fig: bool = False):
    """Before-and-after attribution: for each head, cosine between its ablation's per-token loss change and the
    reversed phase-change loss change (x) against the fraction of that change its ablation undoes (y).

    Heads that carry the phase change sit top-right (cosine and fraction near 1). Induction heads (from the
    classification) are drawn in red and always labelled; other heads grey, labelled when the model is small."""
    cos = st.as_1d(cosine_M, "cosine_M")
    frac = st.as_1d(fraction_M, "fraction_M")
    labels = [str(s) for s in head_labels_M]
    ind = np.asarray(induction_M, bool).ravel()
    if not (cos.size == frac.size == len(labels) == ind.size):
        raise ValueError(f"attribution_scatter: cosine {cos.size}, fraction {frac.size}, labels {len(labels)} and "
                         f"induction {ind.size} must have one entry per head")
    ok = np.isfinite(cos) & np.isfinite(frac)
    fig, ax = st.new_figure()
    ax.axhline(0.0, color="k", lw=0.8, ls=":")
    ax.axvline(0.0, color="k", lw=0.8, ls=":")
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--", label="undoes the whole change")
    other, ind_ok = ok & ~ind, ok & ind
    ax.scatter(cos[other], frac[other], s=30, color="0.55", edgecolors="k", lw=0.3, zorder=3, label="other heads")
    ax.scatter(cos[ind_ok], frac[ind_ok], s=55, color="crimson", marker="D", edgecolors="k", lw=0.5, zorder=4,
               label="induction heads")
    fx = np.concatenate([cos[ok], [-1.0, 1.0]])
    fy = np.concatenate([frac[ok], [0.0, 1.0]])
    pad_y = 0.08 * (fy.max() - fy.min())
    ax.set_xlim(min(fx.min(), -1.0) - 0.08, max(fx.max(), 1.0) + 0.08)
    ax.set_ylim(fy.min() - pad_y, fy.max() + pad_y)
    ax.set_xlabel("cosine(ablation Δ loss, −phase-change Δ loss) (per-token vectors)")
    ax.set_ylabel("fraction of phase-change loss change undone")
    ax.set_title(title or "Before-and-after attribution: which heads' ablation reverses the phase change")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", framealpha=0.85)
    if ok.any():
        idx = np.flatnonzero(ok)
        required = np.ones(idx.size, bool) if idx.size <= st.ALL_LABELS_UP_TO else ind[idx].copy()
        required[np.argsort(-frac[idx])[:5]] = True
        skipped = st.place_labels(ax, cos[idx], frac[idx], [labels[i] for i in idx],
                                ["crimson" if ind[i] else "0.25" for i in idx],
                                priority=ind[idx] * 10.0 + np.abs(frac[idx]), required=required)
        if skipped:
            st.note(ax, f"{skipped} crowded head label(s) left out")
    else:
        ax.text(0.5, 0.5, "no head with finite attribution", transform=ax.transAxes, ha="center", va="center")
    return st.save(fig, path, return_fig)


@st.styled
def composition_heatmaps(path, scores_by_mode: dict, baseline: float, title: str = "", *, return_fig: bool = False):
    """Side-by-side heat maps, one per mode (e.g. {"K": [L, H, L, H], "V": ...}), of the composition score of every
    writer head (rows, layer.head) into every reader head in a later layer (columns); pairs that cannot compose
    are grey. The colour scale starts at 0 and marks the random baseline on its bar."""
    modes = list(scores_by_mode)
    n_layers, n_heads = np.asarray(scores_by_mode[modes[0]]).shape[:2]
    writers = [(l, h) for l in range(n_layers - 1) for h in range(n_heads)]
    readers = [(l, h) for l in range(1, n_layers) for h in range(n_heads)]
    grids = [np.array([[np.asarray(scores_by_mode[m])[l1, h1, l2, h2] for l2, h2 in readers] for l1, h1 in writers])
             for m in modes]
    top = max([np.nanmax(g) for g in grids if np.isfinite(g).any()] + [2 * baseline, 1e-6])
    fig, axes = st.new_figure((st.FIGSIZE[0] * 1.25, max(st.FIGSIZE[1], 1.8 + 0.22 * len(writers))))
    fig.clf()
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    for ax, mode, grid in zip(axes, modes, grids):
        mesh = ax.imshow(np.ma.masked_invalid(grid), cmap=st.grey_bad("viridis"), vmin=0.0, vmax=top,
                         aspect="auto", interpolation="nearest")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if np.isfinite(grid[i, j]) and grid.size <= 400:
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=st.FONTSIZE - 2,
                            color="w" if grid[i, j] < 0.6 * top else "k")
        ax.set_xticks(range(len(readers)), [st.head_label(*r) for r in readers], rotation=90)
        ax.set_yticks(range(len(writers)), [st.head_label(*w) for w in writers])
        ax.set_xlabel("reading head (later layer)")
        ax.set_ylabel("writing head")
        ax.set_title(f"{mode}-composition")
    cb = fig.colorbar(mesh, ax=list(axes))
    cb.ax.axhline(baseline, color="w", lw=1.5)
    cb.ax.axhline(2 * baseline, color="w", lw=1.5, ls="--")
    cb.set_label(f"composition score (solid: random baseline {baseline:.3f}; dashed: 2x)")
    fig.suptitle(title or "Composition scores")
    return st.save(fig, path, return_fig)


@st.styled
def partner_curves(path, tokens_S, series: dict, baseline: float, window=None, title: str = "", *,
                   return_fig: bool = False):
    """One line per {label: scores [S]} over training tokens (log x): e.g. each induction head's composition with
    its strongest partner; the random baseline and twice it as horizontal lines, the phase-change window shaded."""
    tokens_S = st.as_1d(tokens_S, "tokens_S")
    fig, ax = st.new_figure()
    st.shade(ax, window)
    colors = st.run_colors(max(len(series), 1))
    for color, (label, y) in zip(colors, series.items()):
        y = st.as_1d(y, label)
        st.check_rows(tokens_S, y, label)
        tok, yy, _ = st.positive_sorted(tokens_S, y)
        ax.plot(tok, yy, color=color, lw=1.5, label=label)
    ax.axhline(baseline, color="0.4", lw=0.9, ls=":", label=f"random baseline ({baseline:.3f})")
    ax.axhline(2 * baseline, color="0.4", lw=0.9, ls="--", label="2x baseline")
    ax.set_xscale("log")
    finite = [np.nanmax(np.asarray(y, float)) for y in series.values() if np.isfinite(np.asarray(y, float)).any()]
    ax.set_ylim(0.0, min(1.0, 1.25 * max(finite + [2.5 * baseline])))  # scores this small would hug an axis to 1
    ax.set_xlabel("training tokens")
    ax.set_ylabel("composition score")
    ax.set_title(title or "Composition with the strongest partner over training")
    ax.legend(loc="upper left", framealpha=0.85)
    return st.save(fig, path, return_fig)
