"""Prepared data: token store, fixed eval set and token frequencies on disk; a stateless multi-host loader.

`prepare(cfg)` turns `data.sources` into a directory keyed by a fingerprint of its inputs (see `fingerprint`):
tokenizer.json, metadata.json, documents-train.txt / documents-eval.txt (document names per split, one JSON
string a line) and tensorstore zarr arrays `train_tokens`, `eval_tokens` (documents each followed by
`<|eod|>`), `eval_windows` [N, L], `eval_index` [N] and `frequencies` [V]; a weighted mixture's also records
each source's token ranges (metadata's `mixture`) and `eval_source` [N]. It streams (see `build`): memory does
not grow with the corpus, and a killed prepare resumes where it stopped. A directory with that name is always
whole: it is built under a temporary name and renamed into place when complete.

`Loader` makes the global batch of step s a pure function of (seed, s) (docs/method.md §7): no iterator state to
checkpoint, and resuming on any number of processes reproduces an uninterrupted run exactly. It reads its windows
lazily from the token store, so a host holds only the rows it asked for. `MixtureLoader` does the same for a
weighted mixture, each batch holding the sources in the weights' proportions; `make_loader` picks one.

CLI: `python -m induction_jax.data prepare --config configs/X.yaml [key=value ...]` (__main__.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import socket
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from ..base.config import Config, ConfigError, UserError
from . import build, corpus, sources, tokenstore
from .build import CODE_VERSION, sha256_eval

CACHE_ENV = "INDUCTION_JAX_CACHE"


def cache_root(cfg: Config | None = None) -> Path:
    """`data.cache_dir`, else $INDUCTION_JAX_CACHE, else ~/.cache/induction_jax (also where training/peak.py keeps
    its probe)."""
    root = (cfg.data.cache_dir if cfg else None) or os.environ.get(CACHE_ENV) or "~/.cache/induction_jax"
    return Path(root).expanduser()


def _check_cache_root(cfg: Config, root: Path) -> None:
    """Refuses in one line, naming the setting it came from, a cache root that cannot be a directory."""
    setting = "data.cache_dir" if cfg.data.cache_dir else CACHE_ENV if os.environ.get(CACHE_ENV) else "the default"
    if root.is_symlink() and not root.exists():
        raise ConfigError(f"{setting}: {root}: a dangling symlink (to {os.readlink(root)}); create its target or "
                          "point the cache at a directory")
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{setting}: {root}: is a file, not a directory; point the cache at a directory")


def eval_length(cfg: Config) -> int:
    """Eval windows are the model's context when that is shorter than `data.eval_length` (docs/method.md §3)."""
    return min(cfg.data.eval_length, cfg.model.context)


def fingerprint(cfg: Config, files: list[corpus.SourceFile], tokenizer_sha: str = "",
                progress: bool = False) -> str:
    """Everything that changes the prepared bytes: each file's name, kind, size and content digest (not its path
    or mtime: a reinstalled or moved copy of the same bytes is the same corpus), tokenizer, eval settings."""
    d = cfg.data
    digests = [[f.name, f.kind, f.size, corpus.content_digest(f)]
               for f in tqdm(files, desc="hashing sources", unit="file", disable=not progress, leave=False)]
    payload = {
        "code_version": CODE_VERSION, "tokenizers": tokenizers.__version__, "files": digests,
        "text_field": d.text_field, "vocab_size": cfg.model.vocab_size, "tokenizer_sha256": tokenizer_sha,
        "eval": [d.eval_examples, eval_length(cfg), d.eval_seed, d.eval_fraction],
        "pieces": sources.PIECE_BYTES, "tokenizer_sample_bytes": 0 if tokenizer_sha else d.tokenizer_sample_bytes,
    }
    if d.source_weights is not None:
        # A mixture's store records each source's token ranges and draws its eval set per source. The key is
        # added only here, so an unweighted corpus keeps its fingerprint; the weights themselves stay out (they
        # change only the loader).
        payload["mixture"] = True
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


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


def _owner(d: Path) -> tuple[str, int] | None:
    """(host, pid) of a build directory named by this code, else None."""
    try:
        host_pid, _ = d.name.split(_TMP_TAG, 1)[1].rsplit("-", 1)
        host, pid = host_pid.rsplit("-", 1)
        return host, int(pid)
    except ValueError:
        return None


def _abandoned(d: Path) -> bool:
    """Made on this host by a process that is gone (or by this one, whose earlier prepare was interrupted)."""
    owner = _owner(d)
    return owner is not None and owner[0] == _host() and (owner[1] == os.getpid() or not _alive(owner[1]))


def remove_stale_builds(root: Path) -> list[Path]:
    """Deletes the build directories of killed prepares that have nothing to resume: made on this host by a PID
    that is gone, with no progress.json. One with progress is kept for the next prepare of its fingerprint; a live
    prepare's directory (this host's, or any other host's sharing the cache) is left alone."""
    removed = []
    for d in root.glob(f".*{_TMP_TAG}*"):
        owner = _owner(d)
        if owner and owner[0] == _host() and owner[1] != os.getpid() and not _alive(owner[1]) \
                and not (d / "progress.json").is_file():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _claim_build(root: Path, fp: str) -> Path:
    """A build directory for fp owned by this process: an abandoned one renamed to this process (its progress is
    resumed), or a new one. The rename is atomic, so two prepares never claim the same directory."""
    mine = root / f".{fp}{_TMP_TAG}{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    for d in sorted(root.glob(f".{fp}{_TMP_TAG}*"), key=lambda d: not (d / "progress.json").is_file()):
        if _abandoned(d):
            try:
                os.rename(d, mine)
                return mine
            except OSError:
                continue  # another prepare claimed it first
    mine.mkdir()
    return mine


def prepare(cfg: Config, progress: bool = True) -> Prepared:
    """Builds (or finds, or resumes) the prepared data for `cfg`; a second call with the same inputs only hashes
    the sources to find the cached directory."""
    corpus.check_vocab(cfg.model.vocab_size)
    _check_cache_root(cfg, cache_root(cfg))  # before the sources are hashed, which may take long
    if cfg.data.eval_examples < 1:
        raise ConfigError(f"data.eval_examples: must be >= 1, got {cfg.data.eval_examples}")
    user_tok = corpus.load_tokenizer(cfg.data.tokenizer, cfg.model.vocab_size) if cfg.data.tokenizer else None
    files = corpus.resolve(cfg.data)
    fp = fingerprint(cfg, files, corpus.file_sha256(cfg.data.tokenizer) if user_tok else "", progress)
    root = cache_root(cfg)
    final = root / fp
    if (final / "metadata.json").is_file():
        return open_prepared(str(final))
    root.mkdir(parents=True, exist_ok=True)
    tmp = _claim_build(root, fp)
    remove_stale_builds(root)
    try:
        build.build(cfg, files, fp, user_tok, tmp, eval_length(cfg), progress)
    except UserError:  # bad input: nothing worth resuming (other failures keep the directory to resume)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same fingerprint first; its copy is as good
        if not (final / "metadata.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return open_prepared(str(final))


def open_prepared(path: str | Path) -> Prepared:
    """Reads a prepared directory (local path or gs:// URL) written by `prepare`."""
    path = str(path)
    raw = tokenstore.read_file(path, "metadata.json")
    if raw is None:
        raise ConfigError(f"{path}: not a prepared data directory (no metadata.json)")
    meta = json.loads(raw)
    if meta.get("code_version") != CODE_VERSION:
        raise ConfigError(f"{path}: prepared by data code version {meta.get('code_version')}, this code reads "
                          f"{CODE_VERSION}; run prepare again")
    return Prepared(path, meta)


class Prepared:
    """Read access to a prepared directory; small arrays are read on first use and kept, token streams lazily."""

    def __init__(self, path: str, metadata: dict):
        self.path = path
        self.metadata = metadata
        self.bos_id: int = metadata["bos_id"]
        self.eod_id: int = metadata["eod_id"]
        self.eval_hash: str = metadata["eval"]["sha256"]
        self._cache: dict[str, object] = {}

    def _array(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = tokenstore.read(self.path, name)
        return self._cache[name]

    def tokenizer(self) -> Tokenizer:
        if "tokenizer" not in self._cache:
            self._cache["tokenizer"] = Tokenizer.from_str(tokenstore.read_file(self.path, "tokenizer.json").decode())
        return self._cache["tokenizer"]

    def splits(self) -> dict[str, list[str]]:
        """Document names of each split ("train", "eval"), in stream order."""
        return {s: [json.loads(line) for line in tokenstore.read_file(self.path, f"documents-{s}.txt").splitlines()]
                for s in sources.SPLITS}

    def train_store(self):
        """The train stream as a lazily read tensorstore array (uint16 [tokens])."""
        return tokenstore.open_array(self.path, "train_tokens")

    def train_tokens(self) -> np.ndarray:
        """The whole train stream in memory (small corpora and tests; `Loader` reads windows lazily)."""
        return np.asarray(self.train_store().read().result())

    def eval_tokens(self) -> np.ndarray:
        return tokenstore.read(self.path, "eval_tokens")

    @property
    def mixture(self) -> dict | None:
        """A weighted mixture's sources and their token counts per split ({"sources": [K paths], "tokens":
        {"train": [K], "eval": [K]}}; each source's tokens are one range of each stream, in source order); None for
        an unweighted corpus."""
        return self.metadata.get("mixture")

    def source_ranges(self, split: str) -> list[tuple[int, int]]:
        """[(start, stop)] of each source of a mixture in the `split` ("train" or "eval") token stream."""
        sizes = np.asarray(self.mixture["tokens"][split], np.int64)
        ends = np.cumsum(sizes)
        return [(int(e - n), int(e)) for n, e in zip(sizes, ends)]

    def eval_sources(self) -> np.ndarray | None:
        """A mixture's eval set: each window's source index, int32 [N] (order of `mixture["sources"]`)."""
        return self._array("eval_source").astype(np.int32) if self.mixture else None

    def eval_set(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens_NL int32, random token index_N int32), checked against the stored hash."""
        windows_NL, index_N = self._array("eval_windows"), self._array("eval_index")
        if sha256_eval(windows_NL, index_N, self.eval_sources()) != self.eval_hash:
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



def _epoch_seed(seed: int, epoch: int, *stream: int) -> int:
    # Grain's own per-epoch reseeding is seed + epoch, which makes (seed, epoch + 1) repeat (seed + 1, epoch).
    return int(np.random.SeedSequence([seed, *stream, epoch]).generate_state(1, np.uint32)[0])


def make_loader(prepared: Prepared, seq_len: int, global_batch: int, seed: int,
                weights: tuple[float, ...] | None = None) -> Loader:
    """The loader of `data.sources`: `MixtureLoader` with the weights of a weighted mixture (`data.source_weights`),
    else `Loader`."""
    if weights is None:
        return Loader(prepared, seq_len, global_batch, seed)
    return MixtureLoader(prepared, seq_len, global_batch, seed, weights)


class Loader:
    """Global batch of step s = windows [s·B, (s+1)·B) of the endless sequence of per-epoch permutations.

    Windows are the non-overlapping seq_len slices of the train stream; epoch e visits each once, in the order of
    a Grain shuffle seeded by (seed, e). A batch may straddle two epochs. Only the rows asked for are read from
    the token store, so memory does not depend on the corpus size.
    """

    def __init__(self, prepared: Prepared, seq_len: int, global_batch: int, seed: int):
        self.seq_len, self.batch_size, self.seed = seq_len, global_batch, seed
        tokens = prepared.metadata["tokens"]["train"]
        self.windows_per_epoch = tokens // seq_len
        if self.windows_per_epoch < global_batch:
            raise ConfigError(f"{prepared.path}: the corpus is too small for one batch: {tokens} train tokens of "
                              f"{', '.join(prepared.metadata['sources'])} make {self.windows_per_epoch} windows of "
                              f"{seq_len}, fewer than one batch of {global_batch}")
        self._store = prepared.train_store()
        self._epochs: dict = {}

    def epoch(self, e: int):
        """Epoch e as a random-access Grain dataset (grain.MapDataset) of window indices into the train stream."""
        # Imported here, with jax below: prepare's spawned workers import the main module, and without grain
        # (which imports jax) each of them needs ~70 MB instead of ~210 MB.
        import grain

        if e not in self._epochs:
            if len(self._epochs) > 2:  # steps move forward: older epochs are not asked for again
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = grain.MapDataset.range(self.windows_per_epoch).shuffle(seed=_epoch_seed(self.seed, e))
        return self._epochs[e]

    def starts(self, step: int, rows_R: np.ndarray) -> np.ndarray:
        """int64 [R]: where in the train stream each of the given rows of step's global batch starts."""
        flat_R = step * self.batch_size + np.asarray(rows_R, np.int64)
        windows_R = np.array([self.epoch(e)[p] for e, p in (divmod(int(g), self.windows_per_epoch) for g in flat_R)],
                             np.int64)
        return windows_R * self.seq_len

    def rows(self, step: int, rows_R: np.ndarray) -> np.ndarray:
        """The given rows of step's global batch, int32 [R, seq_len]."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        starts_R = self.starts(step, np.asarray(rows_R, np.int64))
        return tokenstore.windows(self._store, starts_R, self.seq_len).astype(np.int32)

    def global_batch(self, step: int) -> np.ndarray:
        return self.rows(step, np.arange(self.batch_size))

    def device_batch(self, step: int, sharding: jax.sharding.NamedSharding) -> jax.Array:
        """The global batch as one jax.Array; this process reads only the rows its devices hold."""
        import jax

        shape = (self.batch_size, self.seq_len)
        spans = sorted({(s[0].start or 0, self.batch_size if s[0].stop is None else s[0].stop)
                        for s in sharding.addressable_devices_indices_map(shape).values()})
        # make_array_from_process_local_data expects this process's row slices concatenated in order.
        rows_R = np.concatenate([np.arange(a, b) for a, b in spans])
        return jax.make_array_from_process_local_data(sharding, self.rows(step, rows_R), shape)


_MIX_STREAM = 1  # separates a mixture's random streams from the unweighted loader's SeedSequence([seed, epoch])


def integer_proportions(weights: tuple[float, ...]) -> tuple[int, ...]:
    """Integers in exactly the ratio of the weights as written (0.3 is 3/10, not the nearest binary fraction)."""
    fractions = [Fraction(repr(float(w))) for w in weights]
    scale = math.lcm(*(f.denominator for f in fractions))
    ints = [int(f * scale) for f in fractions]
    common = math.gcd(*ints)
    return tuple(i // common for i in ints)


def mixture_position(g: int, proportions: tuple[int, ...]) -> tuple[int, int]:
    """(source k, how many earlier positions went to k) of position g of the endless mixed sequence.

    The interleaving of grain's `MapDataset.mix`, on exact integer proportions: source 0 takes position g when
    ceil((g + 1) p_0 / P) > ceil(g p_0 / P) (P = the sum), the other positions are numbered in order and shared
    among the remaining sources the same way. Over the first g positions source k has g p_k / P of them to within
    k + 1, and its n-th position takes its n-th window."""
    remaining = sum(proportions)
    a, b = g, g + 1  # positions before g, and up to g, that are still to share out
    for k, p in enumerate(proportions):
        rest_a, rest_b = a * (remaining - p) // remaining, b * (remaining - p) // remaining
        if a - rest_a != b - rest_b:
            return k, a - rest_a
        remaining -= p
        a, b = rest_a, rest_b
    raise AssertionError("unreachable: the last source takes every remaining position")


class MixtureLoader(Loader):
    """A weighted mixture's loader: global batch of step s = positions [s·B, (s+1)·B) of an endless sequence that
    gives each source its share of positions (`mixture_position`), in a row order shuffled by (seed, s).

    Each source is a sequence of its own non-overlapping seq_len windows, visited once per epoch in the order of a
    Grain shuffle seeded by (seed, source, epoch); a source's n-th position takes its n-th window, so no window
    repeats before its source has given all of them. Every batch thus holds each source's share to within a few
    windows, and the batch of step s is a pure function of (seed, s), as with `Loader`.
    """

    def __init__(self, prepared: Prepared, seq_len: int, global_batch: int, seed: int,
                 weights: tuple[float, ...]):
        self.seq_len, self.batch_size, self.seed = seq_len, global_batch, seed
        mix = prepared.mixture
        if mix is None or len(mix["sources"]) != len(weights):
            what = "an unweighted corpus" if mix is None else f"a mixture of {len(mix['sources'])} sources"
            raise ConfigError(f"{prepared.path}: prepared from {what}, not a mixture of {len(weights)}; prepare it "
                              "with the weighted data.sources")
        self.sources = list(mix["sources"])
        self.weights = tuple(weights)
        self.proportions = integer_proportions(weights)
        self.offsets_K = [a for a, _ in prepared.source_ranges("train")]
        self.windows_K = [(b - a) // seq_len for a, b in prepared.source_ranges("train")]
        for k, (n, (a, b)) in enumerate(zip(self.windows_K, prepared.source_ranges("train"))):
            if n == 0:
                raise ConfigError(f"data.sources[{k}]: {self.sources[k]!r}: {b - a} train tokens, fewer than one "
                                  f"window of {seq_len}; give the source more text or leave it out")
        self._store = prepared.train_store()
        self._epochs: dict = {}

    def epoch(self, e: int, source: int = 0):
        """Epoch e of one source as a random-access Grain dataset of window indices within that source."""
        import grain

        key = (source, e)
        if key not in self._epochs:
            # Steps move forward, each source through its epochs at its own pace: keep a few of each source's.
            for old in [k for k in self._epochs if k[0] == source and abs(k[1] - e) > 2]:
                del self._epochs[old]
            self._epochs[key] = grain.MapDataset.range(self.windows_K[source]).shuffle(
                seed=_epoch_seed(self.seed, e, _MIX_STREAM, source))
        return self._epochs[key]

    def positions(self, step: int, rows_R: np.ndarray) -> np.ndarray:
        """int64 [R, 2]: (source, index within the source) of the given rows of step's global batch."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _MIX_STREAM, step]))
        order_B = rng.permutation(self.batch_size)
        return np.array([mixture_position(step * self.batch_size + int(order_B[r]), self.proportions)
                         for r in rows_R], np.int64).reshape(-1, 2)

    def starts(self, step: int, rows_R: np.ndarray) -> np.ndarray:
        starts = []
        for k, n in self.positions(step, rows_R):
            e, p = divmod(int(n), self.windows_K[k])
            starts.append(self.offsets_K[k] + int(self.epoch(e, int(k))[p]) * self.seq_len)
        return np.asarray(starts, np.int64)


def _mixture_line(m: dict) -> str:
    mix = m["mixture"]
    return "mixture: " + "; ".join(
        f"{src}: {a:,} train / {b:,} held-out tokens, {n} eval windows"
        for src, a, b, n in zip(mix["sources"], mix["tokens"]["train"], mix["tokens"]["eval"], m["eval"]["per_source"]))


def summary(p: Prepared) -> str:
    m = p.metadata
    f, t, b, k = m["files"], m["tokens"], m["bytes"], m["tokenizer"]
    skipped = (f"{f['skipped_binary']} binary, {f['skipped_undecodable']} undecodable, "
               f"{f['empty_documents']} empty")
    if f.get("skipped_records"):
        skipped += f", {f['skipped_records']} records without a string text field"
    if f.get("skipped_damaged"):
        skipped += f", {f['skipped_damaged']} damaged compressed files or archives (partly)"
    return "\n".join([
        f"prepared data: {p.path}",
        f"python {m['python_version']}; sources {', '.join(m['sources'])}; "
        f"content sha256 {m['content_sha256'][:16]}",
        f"files: {f['read']} read ({m['documents']['train']} train / {m['documents']['eval']} held-out documents); "
        f"skipped {skipped}",
        f"bytes: {b['train']:,} train / {b['eval']:,} held-out",
        f"tokens: {t['train']:,} train / {t['eval']:,} held-out "
        f"({b['train'] / max(t['train'], 1):.2f} bytes/token)",
        (f"tokenizer: vocab {k['vocab']}, trained in {k['seconds']:.1f} s on {k['sample_bytes']:,} bytes; "
         if k["trained"] else f"tokenizer: vocab {k['vocab']}, given; ")
        + f"{'copying' if m['pretokenized'] else 'tokenizing'} {k['encode_seconds']:.1f} s",
        f"eval set: {m['eval']['examples']} x {m['eval']['length']} tokens, sha256 {p.eval_hash[:16]}",
    ] + ([_mixture_line(m)] if "mixture" in m else [])
        + ([f"token store sha256 {m['tokens_sha256'][:16]} (train and held-out tokens, tokenizer)"]
           if "tokens_sha256" in m else []))

