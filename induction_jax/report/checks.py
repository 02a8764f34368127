"""The CPU demo's checks of the paper's Arguments 1, 2, 3 and 5, computed from measured results (PASS/FAIL with numbers).

`demo_lines` builds every line of the demo's checks section from the three runs' results. ICL improvement and the
phase-change window are analysis.results' (`improvement`, `best_window`).
"""

from __future__ import annotations

import numpy as np

from ..analysis.results import RunResults, ablation_evidence, best_window, improvement, joint_pca, training_loss
from ..measures import composition, heads
from ..measures.ablation import PATHS


def _line(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'} {text}"


SMOOTH_DECADES = 0.1  # both detectors smooth over this fraction of a decade of training tokens
GRID_DECADES = 0.01  # resolution of the log-token grid the smoothed curves live on
FIT_DECADES = 0.5  # the power law of the loss-bump detector is fitted to this much loss before a candidate onset
MIN_FIT_DECADES = 0.2
HORIZON_DECADES = 0.3  # how far past the onset the excess fall is followed


def smooth_log_tokens(tokens, values, width: float = SMOOTH_DECADES, grid: float = GRID_DECADES):
    """(log10 tokens on a uniform grid [G], values smoothed there [G]): samples are averaged in bins of `grid`
    decades (empty bins, where snapshots are sparse, take the linear interpolation of their neighbours), then a
    moving average over `width` decades. Smoothing over a fixed fraction of a decade, not a fixed number of
    samples, treats dense late snapshots and sparse early ones alike."""
    t, v = np.asarray(tokens, float), np.asarray(values, float)
    ok = (t > 0) & np.isfinite(v)
    x, v = np.log10(t[ok]), v[ok]
    if x.size < 2 or x.max() - x.min() < width:
        return np.zeros(0), np.zeros(0)
    edges = np.arange(x.min(), x.max() + grid, grid)
    centres = (edges[:-1] + edges[1:]) / 2
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(centres) - 1)
    count = np.bincount(which, minlength=len(centres))
    mean = np.bincount(which, weights=v, minlength=len(centres)) / np.maximum(count, 1)
    has = count > 0
    filled = np.interp(centres, centres[has], mean[has])
    k = max(int(round(width / grid)), 1)
    return centres[k // 2: len(centres) - (k - 1 - k // 2)], np.convolve(filled, np.ones(k) / k, mode="valid")


def loss_bump(tokens, loss, start_tokens: float = 0.0, end_tokens: float = np.inf) -> dict | None:
    """The training-loss bump: the largest excess fall of the smoothed loss below a power law fitted to the loss
    before it (docs/method.md §6, check 1b).

    For every candidate onset x (log10 tokens), a power law (a line in log-log) is fitted to the smoothed loss
    over the `FIT_DECADES` before x and extrapolated `HORIZON_DECADES` past it; the excess fall is how far the
    loss drops below that extrapolation, in nats. The bump is the onset with the largest excess; its location is
    where that fall is half done. Only tokens in [start_tokens, end_tokens] count: a learning-rate warm-up or
    decay bends the curve for reasons of its own. Returns {"tokens", "onset_tokens", "excess_nats"} or None when
    the curve is too short or never falls below its trend.
    """
    t, y = np.asarray(tokens, float), np.asarray(loss, float)
    keep = (t >= max(start_tokens, 1.0)) & (t <= end_tokens)
    x, s = smooth_log_tokens(t[keep], y[keep])
    if x.size == 0 or np.any(s <= 0):
        return None
    n_fit, n_min = int(round(FIT_DECADES / GRID_DECADES)), int(round(MIN_FIT_DECADES / GRID_DECADES))
    n_ahead = int(round(HORIZON_DECADES / GRID_DECADES))
    log_s = np.log(s)
    best = None
    for i in range(n_min, len(x) - 3):
        lo = max(0, i - n_fit)
        slope, intercept = np.polyfit(x[lo: i + 1], log_s[lo: i + 1], 1)
        ahead = slice(i + 1, min(len(x), i + 1 + n_ahead))
        excess = np.exp(intercept + slope * x[ahead]) - s[ahead]
        top = int(np.argmax(excess))
        if excess[top] > 0 and (best is None or excess[top] > best[1]):
            half = i + 1 + int(np.argmax(excess >= excess[top] / 2))
            best = (i, float(excess[top]), half)
    if best is None:
        return None
    i, excess, half = best
    return {"tokens": float(10 ** x[half]), "onset_tokens": float(10 ** x[i]), "excess_nats": excess}


def pca_pivot(tokens_a, xy_a, tokens_b, xy_b) -> dict | None:
    """Where trajectory a (the 2-layer model's, in the joint PCA) leaves trajectory b (the 1-layer model's, same
    data and eval set) (docs/method.md §6, check 1c).

    The separation is the distance between the two models' points at the same number of training tokens (b
    interpolated in log tokens, over the range both cover), smoothed over `SMOOTH_DECADES`; the pivot is where it
    grows fastest against log tokens. Returns {"tokens", "separation_before", "separation_after"} (the smoothed
    separation `SMOOTH_DECADES` / 2 either side) or None without an overlap."""
    ta, tb = np.asarray(tokens_a, float), np.asarray(tokens_b, float)
    xy_a, xy_b = np.asarray(xy_a, float), np.asarray(xy_b, float)
    keep = (ta > 0) & (ta >= tb[tb > 0].min(initial=np.inf)) & (ta <= tb.max(initial=-np.inf))
    if keep.sum() < 3:
        return None
    lb = np.log10(np.maximum(tb, 1.0))
    order = np.argsort(lb)
    b_at_a = np.stack([np.interp(np.log10(ta[keep]), lb[order], xy_b[order, c]) for c in range(xy_b.shape[1])], 1)
    x, sep = smooth_log_tokens(ta[keep], np.linalg.norm(xy_a[keep] - b_at_a, axis=1))
    if x.size < 2:
        return None
    k = int(np.argmax(np.diff(sep)))
    h = int(round(SMOOTH_DECADES / GRID_DECADES / 2))
    return {"tokens": float(10 ** ((x[k] + x[k + 1]) / 2)), "separation_before": float(sep[max(k - h, 0)]),
            "separation_after": float(sep[min(k + 1 + h, len(sep) - 1)])}


def copying_info(r: RunResults, ranks: dict, vocab: int, n: int = 2) -> list[str]:
    """INFO lines for the `n` heads with the highest prefix matching at the last snapshot: their copying score next
    to `heads.copying_rank` (how often the token a head reads is its top direct-path logit), which shows whether a
    low copying score means the head does not copy or that its other logits are noisy."""
    pm_LH, cp_LH = r.measure("prefix_matching")[-1], r.measure("copying")[-1]
    ov_LH = r.measure("ov_copying")[-1]
    order = np.argsort(-np.nan_to_num(pm_LH, nan=-1.0), axis=None)[:n]
    lines = []
    for flat in order:
        l, h = np.unravel_index(flat, pm_LH.shape)
        lines.append(f"INFO head {l}.{h} at step {int(r.steps[-1])}: prefix matching {pm_LH[l, h]:.2f}, OV copying "
                     f"{ov_LH[l, h]:+.2f}, copying evaluator {cp_LH[l, h]:+.2f}; the token it reads is its top "
                     f"direct-path logit for {ranks['top1'][l, h]:.0%} of sources (median rank "
                     f"{ranks['median_rank'][l, h]:.0f} of {vocab}).")
    return lines


def constant_lr_span(tokens, lr) -> tuple[float, float]:
    """(first, last) tokens at which the logged learning rate is at its peak: the loss-bump detector's range."""
    tokens, lr = np.asarray(tokens, float), np.asarray(lr, float)
    if not np.isfinite(lr).any():
        return 0.0, np.inf
    at_peak = np.flatnonzero(lr >= np.nanmax(lr) * (1 - 1e-6))
    return float(tokens[at_peak[0]]), float(tokens[at_peak[-1]])


def _check4(ev: dict | None, eval_cfg) -> str:
    """Check 4: (a) induction heads exist; (b) ablating them together removes >= 70% of the windowed ICL score on
    the total path; (c) on the direct path (what each head writes straight to the logits), the head carrying the
    largest share and the head undoing the largest share of the phase change are induction heads."""
    title = "4. Ablation (Argument 3)"
    if ev is None or "total" not in ev["paths"]:
        return _line(False, f"{title}: no ablation results for the 2-layer model.")
    total = ev["paths"]["total"]
    ind = ev["induction"]
    names = ", ".join(ind) or "none"
    share, se = total["induction_share"], total["induction_se"]
    ok_a, ok_b = bool(ind), bool(ind) and share >= 0.7
    direct = ev["paths"].get("direct")
    if direct is None:
        c_text, ok_c = "no direct-path ablation at that step", False
    else:
        top = int(np.nanargmax(direct["share"])) if np.isfinite(direct["share"]).any() else None
        top_text = "n/a" if top is None else \
            f"{ev['labels'][top]} ({direct['share'][top]:.0%} ± {direct['se'][top]:.0%})"
        ok_c = top is not None and ev["labels"][top] in ind
        if direct["undone"] is None:
            undo_text, ok_c = "n/a (no before/after snapshots)", False
        else:
            u = int(np.argmax(direct["undone"]))
            undo_text = f"{ev['labels'][u]} ({direct['undone'][u]:.0%}, steps {ev['before']} -> {ev['after']})"
            ok_c = ok_c and ev["labels"][u] in ind
        c_text = (f"on the direct path the head carrying the largest share is {top_text} and the head undoing the "
                  f"largest share of the phase change is {undo_text}")
    copying = "OV copying" if eval_cfg.copying_measure == "ov" else "copying"
    return _line(ok_a and ok_b and ok_c,
                 f"{title}: at step {ev['step']}, (a) induction heads (prefix matching > {eval_cfg.prefix_threshold}"
                 f", {copying} > {eval_cfg.copying_threshold}): {names}; (b) pattern-preserving ablation of them "
                 f"together removes {share:.0%} ± {se:.0%} of the ±{eval_cfg.icl_window}-index ICL score "
                 f"({ev['clean_icl_window']:+.3f} nats; need >= 70%); (c) {c_text} (both need to be induction "
                 f"heads).")


def _share_info(ev: dict | None) -> list[str]:
    """INFO: every head's share of the ICL score on each path, the share of the phase change it undoes, and what
    it adds when ablated together with the induction heads, each with its bootstrap standard error."""
    if ev is None or not ev["paths"]:
        return []
    paths = [p for p in PATHS if p in ev["paths"]]
    cells = []
    for i, lab in enumerate(ev["labels"]):
        cells.append(f"{lab}{'*' if lab in ev['induction'] else ''} "
                     + " / ".join(f"{ev['paths'][p]['share'][i]:+.0%} ± {ev['paths'][p]['se'][i]:.0%}"
                                  for p in paths))
    lines = [f"INFO share of the ICL score removed by each head at step {ev['step']} ({' / '.join(paths)} paths; "
             f"* induction head): " + ", ".join(cells) + "."]
    undone = [p for p in paths if ev["paths"][p]["undone"] is not None]
    if undone:
        lines.append(f"INFO share of the phase change (steps {ev['before']} -> {ev['after']}) undone by each head "
                     f"({' / '.join(undone)} paths): " + ", ".join(
                         f"{lab} " + " / ".join(f"{ev['paths'][p]['undone'][i]:+.0%}" for p in undone)
                         for i, lab in enumerate(ev["labels"])) + ".")
    if ev["joint"] and ev["induction"]:
        lines.append(f"INFO share each other head adds when ablated together with the induction heads "
                     f"({', '.join(ev['induction'])}; total path, paired standard error): " + ", ".join(
                         f"{lab} {ev['joint']['added'][i]:+.0%} ± {ev['joint']['se'][i]:.0%}"
                         for i, lab in enumerate(ev["labels"]) if lab not in ev["induction"]) + ".")
    return lines


PREVIOUS_TOKEN = 0.4  # check 5 (a): a previous-token head attends more than this to the position before
BASELINE_FACTOR = 2.0  # check 5 (b) and the V-composition INFO: a composition this many times the random baseline


def check5(two: RunResults, window: dict) -> list[str]:
    """Check 5 (Argument 5, the mechanism) and its INFO lines, from the composition scores of the last snapshot:
    (a) each induction head's strongest K-composition partner among the heads below it is a previous-token head;
    (b) that score is >= `BASELINE_FACTOR` x the random baseline."""
    title = "5. Mechanism (Argument 5)"
    step = int(two.steps[-1]) if len(two.steps) else None
    k_LHLH = None if step is None else two.composition_at(step, "k")
    if k_LHLH is None:
        return [_line(False, f"{title}: no composition scores at the last analysed snapshot.")]
    base = two.composition_baseline
    ind_LH = two.induction_mask()
    prev_LH = two.measure("previous_token")[-1]
    induction = [(int(l), int(h)) for l, h in zip(*np.nonzero(ind_LH)) if l > 0]
    if not induction:
        return [_line(False, f"{title}: at step {step} no induction head above layer 0 to compose with.")]
    parts, partners, prev_ok, base_ok = [], [], [], []
    for l2, h2 in induction:
        (l1, h1), score = composition.strongest_partner(k_LHLH, l2, h2)
        partners.append(((l1, h1), (l2, h2)))
        prev_ok.append(bool(prev_LH[l1, h1] > PREVIOUS_TOKEN))
        base_ok.append(bool(score >= BASELINE_FACTOR * base))
        parts.append(f"{l2}.{h2} <- {l1}.{h1} (K-composition {score:.3f} = {score / base:.2f}x the baseline; "
                     f"previous-token score {prev_LH[l1, h1]:.2f})")
    lines = [_line(all(prev_ok) and all(base_ok),
                   f"{title}: at step {step}, each induction head's strongest K-composition partner below it: "
                   f"{', '.join(parts)}; (a) is a previous-token head (need > {PREVIOUS_TOKEN}): "
                   f"{'yes' if all(prev_ok) else 'no'}; (b) composes at >= {BASELINE_FACTOR:g}x the random baseline "
                   f"of the same shapes ({base:.3f}): {'yes' if all(base_ok) else 'no'}.")]
    ceiling_LHLH = two.composition_at(step, "k", ceiling=True)
    lines.append("INFO each partner's K-composition against its alignment ceiling (the score its two circuits "
                 "would reach with their singular values, were their singular directions aligned; "
                 f"{BASELINE_FACTOR:g}x the baseline as a share of it): " + "; ".join(
                     f"{l1}.{h1} -> {l2}.{h2} {k_LHLH[l1, h1, l2, h2]:.3f} of {ceiling_LHLH[l1, h1, l2, h2]:.3f} "
                     f"({k_LHLH[l1, h1, l2, h2] / ceiling_LHLH[l1, h1, l2, h2]:.0%}; "
                     f"{BASELINE_FACTOR * base / ceiling_LHLH[l1, h1, l2, h2]:.0%})"
                     for (l1, h1), (l2, h2) in partners) + ".")
    steps = list(two.composition_steps)
    i, j = int(two.steps[window["i"]]), int(two.steps[window["j"]])
    if i in steps and j in steps and len(steps) > 1:
        k_S = two.composition[:, composition.MODES.index("k")]
        rises = []
        for (l1, h1), (l2, h2) in partners:
            pair_S = k_S[:, l1, h1, l2, h2]
            rise = pair_S[-1] - pair_S[0]
            inside = pair_S[steps.index(j)] - pair_S[steps.index(i)]
            rises.append(f"{l1}.{h1} -> {l2}.{h2} {pair_S[0]:.3f} -> {pair_S[-1]:.3f}, "
                         + (f"{inside / rise:.0%} of the rise" if rise > 0 else "no rise")
                         + f" between steps {i} and {j}")
        lines.append("INFO K-composition over training (first -> last snapshot; the share inside check 1's "
                     "window is a finding, not a check): " + "; ".join(rises) + ".")
    scores = {mode: two.composition_at(step, mode) for mode in composition.MODES}
    for l2, h2 in induction:
        cells = [f"{l1}.{h1} " + "/".join(f"{scores[m][l1, h1, l2, h2]:.2f}" for m in composition.MODES)
                 for l1 in range(l2) for h1 in range(k_LHLH.shape[1])]
        lines.append(f"INFO composition into {l2}.{h2} at step {step} (Q/K/V; baseline {base:.3f}): "
                     + ", ".join(cells) + ".")
    feeders = [f"{l1}.{h1} -> {l2}.{h2} ({scores['v'][l1, h1, l2, h2]:.2f})" for l2, h2 in induction
               for l1 in range(l2) for h1 in range(k_LHLH.shape[1])
               if scores["v"][l1, h1, l2, h2] >= BASELINE_FACTOR * base]
    lines.append(f"INFO heads feeding an induction head through its values (V-composition >= "
                 f"{BASELINE_FACTOR:g}x baseline): " + (", ".join(feeders) or "none") + ".")
    return lines


def demo_checks(two: RunResults, one: RunResults, smeared: RunResults, ablation: dict | None,
                bump: dict | None, pivot: dict | None) -> list[str]:
    """The PASS/FAIL lines of checks 1-5 (docs/method.md §6) and INFO lines, from measured results only.

    `ablation` is `ablation_evidence(two, ...)`; `bump` is `loss_bump` of the 2-layer training loss; `pivot` is
    `pca_pivot` of the 2-layer trajectory against the 1-layer one."""
    lines = []
    w = best_window(two)
    imp2 = improvement(two)
    win = (w["start_tokens"], w["end_tokens"])
    ok_a = w["qualifies"] and imp2 > 0
    big = w["largest"]
    largest_text = "" if (big["i"], big["j"]) == (w["i"], w["j"]) else (
        f" (the largest share in such a span: {big['share']:.0%} between {big['start_tokens']:,.0f} and "
        f"{big['end_tokens']:,.0f} tokens, prefix matching {big['pm_start']:.2f} -> {big['pm_end']:.2f})")

    def inside(found):
        return found is not None and win[0] <= found["tokens"] <= win[1]

    bump_text = "none found" if bump is None else \
        f"{bump['tokens']:,.0f} tokens ({bump['excess_nats']:.3f} nats below the power law fitted before it)"
    pivot_text = "none found" if pivot is None else (f"{pivot['tokens']:,.0f} tokens (separation "
                                                     f"{pivot['separation_before']:.2f} -> "
                                                     f"{pivot['separation_after']:.2f})")
    lines.append(_line(ok_a and inside(bump) and inside(pivot),
                       f"1. Phase change (Argument 1): (a) {w['share']:.0%} of the 2-layer model's ICL improvement "
                       f"({imp2:+.3f} nats) happens between {win[0]:,.0f} and {win[1]:,.0f} tokens ({w['span']:.0%} "
                       f"of training; need >= 60% within <= 30%); max prefix matching there {w['pm_start']:.2f} -> "
                       f"{w['pm_end']:.2f} (need < 0.2 -> > 0.5){largest_text}; (b) training-loss bump at {bump_text}: "
                       f"{'inside' if inside(bump) else 'not inside'} the window; (c) PCA pivot (the 2-layer "
                       f"trajectory leaves the 1-layer one) at {pivot_text}: "
                       f"{'inside' if inside(pivot) else 'not inside'} the window."))
    imp1 = improvement(one)
    pm1 = float(np.nanmax(one.measure("prefix_matching")))
    ok2 = imp2 > 0 and imp1 <= imp2 / 3 and pm1 <= 0.3
    lines.append(_line(ok2, f"2. One layer is not enough (Argument 2): 1-layer ICL improvement {imp1:+.3f} nats vs "
                            f"2-layer {imp2:+.3f} (ratio {imp1 / imp2 if imp2 else float('nan'):.2f}; need a 2-layer "
                            f"improvement > 0 and a ratio <= 1/3); its "
                            f"max prefix matching {pm1:.2f} (need <= 0.3)."))
    imps = improvement(smeared)
    pms = float(np.nanmax(smeared.measure("prefix_matching")))
    ok3 = imp2 > 0 and imps >= 2 * imp2 / 3 and pms > 0.5
    lines.append(_line(ok3, f"3. Smeared key (Argument 2): 1-layer smeared-key ICL improvement {imps:+.3f} nats vs "
                            f"2-layer {imp2:+.3f} (ratio {imps / imp2 if imp2 else float('nan'):.2f}; need a 2-layer "
                            f"improvement > 0 and a ratio >= 2/3); its "
                            f"max prefix matching {pms:.2f} (need > 0.5)."))
    lines.append(_check4(ablation, two.run.config.eval))
    lines += _share_info(ablation)
    lines += check5(two, w)
    return lines


def demo_lines(two: RunResults, one: RunResults, smeared: RunResults) -> list[str]:
    """Every line of the demo's checks section, from the results of the 2-layer and 1-layer attention-only runs and
    the 1-layer smeared-key run: checks 1-5 with their INFO lines (`demo_checks`), judged on the 2-layer run's
    training loss (the bump within its constant learning rate), the joint PCA of the three runs (the pivot), its
    ablations at the ends of check 1's window (the evidence), and the copying INFO lines of its last snapshot."""
    w = best_window(two)
    before, after = int(two.steps[w["i"]]), int(two.steps[w["j"]])
    tok_tr, loss_tr, lr_tr = training_loss(two.run.path)
    start, end = constant_lr_span(tok_tr, lr_tr)
    bump = loss_bump(tok_tr, loss_tr, start, end)
    proj, _ = joint_pca([two, one, smeared])
    pivot = pca_pivot(two.tokens, proj[0], one.tokens, proj[1])
    evidence = ablation_evidence(two, before, after)
    lines = demo_checks(two, one, smeared, evidence, bump, pivot)
    run2 = two.run
    ranks = heads.copying_rank(run2.model, run2.params(int(two.steps[-1])), run2.config.eval,
                               heads.pool_sampler(run2.eval_set.pool_P), run2.eval_set.bos_id,
                               np.random.default_rng(run2.config.data.eval_seed + 1))
    lines += copying_info(two, ranks, run2.config.model.vocab_size)
    return lines
