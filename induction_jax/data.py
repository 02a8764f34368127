"""Prepared data: token store, fixed eval set and token frequencies on disk; a stateless multi-host loader.

`prepare(cfg)` turns `data.sources` into a directory keyed by a fingerprint of its inputs (see `fingerprint`):
tokenizer.json, metadata.json, splits.json (document names per split) and tensorstore zarr arrays `train_tokens`,
`eval_tokens` (documents joined by `<|eod|>`), `eval_windows` [N, L], `eval_index` [N] and `frequencies` [V].
It is built in a temporary directory and renamed into place only when complete, so a directory with that name
is always whole.

`Loader` makes the global batch of step s a pure function of (seed, s) (docs/method.md §7): no iterator state to
checkpoint, and resuming on any number of processes reproduces an uninterrupted run exactly.

CLI: `python -m induction_jax.data prepare --config configs/X.yaml [key=value ...]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import grain
import jax
import numpy as np
import tensorstore as ts
import tokenizers
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from . import cli, corpus
from .config import Config, ConfigError

CODE_VERSION = 1  # bump whenever prepared output would change for the same inputs
CACHE_ENV = "INDUCTION_JAX_CACHE"
_EVAL_STREAM = 1  # separates the eval set's random stream from any other use of data.eval_seed
_ENCODE_CHARS = 1 << 23  # text per encode_batch call: enough to keep the Rust threads busy, small for the bar


def cache_root(cfg: Config | None = None) -> Path:
    """`data.cache_dir`, else $INDUCTION_JAX_CACHE, else ~/.cache/induction_jax (also where peak.py keeps its probe)."""
    root = (cfg.data.cache_dir if cfg else None) or os.environ.get(CACHE_ENV) or "~/.cache/induction_jax"
    return Path(root).expanduser()


def eval_length(cfg: Config) -> int:
    """Eval windows are the model's context when that is shorter than `data.eval_length` (docs/method.md §3)."""
    return min(cfg.data.eval_length, cfg.model.context)


def fingerprint(cfg: Config, files: list[corpus.SourceFile], tokenizer_sha: str = "") -> str:
    """Everything that changes the prepared bytes: file list with sizes and mtimes, tokenizer, eval settings."""
    d = cfg.data
    payload = {
        "code_version": CODE_VERSION, "tokenizers": tokenizers.__version__,
        "files": [[f.name, f.path, f.size, f.mtime_ns] for f in files], "text_field": d.text_field,
        "vocab_size": cfg.model.vocab_size, "tokenizer_sha256": tokenizer_sha,
        "eval": [d.eval_examples, eval_length(cfg), d.eval_seed, d.eval_fraction],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _url(path: str | Path) -> str:
    """A tensorstore kvstore URL, so a prepared directory may live on a local disk or at gs://."""
    path = str(path)
    return path.rstrip("/") + "/" if "://" in path else Path(path).absolute().as_uri() + "/"


def _write_array(directory: Path, name: str, array: np.ndarray) -> None:
    chunks = [min(max(s, 1), 1 << 20) if i == 0 else max(s, 1) for i, s in enumerate(array.shape)]
    if array.ndim == 2:  # whole eval windows per chunk, ~1M tokens each
        chunks[0] = max(1, min(array.shape[0], (1 << 20) // max(array.shape[1], 1)))
    spec = {"driver": "zarr", "kvstore": _url(directory / name),
            "metadata": {"dtype": array.dtype.str, "shape": list(array.shape), "chunks": chunks},
            "create": True, "delete_existing": True}
    ts.open(spec).result().write(array).result()


def _read_array(path: str, name: str) -> np.ndarray:
    store = ts.open({"driver": "zarr", "kvstore": _url(path) + name + "/"}, open=True, read=True).result()
    return np.asarray(store.read().result())


def _read_file(path: str, name: str) -> bytes | None:
    result = ts.KvStore.open(_url(path)).result().read(name).result()
    return result.value if result.state == "value" else None


def sha256_eval(windows_NL: np.ndarray, index_N: np.ndarray) -> str:
    h = hashlib.sha256(f"{windows_NL.shape[0]}x{windows_NL.shape[1]}".encode())
    h.update(windows_NL.astype("<u2").tobytes())
    h.update(index_N.astype("<i4").tobytes())
    return h.hexdigest()


def make_eval_set(stream_M: np.ndarray, n: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """N windows at uniformly random offsets of the held-out stream, and one random token index in [1, L-1] each.

    Offsets, not document starts: the content at every token index is then identically distributed, and only the
    available context differs (docs/method.md §3).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, _EVAL_STREAM]))
    offsets_N = rng.integers(0, stream_M.size - length + 1, size=n)
    index_N = rng.integers(1, length, size=n).astype(np.int32)
    windows_NL = stream_M[offsets_N[:, None] + np.arange(length)[None, :]]
    return windows_NL, index_N


def _encode(tok: Tokenizer, texts: list[str], eod_id: int, desc: str, progress: bool) -> np.ndarray:
    """One uint16 stream: every document followed by `<|eod|>`."""
    parts: list[np.ndarray] = []
    eod = np.array([eod_id], np.uint16)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # skips offsets where available
    with tqdm(total=sum(map(len, texts)), desc=desc, unit="char", unit_scale=True, disable=not progress) as bar:
        start = 0
        while start < len(texts):
            stop, chars = start, 0
            while stop < len(texts) and chars < _ENCODE_CHARS:
                chars += len(texts[stop])
                stop += 1
            for enc in encode(texts[start:stop], add_special_tokens=False):
                parts += [np.asarray(enc.ids, np.uint16), eod]
            bar.update(chars)
            start = stop
    return np.concatenate(parts)


_TMP_TAG = ".tmp-"  # build directories: .<fingerprint>.tmp-<host>-<pid>-<random>


def _host() -> str:
    return socket.gethostname().replace("/", "_") or "localhost"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_builds(root: Path) -> list[Path]:
    """Deletes the build directories of killed prepares: those made on this host by a PID that is gone. A live
    prepare's directory (this host's, or any other host's sharing the cache) is left alone."""
    removed = []
    for d in root.glob(f".*{_TMP_TAG}*"):
        try:
            host_pid, _ = d.name.split(_TMP_TAG, 1)[1].rsplit("-", 1)
            host, pid = host_pid.rsplit("-", 1)
            pid = int(pid)
        except ValueError:
            continue  # not named by this code: not ours to judge
        if host == _host() and pid != os.getpid() and not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def prepare(cfg: Config, progress: bool = True) -> Prepared:
    """Builds (or finds) the prepared data for `cfg`; a second call with the same inputs only checks the cache."""
    corpus.check_vocab(cfg.model.vocab_size)
    if cfg.data.eval_examples < 1:
        raise ConfigError(f"data.eval_examples: must be >= 1, got {cfg.data.eval_examples}")
    user_tok = corpus.load_tokenizer(cfg.data.tokenizer, cfg.model.vocab_size) if cfg.data.tokenizer else None
    files = corpus.resolve(cfg.data)
    fp = fingerprint(cfg, files, corpus.file_sha256(cfg.data.tokenizer) if user_tok else "")
    root = cache_root(cfg)
    final = root / fp
    if root.is_dir():
        remove_stale_builds(root)
    if (final / "metadata.json").is_file():
        return open_prepared(str(final))
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{fp}{_TMP_TAG}{_host()}-{os.getpid()}-", dir=root))
    try:
        _build(cfg, files, fp, user_tok, tmp, progress)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same fingerprint first; its copy is as good
            if not (final / "metadata.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_prepared(str(final))


def _build(cfg: Config, files: list[corpus.SourceFile], fp: str, user_tok: Tokenizer | None, out: Path,
           progress: bool) -> None:
    docs = corpus.read(files, cfg.data, progress)
    if docs.skipped_records:
        worst = sorted(docs.skipped_by_file.items(), key=lambda kv: -kv[1])
        where = ", ".join(f"{name}: {n}" for name, n in worst[:3]) + (", ..." if len(worst) > 3 else "")
        print(f"warning: data.sources: skipped {docs.skipped_records} JSONL line(s) that are not JSON objects with "
              f"a string {cfg.data.text_field!r} field ({where})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    tok = user_tok or corpus.train_tokenizer(docs.train.texts, cfg.model.vocab_size, progress)
    tok_seconds = time.perf_counter() - t0
    bos_id, eod_id = (tok.token_to_id(s) for s in corpus.SPECIAL_TOKENS)
    t0 = time.perf_counter()
    train_M = _encode(tok, docs.train.texts, eod_id, "tokenizing train", progress)
    eval_M = _encode(tok, docs.eval.texts, eod_id, "tokenizing held-out", progress)
    encode_seconds = time.perf_counter() - t0
    length = eval_length(cfg)
    if eval_M.size < length:
        raise ConfigError(f"data.sources: {', '.join(cfg.data.sources)}: the held-out split has {eval_M.size} "
                          f"tokens, fewer than one eval window of {length}; raise data.eval_fraction")
    windows_NL, index_N = make_eval_set(eval_M, cfg.data.eval_examples, length, cfg.data.eval_seed)
    freq_V = np.bincount(train_M, minlength=max(cfg.model.vocab_size, tok.get_vocab_size())).astype(np.int64)

    tok.save(str(out / "tokenizer.json"))
    (out / "splits.json").write_text(json.dumps({"train": docs.train.names, "eval": docs.eval.names}))
    for name, array in tqdm([("train_tokens", train_M), ("eval_tokens", eval_M), ("eval_windows", windows_NL),
                             ("eval_index", index_N), ("frequencies", freq_V)],
                            desc="writing token store", disable=not progress):
        _write_array(out, name, array)
    metadata = {
        "code_version": CODE_VERSION, "fingerprint": fp, "python_version": sys.version.split()[0],
        "sources": list(cfg.data.sources), "site_packages": cfg.data.site_packages,
        "content_sha256": docs.content_hash,
        "files": {"read": docs.files, "skipped_binary": docs.skipped_binary,
                  "skipped_undecodable": docs.skipped_undecodable, "skipped_jsonl_records": docs.skipped_records,
                  "empty_documents": docs.empty},
        "documents": {"train": len(docs.train.texts), "eval": len(docs.eval.texts)},
        "bytes": {"train": docs.train.bytes, "eval": docs.eval.bytes},
        "tokens": {"train": int(train_M.size), "eval": int(eval_M.size)},
        "tokens_sha256": hashlib.sha256(train_M.astype("<u2").tobytes() + eval_M.astype("<u2").tobytes()
                                        + tok.to_str().encode()).hexdigest(),
        "tokenizer": {"trained": user_tok is None, "source": cfg.data.tokenizer or "trained on the train split",
                      "vocab": tok.get_vocab_size(), "seconds": round(tok_seconds, 3),
                      "encode_seconds": round(encode_seconds, 3)},
        "vocab_size": cfg.model.vocab_size, "bos_id": bos_id, "eod_id": eod_id,
        "eval": {"examples": cfg.data.eval_examples, "length": length, "seed": cfg.data.eval_seed,
                 "fraction": cfg.data.eval_fraction, "sha256": sha256_eval(windows_NL, index_N)},
    }
    # Written last: a directory with metadata.json is complete, whatever else happened to it.
    (out / "metadata.json").write_text(json.dumps(metadata, indent=1))


def open_prepared(path: str | Path) -> Prepared:
    """Reads a prepared directory (local path or gs:// URL) written by `prepare`."""
    path = str(path)
    raw = _read_file(path, "metadata.json")
    if raw is None:
        raise ConfigError(f"{path}: not a prepared data directory (no metadata.json)")
    meta = json.loads(raw)
    if meta.get("code_version") != CODE_VERSION:
        raise ConfigError(f"{path}: prepared by data code version {meta.get('code_version')}, this code reads "
                          f"{CODE_VERSION}; run prepare again")
    return Prepared(path, meta)


class Prepared:
    """Read access to a prepared directory; arrays are read on first use and kept."""

    def __init__(self, path: str, metadata: dict):
        self.path = path
        self.metadata = metadata
        self.bos_id: int = metadata["bos_id"]
        self.eod_id: int = metadata["eod_id"]
        self.eval_hash: str = metadata["eval"]["sha256"]
        self._cache: dict[str, object] = {}

    def _array(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = _read_array(self.path, name)
        return self._cache[name]

    def tokenizer(self) -> Tokenizer:
        if "tokenizer" not in self._cache:
            self._cache["tokenizer"] = Tokenizer.from_str(_read_file(self.path, "tokenizer.json").decode())
        return self._cache["tokenizer"]

    def splits(self) -> dict[str, list[str]]:
        """Document names of each split ("train", "eval"), in stream order."""
        return json.loads(_read_file(self.path, "splits.json"))

    def train_tokens(self) -> np.ndarray:
        return self._array("train_tokens")

    def eval_tokens(self) -> np.ndarray:
        return self._array("eval_tokens")

    def eval_set(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens_NL int32, random token index_N int32), checked against the stored hash."""
        windows_NL, index_N = self._array("eval_windows"), self._array("eval_index")
        if sha256_eval(windows_NL, index_N) != self.eval_hash:
            raise ValueError(f"{self.path}: eval set does not match its sha256 {self.eval_hash}; prepare again")
        return windows_NL.astype(np.int32), index_N.astype(np.int32)

    @property
    def frequencies(self) -> np.ndarray:
        """Occurrences of each token id in the train stream, int64 [vocab]."""
        return self._array("frequencies")

    def candidate_tokens(self, exclude: float) -> np.ndarray:
        """Token ids ranked between the `exclude` fraction most and least common, specials and unseen removed."""
        if not 0 <= exclude < 0.5:
            raise ValueError(f"exclude={exclude} must be in [0, 0.5)")
        key = f"candidates:{exclude}"
        if key not in self._cache:
            freq_V = self.frequencies[: self.metadata["tokenizer"]["vocab"]]
            ids = np.setdiff1d(np.arange(freq_V.size), [self.bos_id, self.eod_id])
            ranked = ids[np.lexsort((ids, freq_V[ids]))]  # rarest first; ties broken by id
            k = int(exclude * ranked.size)
            middle = ranked[k: ranked.size - k]
            # A token never seen in training has an untrained embedding: useless as a random "word".
            self._cache[key] = np.sort(middle[freq_V[middle] > 0])
        return self._cache[key]

    def random_tokens(self, rng: np.random.Generator, shape, exclude: float) -> np.ndarray:
        """Uniform draws (int32) from `candidate_tokens(exclude)`."""
        pool = self.candidate_tokens(exclude)
        if pool.size == 0:
            raise ValueError(f"{self.path}: no tokens left after excluding {exclude} at each end")
        return pool[rng.integers(0, pool.size, size=shape)].astype(np.int32)


def _epoch_seed(seed: int, epoch: int) -> int:
    # Grain's own per-epoch reseeding is seed + epoch, which makes (seed, epoch + 1) repeat (seed + 1, epoch).
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint32)[0])


class Loader:
    """Global batch of step s = windows [s·B, (s+1)·B) of the endless sequence of per-epoch permutations.

    Windows are the non-overlapping seq_len slices of the train stream; epoch e visits each once, in the order of
    a Grain shuffle seeded by (seed, e). A batch may straddle two epochs.
    """

    def __init__(self, prepared: Prepared, seq_len: int, global_batch: int, seed: int):
        tokens = prepared.train_tokens()
        self.seq_len, self.batch_size, self.seed = seq_len, global_batch, seed
        self.windows_per_epoch = tokens.size // seq_len
        if self.windows_per_epoch < global_batch:
            raise ConfigError(f"{prepared.path}: {tokens.size} train tokens make {self.windows_per_epoch} windows "
                              f"of {seq_len}, fewer than one batch of {global_batch}")
        self._windows_WT = tokens[: self.windows_per_epoch * seq_len].reshape(-1, seq_len)
        self._epochs: dict[int, grain.MapDataset] = {}

    def epoch(self, e: int) -> grain.MapDataset:
        """Epoch e as a random-access Grain dataset of windows (uint16 [seq_len])."""
        if e not in self._epochs:
            if len(self._epochs) > 2:  # steps move forward: older epochs are not asked for again
                self._epochs.pop(min(self._epochs))
            windows_WT = self._windows_WT
            self._epochs[e] = (grain.MapDataset.range(self.windows_per_epoch)
                               .shuffle(seed=_epoch_seed(self.seed, e)).map(lambda i: windows_WT[i]))
        return self._epochs[e]

    def rows(self, step: int, rows_R: np.ndarray) -> np.ndarray:
        """The given rows of step's global batch, int32 [R, seq_len]."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        flat_R = step * self.batch_size + np.asarray(rows_R, np.int64)
        out_RT = np.empty((flat_R.size, self.seq_len), np.int32)
        for r, g in enumerate(flat_R):
            e, p = divmod(int(g), self.windows_per_epoch)
            out_RT[r] = self.epoch(e)[p]
        return out_RT

    def global_batch(self, step: int) -> np.ndarray:
        return self.rows(step, np.arange(self.batch_size))

    def process_batch(self, step: int, process_index: int, process_count: int) -> np.ndarray:
        """This process's contiguous block of B / process_count rows."""
        if self.batch_size % process_count:
            raise ValueError(f"global batch {self.batch_size} is not divisible by {process_count} processes")
        per = self.batch_size // process_count
        return self.rows(step, np.arange(process_index * per, (process_index + 1) * per))

    def device_batch(self, step: int, sharding: jax.sharding.NamedSharding) -> jax.Array:
        """The global batch as one jax.Array; this process reads only the rows its devices hold."""
        shape = (self.batch_size, self.seq_len)
        spans = sorted({(s[0].start or 0, self.batch_size if s[0].stop is None else s[0].stop)
                        for s in sharding.addressable_devices_indices_map(shape).values()})
        # make_array_from_process_local_data expects this process's row slices concatenated in order.
        rows_R = np.concatenate([np.arange(a, b) for a, b in spans])
        return jax.make_array_from_process_local_data(sharding, self.rows(step, rows_R), shape)


def summary(p: Prepared) -> str:
    m = p.metadata
    f, t, b, k = m["files"], m["tokens"], m["bytes"], m["tokenizer"]
    skipped = (f"{f['skipped_binary']} binary, {f['skipped_undecodable']} undecodable, "
               f"{f['empty_documents']} empty")
    if f.get("skipped_jsonl_records"):
        skipped += f", {f['skipped_jsonl_records']} JSONL lines without a string text field"
    return "\n".join([
        f"prepared data: {p.path}",
        f"python {m['python_version']}; sources {', '.join(m['sources'])}; "
        f"content sha256 {m['content_sha256'][:16]}",
        f"files: {f['read']} read ({m['documents']['train']} train / {m['documents']['eval']} held-out documents); "
        f"skipped {skipped}",
        f"bytes: {b['train']:,} train / {b['eval']:,} held-out",
        f"tokens: {t['train']:,} train / {t['eval']:,} held-out "
        f"({b['train'] / max(t['train'], 1):.2f} bytes/token)",
        f"tokenizer: vocab {k['vocab']}, {'trained' if k['trained'] else 'given'} in {k['seconds']:.1f} s; "
        f"tokenizing {k['encode_seconds']:.1f} s",
        f"eval set: {m['eval']['examples']} x {m['eval']['length']} tokens, sha256 {p.eval_hash[:16]}",
    ] + ([f"token store sha256 {m['tokens_sha256'][:16]} (train and held-out tokens, tokenizer)"]
         if "tokens_sha256" in m else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m induction_jax.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize data.sources into the cache (a no-op when already done)")
    cli.add_config_args(prep, required=True)
    cli.add_progress_arg(prep)
    args = parser.parse_args(argv)
    cfg = cli.config_from_args(args)
    t0 = time.perf_counter()
    prepared = prepare(cfg, progress=not args.no_progress)
    print(summary(prepared))
    print(f"({time.perf_counter() - t0:.1f} s this call)")
    return 0


if __name__ == "__main__":
    cli.run(main)
