"""Where one CPU core's train step spends its time, and what the blocked attention's settings are worth there.

    python benchmarks/step_profile.py [--config configs/cpu/attn_only_2l.yaml] [--cores 1] [key=value ...]

The process pins itself to its first `--cores` cores (`cpu_peers.pinned`) before jax starts: XLA:CPU's
`--xla_cpu_multi_thread_eigen=false` and `intra_op_parallelism_threads=1` do not keep it off a second core.

Prints
- forward, forward + backward and the whole AdamW step (ms, best of `--repeats`);
- the step with the blocked attention's query block (`model.attention_block` 64 and 128) and its backward's pattern
  residual (kept from the forward, or recomputed from the log-sum-exp: `attention.SAVED_PATTERN_BYTES` 0), timed
  in turns in this process, with each one's ratio to the first;
- a jax.profiler trace of `--trace-steps` steps, each XLA op's time grouped by what it computes (from the op's
  source metadata and shape): matmuls or the elementwise and layout work around them; attention core (the
  [B, H, T, *] work), Q/K/V/O projections, LayerNorms and residual adds, the unembedding and its cross-entropy,
  the optimizer; forward or backward.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

from cpu_peers import pinned


def _part(op_name: str, rank: int) -> str:
    if "Transformer" not in op_name:
        return "optimizer"
    if "/attn/" in op_name:
        return "attention core" if rank >= 4 else "Q/K/V/O projections"
    if "unembed" in op_name or "_layers" not in op_name:
        return "unembedding + cross-entropy"
    return "LayerNorm, residual"


def _ops(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """instruction name -> (part, matmul or elementwise, forward / backward / update). A fusion counts as a matmul
    when its fused computation holds a dot (XLA:CPU's library fusions also take reductions)."""
    with_dot, computation = set(), None
    for line in hlo_text.splitlines():
        head = re.match(r"%?([\w.\-]+) .*\{$", line)
        if head:
            computation = head.group(1)
        elif re.search(r" (dot|convolution)\(", line) and computation:
            with_dot.add(computation)
    ops = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]\S* (\w[\w-]*)\(", line)
        if not m:
            continue
        name, dims, opcode = m.groups()
        meta = re.search(r'op_name="([^"]*)"', line)
        op_name = meta.group(1) if meta else ""
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        matmul = opcode in ("dot", "convolution") or (opcode == "fusion" and calls and calls.group(1) in with_dot)
        rank = len(dims.split(",")) if dims else 0
        phase = "backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else "update"
        ops[name] = (_part(op_name, rank), "matmul" if matmul else "elementwise, layout", phase)
    return ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/cpu/attn_only_2l.yaml")
    ap.add_argument("--cores", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="turns over the attention settings")
    ap.add_argument("--trace-steps", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    pin = pinned(args.cores)
    if pin:
        pin()

    import jax
    import numpy as np

    from timing import best_time

    from induction_jax.base import config
    from induction_jax.model import attention
    from induction_jax.model import model as model_lib
    from induction_jax.training import sharding, step

    cfg = config.load(args.config, args.overrides)
    m = cfg.model
    mesh = sharding.make_mesh(config.MeshConfig(1, 1, 1), jax.devices()[:1])
    tokens = np.random.default_rng(0).integers(0, m.vocab_size, (cfg.train.batch_size, m.context), dtype=np.int32)
    n_tokens = tokens.size
    print(f"{' '.join([args.config, *args.overrides])}: batch {cfg.train.batch_size} x {m.context}, "
          f"{args.cores} core(s), jax {jax.__version__}")

    def stepper(overrides: list[str], saved_bytes: int):
        """A step function with its own state, traced with SAVED_PATTERN_BYTES = saved_bytes."""
        c = config.load(args.config, args.overrides + overrides)
        trainer = step.build(c, mesh)
        state = [trainer.init_fn(jax.random.key(0))]
        batch = jax.device_put(tokens, trainer.batch_sharding)
        kept, attention.SAVED_PATTERN_BYTES = attention.SAVED_PATTERN_BYTES, saved_bytes
        try:
            state[0], metrics = trainer.step_fn(state[0], batch)  # trace and compile now
            jax.block_until_ready(metrics)
        finally:
            attention.SAVED_PATTERN_BYTES = kept

        def run():
            state[0], metrics = trainer.step_fn(state[0], batch)
            return metrics
        return run, trainer, state, batch

    model = model_lib.make(m)
    params = model_lib.init_params(m, jax.random.key(0))
    loss = jax.jit(lambda p, t: step.loss_fn(p, model, t))
    grad = jax.jit(jax.value_and_grad(lambda p, t: step.loss_fn(p, model, t)))
    t_fwd = best_time(lambda: loss(params, tokens), args.repeats)
    t_grad = best_time(lambda: grad(params, tokens), args.repeats)
    run, trainer, state, batch = stepper([], attention.SAVED_PATTERN_BYTES)
    t_step = best_time(run, args.repeats)
    print(f"\nforward {t_fwd * 1e3:.1f} ms, forward + backward {t_grad * 1e3:.1f} ms (backward "
          f"{(t_grad - t_fwd) / t_fwd:.2f}x the forward), step {t_step * 1e3:.1f} ms = {n_tokens / t_step:,.0f} "
          "tokens/s")

    variants = [(f"block {b}, patterns {how}", [f"model.attention_block={b}"], nbytes)
                for b in (64, 128)
                for how, nbytes in (("kept", attention.SAVED_PATTERN_BYTES), ("recomputed", 0))]
    runs = [stepper(overrides, nbytes)[0] for _, overrides, nbytes in variants]
    best = [float("inf")] * len(runs)
    for _ in range(args.rounds):
        for i, fn in enumerate(runs):
            best[i] = min(best[i], best_time(fn, args.repeats))
    print("\n| blocked attention | ms/step | tokens/s | vs. first |\n|---|---|---|---|")
    for (label, _, _), t in zip(variants, best):
        print(f"| {label} | {t * 1e3:.1f} | {n_tokens / t:,.0f} | {best[0] / t:.2f}x |")

    ops = _ops(trainer.step_fn.lower(state[0], batch).compile().as_text())
    with tempfile.TemporaryDirectory(prefix="step_profile_") as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.trace_steps):
                jax.block_until_ready(run())
        events = json.load(gzip.open(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    ms = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("name") in ops:
            ms[ops[e["name"]]] += e.get("dur", 0) / 1e3 / args.trace_steps
    total = sum(ms.values())
    print(f"\nXLA ops per step (trace of {args.trace_steps} steps; their sum {total:.1f} ms):\n")
    print("| part | kind | forward ms | backward ms | update ms | share |\n|---|---|---|---|---|---|")
    by_part = collections.Counter()
    for (part, kind, _), v in ms.items():
        by_part[(part, kind)] += v
    for (part, kind), v in by_part.most_common():
        cells = " | ".join(f"{ms[(part, kind, phase)]:.1f}" for phase in ("forward", "backward", "update"))
        print(f"| {part} | {kind} | {cells} | {v / total:.0%} |")

if __name__ == "__main__":
    main()
