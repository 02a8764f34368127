"""Phase-adaptive snapshots (`snapshots.adaptive`): extra snapshots while the live probe moves fast.

At each live probe the rates of the ICL score and of the largest prefix-matching score are measured between the
first and the last of the last `window` probes, in units per million training tokens. A rate above its threshold
starts (or prolongs) a dense stretch: every multiple of `every` is snapshotted until `settle` consecutive probes
find every watched rate below its threshold. Snapshots of the base schedule stay; at most `budget` extra ones are
taken over the whole run.

Each decision is a function of the probe values alone, in step order: `extra_steps` replays them from a run's
metrics.jsonl, and `AdaptiveSchedule` is the same state machine run step by step by the trainer, whose state
travels in every resume checkpoint, so a resumed run takes exactly the snapshots of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..base.config import AdaptiveConfig

TOKENS_PER_RATE = 1e6  # rates are per million tokens


def rates(window: Sequence[tuple[int, float, float]], tokens_per_step: int) -> tuple[float, float]:
    """(|ICL change|, |max prefix-matching change|) per million tokens between the first and the last probe of
    `window`, a sequence of (step, icl, prefix_max)."""
    (s0, icl0, pm0), (s1, icl1, pm1) = window[0], window[-1]
    mtok = (s1 - s0) * tokens_per_step / TOKENS_PER_RATE
    return abs(icl1 - icl0) / mtok, abs(pm1 - pm0) / mtok


class AdaptiveSchedule:
    """The dense-or-not state after each probe, and the budget spent; `observe` each probe, then `take` each step
    (the probe of a step comes first, so the probe that finds the change already snapshots its own step)."""

    def __init__(self, cfg: AdaptiveConfig, base_steps: Iterable[int], tokens_per_step: int,
                 state: dict | None = None):
        self.cfg = cfg
        self.base = frozenset(base_steps)
        self.tokens_per_step = tokens_per_step
        state = state or {}
        self.history: list[tuple[int, float, float]] = [tuple(p) for p in state.get("history", [])]
        self.dense = bool(state.get("dense", False))
        self.calm = int(state.get("calm", 0))
        self.used = int(state.get("used", 0))
        self.taken: list[int] = []  # extra steps taken by this object (not part of the state)

    def fast(self) -> bool:
        """Whether the rates over the last `window` probes exceed a watched threshold."""
        if len(self.history) < self.cfg.window:
            return False
        icl, prefix = rates(self.history[-self.cfg.window:], self.tokens_per_step)
        # NaN (a diverging run) compares False: it never densifies
        return bool((self.cfg.icl_rate and icl > self.cfg.icl_rate)
                    or (self.cfg.prefix_rate and prefix > self.cfg.prefix_rate))

    def observe(self, step: int, icl: float, prefix_max: float) -> None:
        if self.history and step <= self.history[-1][0]:
            raise ValueError(f"adaptive snapshots: probe of step {step} after one of step {self.history[-1][0]}")
        self.history = (self.history + [(int(step), float(icl), float(prefix_max))])[-self.cfg.window:]
        if self.fast():
            self.dense, self.calm = True, 0
        elif self.dense:
            self.calm += 1
            if self.calm >= self.cfg.settle:
                self.dense, self.calm = False, 0

    def take(self, step: int) -> bool:
        """Whether `step` is an extra snapshot; spends the budget when it is. Call once per step."""
        if not (self.dense and step % self.cfg.every == 0 and step not in self.base and self.used < self.cfg.budget):
            return False
        self.used += 1
        self.taken.append(step)
        return True

    def state(self) -> dict:
        """JSON-ready state, exact: Python floats round-trip through JSON unchanged."""
        return {"history": [list(p) for p in self.history], "dense": self.dense, "calm": self.calm,
                "used": self.used}


def extra_steps(cfg: AdaptiveConfig, base_steps: Iterable[int], probes: Iterable[tuple[int, float, float]],
                tokens_per_step: int, total_steps: int) -> list[int]:
    """The extra snapshot steps a run takes, from its probes (step, icl, prefix_max), as the trainer decides them."""
    by_step = {int(s): (s, icl, pm) for s, icl, pm in probes}
    sched = AdaptiveSchedule(cfg, base_steps, tokens_per_step)
    for step in sorted(set(range(cfg.every, total_steps + 1, cfg.every)) | set(by_step)):
        if step in by_step:
            sched.observe(*by_step[step])
        sched.take(step)
    return sched.taken


def logged_probes(records: Iterable[dict]) -> list[tuple[int, float, float]]:
    """(step, icl, prefix_max) of every live-probe record of a metrics log, in step order."""
    out = {int(r["step"]): (int(r["step"]), float(r["probe_icl"]), float(r["probe_max_prefix"]))
           for r in records if "probe_icl" in r and "probe_max_prefix" in r}
    return [out[s] for s in sorted(out)]
