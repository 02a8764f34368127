"""Paper-style figures (Olsson et al. 2022) from plain numpy arrays.

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

import functools
import pathlib
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on training/analysis machines; must precede the pyplot import

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import matplotlib.transforms as mtransforms  # noqa: E402
import numpy as np  # noqa: E402

FIGSIZE = (7.0, 4.0)
DPI = 150
FONTSIZE = 9
WINDOW_LABEL = "phase change window"
WINDOW_COLOR = "0.55"

_RC = {
    "font.size": FONTSIZE,
    "axes.titlesize": FONTSIZE + 1,
    "axes.labelsize": FONTSIZE,
    "xtick.labelsize": FONTSIZE,
    "ytick.labelsize": FONTSIZE,
    "legend.fontsize": FONTSIZE,
    "svg.fonttype": "none",  # keep SVG text as text, so it stays searchable and editable
}

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


# ------------------------------------------------------------------------------------------------ helpers

def _styled(fn):
    """Runs a figure function under the module's rcParams: titles, legends and texts read them when created, so
    the whole body, not only the figure's creation, must be inside the context."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(_RC):
            return fn(*args, **kwargs)
    return wrapper


def _figure(figsize=FIGSIZE):
    # dpi fixed to the saved dpi so that label placement done in display pixels matches the saved image
    return plt.subplots(figsize=figsize, dpi=DPI, layout="constrained")


def _save(fig, path, return_fig: bool):
    base = pathlib.Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix in (".png", ".svg"):
        out = base.with_name(base.name + suffix)
        fig.savefig(out, dpi=DPI)
        paths.append(out)
    plt.close(fig)
    return (paths, fig) if return_fig else paths


def _as_1d(x, name: str) -> np.ndarray:
    a = np.atleast_1d(np.asarray(x, dtype=np.float64))
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array, got shape {a.shape}")
    return a


def _check_rows(tokens_S: np.ndarray, arr: np.ndarray, name: str) -> None:
    if arr.shape[0] != tokens_S.shape[0]:
        raise ValueError(f"{name}: {arr.shape[0]} rows but {tokens_S.shape[0]} snapshot token counts")


def _positive_sorted(tokens_S: np.ndarray, *arrays):
    """Snapshots with tokens > 0, sorted by tokens, duplicates keeping the last (a resumed run may re-record one).

    Returns (tokens, arrays..., number dropped for being <= 0 or NaN)."""
    keep = np.isfinite(tokens_S) & (tokens_S > 0)
    idx = np.flatnonzero(keep)
    order = idx[np.argsort(tokens_S[idx], kind="stable")]
    # last occurrence of each token count: unique over the reversed order
    _, first_in_rev = np.unique(tokens_S[order][::-1], return_index=True)
    order = order[::-1][first_in_rev]
    dropped = int((~keep).sum())
    return (tokens_S[order], *(np.asarray(a)[order] for a in arrays), dropped)


def _log_edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges for pcolormesh on a log axis: geometric midpoints, the outer cells mirrored in log space."""
    c = np.asarray(centres, np.float64)
    if c.size == 1:
        return np.array([c[0] / 1.25, c[0] * 1.25])
    mids = np.sqrt(c[:-1] * c[1:])
    return np.concatenate([[c[0] ** 2 / mids[0]], mids, [c[-1] ** 2 / mids[-1]]])


def _note(ax, text: str, loc: str = "lower right") -> None:
    """A small caveat in a corner (default lower right), boxed so it stays readable over heat maps."""
    y, va = (0.01, "bottom") if loc.startswith("lower") else (0.99, "top")
    x, ha = (0.995, "right") if loc.endswith("right") else (0.005, "left")
    ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, fontsize=FONTSIZE - 1,
            color="0.25", bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.8),
            zorder=10)


def _note_dropped(ax, *counts: tuple[int, str]) -> None:
    """Says what a log axis could not show: `counts` are (n, 'snapshot(s)')-style pairs, zeros skipped."""
    parts = [f"{n} {what}" for n, what in counts if n]
    if parts:
        _note(ax, " and ".join(parts) + " at 0 not shown (log axis)")


def _plain_log_ticks(axis) -> None:
    """Token-index axes read better as 1, 10, 100 than as powers of ten."""
    axis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))


def _windows_for(window, names: Sequence[str]) -> dict:
    """Normalises `window` (None, one (start, end) pair, or a dict name -> pair) to a dict name -> pair; a single
    pair is stored under None, meaning 'shared by every run'."""
    if window is None:
        return {}
    if isinstance(window, Mapping):
        return {k: tuple(map(float, v)) for k, v in window.items() if k in names and v is not None}
    lo, hi = map(float, window)
    return {None: (lo, hi)}


def _valid_window(w) -> bool:
    return w is not None and all(np.isfinite(w)) and w[1] >= w[0]


def _shade(ax, window, color=WINDOW_COLOR, label=WINDOW_LABEL, alpha=0.22, vertical=True):
    if not _valid_window(window):
        return
    lo, hi = window
    if hi == lo:  # a zero-width window would be invisible; draw it as a line
        (ax.axvline if vertical else ax.axhline)(lo, color=color, lw=1.5, alpha=0.8, label=label)
    else:
        (ax.axvspan if vertical else ax.axhspan)(lo, hi, color=color, alpha=alpha, lw=0, label=label)


def _window_lines(ax, window, vertical=True):
    """Window edges as dashed lines, for heat maps where a shaded band would hide the colours."""
    if not _valid_window(window):
        return
    line = ax.axvline if vertical else ax.axhline
    for k, v in enumerate(window):
        line(v, color="k", ls="--", lw=1.0, label=WINDOW_LABEL if k == 0 else None)


def _robust_range(a: np.ndarray, pct=(1.0, 99.0)):
    """Colour limits from percentiles, so that one huge early-training loss does not wash out the rest."""
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, pct)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return float(lo), float(hi)


def _symmetric_limit(a: np.ndarray, pct=99.0) -> float:
    finite = np.abs(a[np.isfinite(a)])
    if finite.size == 0:
        return 1.0
    v = float(np.percentile(finite, pct))
    return v if v > 0 else (float(finite.max()) or 1.0)


def _extend(a: np.ndarray, lo: float, hi: float) -> str:
    finite = a[np.isfinite(a)]
    below = finite.size and finite.min() < lo
    above = finite.size and finite.max() > hi
    return {(0, 0): "neither", (1, 0): "min", (0, 1): "max", (1, 1): "both"}[(bool(below), bool(above))]


def _grey_bad(cmap_name: str):
    return plt.get_cmap(cmap_name).with_extremes(bad="0.85")


def _layer_colors(n_layers: int) -> list:
    if n_layers <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n_layers)]
    return [plt.get_cmap("viridis")(x) for x in np.linspace(0.0, 0.9, n_layers)]


def _run_colors(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


# PCA points are coloured by viridis (purple-blue-green-yellow), so run lines there avoid those hues and also
# differ in dash pattern; crimson is kept for the window rings
_TRAJ_COLORS = ["black", "tab:brown", "tab:pink", "0.5", "tab:orange", "tab:olive"]
_TRAJ_STYLES = ["-", "--", "-.", ":"]


def head_label(layer: int, head: int) -> str:
    """'L.H', 0-based, the label every figure and report uses for a head."""
    return f"{layer}.{head}"


ALL_LABELS_UP_TO = 16  # scatters with at most this many heads label every head, whatever the crowding


def _place_labels(ax, xs, ys, texts, colors, priority=None, obstacles=None, required=None,
                  fontsize=FONTSIZE - 1) -> int:
    """Greedy non-overlapping labels next to scatter points.

    Tries offsets around each point at growing distances and takes the first whose text box stays inside the
    axes and overlaps no label already placed, no labelled point, no `obstacles` point (data coordinates, e.g. the
    rest of a trajectory), and no text or legend already on the axes; points with higher `priority` choose first.
    A `required` label (default: all) that found no free spot goes to the nearest in-axes spot with a leader line,
    so it is never dropped; an optional one is placed only in a free spot right next to its point (no leader
    lines criss-crossing a crowded cluster) and is otherwise skipped. Returns the number skipped.
    Works in display pixels, so it must run after the layout is final (we draw once first).
    """
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    pts = ax.transData.transform(np.column_stack([xs, ys]))
    extra = np.zeros((0, 2))
    if obstacles is not None and len(obstacles):
        extra = ax.transData.transform(np.asarray(obstacles, np.float64).reshape(-1, 2))
        extra = extra[np.isfinite(extra).all(axis=1)]
    px_per_pt = fig.dpi / 72.0
    pad = 1.5 * px_per_pt
    order = np.argsort(-np.asarray(priority, np.float64), kind="stable") if priority is not None \
        else np.arange(len(xs))
    directions = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
    radii = [3.0, 9.0, 16.0, 26.0, 38.0]
    placed = []
    for artist in list(ax.texts) + ([ax.get_legend()] if ax.get_legend() else []):
        bb = artist.get_window_extent(renderer)
        placed.append((bb.x0, bb.y0, bb.x1, bb.y1))
    point_r = 4.0 * px_per_pt
    required = np.ones(len(xs), bool) if required is None else np.asarray(required, bool)
    skipped = 0

    def free(box, own):
        x0, y0, x1, y1 = box
        if x0 < axbox.x0 or x1 > axbox.x1 or y0 < axbox.y0 or y1 > axbox.y1:
            return False
        for (a0, b0, a1, b1) in placed:
            if x0 - pad < a1 and x1 + pad > a0 and y0 - pad < b1 and y1 + pad > b0:
                return False
        for j, (qx, qy) in enumerate(pts):
            if j != own and x0 - point_r < qx < x1 + point_r and y0 - point_r < qy < y1 + point_r:
                return False
        if extra.size:
            hit = (extra[:, 0] > x0 - point_r) & (extra[:, 0] < x1 + point_r) & \
                  (extra[:, 1] > y0 - point_r) & (extra[:, 1] < y1 + point_r)
            if hit.any():
                return False
        return True

    for i in order:
        t = ax.text(0, 0, texts[i], fontsize=fontsize)
        bb = t.get_window_extent(renderer)
        t.remove()
        w, h = bb.width, bb.height
        px, py = pts[i]
        chosen, first = None, None
        for r in (radii if required[i] else radii[:2]):
            for dx, dy in directions:
                ox, oy = dx * r * px_per_pt, dy * r * px_per_pt
                x0 = px + ox if dx > 0 else (px + ox - w if dx < 0 else px - w / 2)
                y0 = py + oy if dy > 0 else (py + oy - h if dy < 0 else py - h / 2)
                box = (x0, y0, x0 + w, y0 + h)
                inside = axbox.x0 <= x0 and x0 + w <= axbox.x1 and axbox.y0 <= y0 and y0 + h <= axbox.y1
                if first is None and inside:
                    first = (dx, dy, r, box)
                if free(box, i):
                    chosen = (dx, dy, r, box)
                    break
            if chosen:
                break
        if chosen is None and not required[i]:
            skipped += 1
            continue
        # no free spot: the nearest in-axes spot, with a leader line (overlap beats a missing label)
        dx, dy, r, box = chosen or first or (1, 1, radii[0], (px, py, px + w, py + h))
        placed.append(box)
        ha = "left" if dx > 0 else ("right" if dx < 0 else "center")
        va = "bottom" if dy > 0 else ("top" if dy < 0 else "center")
        leader = dict(arrowstyle="-", color="0.4", lw=0.6, shrinkA=0, shrinkB=3) if r > 9 or chosen is None \
            else None
        ann = ax.annotate(texts[i], xy=(xs[i], ys[i]), xytext=(dx * r, dy * r), textcoords="offset points",
                          ha=ha, va=va, fontsize=fontsize, color=colors[i], arrowprops=leader, zorder=6)
        ann.set_in_layout(False)
    return skipped


def _spread(values: np.ndarray, gap: float) -> np.ndarray:
    """Positions as close as possible to `values` with neighbours at least `gap` apart (1-d label de-overlap)."""
    order = np.argsort(values)
    v = values[order].astype(np.float64)
    out = v.copy()
    for k in range(1, len(out)):
        out[k] = max(out[k], out[k - 1] + gap)
    # centre the pushed-up block on the original values so labels do not all drift upwards
    shift = np.mean(out - v)
    out -= max(shift, 0.0) / 2
    for k in range(1, len(out)):
        out[k] = max(out[k], out[k - 1] + gap)
    res = np.empty_like(out)
    res[order] = out
    return res


# ------------------------------------------------------------------------------------------------ figures

@_styled
def loss_curve(path, tokens_S, loss_S, window=None, title: str = "", *, ylabel: str = "loss (nats)",
               return_fig: bool = False):
    """Loss (training or eval) against training tokens on a log axis; the phase-change window shaded.

    The paper's signature of the phase change here is a small bump/plateau break in the loss curve inside the
    window, so the y axis is linear and not clipped."""
    tokens_S, loss_S = _as_1d(tokens_S, "tokens_S"), _as_1d(loss_S, "loss_S")
    _check_rows(tokens_S, loss_S, "loss_S")
    tok, loss, dropped = _positive_sorted(tokens_S, loss_S)
    fig, ax = _figure()
    _shade(ax, window)
    ax.plot(tok, loss, color="C0", lw=1.6, marker="o" if tok.size <= 60 else None, ms=3, label="loss")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "Loss over training")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper right")
    _note_dropped(ax, (dropped, "snapshot(s)"))
    return _save(fig, path, return_fig)


@_styled
def icl_curve(path, runs: Mapping[str, tuple], window=None, indices: tuple[int, int] = (50, 500), title: str = "",
              *, return_fig: bool = False):
    """In-context learning score (loss at the late index minus loss at the early one) against training tokens.

    `runs`: name -> (tokens_S, icl_S). `window`: one (start, end) pair, or a dict name -> pair shaded in the
    run's colour. More negative = more in-context learning; the zero line marks 'no benefit from context'."""
    names = list(runs)
    colors = _run_colors(len(names))
    windows = _windows_for(window, names)
    fig, ax = _figure()
    if None in windows:
        _shade(ax, windows[None])
    total_dropped = 0
    for name, color in zip(names, colors):
        if name in windows:
            _shade(ax, windows[name], color=color, alpha=0.15, label=f"{WINDOW_LABEL} ({name})")
        tokens_S, icl_S = (_as_1d(a, f"runs[{name!r}]") for a in runs[name])
        _check_rows(tokens_S, icl_S, f"runs[{name!r}] icl_S")
        tok, icl, dropped = _positive_sorted(tokens_S, icl_S)
        total_dropped += dropped
        ax.plot(tok, icl, color=color, lw=1.6, marker="o" if tok.size <= 60 else None, ms=3, label=name)
    ax.axhline(0.0, color="k", lw=0.8, ls=":")
    early, late = indices
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"ICL score: loss@{late} − loss@{early} (nats)")
    ax.set_title(title or "In-context learning score over training (lower = more in-context learning)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best")
    _note_dropped(ax, (total_dropped, "snapshot(s)"))
    return _save(fig, path, return_fig)


@_styled
def loss_heatmap(path, tokens_S, loss_SI, index_I, window=None, title: str = "", *, return_fig: bool = False):
    """Per-token loss over (training tokens, token index), both log axes, as the paper's view (c).

    Training tokens run along x (as in every other figure), token index along y. Cells have geometric edges, so
    log-spaced snapshots get equal-width columns. The colour scale is clipped to the 1st-99th percentile (arrows
    on the colour bar say so) because the untrained model's loss would otherwise use up the whole scale."""
    return _token_heatmap(path, tokens_S, loss_SI, index_I, "token indices", window, return_fig,
                          colours=lambda v: (_grey_bad("viridis"), mcolors.Normalize(*_robust_range(v)), "loss (nats)"),
                          title=title or "Per-token loss over training and context", dropped_what="token index(es)")


def _token_heatmap(path, tokens_S, values_SY, y_Y, y_name: str, window, return_fig: bool, *, colours, title: str,
                   dropped_what: str):
    """A (training tokens x, token index y) heat map on log-log axes with geometric cell edges; `colours(values)`
    gives (cmap, norm, colour-bar label). Shared by the loss and d loss / d log index views."""
    tokens_S, y_Y = _as_1d(tokens_S, "tokens_S"), _as_1d(y_Y, y_name)
    v_SY = np.asarray(values_SY, np.float64).reshape(tokens_S.size, -1)
    if v_SY.shape[1] != y_Y.size:
        raise ValueError(f"{y_name}: {v_SY.shape[1]} columns but {y_Y.size} entries")
    tok, v, dropped = _positive_sorted(tokens_S, v_SY)
    y, v_YS, dropped_y = _positive_sorted(y_Y, v.T)
    fig, ax = _figure()
    if tok.size and y.size:
        cmap, norm, label = colours(v_YS)
        mesh = ax.pcolormesh(_log_edges(tok), _log_edges(y), np.ma.masked_invalid(v_YS), cmap=cmap, norm=norm,
                             shading="flat", rasterized=True)
        fig.colorbar(mesh, ax=ax, label=label, extend=_extend(v_YS, norm.vmin, norm.vmax))
        _window_lines(ax, window)
        if _valid_window(window):
            ax.legend(loc="upper right", framealpha=0.85)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("token index")
    ax.set_title(title)
    _plain_log_ticks(ax.yaxis)
    _note_dropped(ax, (dropped, "snapshot(s)"), (dropped_y, dropped_what))
    return _save(fig, path, return_fig)


@_styled
def dloss_dlog_index(path, tokens_S, centres_B, dloss_SB, window=None, title: str = "", *,
                     return_fig: bool = False):
    """d loss / d ln(token index) over training as a heat map (training tokens x, token index y, both log).

    Diverging colours centred at 0: blue where later tokens are predicted better than earlier ones (in-context
    learning); after the phase change the blue band reaches into large token indices. A heat map reads better
    than a few lines here because the change is a sweep over training time."""
    def colours(v):
        lim = _symmetric_limit(v)
        return _grey_bad("RdBu_r"), mcolors.Normalize(-lim, lim), "d loss / d ln(token index) (nats)"

    return _token_heatmap(path, tokens_S, dloss_SB, centres_B, "bin centres", window, return_fig, colours=colours,
                          title=title or "Derivative of loss with respect to log token index over training",
                          dropped_what="bin(s)")


@_styled
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
    windows = _windows_for(window, names)
    data = {}
    for name in names:
        tokens_S = _as_1d(runs[name][0], f"runs[{name!r}] tokens_S")
        xy = np.asarray(runs[name][1], np.float64).reshape(-1, 2)
        _check_rows(tokens_S, xy, f"runs[{name!r}] xy_S2")
        order = np.argsort(np.where(np.isfinite(tokens_S), tokens_S, np.inf), kind="stable")
        data[name] = (tokens_S[order], xy[order])
    all_tok = np.concatenate([d[0] for d in data.values()]) if data else np.zeros(0)
    pos = all_tok[np.isfinite(all_tok) & (all_tok > 0)]
    if pos.size:
        norm = mcolors.LogNorm(vmin=pos.min(), vmax=max(pos.max(), pos.min() * 1.0001))
    else:
        norm = mcolors.Normalize(vmin=0.0, vmax=1.0)
    floor = pos.min() if pos.size else 0.0

    fig, ax = _figure()
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
        if _valid_window(w):
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
    if any(_valid_window(w) for w in windows.values()):
        ax.scatter([], [], s=60, facecolors="none", edgecolors="crimson", lw=1.3, label=f"in {WINDOW_LABEL}")
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
        _place_labels(ax, np.array(ends_x), np.array(ends_y), ends_text, ends_color, obstacles=trajectory_points)
    return _save(fig, path, return_fig)


@_styled
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
    tokens_S = _as_1d(tokens_S, "tokens_S")
    scores = np.asarray(scores_SLH, np.float64)
    if scores.ndim == 2:
        scores = scores[None]
    if scores.ndim != 3:
        raise ValueError(f"scores_SLH: expected [snapshots, layers, heads], got shape {scores.shape}")
    _check_rows(tokens_S, scores, "scores_SLH")
    n_layers, n_heads = scores.shape[1:]
    tok, sc, dropped = _positive_sorted(tokens_S, scores)
    colors = _layer_colors(n_layers)

    fig, ax = _figure()
    _shade(ax, window)
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
            labels.append(head_label(layer, head))
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
        targets = np.clip(_spread(last_y[chosen], gap), y0, y1 + 0.5 * gap)
        blend = mtransforms.blended_transform_factory(ax.transAxes, ax.transData)
        for k, i in enumerate(chosen):
            ax.annotate(labels[i], xy=finals[i], xytext=(1.015, targets[k]), textcoords=blend, va="center",
                        fontsize=FONTSIZE - 1, color=label_colors[i],
                        arrowprops=dict(arrowstyle="-", color=label_colors[i], lw=0.5, alpha=0.6))
    notes = [f"{dropped} snapshot(s) at 0 not shown (log axis)"] if dropped else []
    if finals and n_empty:
        notes.append(f"{n_empty} head(s) without a finite score not shown")
    if notes:
        _note(ax, "; ".join(notes))
    return _save(fig, path, return_fig)


@_styled
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
    labels_M = [head_label(l, h) for l in range(n_layers) for h in range(n_heads)]
    x, y = prefix.ravel(), copying.ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    p_thr, c_thr = map(float, thresholds)
    colors = _layer_colors(n_layers)

    fig, ax = _figure()
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
            fontsize=FONTSIZE - 1, color="0.3")
    ax.text(xlim[1], c_thr, f"copying threshold {c_thr:g} ", va="top", ha="right", fontsize=FONTSIZE - 1,
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
        required = np.ones(idx.size, bool) if idx.size <= ALL_LABELS_UP_TO else in_quadrant.copy()
        required[np.argsort(-x[idx])[:5]] = True
        skipped = _place_labels(ax, x[idx], y[idx], [labels_M[i] for i in idx], [colors[layer_M[i]] for i in idx],
                                priority=in_quadrant * 10.0 + x[idx], required=required)
        if skipped:
            _note(ax, f"{skipped} crowded head label(s) left out", loc="lower left")
    return _save(fig, path, return_fig)


@_styled
def ablation_heatmap(path, tokens_S, delta_icl_SM, head_labels_M: Sequence[str], window=None, title: str = "", *,
                     return_fig: bool = False):
    """Heads x snapshots heat map of the change in ICL score when each head is ablated.

    Training tokens on a log x axis (geometric cell edges), one row per head in the given order. Red (> 0) means
    the ablation raises the ICL score towards 0, i.e. removes in-context learning; the colour scale is symmetric
    about 0, clipped at the 99th percentile of |Δ|."""
    tokens_S = _as_1d(tokens_S, "tokens_S")
    delta = np.asarray(delta_icl_SM, np.float64).reshape(tokens_S.size, -1)
    labels = [str(s) for s in head_labels_M]
    if delta.shape[1] != len(labels):
        raise ValueError(f"delta_icl_SM: {delta.shape[1]} heads but {len(labels)} head labels")
    tok, d, dropped = _positive_sorted(tokens_S, delta)
    n = len(labels)
    fig, ax = _figure((FIGSIZE[0], max(FIGSIZE[1], 1.5 + 0.16 * n)))
    if tok.size and n:
        v = _symmetric_limit(d)
        mesh = ax.pcolormesh(_log_edges(tok), np.arange(n + 1) - 0.5, np.ma.masked_invalid(d.T),
                             cmap=_grey_bad("RdBu_r"), norm=mcolors.Normalize(-v, v), shading="flat",
                             rasterized=True)
        cb = fig.colorbar(mesh, ax=ax, extend=_extend(d, -v, v))
        cb.set_label("Δ ICL score (nats)\n(> 0: ablation removes in-context learning)")
        _window_lines(ax, window)
        if _valid_window(window):
            ax.legend(loc="upper left", bbox_to_anchor=(0.0, 1.0), framealpha=0.85, fontsize=FONTSIZE - 1)
    step = max(1, int(np.ceil(n / 48)))  # beyond ~48 rows tick labels would collide; show every step-th
    ax.set_yticks(np.arange(0, n, step))
    ax.set_yticklabels(labels[::step], fontsize=FONTSIZE if n <= 24 else FONTSIZE - 1)
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
    _note_dropped(ax, (dropped, "snapshot(s)"))
    return _save(fig, path, return_fig)


@_styled
def attribution_scatter(path, cosine_M, fraction_M, head_labels_M: Sequence[str], induction_M, title: str = "",
                        *, return_fig: bool = False):
    """Before-and-after attribution: for each head, cosine between its ablation's per-token loss change and the
    reversed phase-change loss change (x) against the fraction of that change its ablation undoes (y).

    Heads that carry the phase change sit top-right (cosine and fraction near 1). Induction heads (from the
    classification) are drawn in red and always labelled; other heads grey, labelled when the model is small."""
    cos = _as_1d(cosine_M, "cosine_M")
    frac = _as_1d(fraction_M, "fraction_M")
    labels = [str(s) for s in head_labels_M]
    ind = np.asarray(induction_M, bool).ravel()
    if not (cos.size == frac.size == len(labels) == ind.size):
        raise ValueError(f"attribution_scatter: cosine {cos.size}, fraction {frac.size}, labels {len(labels)} and "
                         f"induction {ind.size} must have one entry per head")
    ok = np.isfinite(cos) & np.isfinite(frac)
    fig, ax = _figure()
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
        required = np.ones(idx.size, bool) if idx.size <= ALL_LABELS_UP_TO else ind[idx].copy()
        required[np.argsort(-frac[idx])[:5]] = True
        skipped = _place_labels(ax, cos[idx], frac[idx], [labels[i] for i in idx],
                                ["crimson" if ind[i] else "0.25" for i in idx],
                                priority=ind[idx] * 10.0 + np.abs(frac[idx]), required=required)
        if skipped:
            _note(ax, f"{skipped} crowded head label(s) left out")
    else:
        ax.text(0.5, 0.5, "no head with finite attribution", transform=ax.transAxes, ha="center", va="center")
    return _save(fig, path, return_fig)
