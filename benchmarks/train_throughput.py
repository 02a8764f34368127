"""Training throughput and MFU of the CPU configs, with this machine's float32 matmul peak measured in the same run.

    python benchmarks/train_throughput.py [--configs configs/cpu/attn_only_2l.yaml ...] [--steps 30] [key=value ...]
    python benchmarks/train_throughput.py --side-by-side   # also: 2 single-threaded processes, one per core;
                                                           # 1 process data-parallel over 2 single-threaded devices;
                                                           # 2 processes (one per core) data-parallel over
                                                           # jax.distributed, one model

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

    from induction_jax import config, peak, sharding, step

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
    # CPU: a float32 matmul probe measured now; accelerators: the datasheet peak for the compute dtype.
    pk = peak.matmul_probe() if jax.devices()[0].platform == "cpu" else peak.device_peak(cfg.model.dtype)[0]
    pk *= n_devices // jax.process_count()  # the probe measures one device (one core when single-threaded)
    return {"config": config_path, "tokens_per_s": tps, "gflops": tps * flops / 1e9, "peak_gflops": pk / 1e9,
            "mfu": tps * flops / pk, "ms_per_step": 1e3 * dt / steps}


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
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.child:
        return _child(args)
    if args.inline:
        import jax
        print(f"device: {jax.devices()[0].device_kind}")
        print(f"{'config':32s} {'attention':9s} {'tok/s':>10s} {'ms/step':>8s} {'TFLOP/s':>8s} {'peak':>7s} "
              f"{'MFU':>6s}")
        for c in args.configs:
            for path in args.paths:
                r = measure(c, [*args.overrides, f"model.attention={path}"], args.steps)
                print(f"{c:32s} {path:9s} {r['tokens_per_s']:10.0f} {r['ms_per_step']:8.1f} "
                      f"{r['gflops'] / 1e3:8.1f} {r['peak_gflops'] / 1e3:7.0f} {r['mfu']:6.1%}", flush=True)
        return
    print(f"{'config':40s} {'attention':9s} {'mode':28s} {'tok/s':>9s} {'ms/step':>8s} {'GFLOP/s':>8s} {'peak':>7s} "
          f"{'MFU':>6s}")
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
            outs = [p.communicate()[0].strip().splitlines() for p in procs]
            if any(p.returncode != 0 or not out for p, out in zip(procs, outs)):
                # e.g. XLA:CPU's 2-device all-reduce deadlock, which aborts the child (docs/benchmarks.md)
                print(f"{c:40s} {path:9s} {mode:28s} failed (exit codes {[p.returncode for p in procs]})")
                continue
            results = [json.loads(out[-1]) for out in outs]
            if mode.endswith("1 model"):  # both processes time the same global steps
                results = [dict(results[0], peak_gflops=sum(r["peak_gflops"] for r in results))]
            tps = sum(r["tokens_per_s"] for r in results)
            gf = sum(r["gflops"] for r in results)
            pk = results[0]["peak_gflops"] * (len(results) if len(results) > 1 else 1)
            if len(results) > 1:  # each child's probe saw one core; the machine's peak is their sum
                pk = sum(r["peak_gflops"] for r in results)
            print(f"{c:40s} {path:9s} {mode:28s} {tps:9.0f} {results[0]['ms_per_step']:8.1f} {gf:8.1f} {pk:7.1f} "
                  f"{gf / pk:6.1%}")


if __name__ == "__main__":
    main()
