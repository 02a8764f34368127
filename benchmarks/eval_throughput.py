"""Eval throughput (per-token losses, forward only) against the training step on the same config and machine,
and the head evaluators' time per snapshot.

    python benchmarks/eval_throughput.py [--config configs/cpu/attn_only_2l.yaml] [key=value ...]

Random tokens and a freshly initialised model stand in for the eval set and a snapshot (speed does not depend
on the values). Target: eval >= 2.5x the training step's tokens/s, as there is no backward pass.
"""

from __future__ import annotations

import argparse

from cpu_peers import pinned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/cpu/attn_only_2l.yaml")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--cores", type=int, default=1, help="pin the process to its first N cores")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    pin = pinned(args.cores)  # before jax starts: its CPU threads then stay on these cores
    if pin:
        pin()

    import jax
    import numpy as np

    from timing import best_time

    from induction_jax.base import config
    from induction_jax.measures import evaluate, heads
    from induction_jax.model import model as model_lib
    from induction_jax.training import sharding, step

    cfg = config.load(args.config, args.overrides)
    m = cfg.model
    rng = np.random.default_rng(0)
    mesh = sharding.make_mesh(config.MeshConfig(1, 1, 1), jax.devices()[:1])
    trainer = step.build(cfg, mesh)
    state = trainer.init_fn(jax.random.key(0))
    batch = jax.device_put(rng.integers(0, m.vocab_size, (cfg.train.batch_size, m.context), dtype=np.int32),
                           trainer.batch_sharding)

    def train_steps():
        nonlocal state
        for _ in range(args.train_steps):
            state, out = trainer.step_fn(state, batch)
        jax.block_until_ready(out)

    train_tps = args.train_steps * trainer.tokens_per_step / best_time(train_steps, 1)
    params = jax.device_get(state["params"])
    model = model_lib.make(m)
    tokens = rng.integers(0, m.vocab_size, (args.examples, m.context), dtype=np.int32)
    eval_s = best_time(lambda: evaluate.per_token_losses(model, params, tokens, cfg.eval.batch_size))
    eval_tps = tokens.size / eval_s
    sample = heads.uniform_sampler(m.vocab_size)
    t_prefix = best_time(lambda: heads.prefix_matching(model, params, cfg.eval, sample, 0, 0))
    t_copy = best_time(lambda: heads.copying(model, params, cfg.eval, sample, 0, 0))
    prev_tokens = tokens[:64]
    t_prev = best_time(lambda: heads.previous_token(model, params, prev_tokens, cfg.eval.batch_size))
    prev = heads.previous_token(model, params, prev_tokens, cfg.eval.batch_size)
    t_qk = best_time(lambda: heads.qk_trace(params, m, prev))
    print(f"config {args.config}; {jax.device_count()} device(s), {jax.devices()[0].device_kind}")
    print(f"{'measure':44s} {'value':>14s}")
    print(f"{'train step tokens/s':44s} {train_tps:14,.0f}")
    print(f"{'eval (per-token losses) tokens/s':44s} {eval_tps:14,.0f}")
    print(f"{'eval / train':44s} {eval_tps / train_tps:14.2f}x")
    print(f"{'eval set of %d x %d: seconds' % tokens.shape:44s} {eval_s:14.2f}")
    for name, t in [("prefix matching", t_prefix), ("copying", t_copy), ("previous token (64 windows)", t_prev),
                    ("QK trace", t_qk)]:
        print(f"{'head evaluator: ' + name + ' (s/snapshot)':44s} {t:14.3f}")
    print(f"{'all head evaluators (s/snapshot)':44s} {t_prefix + t_copy + t_prev + t_qk:14.3f}")


if __name__ == "__main__":
    main()
