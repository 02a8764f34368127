"""Training throughput and MFU, both attention paths side by side: the CPU configs (peak: a float32 matmul probe
measured in the same run), or with --inline any config on this process's default device (an accelerator's peak:
its datasheet figure).

    python benchmarks/train_throughput.py [key=value ...] [--steps 30] [--configs configs/cpu/attn_only_2l.yaml ...]
    python benchmarks/train_throughput.py --side-by-side   # also: 2 single-threaded processes, one per core;
                                                           # 1 process data-parallel over 2 single-threaded devices;
                                                           # 2 processes (one per core) data-parallel over
                                                           # jax.distributed, one model
    python benchmarks/train_throughput.py --inline --contexts 2048 8192 --tokens-per-step 32768 \
        --configs configs/full_4l.yaml configs/full_6l.yaml configs/full_16l.yaml   # one accelerator

Random tokens stand in for data (the loader is benchmarked separately); the step is the real jitted train step.
Every row runs twice, with the training loss's fused attention (model.attention=fused, the default) and with the
explicit path that materialises patterns (model.attention=explicit); `--paths fused` keeps one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DEFAULT = ["configs/cpu/attn_only_1l.yaml", "configs/cpu/attn_only_2l.yaml", "configs/cpu/smeared_key_1l.yaml"]
SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def measure(config_path: str, overrides: list[str], steps: int, n_devices: int = 1) -> dict:
    import jax
    import numpy as np

    from induction_jax.base import config
    from induction_jax.training import peak, sharding, step

    distributed = sharding.initialize_distributed()  # INDUCTION_JAX_* env vars: one model over many processes
    cfg = config.load(config_path, overrides)
    devices = jax.devices() if distributed else jax.devices()[:n_devices]
    n_devices = len(devices)
    mesh = sharding.make_mesh(config.MeshConfig(data=n_devices, fsdp=1, tensor=1), devices)
    trainer = step.build(cfg, mesh)
    state = trainer.init_fn(jax.random.key(0))
    rng = np.random.default_rng(0)
    shape = (cfg.train.batch_size, cfg.model.context)
    # Every process draws the same global batches and hands over the rows its own devices hold.
    batches = [jax.make_array_from_callback(shape, trainer.batch_sharding, lambda idx, b=b: b[idx])
               for b in [rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32) for _ in range(4)]]
    for i in range(3):  # compile + warm-up
        state, m = trainer.step_fn(state, batches[i % 4])
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(steps):
        state, m = trainer.step_fn(state, batches[i % 4])
    jax.block_until_ready(m)
    dt = time.perf_counter() - t0
    tps = steps * trainer.tokens_per_step / dt
    flops = step.flops_per_token(cfg)
    if jax.devices()[0].platform == "cpu":
        # A float32 matmul probe measured now: it uses every core this process may run on, whatever its device
        # count (XLA's single-thread flags do not confine it; only pinning does).
        pk = peak.matmul_probe()
    else:  # the datasheet peak for the compute dtype, per chip
        pk = peak.device_peak(cfg.model.dtype)[0] * (n_devices // jax.process_count())
    return {"config": config_path, "tokens_per_s": tps, "gflops": tps * flops / 1e9, "peak_gflops": pk / 1e9,
            "mfu": tps * flops / pk, "ms_per_step": 1e3 * dt / steps}


def inline(args) -> None:
    """Every config x context x attention path in this process, on its default device (e.g. one GPU)."""
    import gc

    import jax

    from induction_jax.base import config

    print(f"device: {jax.devices()[0].device_kind}")
    print(f"{'config':28s} {'context':>7s} {'batch':>5s} {'attention':9s} {'tok/s':>10s} {'ms/step':>8s} "
          f"{'TFLOP/s':>8s} {'peak':>7s} {'MFU':>6s}", flush=True)
    measured = {}
    for c in args.configs:
        for context in args.contexts or [None]:
            shape = []
            if context is not None:  # the same tokens per step at every context
                shape = [f"model.context={context}", f"train.batch_size={max(1, args.tokens_per_step // context)}"]
            for path in args.paths:
                overrides = [*args.overrides, *shape, f"model.attention={path}"]
                cfg = config.load(c, overrides)
                head = f"{c:28s} {cfg.model.context:7d} {cfg.train.batch_size:5d} {path:9s}"
                try:
                    r = measure(c, overrides, args.steps)
                except Exception as e:  # an out-of-memory row is a result; the other rows still run
                    if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                        raise
                    print(f"{head} out of device memory", flush=True)
                else:
                    print(f"{head} {r['tokens_per_s']:10.0f} {r['ms_per_step']:8.1f} {r['gflops'] / 1e3:8.1f} "
                          f"{r['peak_gflops'] / 1e3:7.0f} {r['mfu']:6.1%}", flush=True)
                    mode = f"context {cfg.model.context} x batch {cfg.train.batch_size}"
                    measured.setdefault((c, mode), {})[path] = (r["tokens_per_s"], r["mfu"])
                jax.clear_caches()
                gc.collect()
    side_by_side(measured, args.paths)


def _child(args) -> None:
    print(json.dumps(measure(args.child, args.overrides, args.steps, args.devices)))


def run_child(config_path, overrides, steps, single_thread=False, cpu=None, devices=1, process=None, port=0):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
    if process is not None:
        env.update(INDUCTION_JAX_COORDINATOR=f"localhost:{port}", INDUCTION_JAX_NUM_PROCESSES="2",
                   INDUCTION_JAX_PROCESS_ID=str(process))
    if single_thread:
        env["XLA_FLAGS"] = SINGLE_THREAD
    cmd = [sys.executable, __file__, "--child", config_path, "--steps", str(steps), "--devices", str(devices),
           *overrides]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu)] + cmd
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)


def _output(proc, timeout: float) -> list[str]:
    """The child's stdout lines; a child still running after `timeout` s (a deadlocked all-reduce) is killed."""
    try:
        return proc.communicate(timeout=timeout)[0].strip().splitlines()
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return []


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*", default=DEFAULT)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--paths", nargs="*", default=["fused", "explicit"], help="model.attention values to compare")
    ap.add_argument("--side-by-side", action="store_true")
    ap.add_argument("--inline", action="store_true",
                    help="measure in this process on its default device (e.g. a GPU), no child processes")
    ap.add_argument("--contexts", nargs="*", type=int, default=[],
                    help="with --inline: contexts to measure, each at --tokens-per-step tokens")
    ap.add_argument("--tokens-per-step", type=int, default=32768)
    ap.add_argument("--child-timeout", type=float, default=900, help="s before a child process is killed")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    hint = "(key=value overrides go before --paths and --configs, which take lists)"
    for path in args.paths:
        if path not in ("fused", "explicit"):
            ap.error(f"--paths: {path!r} is neither fused nor explicit {hint}")
    for c in args.configs:
        if not os.path.isfile(c):
            ap.error(f"--configs: {c}: no such file {hint}")
    if args.child:
        return _child(args)
    if args.inline:
        return inline(args)
    print(f"{'config':40s} {'attention':9s} {'mode':28s} {'tok/s':>9s} {'ms/step':>8s} {'GFLOP/s':>8s} {'peak':>7s} "
          f"{'MFU':>6s}")
    measured = {}  # (config, mode) -> {path: (tokens/s, MFU)}
    for c, path in [(c, path) for c in args.configs for path in args.paths]:
        overrides = [*args.overrides, f"model.attention={path}"]
        # Each row's children start only when the previous row has finished: rows must not share the cores.
        rows = [("1 process, 2 threads", lambda: [run_child(c, overrides, args.steps)])]
        if args.side_by_side:
            rows.append(("2 processes x 1 thread (sum)",
                         lambda: [run_child(c, overrides, args.steps, True, cpu) for cpu in (0, 1)]))
            rows.append(("1 process, 2 devices x 1 thread",
                         lambda: [run_child(c, overrides, args.steps, True, None, 2)]))
            rows.append(("2 processes x 1 thread, 1 model",
                         lambda: [run_child(c, overrides, args.steps, True, cpu, 1, cpu, port)
                                  for port in [_free_port()] for cpu in (0, 1)]))
        for mode, start in rows:
            procs = start()
            outs = [_output(p, args.child_timeout) for p in procs]
            if any(p.returncode != 0 or not out for p, out in zip(procs, outs)):
                # e.g. XLA:CPU's 2-device all-reduce deadlock, which aborts or stalls the child (docs/benchmarks.md)
                codes = [p.returncode for p in procs]
                print(f"{c:40s} {path:9s} {mode:28s} failed (exit codes {codes})", flush=True)
                continue
            results = [json.loads(out[-1]) for out in outs]
            if mode.endswith("1 model"):  # both processes time the same global steps
                results = [dict(results[0], peak_gflops=sum(r["peak_gflops"] for r in results))]
            tps = sum(r["tokens_per_s"] for r in results)
            gf = sum(r["gflops"] for r in results)
            pk = sum(r["peak_gflops"] for r in results)  # each pinned child's probe saw its own core
            print(f"{c:40s} {path:9s} {mode:28s} {tps:9.0f} {results[0]['ms_per_step']:8.1f} {gf:8.1f} {pk:7.1f} "
                  f"{gf / pk:6.1%}", flush=True)
            measured.setdefault((c, mode), {})[path] = (tps, gf / pk)
    side_by_side(measured, args.paths)


def side_by_side(measured: dict, paths: list[str]) -> None:
    """One line per config and mode: each path's tokens/s and MFU, and the first path's speed over the others'."""
    print(f"\n{'config':40s} {'mode':32s} " + " ".join(f"{p + ' tok/s':>14s} {'MFU':>6s}" for p in paths)
          + "".join(f" {paths[0] + '/' + p:>16s}" for p in paths[1:]))
    for (c, mode), by_path in measured.items():
        cells = [f"{by_path[p][0]:14.0f} {by_path[p][1]:6.1%}" if p in by_path else f"{'-':>14s} {'-':>6s}"
                 for p in paths]
        ratios = [f"{by_path[paths[0]][0] / by_path[p][0]:15.2f}x" if paths[0] in by_path and p in by_path
                  else f"{'-':>16s}" for p in paths[1:]]
        print(f"{c:40s} {mode:32s} " + " ".join(cells) + "".join(" " + r for r in ratios))


if __name__ == "__main__":
    main()
