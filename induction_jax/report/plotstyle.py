"""The look shared by every figure (sizes, fonts, the phase-change window's shading, colours) and the helpers the
figures are drawn with: input checks, log-axis handling, notes, and label placement that avoids overlaps. The
figures themselves are in plots.py and headplots.py."""

from __future__ import annotations

import functools
import pathlib
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on training/analysis machines; must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
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

# ------------------------------------------------------------------------------------------------ helpers

def styled(fn):
    """Runs a figure function under the module's rcParams: titles, legends and texts read them when created, so
    the whole body, not only the figure's creation, must be inside the context."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(_RC):
            return fn(*args, **kwargs)
    return wrapper


def new_figure(figsize=FIGSIZE, **subplots):
    # dpi fixed to the saved dpi so that label placement done in display pixels matches the saved image
    return plt.subplots(figsize=figsize, dpi=DPI, layout="constrained", **subplots)


def save(fig, path, return_fig: bool):
    base = pathlib.Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix in (".png", ".svg"):
        out = base.with_name(base.name + suffix)
        fig.savefig(out, dpi=DPI)
        paths.append(out)
    plt.close(fig)
    return (paths, fig) if return_fig else paths


def as_1d(x, name: str) -> np.ndarray:
    a = np.atleast_1d(np.asarray(x, dtype=np.float64))
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array, got shape {a.shape}")
    return a


def check_rows(tokens_S: np.ndarray, arr: np.ndarray, name: str) -> None:
    if arr.shape[0] != tokens_S.shape[0]:
        raise ValueError(f"{name}: {arr.shape[0]} rows but {tokens_S.shape[0]} snapshot token counts")


def positive_sorted(tokens_S: np.ndarray, *arrays):
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


def log_edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges for pcolormesh on a log axis: geometric midpoints, the outer cells mirrored in log space."""
    c = np.asarray(centres, np.float64)
    if c.size == 1:
        return np.array([c[0] / 1.25, c[0] * 1.25])
    mids = np.sqrt(c[:-1] * c[1:])
    return np.concatenate([[c[0] ** 2 / mids[0]], mids, [c[-1] ** 2 / mids[-1]]])


def note(ax, text: str, loc: str = "lower right") -> None:
    """A small caveat in a corner (default lower right), boxed so it stays readable over heat maps."""
    y, va = (0.01, "bottom") if loc.startswith("lower") else (0.99, "top")
    x, ha = (0.995, "right") if loc.endswith("right") else (0.005, "left")
    ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, fontsize=FONTSIZE - 1,
            color="0.25", bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.8),
            zorder=10)


def note_dropped(ax, *counts: tuple[int, str]) -> None:
    """Says what a log axis could not show: `counts` are (n, 'snapshot(s)')-style pairs, zeros skipped."""
    parts = [f"{n} {what}" for n, what in counts if n]
    if parts:
        note(ax, " and ".join(parts) + " at 0 not shown (log axis)")


def plain_log_ticks(axis) -> None:
    """Token-index axes read better as 1, 10, 100 than as powers of ten."""
    axis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))


def windows_for(window, names: Sequence[str]) -> dict:
    """Normalises `window` (None, one (start, end) pair, or a dict name -> pair) to a dict name -> pair; a single
    pair is stored under None, meaning 'shared by every run'."""
    if window is None:
        return {}
    if isinstance(window, Mapping):
        return {k: tuple(map(float, v)) for k, v in window.items() if k in names and v is not None}
    lo, hi = map(float, window)
    return {None: (lo, hi)}


def valid_window(w) -> bool:
    return w is not None and all(np.isfinite(w)) and w[1] >= w[0]


def shade(ax, window, color=WINDOW_COLOR, label=WINDOW_LABEL, alpha=0.22, vertical=True):
    if not valid_window(window):
        return
    lo, hi = window
    if hi == lo:  # a zero-width window would be invisible; draw it as a line
        (ax.axvline if vertical else ax.axhline)(lo, color=color, lw=1.5, alpha=0.8, label=label)
    else:
        (ax.axvspan if vertical else ax.axhspan)(lo, hi, color=color, alpha=alpha, lw=0, label=label)


def window_lines(ax, window, vertical=True):
    """Window edges as dashed lines, for heat maps where a shaded band would hide the colours."""
    if not valid_window(window):
        return
    line = ax.axvline if vertical else ax.axhline
    for k, v in enumerate(window):
        line(v, color="k", ls="--", lw=1.0, label=WINDOW_LABEL if k == 0 else None)


def robust_range(a: np.ndarray, pct=(1.0, 99.0)):
    """Colour limits from percentiles, so that one huge early-training loss does not wash out the rest."""
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, pct)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return float(lo), float(hi)


def symmetric_limit(a: np.ndarray, pct=99.0) -> float:
    finite = np.abs(a[np.isfinite(a)])
    if finite.size == 0:
        return 1.0
    v = float(np.percentile(finite, pct))
    return v if v > 0 else (float(finite.max()) or 1.0)


def extend(a: np.ndarray, lo: float, hi: float) -> str:
    finite = a[np.isfinite(a)]
    below = finite.size and finite.min() < lo
    above = finite.size and finite.max() > hi
    return {(0, 0): "neither", (1, 0): "min", (0, 1): "max", (1, 1): "both"}[(bool(below), bool(above))]


def grey_bad(cmap_name: str):
    return plt.get_cmap(cmap_name).with_extremes(bad="0.85")


def layer_colors(n_layers: int) -> list:
    if n_layers <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n_layers)]
    return [plt.get_cmap("viridis")(x) for x in np.linspace(0.0, 0.9, n_layers)]


def run_colors(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]




def head_label(layer: int, head: int) -> str:
    """'L.H', 0-based, the label every figure and report uses for a head."""
    return f"{layer}.{head}"


ALL_LABELS_UP_TO = 16  # scatters with at most this many heads label every head, whatever the crowding


def place_labels(ax, xs, ys, texts, colors, priority=None, obstacles=None, required=None,
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


def spread(values: np.ndarray, gap: float) -> np.ndarray:
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
