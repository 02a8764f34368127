"""Prepare throughput and peak memory at 1x and 4x a corpus size, and loader tokens/s next to the train step's.

    python benchmarks/data_throughput.py [--gb 1] [--scales 1 4] [--compressed gz zst] [--budget-gb 1]
                                         [--workdir DIR]

Targets: the prepare's peak RSS flat to within 20% between 1x and 4x; the loader at least 20x the train step.

The corpus is local text: the interpreter's standard library and site-packages (.py files), shuffled and repeated
into 256 MB JSONL shards (one record per file) until it reaches the size asked for. Each prepare runs in its own
process tree (main process plus tokenizing workers), whose summed RSS is sampled every 0.2 s and whose CPU time
is counted when it exits: MB per CPU-second does not depend on what else the machine runs. With --compressed,
each scale's shards are then compressed in place (gzip level 6, as the gzip tool writes; zstd level 3, its
default) and prepared again: the same documents under the same names, so the token store must be the same, and
the rows give MB/s of decompressed text beside the plain one; a prepare decompresses in its main process, so each
codec's decompression rate on one core (of 64 MB of the same text) is printed too. The loader is timed
in a fresh process on the largest store, reading `global_batch` of the train config's shape; its peak RSS is
compared with `--budget-gb` and with the store's size. The training step is timed here directly (jitted
value_and_grad of the mean `crossentropy.token_losses` plus an optax.adamw update, one thread) on the same shape.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import io
import lzma
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

SHARD_BYTES = 256 << 20

LOADER = """
import json, resource, sys, time
from induction_jax.data import dataset
path, seq, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
loader = dataset.Loader(dataset.open_prepared(path), seq, batch, seed=0)
loader.global_batch(0)
t0 = time.perf_counter()
for step in range(1, steps + 1):
    loader.global_batch(step * 7919)  # spread over the store and its epochs
dt = time.perf_counter() - t0
print(json.dumps({"tokens_per_s": steps * seq * batch / dt,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def local_texts() -> list[str]:
    paths = sysconfig.get_paths()
    out = []
    for root in dict.fromkeys([paths["stdlib"], paths["purelib"]]):
        for p in sorted(Path(root).rglob("*.py")):
            try:
                out.append(p.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError):
                continue
    return [t for t in out if t]


def write_corpus(out: Path, total: int, texts: list[str], seed: int) -> int:
    """JSONL shards of shuffled copies of `texts` until `total` bytes; returns the bytes written."""
    out.mkdir(parents=True)
    rng, written, shard, fh = random.Random(seed), 0, 0, None
    while written < total:
        order = list(range(len(texts)))
        rng.shuffle(order)
        for i in order:
            if fh is None or fh.tell() >= SHARD_BYTES:
                if fh:
                    fh.close()
                fh = open(out / f"shard-{shard:04d}.jsonl", "w", encoding="utf-8")
                shard += 1
            line = json.dumps({"text": texts[i]}) + "\n"
            fh.write(line)
            written += len(line.encode())
            if written >= total:
                break
    fh.close()
    return written


def compress_shards(corpus: Path, codec: str) -> tuple[Path, int]:
    """Moves the plain shards aside and writes them compressed at their place; returns (the plain folder, the
    compressed bytes)."""
    plain = corpus.with_name(corpus.name + ".plain")
    corpus.rename(plain)
    corpus.mkdir()
    stored = 0
    for shard in sorted(plain.iterdir()):
        target = corpus / f"{shard.name}.{codec}"
        with open(shard, "rb") as src, open(target, "wb") as raw:
            if codec == "gz":
                with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            else:
                import zstandard
                with zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False) as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        stored += target.stat().st_size
    return plain, stored


def restore_shards(corpus: Path, plain: Path) -> None:
    shutil.rmtree(corpus)
    plain.rename(corpus)


def decompression_rates(texts: list[str], size: int = 64 << 20) -> list[tuple[str, float, float]]:
    """(codec, compression ratio, MB of text decompressed per CPU-second) for each codec at its usual level."""
    text = "".join(texts).encode()
    text = (text * (size // len(text) + 1))[:size]
    codecs = [("gzip -6", lambda d: gzip.compress(d, 6), lambda b: gzip.GzipFile(fileobj=io.BytesIO(b))),
              ("bzip2 -9", bz2.compress, lambda b: bz2.BZ2File(io.BytesIO(b))),
              ("xz -6", lzma.compress, lambda b: lzma.LZMAFile(io.BytesIO(b)))]
    try:
        import zstandard
        codecs.append(("zstd -3", zstandard.ZstdCompressor(level=3).compress,
                       lambda b: zstandard.ZstdDecompressor().stream_reader(io.BytesIO(b), read_across_frames=True)))
    except ImportError:
        pass
    out = []
    for name, compress, reader in codecs:
        packed = compress(text)
        t0, f, n = time.process_time(), reader(packed), 0
        while chunk := f.read(1 << 20):
            n += len(chunk)
        out.append((name, len(text) / len(packed), n / 1e6 / (time.process_time() - t0)))
    return out


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def run_prepare(config: str, corpus: Path, cache: Path) -> dict:
    cmd = [sys.executable, "-m", "induction_jax.data", "prepare", "--no-progress", "--config", config,
           f"data.sources=[{corpus}]", f"data.cache_dir={cache}", "data.site_packages=false"]
    def cpu():  # of every waited-for descendant: the prepare process and, through it, its workers
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    t0, c0 = time.perf_counter(), cpu()
    proc = psutil.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc))
        time.sleep(0.2)
    seconds, cpu_seconds = time.perf_counter() - t0, cpu() - c0
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"prepare failed:\n{out}")
    meta = json.loads(next(cache.glob("[0-9a-f]*/metadata.json")).read_text())
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss": peak, "meta": meta,
            "path": str(next(cache.glob("[0-9a-f]*")))}


def train_rate(config: str, steps: int) -> float:
    """Tokens/s of the jitted forward + backward + AdamW update on one fixed batch (one thread)."""
    os.environ.update(XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1", JAX_PLATFORMS="cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from induction_jax.base.config import load
    from induction_jax.model import crossentropy, model

    cfg = load(config)
    params = model.init_params(cfg.model, jax.random.key(0))
    net = model.make(cfg.model)
    opt = optax.adamw(cfg.train.lr, b1=cfg.train.b1, b2=cfg.train.b2, weight_decay=cfg.train.weight_decay)

    @jax.jit
    def step(params, opt_state, tokens_BT):
        def loss_fn(p):
            return crossentropy.token_losses(net.apply({"params": p}, tokens_BT), tokens_BT).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    tokens_BT = jnp.asarray(np.random.default_rng(0).integers(
        0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.context)), jnp.int32)
    state = (params, opt.init(params))
    jax.block_until_ready(step(*state, tokens_BT))  # compile
    t0 = time.perf_counter()
    for _ in range(steps):
        *state, loss = step(*state, tokens_BT)
    jax.block_until_ready(loss)
    return steps * tokens_BT.size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cpu/attn_only_2l.yaml", help="prepare and train-step config")
    parser.add_argument("--gb", type=float, default=1.0, help="corpus size at scale 1, in GB (1e9 bytes)")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--compressed", nargs="*", default=[], choices=["gz", "zst"],
                        help="also prepare each scale's shards compressed so (zst needs zstandard)")
    parser.add_argument("--budget-gb", type=float, default=1.0, help="the loader process's memory budget")
    parser.add_argument("--steps", type=int, default=2000, help="loader batches timed")
    parser.add_argument("--train-steps", type=int, default=20, help="training steps timed")
    parser.add_argument("--workdir", default=None, help="where the corpora and stores go (deleted after)")
    args = parser.parse_args(argv)
    from induction_jax.base.config import load
    cfg = load(ROOT / args.config if not Path(args.config).exists() else args.config)
    work = Path(tempfile.mkdtemp(prefix="data-bench-", dir=args.workdir))
    rows, packed, texts = [], [], local_texts()
    try:
        for scale in args.scales:
            corpus = work / f"corpus-{scale}x"
            size = write_corpus(corpus, int(scale * args.gb * 1e9), texts, seed=scale)
            if rows:
                shutil.rmtree(rows[-1]["path"], ignore_errors=True)  # keep only the largest store
            r = run_prepare(args.config, corpus, work / f"cache-{scale}x")
            m = r["meta"]
            rows.append({**r, "scale": scale, "bytes": size, "stored": size, "as": ".jsonl",
                         "tokens": m["tokens"]["train"] + m["tokens"]["eval"]})
            print(f"scale {scale}x: {size / 1e9:.2f} GB in {r['seconds']:.0f} s ({r['cpu_seconds']:.0f} CPU-s), "
                  f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB", flush=True)
            for codec in args.compressed:
                plain, stored = compress_shards(corpus, codec)
                c = run_prepare(args.config, corpus, work / f"cache-{scale}x-{codec}")
                restore_shards(corpus, plain)
                shutil.rmtree(c["path"], ignore_errors=True)
                packed.append({**c, "scale": scale, "bytes": size, "stored": stored, "as": f".jsonl.{codec}",
                               "tokens": c["meta"]["tokens"]["train"] + c["meta"]["tokens"]["eval"],
                               "same": c["meta"]["tokens_sha256"] == m["tokens_sha256"]})
                print(f"scale {scale}x, .{codec}: {stored / 1e9:.2f} GB stored in {c['seconds']:.0f} s "
                      f"({c['cpu_seconds']:.0f} CPU-s), peak RSS {c['peak_rss'] / 2**30:.2f} GiB", flush=True)
            shutil.rmtree(corpus)
        big = rows[-1]
        store = sum(p.stat().st_size for p in Path(big["path"]).rglob("*") if p.is_file())
        loader = json.loads(subprocess.run(
            [sys.executable, "-c", LOADER, big["path"], str(cfg.model.context), str(cfg.train.batch_size),
             str(args.steps)], cwd=ROOT, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        train = train_rate(args.config, args.train_steps)
        rates = decompression_rates(texts) if args.compressed else []
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nprepare ({args.config}: vocab {cfg.model.vocab_size}, tokenizer sample "
          f"{cfg.data.tokenizer_sample_bytes / 2**20:.0f} MiB, {psutil.cpu_count()} CPUs)")
    print("| corpus | stored as | text | tokens | tokenizer training | wall time | throughput (text) | CPU time "
          "| text per CPU-second | peak RSS (all processes) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows + packed, key=lambda r: r["scale"]):
        k = r["meta"]["tokenizer"]
        print(f"| {r['scale']}x | {r['as']}, {r['stored'] / 1e9:.3f} GB | {r['bytes'] / 1e9:.2f} GB | "
              f"{r['tokens'] / 1e6:,.0f} M | {k['seconds']:.0f} s on {k['sample_bytes'] / 2**20:.0f} MiB | "
              f"{r['seconds']:,.0f} s | {r['bytes'] / 1e6 / r['seconds']:.2f} MB/s | {r['cpu_seconds']:,.0f} s | "
              f"{r['bytes'] / 1e6 / r['cpu_seconds']:.2f} MB | {r['peak_rss'] / 2**30:.2f} GiB |")
    for r in packed:
        print(f"{r['scale']}x {r['as']}: the token store is {'the same as' if r['same'] else 'NOT the same as'} the "
              f"plain corpus's (tokens_sha256)")
    ratio = rows[-1]["peak_rss"] / rows[0]["peak_rss"]
    print(f"peak RSS {rows[-1]['scale']}x / {rows[0]['scale']}x = {ratio:.2f} (target within 20%): "
          f"{'ok' if abs(ratio - 1) <= 0.2 else 'NOT FLAT'}")
    b, t = cfg.train.batch_size, cfg.model.context
    print(f"\nloader on the {rows[-1]['scale']}x store ({store / 1e9:.2f} GB on disk), batch {b} x {t}")
    print("| measured | tokens/s | x train step | peak RSS |")
    print("|---|---:|---:|---:|")
    print(f"| loader.global_batch (fresh process) | {loader['tokens_per_s']:,.0f} | "
          f"{loader['tokens_per_s'] / train:.0f} | {loader['peak_rss'] / 2**30:.2f} GiB |")
    print(f"| train step (value_and_grad + adamw, 1 thread) | {train:,.0f} | 1 | |")
    fits = loader["peak_rss"] < args.budget_gb * 2**30 < store
    print(f"loader RSS {loader['peak_rss'] / 2**30:.2f} GiB < budget {args.budget_gb} GiB < store "
          f"{store / 2**30:.2f} GiB: {'ok' if fits else 'NO'}; loader / train step = "
          f"{loader['tokens_per_s'] / train:.0f}x (target >= 20x): "
          f"{'ok' if loader['tokens_per_s'] >= 20 * train else 'TOO SLOW'}")
    if rates:
        print("\ndecompression in one process (what a prepare's main process does for compressed sources)")
        print("| codec | ratio | text per CPU-second |")
        print("|---|---:|---:|")
        for name, ratio, rate in rates:
            print(f"| {name} | {ratio:.1f} | {rate:,.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
