"""Our CPU jobs with the allocator settings `import induction_jax` makes (induction_jax/hostmem.py) and with
glibc's defaults (`INDUCTION_JAX_KEEP_HEAP=0`), side by side in one run.

    python benchmarks/host_memory.py [--jobs train ablate loss] [--threads 1 2 2x1] [--rounds 2]

Each figure is the best of `--rounds` child processes of benchmarks/cpu_peers.py (its jobs, shapes and thread
layouts), the two settings alternating; the faults column is the minor page faults per timed call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import cpu_peers


def measure(job: str, spec: str, keep: bool, args) -> dict | None:
    devices, threads, cores = cpu_peers._layout(spec)
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS=str(threads), JAX_NUM_CPU_DEVICES=str(devices),
               INDUCTION_JAX_KEEP_HEAP="1" if keep else "0")
    if threads == 1:
        env["XLA_FLAGS"] = cpu_peers.SINGLE_THREAD
    cmd = [sys.executable, cpu_peers.__file__, "--child", "ours", "--job", job, "--threads", spec, "--examples",
           str(args.examples), "--repeats", str(args.repeats), "--batch", str(args.ablate_batch if job == "ablate"
                                                                            else 0)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=cpu_peers.pinned(cores))
    lines = out.stdout.strip().splitlines()
    if out.returncode or not lines:
        print(f"  ({job} {spec} failed: {out.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", nargs="*", default=["train", "ablate", "loss"])
    ap.add_argument("--threads", nargs="*", default=["1", "2", "2x1"])
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--ablate-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    units = {"train": "tokens/s", "ablate": "s", "loss": "tokens/s"}
    print(f"{'job':8s} {'threads':>7s} {'kept heap':>10s} {'faults':>9s} {'glibc heap':>11s} {'faults':>9s} "
          f"{'speed-up':>8s}  unit")
    for job in args.jobs:
        seconds = units[job] == "s"
        for spec in args.threads:
            best: dict[bool, dict | None] = {True: None, False: None}
            for _ in range(args.rounds):
                for keep in (True, False):
                    r, b = measure(job, spec, keep, args), best[keep]
                    if r is not None and (b is None or (r["value"] < b["value"] if seconds else
                                                        r["value"] > b["value"])):
                        best[keep] = r
            kept, dflt = best[True], best[False]
            fmt = (lambda r: "-" if r is None else (f"{r['value']:.2f}" if seconds else f"{r['value']:.0f}"))
            faults = (lambda r: "-" if r is None else f"{r['faults']:.0f}")
            speedup = "-" if kept is None or dflt is None else \
                f"{(dflt['value'] / kept['value'] if seconds else kept['value'] / dflt['value']):.2f}x"
            print(f"{job:8s} {spec:>7s} {fmt(kept):>10s} {faults(kept):>9s} {fmt(dflt):>11s} {faults(dflt):>9s} "
                  f"{speedup:>8s}  {units[job]}", flush=True)


if __name__ == "__main__":
    main()
