"""The CPU jobs a researcher compares, against PyTorch eager (TransformerLens's HookedTransformer) in the same run.

    python benchmarks/cpu_peers.py [--config configs/cpu/attn_only_2l.yaml] [--jobs train ablate loss]

Jobs, each on the same model shape (the config's; attention-only, shortformer positions, LayerNorm):
- train: one AdamW step on a batch of the config's batch size (tokens/s), at 1 and at 2 threads;
- ablate: the pattern-preserving ablation of every head, one at a time, on `--examples` windows of the full
  context, `--ablate-batch` windows per call (seconds; one row per batch size): ours is what `ablate` runs per
  snapshot (`ablation.ablate_eval_set`, all heads' lanes vmapped, with the ICL statistics it stores), the peer a
  hook loop that replaces every pattern with the clean run's and zeroes one head's z;
- loss: per-token losses of the eval windows (tokens/s).
`--threads` takes thread counts (1, 2) and, for our side, `DxT` layouts: `2x1` runs our job on 2 single-threaded
CPU devices in one process (the train batch, the ablation lanes and the loss batches split over them) against
the peer at 2 threads (measured once per job and core count, and shared by the "2" and "2x1" rows). Every child
is pinned to as many cores as its layout uses (cores 0..n-1, `sched_setaffinity`): XLA:CPU sizes its thread pool by
the cores it may run on and ignores `--xla_cpu_multi_thread_eigen=false`, so an unpinned "1 thread" child of ours
ran on both cores (16.2 s of CPU in 11.0 s).
The peer runs with glibc's default allocator, as a TransformerLens user's process does; `--peer-keep-heap` gives
it the settings `import induction_jax` makes (induction_jax/hostmem.py). Each figure is the best of `--rounds`
child processes, ours and the peer's alternating, each with its thread count fixed before its library starts
(torch and XLA never share a process: loaded together, XLA's step ran 1.6x slower). Without torch and
transformer_lens (the `tl` extra) the table has our column only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

from timing import timed

SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def ours(job: str, cfg, examples: int, batch: int):
    """(callable, work per call: tokens, or None when the figure is seconds), on every device of the process."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from induction_jax.base import config as config_lib
    from induction_jax.measures import ablation, evaluate
    from induction_jax.model import model as model_lib
    from induction_jax.training import sharding, step

    m = cfg.model
    rng = np.random.default_rng(0)
    mesh = sharding.make_mesh(config_lib.MeshConfig(data=-1, fsdp=1, tensor=1))  # the batch over every device
    if job == "train":
        trainer = step.build(cfg, mesh)
        state = [trainer.init_fn(jax.random.key(0))]
        tokens = jax.device_put(rng.integers(0, m.vocab_size, (cfg.train.batch_size, m.context), dtype=np.int32),
                                trainer.batch_sharding)

        def train():
            state[0], metrics = trainer.step_fn(state[0], tokens)
            jax.block_until_ready(metrics)
        return train, trainer.tokens_per_step
    model = model_lib.make(m)
    params = model_lib.init_params(m, jax.random.key(0))
    tokens = rng.integers(0, m.vocab_size, (examples, m.context), dtype=np.int32)
    if job == "loss":
        split = sharding.batch_sharding(mesh)
        return (lambda: evaluate.per_token_losses(model, params, tokens, cfg.eval.batch_size, sharding=split)), \
            tokens.size
    masks = ablation.single_head_masks(m.n_layers, m.n_heads)
    # ablate_eval_set runs eval.batch_size // lanes windows per call
    eval_cfg = dataclasses.replace(cfg.eval, batch_size=batch * len(masks))
    random_index = rng.integers(m.context // 2, m.context, examples)
    return (lambda: ablation.ablate_eval_set(model, params, tokens, random_index, masks, eval_cfg)), None


def peer(job: str, cfg, examples: int, batch: int):
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    m = cfg.model
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=m.n_layers, d_model=m.d_model, n_heads=m.n_heads, d_head=m.d_head, n_ctx=m.context,
        d_vocab=m.vocab_size, attn_only=True, act_fn=None, normalization_type="LN",
        positional_embedding_type="shortformer", device="cpu"))
    gen = torch.Generator().manual_seed(0)
    if job == "train":
        tokens = torch.randint(0, m.vocab_size, (cfg.train.batch_size, m.context), generator=gen)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

        def train():
            loss = model(tokens, return_type="loss")
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
        return train, tokens.numel()
    tokens = torch.randint(0, m.vocab_size, (examples, m.context), generator=gen)
    batches = tokens.split(cfg.eval.batch_size if job == "loss" else batch)
    if job == "loss":
        def losses():
            with torch.no_grad():
                return [model(b, return_type="loss", loss_per_token=True) for b in batches]
        return losses, tokens.numel()

    def ablate_all():
        with torch.no_grad():
            for b in batches:
                _, cache = model.run_with_cache(b, names_filter=lambda n: n.endswith("hook_pattern"))
                for layer in range(m.n_layers):
                    for head in range(m.n_heads):
                        hooks = [(f"blocks.{lyr}.attn.hook_pattern",
                                  lambda p, hook, c=cache[f"blocks.{lyr}.attn.hook_pattern"]: c)
                                 for lyr in range(m.n_layers)]

                        def zero(z, hook, h=head):
                            z[:, :, h] = 0.0
                            return z
                        hooks.append((f"blocks.{layer}.attn.hook_z", zero))
                        model.run_with_hooks(b, return_type="loss", loss_per_token=True, fwd_hooks=hooks)
    return ablate_all, None


def _child(args) -> None:
    from induction_jax.base import config as config_lib
    cfg = config_lib.load(args.config, args.overrides)
    if args.child == "peer":
        import torch
        torch.set_num_threads(_layout(args.threads[0])[2])
    fn, work = (ours if args.child == "ours" else peer)(args.job, cfg, args.examples, args.batch)
    best, faults = timed(fn, args.repeats, warmups=2)  # compile, then one call with warm caches
    print(json.dumps({"value": best if work is None else work / best, "faults": faults}))


def _layout(spec: str) -> tuple[int, int, int]:
    """"2" -> (1 device, 2 threads, 2 cores); "2x1" -> (2 devices, 1 thread each, 2 cores)."""
    devices, _, threads = spec.partition("x")
    if not threads:
        devices, threads = "1", devices
    d, t = int(devices), int(threads)
    return d, t, d * t


def pinned(cores: int):
    """preexec_fn confining a child to cores 0..cores-1 (Linux), so a thread count is the cores it really uses."""
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < cores:
        return None
    return lambda: os.sched_setaffinity(0, set(range(cores)))


def _measure(who: str, job: str, spec: str, batch: int, args) -> float | None:
    devices, threads, cores = _layout(spec)
    if who == "peer":
        devices, threads = 1, cores
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS=str(threads), JAX_NUM_CPU_DEVICES=str(devices))
    if who == "peer" and not args.peer_keep_heap:
        # The child imports induction_jax for the config, whose import would tune the peer's allocator too.
        env["INDUCTION_JAX_KEEP_HEAP"] = "0"
    if threads == 1:
        env["XLA_FLAGS"] = SINGLE_THREAD
    cmd = [sys.executable, __file__, "--child", who, "--job", job, "--threads", spec, "--config",
           args.config, "--examples", str(args.examples), "--repeats", str(args.repeats), "--batch", str(batch),
           *args.overrides]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=pinned(cores))
    lines = out.stdout.strip().splitlines()
    if out.returncode or not lines:
        print(f"  ({who} {job} {spec} failed: {out.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
        return None
    return json.loads(lines[-1])["value"]


def _pick(best: float | None, new: float | None, seconds: bool) -> float | None:
    if best is None or new is None:
        return new if best is None else best
    return min(best, new) if seconds else max(best, new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/cpu/attn_only_2l.yaml")
    ap.add_argument("--jobs", nargs="*", default=["train", "ablate", "loss"])
    ap.add_argument("--threads", nargs="*", default=["1", "2", "2x1"],
                    help="thread counts, and DxT (D single-threaded devices x T threads) for our side")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ablate-batch", type=int, nargs="*", default=[4, 32],
                    help="windows per call in the ablate job, one row each (4: what `ablate` runs with the "
                         "demo's eval.batch_size 32 and 8 heads)")
    ap.add_argument("--rounds", type=int, default=2, help="child processes per figure, alternating ours and peer")
    ap.add_argument("--peer-keep-heap", action="store_true",
                    help="give the peer's process the allocator settings ours makes on import "
                         "(induction_jax.hostmem); by default it runs with glibc's, as a TransformerLens user's does")
    ap.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["ours", "peer"], help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.child:
        return _child(args)
    try:
        import torch  # noqa: F401
        import transformer_lens  # noqa: F401
        have_peer = True
    except ImportError:
        have_peer = False
    units = {"train": "tokens/s", "ablate": "s", "loss": "tokens/s"}
    peer_seen: dict = {}  # (job, cores, batch) -> the peer's figure: "2" and "2x1" compare against one measurement
    print(f"{'job':12s} {'threads':>7s} {'induction_jax':>14s} {'TransformerLens':>16s} {'ratio':>7s}  unit")
    for job in args.jobs:
        for threads in args.threads:
            for batch in (args.ablate_batch if job == "ablate" else [0]):
                seconds = units[job] == "s"
                key = (job, _layout(threads)[2], batch)
                a, b = None, peer_seen.get(key)
                peer_due = have_peer and key not in peer_seen
                for _ in range(args.rounds):  # alternate, so both frameworks see the same spells of background load
                    a = _pick(a, _measure("ours", job, threads, batch, args), seconds)
                    if peer_due:
                        b = _pick(b, _measure("peer", job, threads, batch, args), seconds)
                peer_seen[key] = b
                # Ratios read as "how many times better ours is": throughput ours/peer, seconds peer/ours.
                ratio = None if a is None or b is None else (a / b if units[job] != "s" else b / a)
                fmt = (lambda v: "-" if v is None else (f"{v:.2f}" if units[job] == "s" else f"{v:.0f}"))
                name = f"{job} b{batch}" if batch else job
                print(f"{name:12s} {threads:>7s} {fmt(a):>14s} {fmt(b):>16s} "
                      f"{'-' if ratio is None else f'{ratio:.2f}x':>7s}  {units[job]}", flush=True)


if __name__ == "__main__":
    main()
