"""`python -m induction_jax.demo`: the CPU demo."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from . import cli, model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m induction_jax.demo", description=__doc__)
    cli.add_config_args(parser, default="configs/cpu/attn_only_2l.yaml")
    parser.add_argument("--check-only", action="store_true", help="validate the config and exit")
    args = parser.parse_args(argv)
    cfg = cli.config_from_args(args)
    if args.check_only:
        return 0
    params = model.init_params(cfg.model, jax.random.key(cfg.train.seed))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, cfg.model.context)))
    loss = model.token_losses(model.make(cfg.model).apply({"params": params}, tokens), tokens).mean()
    print(f"{args.config}: {model.count_params(cfg.model):,} parameters "
          f"({model.count_params(cfg.model, embedding=False):,} non-embedding); "
          f"loss of one forward pass on random tokens: {float(loss):.4f} (ln V = {np.log(cfg.model.vocab_size):.4f})")
    return 0


if __name__ == "__main__":
    cli.run(main)
