"""Paper-style figures (Olsson et al. 2022) from plain numpy arrays: curves over training (loss, ICL score, loss by
token index, joint PCA) here, per-head figures in headplots.py, the shared look and helpers in plotstyle.py.

Every function writes `<path>.png` and `<path>.svg` (`path` has no suffix; its parent directory is created), closes
the figure and returns the written paths; with `return_fig=True` it returns `(paths, fig)` so tests can inspect the
axes of the (closed, still intact) figure. Inputs follow the package's shape-suffix names (`tokens_S`: training
tokens at each of S snapshots, `_L`/`_H`: layers/heads, `_M`: a flat list of heads, `_I`: token indices, `_B`: bins).

Conventions shared by all figures:
- training tokens and token index are on log axes, as in the paper. A log axis cannot show 0, so snapshots at
  0 training tokens (the initial snapshot) and token index 0 are left out of log-axis plots, and the figure says
  how many were left out; the PCA plot keeps them (tokens only colour its points) at the bottom of the colour scale.
- NaN values (e.g. the QK trace of layer-0 heads, or of every head of a 1-layer model) leave gaps: all-NaN lines are
  skipped, NaN heat-map cells are drawn grey, NaN scatter points are dropped.
- `window=(tok_start, tok_end)` is the detected phase-change window, shaded everywhere it is given. Multi-run
  figures also take a dict run name -> window, since each run has its own.
"""

from __future__ import annotations

from typing import Mapping

import matplotlib.colors as mcolors
import matplotlib.ticker as mticker
import numpy as np

from . import plotstyle as st

# PCA points are coloured by viridis (purple-blue-green-yellow), so run lines there avoid those hues and also
# differ in dash pattern; crimson is kept for the window rings
_TRAJ_COLORS = ["black", "tab:brown", "tab:pink", "0.5", "tab:orange", "tab:olive"]
_TRAJ_STYLES = ["-", "--", "-.", ":"]


# ------------------------------------------------------------------------------------------------ figures

@st.styled
def loss_curve(path, tokens_S, loss_S, window=None, title: str = "", *, ylabel: str = "loss (nats)",
               return_fig: bool = False):
    """Loss (training or eval) against training tokens on a log axis; the phase-change window shaded.

    The paper's signature of the phase change here is a small bump/plateau break in the loss curve inside the
    window, so the y axis is linear and not clipped."""
    tokens_S, loss_S = st.as_1d(tokens_S, "tokens_S"), st.as_1d(loss_S, "loss_S")
    st.check_rows(tokens_S, loss_S, "loss_S")
    tok, loss, dropped = st.positive_sorted(tokens_S, loss_S)
    fig, ax = st.new_figure()
    st.shade(ax, window)
    ax.plot(tok, loss, color="C0", lw=1.6, marker="o" if tok.size <= 60 else None, ms=3, label="loss")
    return _over_training(fig, ax, path, return_fig, ylabel, title or "Loss over training", "upper right", dropped)


def _over_training(fig, ax, path, return_fig: bool, ylabel: str, title: str, legend_loc: str, dropped: int):
    """Finishes and saves a curve over training tokens: log x, labels, grid, legend, the dropped-snapshot note."""
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc=legend_loc)
    st.note_dropped(ax, (dropped, "snapshot(s)"))
    return st.save(fig, path, return_fig)


@st.styled
def icl_curve(path, runs: Mapping[str, tuple], window=None, indices: tuple[int, int] = (50, 500), title: str = "",
              *, return_fig: bool = False):
    """In-context learning score (loss at the late index minus loss at the early one) against training tokens.

    `runs`: name -> (tokens_S, icl_S). `window`: one (start, end) pair, or a dict name -> pair shaded in the
    run's colour. More negative = more in-context learning; the zero line marks 'no benefit from context'."""
    names = list(runs)
    colors = st.run_colors(len(names))
    windows = st.windows_for(window, names)
    fig, ax = st.new_figure()
    if None in windows:
        st.shade(ax, windows[None])
    total_dropped = 0
    for name, color in zip(names, colors):
        if name in windows:
            st.shade(ax, windows[name], color=color, alpha=0.15, label=f"{st.WINDOW_LABEL} ({name})")
        tokens_S, icl_S = (st.as_1d(a, f"runs[{name!r}]") for a in runs[name])
        st.check_rows(tokens_S, icl_S, f"runs[{name!r}] icl_S")
        tok, icl, dropped = st.positive_sorted(tokens_S, icl_S)
        total_dropped += dropped
        ax.plot(tok, icl, color=color, lw=1.6, marker="o" if tok.size <= 60 else None, ms=3, label=name)
    ax.axhline(0.0, color="k", lw=0.8, ls=":")
    early, late = indices
    return _over_training(fig, ax, path, return_fig, f"ICL score: loss@{late} − loss@{early} (nats)",
                          title or "In-context learning score over training (lower = more in-context learning)",
                          "best", total_dropped)


@st.styled
def loss_heatmap(path, tokens_S, loss_SI, index_I, window=None, title: str = "", *, return_fig: bool = False):
    """Per-token loss over (training tokens, token index), both log axes, as the paper's view (c).

    Training tokens run along x (as in every other figure), token index along y. Cells have geometric edges, so
    log-spaced snapshots get equal-width columns. The colour scale is clipped to the 1st-99th percentile (arrows
    on the colour bar say so) because the untrained model's loss would otherwise use up the whole scale."""
    return _token_heatmap(path, tokens_S, loss_SI, index_I, "token indices", window, return_fig,
                          colours=lambda v: (st.grey_bad("viridis"), mcolors.Normalize(*st.robust_range(v)),
                                             "loss (nats)"),
                          title=title or "Per-token loss over training and context", dropped_what="token index(es)")


def _token_heatmap(path, tokens_S, values_SY, y_Y, y_name: str, window, return_fig: bool, *, colours, title: str,
                   dropped_what: str):
    """A (training tokens x, token index y) heat map on log-log axes with geometric cell edges; `colours(values)`
    gives (cmap, norm, colour-bar label). Shared by the loss and d loss / d log index views."""
    tokens_S, y_Y = st.as_1d(tokens_S, "tokens_S"), st.as_1d(y_Y, y_name)
    v_SY = np.asarray(values_SY, np.float64).reshape(tokens_S.size, -1)
    if v_SY.shape[1] != y_Y.size:
        raise ValueError(f"{y_name}: {v_SY.shape[1]} columns but {y_Y.size} entries")
    tok, v, dropped = st.positive_sorted(tokens_S, v_SY)
    y, v_YS, dropped_y = st.positive_sorted(y_Y, v.T)
    fig, ax = st.new_figure()
    if tok.size and y.size:
        cmap, norm, label = colours(v_YS)
        mesh = ax.pcolormesh(st.log_edges(tok), st.log_edges(y), np.ma.masked_invalid(v_YS), cmap=cmap, norm=norm,
                             shading="flat", rasterized=True)
        fig.colorbar(mesh, ax=ax, label=label, extend=st.extend(v_YS, norm.vmin, norm.vmax))
        st.window_lines(ax, window)
        if st.valid_window(window):
            ax.legend(loc="upper right", framealpha=0.85)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("token index")
    ax.set_title(title)
    st.plain_log_ticks(ax.yaxis)
    st.note_dropped(ax, (dropped, "snapshot(s)"), (dropped_y, dropped_what))
    return st.save(fig, path, return_fig)


@st.styled
def dloss_dlog_index(path, tokens_S, centres_B, dloss_SB, window=None, title: str = "", *,
                     return_fig: bool = False):
    """d loss / d ln(token index) over training as a heat map (training tokens x, token index y, both log).

    Diverging colours centred at 0: blue where later tokens are predicted better than earlier ones (in-context
    learning); after the phase change the blue band reaches into large token indices. A heat map reads better
    than a few lines here because the change is a sweep over training time."""
    def colours(v):
        lim = st.symmetric_limit(v)
        return st.grey_bad("RdBu_r"), mcolors.Normalize(-lim, lim), "d loss / d ln(token index) (nats)"

    return _token_heatmap(path, tokens_S, dloss_SB, centres_B, "bin centres", window, return_fig, colours=colours,
                          title=title or "Derivative of loss with respect to log token index over training",
                          dropped_what="bin(s)")


@st.styled
def pca_trajectories(path, runs: Mapping[str, tuple], window=None, explained_variance=None, title: str = "", *,
                     return_fig: bool = False):
    """Training trajectories in the joint PCA of per-token loss vectors (view b): one line per run.

    `runs`: name -> (tokens_S, xy_S2) with xy the projections on PC1 and PC2 (nats, as the loss vectors are).
    Points are coloured by training tokens on one log colour scale shared by all runs; first and last snapshots
    are marked, and snapshots inside the phase-change window (one pair, or a dict per run) are ringed. The paper's
    signature is the trajectory pivoting inside the window. `explained_variance`: optional (pc1, pc2) fractions,
    shown on the axis labels."""
    names = list(runs)
    colors = [_TRAJ_COLORS[i % len(_TRAJ_COLORS)] for i in range(len(names))]
    styles = [_TRAJ_STYLES[(i // len(_TRAJ_COLORS) + i) % len(_TRAJ_STYLES)] for i in range(len(names))]
    windows = st.windows_for(window, names)
    data = {}
    for name in names:
        tokens_S = st.as_1d(runs[name][0], f"runs[{name!r}] tokens_S")
        xy = np.asarray(runs[name][1], np.float64).reshape(-1, 2)
        st.check_rows(tokens_S, xy, f"runs[{name!r}] xy_S2")
        order = np.argsort(np.where(np.isfinite(tokens_S), tokens_S, np.inf), kind="stable")
        data[name] = (tokens_S[order], xy[order])
    all_tok = np.concatenate([d[0] for d in data.values()]) if data else np.zeros(0)
    pos = all_tok[np.isfinite(all_tok) & (all_tok > 0)]
    if pos.size:
        norm = mcolors.LogNorm(vmin=pos.min(), vmax=max(pos.max(), pos.min() * 1.0001))
    else:
        norm = mcolors.Normalize(vmin=0.0, vmax=1.0)
    floor = pos.min() if pos.size else 0.0

    fig, ax = st.new_figure()
    sc = None
    ends_x, ends_y, ends_text, ends_color = [], [], [], []
    for name, color, style in zip(names, colors, styles):
        tok, xy = data[name]
        ok = np.isfinite(xy).all(axis=1)
        if not ok.any():
            continue
        ax.plot(xy[ok, 0], xy[ok, 1], color=color, ls=style, lw=1.4, alpha=0.9, zorder=2, label=name)
        c = np.where(np.isfinite(tok) & (tok > 0), tok, floor)  # 0-token snapshot: bottom of the scale
        sc = ax.scatter(xy[ok, 0], xy[ok, 1], c=c[ok], cmap="viridis", norm=norm, s=22, zorder=3,
                        edgecolors="none")
        w = windows.get(name, windows.get(None))
        if st.valid_window(w):
            inside = ok & (tok >= w[0]) & (tok <= w[1])
            ax.scatter(xy[inside, 0], xy[inside, 1], s=75, facecolors="none", edgecolors="crimson", lw=1.3,
                       zorder=4)
        first, last = np.flatnonzero(ok)[[0, -1]]
        ax.scatter(*xy[first], marker="s", s=90, facecolors="none", edgecolors="k", lw=1.4, zorder=5)
        ax.scatter(*xy[last], marker="D", s=80, facecolors="none", edgecolors="k", lw=1.4, zorder=5)
        ends_x.append(xy[last, 0]), ends_y.append(xy[last, 1]), ends_text.append(name), ends_color.append(color)

    # legend proxies: the markers mean the same for every run, so explain them once
    ax.scatter([], [], marker="s", s=60, facecolors="none", edgecolors="k", label="first snapshot")
    ax.scatter([], [], marker="D", s=50, facecolors="none", edgecolors="k", label="last snapshot")
    if any(st.valid_window(w) for w in windows.values()):
        ax.scatter([], [], s=60, facecolors="none", edgecolors="crimson", lw=1.3, label=f"in {st.WINDOW_LABEL}")
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="training tokens")
    ev = explained_variance
    ax.set_xlabel("PC 1 (nats)" + (f", {100 * ev[0]:.0f}% of variance" if ev is not None else ""))
    ax.set_ylabel("PC 2 (nats)" + (f", {100 * ev[1]:.0f}% of variance" if ev is not None else ""))
    ax.set_title(title or "Training trajectories in the PCA of per-token losses")
    ax.grid(True, alpha=0.3)
    ax.margins(0.08)
    ax.legend(loc="best", framealpha=0.85)
    if len(names) > 1 and ends_x:
        trajectory_points = np.concatenate([d[1] for d in data.values()])
        st.place_labels(ax, np.array(ends_x), np.array(ends_y), ends_text, ends_color, obstacles=trajectory_points)
    return st.save(fig, path, return_fig)


@st.styled
def probe_snapshots(path, tokens_P, icl_P, prefix_P, schedules: Mapping[str, np.ndarray], window=None,
                    title: str = "", *, return_fig: bool = False):
    """The live probe over training (ICL score on the left axis, max prefix matching on the right) above one row
    of ticks per snapshot schedule (`schedules`: label -> training tokens of its snapshots), e.g. a base schedule
    and the adaptive snapshots added to it. The token axis is linear: the spacing of the snapshots is the point."""
    tokens_P, icl_P, prefix_P = (st.as_1d(a, n) for a, n in ((tokens_P, "tokens_P"), (icl_P, "icl_P"),
                                                               (prefix_P, "prefix_P")))
    st.check_rows(tokens_P, icl_P, "icl_P")
    st.check_rows(tokens_P, prefix_P, "prefix_P")
    fig, (ax, rows) = st.new_figure((7.0, 4.6), nrows=2, sharex=True, height_ratios=[3.2, 1])
    st.shade(ax, window)
    ax.plot(tokens_P, icl_P, color="C0", lw=1.4, marker="o", ms=2.5, label="probe ICL score")
    ax.axhline(0.0, color="k", lw=0.8, ls=":")
    ax.set_ylabel("ICL score (nats)", color="C0")
    right = ax.twinx()
    right.plot(tokens_P, prefix_P, color="C1", lw=1.4, marker="s", ms=2.5, label="probe max prefix matching")
    right.set_ylabel("max prefix matching", color="C1")
    right.set_ylim(0.0, max(1.0, float(np.nanmax(prefix_P, initial=0.0)) * 1.05))
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper center", framealpha=0.85)
    ax.set_title(title or "Live probe and snapshots")
    ax.grid(True, alpha=0.3)
    colors = ["0.35", "crimson", "C2", "C4", "C5"]
    labels = list(schedules)
    for k, label in enumerate(labels):
        tok = st.as_1d(schedules[label], f"schedules[{label!r}]")
        y = len(labels) - 1 - k
        rows.vlines(tok, y - 0.35, y + 0.35, color=colors[k % len(colors)], lw=1.6)
    rows.set_yticks(range(len(labels)), [f"{lab} ({np.size(schedules[lab])})" for lab in reversed(labels)])
    rows.set_ylim(-0.6, len(labels) - 0.4)
    rows.set_xlabel("training tokens")
    rows.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v / 1e6:g}M" if v else "0"))
    rows.grid(True, axis="x", alpha=0.3)
    return st.save(fig, path, return_fig)
