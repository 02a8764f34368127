"""The CPU demo's checks of the paper's Arguments 1-3, computed from measured results (PASS/FAIL with numbers).

ICL improvement = ICL score at the first snapshot minus at the last (positive = the run learned to use context),
using the ±window-averaged score (single indices are too noisy on a small eval set; DESIGN.md §3).
"""

from __future__ import annotations

import numpy as np

from .report import RunResults


def improvement(r: RunResults) -> float:
    return float(r.icl_window[0] - r.icl_window[-1])


def best_window(r: RunResults, max_share: float = 0.3) -> dict:
    """Among windows of snapshots spanning at most `max_share` of the training tokens, the one holding the largest
    share of the run's ICL improvement; with the max prefix-matching score at its two ends."""
    t, icl = r.tokens, r.icl_window
    total = improvement(r)
    pm_S = np.nanmax(r.measure("prefix_matching").reshape(len(t), -1), axis=1)
    span = max_share * (t[-1] - t[0]) if len(t) > 1 else 0.0
    best = {"share": float("-inf"), "i": 0, "j": 0}
    for i in range(len(t)):
        for j in range(i + 1, len(t)):
            if t[j] - t[i] > span + 1e-9:
                break
            share = (icl[i] - icl[j]) / total if total > 0 else 0.0
            if share > best["share"]:
                best = {"share": float(share), "i": i, "j": j}
    i, j = best["i"], best["j"]
    best.update(start_tokens=float(t[i]), end_tokens=float(t[j]), pm_start=float(pm_S[i]), pm_end=float(pm_S[j]),
                span=float((t[j] - t[i]) / max(t[-1] - t[0], 1)))
    return best


def _line(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'} {text}"


def loss_bump_tokens(tokens, loss) -> float | None:
    """Where the smoothed training loss falls fastest against log tokens after the first 5% of training."""
    tokens, loss = np.asarray(tokens, float), np.asarray(loss, float)
    if len(loss) < 20:
        return None
    k = max(len(loss) // 50, 1)
    ls = np.convolve(loss, np.ones(k) / k, mode="valid")
    ts = tokens[k - 1:]
    start = int(0.05 * len(ts))
    slope = np.gradient(ls[start:], np.log(np.maximum(ts[start:], 1)))
    return float(ts[start + int(np.argmin(slope))])


def pca_pivot_tokens(tokens, xy_S2) -> float | None:
    """The snapshot where the PCA trajectory turns most sharply (largest angle between successive moves)."""
    xy = np.asarray(xy_S2, float)
    if len(xy) < 3:
        return None
    d = np.diff(xy, axis=0)
    ang = []
    for a, b in zip(d[:-1], d[1:]):
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        ang.append(np.arccos(np.clip(a @ b / (na * nb), -1, 1)) if na > 0 and nb > 0 else 0.0)
    return float(tokens[1 + int(np.argmax(ang))])


def copying_info(r: RunResults, ranks: dict, vocab: int, n: int = 2) -> list[str]:
    """INFO lines for the `n` heads with the highest prefix matching at the last snapshot: their copying score next
    to `heads.copying_rank` (how often the token a head reads is its top direct-path logit), which shows whether a
    low copying score means the head does not copy or that its other logits are noisy."""
    pm_LH, cp_LH = r.measure("prefix_matching")[-1], r.measure("copying")[-1]
    order = np.argsort(-np.nan_to_num(pm_LH, nan=-1.0), axis=None)[:n]
    lines = []
    for flat in order:
        l, h = np.unravel_index(flat, pm_LH.shape)
        lines.append(f"INFO head {l}.{h} at step {int(r.steps[-1])}: prefix matching {pm_LH[l, h]:.2f}, copying "
                     f"{cp_LH[l, h]:+.2f}; the token it reads is its top direct-path logit for "
                     f"{ranks['top1'][l, h]:.0%} of sources (median rank {ranks['median_rank'][l, h]:.0f} of "
                     f"{vocab}).")
    return lines


def demo_checks(two: RunResults, one: RunResults, smeared: RunResults, ablation: dict | None,
                extras: dict) -> list[str]:
    lines = []
    w = best_window(two)
    imp2 = improvement(two)
    ok1 = w["share"] >= 0.6 and w["span"] <= 0.3 and w["pm_start"] < 0.2 and w["pm_end"] > 0.5 and imp2 > 0
    lines.append(_line(ok1, f"1. Phase change (Argument 1): {w['share']:.0%} of the 2-layer model's ICL improvement "
                            f"({imp2:+.3f} nats) happens between {w['start_tokens']:,.0f} and {w['end_tokens']:,.0f} "
                            f"tokens ({w['span']:.0%} of training; need >= 60% within <= 30%); max prefix matching "
                            f"there {w['pm_start']:.2f} -> {w['pm_end']:.2f} (need < 0.2 -> > 0.5)."))
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
    if ablation is None:
        lines.append(_line(False, "4. Ablation (Argument 3): no ablation results for the 2-layer model."))
    else:
        clean = ablation["clean_icl"]
        ind = ablation["induction"]
        share = -ablation["induction_delta_icl"] / clean if clean < 0 else float("nan")
        others = [(f"{l}.{h}", -d / clean if clean < 0 else float("nan"))
                  for (l, h), d in zip(ablation["heads"], ablation["delta_icl"]) if not ind[l][h]]
        worst = max(others, key=lambda x: x[1]) if others else ("none", 0.0)
        names = ", ".join(f"{l}.{h}" for l in range(len(ind)) for h in range(len(ind[l])) if ind[l][h]) or "none"
        ok4 = bool(names != "none" and share >= 0.7 and worst[1] <= 0.1)
        lines.append(_line(ok4, f"4. Ablation (Argument 3): at step {ablation['step']}, pattern-preserving ablation "
                                f"of the induction heads ({names}) removes {share:.0%} of the ICL score "
                                f"({clean:+.3f} nats; need >= 70%); the largest share removed by any other single "
                                f"head is {worst[1]:.0%} ({worst[0]}; need <= 10%)."))
    win = (w["start_tokens"], w["end_tokens"])
    for name, tok in extras.items():
        where = "n/a" if tok is None else ("inside" if win[0] <= tok <= win[1] else "outside")
        lines.append(f"INFO {name}: {'n/a' if tok is None else f'{tok:,.0f} tokens'} ({where} the window "
                     f"{win[0]:,.0f}-{win[1]:,.0f}).")
    return lines
