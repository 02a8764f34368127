"""Loader tokens/s next to the training step's tokens/s, measured in one run (target: loader >= 20x).

    python benchmarks/data_throughput.py [--config configs/cpu/attn_only_2l.yaml] [--steps 2000] [key=value ...]

The training step is timed here directly (jitted value_and_grad of the mean `model.token_losses` plus an
optax.adamw update) so the comparison does not depend on the trainer's other work.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from induction_jax import data, model  # noqa: E402
from induction_jax.config import ConfigError, load  # noqa: E402


def loader_rate(loader: data.Loader, steps: int, sharding=None) -> float:
    """Tokens/s of global batches (host arrays, or device arrays when a sharding is given)."""
    fetch = loader.global_batch if sharding is None else (lambda s: loader.device_batch(s, sharding))
    fetch(0)
    t0 = time.perf_counter()
    for step in range(steps):
        out = fetch(step)
    jax.block_until_ready(out)
    return steps * loader.batch_size * loader.seq_len / (time.perf_counter() - t0)


def train_rate(cfg, tokens_BT: np.ndarray, steps: int) -> float:
    """Tokens/s of the jitted forward + backward + AdamW update on one fixed batch."""
    params = model.init_params(cfg.model, jax.random.key(0))
    net = model.make(cfg.model)
    opt = optax.adamw(cfg.train.lr, b1=cfg.train.b1, b2=cfg.train.b2, weight_decay=cfg.train.weight_decay)

    @jax.jit
    def step(params, opt_state, tokens_BT):
        def loss_fn(p):
            return model.token_losses(net.apply({"params": p}, tokens_BT), tokens_BT).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = (params, opt.init(params))
    batch = jnp.asarray(tokens_BT)
    jax.block_until_ready(step(*state, batch))  # compile
    t0 = time.perf_counter()
    for _ in range(steps):
        *state, loss = step(*state, batch)
    jax.block_until_ready(loss)
    return steps * tokens_BT.size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cpu/attn_only_2l.yaml")
    parser.add_argument("--steps", type=int, default=2000, help="loader steps timed")
    parser.add_argument("--train-steps", type=int, default=10, help="training steps timed")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
        prepared = data.prepare(cfg)
        loader = data.Loader(prepared, cfg.model.context, cfg.train.batch_size, cfg.data.seed)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,))
    host = loader_rate(loader, args.steps)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    to_device = loader_rate(loader, args.steps, batch_sharding)
    train = train_rate(cfg, loader.global_batch(0), args.train_steps)
    b, t = cfg.train.batch_size, cfg.model.context
    print(f"config {args.config}: batch {b} x {t} tokens, {jax.devices()[0].platform} x{jax.device_count()}, "
          f"{prepared.metadata['tokens']['train']:,} train tokens")
    print(f"| {'measured':<34} | {'tokens/s':>12} | {'x train step':>12} |")
    print(f"|{'-' * 36}|{'-' * 14}|{'-' * 14}|")
    for name, rate in [("loader.global_batch (host)", host), ("loader.device_batch (1 device)", to_device),
                       ("train step (value_and_grad+adamw)", train)]:
        print(f"| {name:<34} | {rate:>12,.0f} | {rate / train:>12.1f} |")
    verdict = "ok" if host >= 20 * train else "TOO SLOW"
    print(f"loader / train step = {host / train:.0f}x (target >= 20x): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
