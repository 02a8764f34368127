"""Head-ablation throughput: (a) the vmapped job (one mask per lane, from the first ablated layer, patterns
frozen), (b) a Python loop over heads calling the jitted single-mask function (clean run + ablated run per call),
(c) H clean forward passes — on the same model, eval batch and machine, in one run.

    python benchmarks/ablation_throughput.py [--config configs/cpu/attn_only_2l.yaml] [--examples 64]
"""

from __future__ import annotations

import argparse

from cpu_peers import pinned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/cpu/attn_only_2l.yaml")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cores", type=int, default=1, help="pin the process to its first N cores")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    pin = pinned(args.cores)  # before jax starts: its CPU threads then stay on these cores
    if pin:
        pin()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from timing import best_time

    from induction_jax.base import config
    from induction_jax.measures import ablation
    from induction_jax.model import crossentropy
    from induction_jax.model import model as model_lib

    cfg = config.load(args.config, args.overrides)
    m = cfg.model
    model = model_lib.make(m)
    params = model_lib.init_params(m, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, m.vocab_size, (args.examples, m.context), dtype=np.int32)
    masks = ablation.single_head_masks(m.n_layers, m.n_heads)
    h = len(masks)
    batches = [jnp.asarray(tokens[i: i + args.batch]) for i in range(0, len(tokens), args.batch)]

    def vmapped():
        return [ablation.ablated_losses(model, params, b, masks) for b in batches]

    def loop():
        return [[ablation.single_mask_losses(model, params, b, jnp.asarray(mk)) for mk in masks] for b in batches]

    fwd = jax.jit(lambda p, t: crossentropy.token_losses(model.apply({"params": p}, t), t))

    def clean():
        return [[fwd(params, b) for _ in range(h)] for b in batches]

    ta, tb, tc = best_time(vmapped), best_time(loop), best_time(clean)
    n_tok = tokens.size
    print(f"config {args.config}; {h} heads; {args.examples} x {m.context} eval tokens in batches of {args.batch}")
    print(f"{'job':52s} {'seconds':>8s} {'head-evals/s':>13s}")
    for name, t in [("(a) vmapped, from first ablated layer, frozen patterns", ta),
                    ("(b) Python loop of jitted single-mask calls", tb), ("(c) H clean forward passes", tc)]:
        print(f"{name:52s} {t:8.2f} {h * n_tok / t:13,.0f}")
    print(f"(b)/(a) = {tb / ta:.2f}x   (a)/(c) = {ta / tc:.2f}")


if __name__ == "__main__":
    main()
