"""Streaming build of a prepared directory: pieces read and tokenized in worker processes, appended in order.

Memory does not grow with the corpus: a piece (`sources.PIECE_BYTES` of source) is read, split and tokenized in
a worker, and its tokens are appended to the train / held-out token streams as soon as the pieces before it are.
The tokenizer is trained first, on at most `data.tokenizer_sample_bytes` of train text from pieces spread over
the corpus (all of it when the corpus is smaller). A piece of compressed files or archives is decompressed here,
in the main process, and its parts (`sources.parts`) go to the workers as pieces do. After every piece or part,
progress.json records what is committed; a build directory left by a killed prepare resumes at the first piece
or part it does not list. Finished pieces are then read again only to hash their content (metadata's
content_sha256), never tokenized again.

A weighted mixture's sources are planned apart, so each source's tokens are one contiguous range of each stream:
metadata.json's `mixture` records their sizes, and the eval set (`eval_source`: each window's source) is drawn per
source (`mixture_eval_offsets`).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from ..base.config import Config, ConfigError
from . import corpus, sources, tokenstore
from .sources import SPLITS

CODE_VERSION = 2  # bump whenever prepared output would change for the same inputs
_EVAL_STREAM = 1  # separates the eval set's random stream from any other use of data.eval_seed
_ENCODE_CHARS = 1 << 20  # text per encode_batch call: bounds the Encoding objects held at once
_W: dict = {}  # a worker's settings, set by _init
_FAULT_LINES = 20  # damaged streams and archive members that are not text: lines kept in progress and metadata


def _init(data_cfg, vocab: int, single: bool) -> None:
    if not single:  # one process per core already: no Rayon threads on top
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _W.update(cfg=data_cfg, vocab=vocab, tok=None, tok_path=None)


def _sample_task(task) -> list[str]:
    return sources.read_piece(task[0], _W["cfg"]).texts["train"]


def _digest_task(task) -> bytes:
    piece, _, eod_id = task
    return bytes(sources.read_piece(piece, _W["cfg"], _W["vocab"], eod_id).digests)


def encode(tok: Tokenizer, texts: list[str], eod_id: int) -> np.ndarray:
    """One uint16 stream: every document followed by `<|eod|>`."""
    parts: list[np.ndarray] = []
    eod = np.array([eod_id], np.uint16)
    start = 0
    while start < len(texts):
        stop, chars = start, 0
        while stop < len(texts) and chars < _ENCODE_CHARS:
            chars += len(texts[stop])
            stop += 1
        for enc in tok.encode_batch_fast(texts[start:stop], add_special_tokens=False):
            parts += [np.asarray(enc.ids, np.uint16), eod]
        start = stop
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def _encode_task(task) -> sources.PieceDocs:
    piece, tok_path, eod_id = task
    docs = sources.read_piece(piece, _W["cfg"], _W["vocab"], eod_id)
    if docs.tokens is None:
        if _W["tok_path"] != tok_path:
            _W.update(tok=Tokenizer.from_file(tok_path), tok_path=tok_path)
        docs.tokens = {s: encode(_W["tok"], docs.texts[s], eod_id) for s in SPLITS}
        docs.texts = {}  # not sent back
    return docs


def _lookahead(items):
    """(item, whether it is the last) for each item."""
    end = object()
    it = iter(items)
    prev = next(it, end)
    while prev is not end:
        item = next(it, end)
        yield prev, item is end
        prev = item


def _units(pieces: list[sources.Piece], d, start: tuple[int, int] = (0, 0), stop: tuple[int, int] | None = None,
           chosen: set[int] | None = None, skipped=None, cap: int = 0):
    """(piece index, part index, last part of the piece, piece or part, stored bytes) of the work from
    (piece, part) `start` up to `stop` (exclusive), of the `chosen` pieces only if given, and of a streamed piece
    only the parts that reach `cap` bytes of text if given. A streamed piece is decompressed here; its parts
    before `start` are decompressed but not yielded (`skipped(size)` is called)."""
    for i in range(start[0], len(pieces)):
        if stop is not None and (i, 0) >= stop:
            return
        if chosen is not None and i not in chosen:
            continue
        p = pieces[i]
        if not p.streamed:
            yield i, 0, True, p, p.size
            continue
        text = 0
        for k, (part, last) in enumerate(_lookahead(sources.parts(p, d, sources.PIECE_BYTES))):
            if stop is not None and (i, k) >= stop:
                return
            if cap and text >= cap:
                break
            text += part.text_bytes
            if i == start[0] and k < start[1]:
                if skipped is not None:
                    skipped(part.size)
                continue
            yield i, k, last, part, part.size


def _ordered(pool: ProcessPoolExecutor, fn, tasks, ahead: int):
    """fn over tasks in the pool, results in task order, at most `ahead` tasks in flight (bounded memory)."""
    pending: collections.deque = collections.deque()
    for task in tasks:
        pending.append(pool.submit(fn, task))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@contextlib.contextmanager
def _workers(n: int, data_cfg, vocab: int):
    """A map(fn, tasks) in order: in this process for n <= 1, else over n spawned processes (spawn, not fork:
    the caller may hold JAX's threads)."""
    if n <= 1:
        _init(data_cfg, vocab, True)
        yield map
        return
    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
                               initargs=(data_cfg, vocab, False))
    try:
        yield lambda fn, tasks: _ordered(pool, fn, tasks, 2 * n)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _new_state(plan_id: str, vocab: int) -> dict:
    zero = {s: 0 for s in SPLITS}
    return {"plan": plan_id, "pieces": 0, "tokens": dict(zero), "names_bytes": dict(zero), "documents": dict(zero),
            "bytes": dict(zero), "binary": 0, "undecodable": 0, "empty": 0, "skipped": 0, "skipped_by_file": {},
            "files_read": 0, "last_file": "", "per_source": {}, "frequencies": [0] * vocab,
            "tokenizer_seconds": 0.0, "sample_bytes": 0, "encode_seconds": 0.0, "parts": 0, "damaged": 0,
            "faults": 0, "fault_lines": []}


def _load_state(out: Path, plan_id: str, vocab: int) -> dict:
    path = out / "progress.json"
    if path.is_file():
        state = json.loads(path.read_text())
        if state.get("plan") == plan_id:
            return {**_new_state(plan_id, vocab), **state}  # keys a build of an earlier version did not write
    return _new_state(plan_id, vocab)


def _save_state(out: Path, state: dict) -> None:
    tmp = out / "progress.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(out / "progress.json")


def _commit(state: dict, docs: sources.PieceDocs, name_files: dict) -> None:
    for s in SPLITS:
        state["tokens"][s] += int(docs.tokens[s].size)
        state["documents"][s] += len(docs.names[s])
        state["bytes"][s] += docs.bytes[s]
        name_files[s].write("".join(json.dumps(n) + "\n" for n in docs.names[s]).encode())
        name_files[s].flush()
        state["names_bytes"][s] = name_files[s].tell()
    for key in ("binary", "undecodable", "empty", "skipped", "damaged"):
        state[key] += getattr(docs, key)
    for line in docs.faults:
        state["faults"] += 1
        if len(state["fault_lines"]) < _FAULT_LINES:
            state["fault_lines"].append(line)
    for name, n in docs.skipped_by_file.items():
        state["skipped_by_file"][name] = state["skipped_by_file"].get(name, 0) + n
    for source, (n, path, kind) in docs.compressed.items():
        state.setdefault("compressed", {}).setdefault(source, [0, path, kind])[0] += n
    for name, source in docs.used:  # a file may span pieces: count it once
        if name != state["last_file"]:
            state["files_read"] += 1
            state["per_source"][source] = state["per_source"].get(source, 0) + 1
            state["last_file"] = name
    freq = np.asarray(state["frequencies"], np.int64)
    freq += np.bincount(docs.tokens["train"], minlength=freq.size)[: freq.size]
    state["frequencies"] = freq.tolist()


def _names_file(out: Path, split: str, length: int):
    path = out / f"documents-{split}.txt"
    path.touch()
    os.truncate(path, length)  # drop names a killed build wrote after its last commit
    return open(path, "ab")


def _tokenizer(cfg: Config, user_tok, pieces, state: dict, out: Path, pmap, progress: bool) -> Tokenizer:
    path = out / "tokenizer.json"
    if path.is_file():  # a resumed build keeps the tokenizer it started with
        return Tokenizer.from_file(str(path))
    if user_tok is not None:
        user_tok.save(str(path))
        return user_tok
    budget = cfg.data.tokenizer_sample_bytes
    chosen = sources.sample(pieces, budget)
    # a compressed piece's text is larger than its stored size
    streamed = any(pieces[i].streamed for i in chosen)
    bar = tqdm(total=budget if streamed else min(budget, sum(pieces[i].size for i in chosen)),
               desc="reading the tokenizer's sample", unit="B", unit_scale=True, disable=not progress)

    def texts():
        units = _units(pieces, cfg.data, chosen=set(chosen), cap=sources.sample_cap(pieces, chosen, budget))
        for batch in pmap(_sample_task, ((unit, "", -1) for _, _, _, unit, _ in units)):
            for text in batch:
                n = len(text.encode("utf-8"))
                if state["sample_bytes"] + n > budget and state["sample_bytes"]:
                    return
                state["sample_bytes"] += n
                bar.update(n)
                yield text

    t0 = time.perf_counter()
    tok = corpus.train_tokenizer(texts(), cfg.model.vocab_size, progress)
    bar.close()
    state["tokenizer_seconds"] = round(time.perf_counter() - t0, 3)
    tok.save(str(path))
    _save_state(out, state)
    return tok


def sha256_eval(windows_NL: np.ndarray, index_N: np.ndarray, source_N: np.ndarray | None = None) -> str:
    """The eval set's hash; a mixture's (`source_N`: each window's source index) covers the source of each window
    too. Source paths are left out, as the data fingerprint leaves them out."""
    h = hashlib.sha256(f"{windows_NL.shape[0]}x{windows_NL.shape[1]}".encode())
    h.update(windows_NL.astype("<u2").tobytes())
    h.update(index_N.astype("<i4").tobytes())
    if source_N is not None:
        h.update(b"sources")
        h.update(np.asarray(source_N).astype("<i4").tobytes())
    return h.hexdigest()


def mixture_eval_offsets(sizes_K: list[int], n: int, length: int, seed: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A mixture's eval set, per source: window i comes from source i % K (so every source has N/K windows, give
    or take one, and any prefix of the set, such as the live probe's, covers the sources alike), at an offset
    uniformly random within that source's range of the held-out stream. Returns (offsets_N, index_N, source_N)."""
    sizes_K = np.asarray(sizes_K, np.int64)
    starts_K = np.concatenate([[0], np.cumsum(sizes_K)[:-1]])
    source_N = (np.arange(n) % sizes_K.size).astype(np.int32)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _EVAL_STREAM]))
    low_N = starts_K[source_N]
    offsets_N = rng.integers(low_N, low_N + sizes_K[source_N] - length + 1)
    index_N = rng.integers(1, length, size=n).astype(np.int32)
    return offsets_N, index_N, source_N


def eval_offsets(stream_size: int, n: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """N window offsets, uniformly random in the held-out stream, and one random token index in [1, L-1] each.

    Offsets, not document starts: the content at every token index is then identically distributed, and only the
    available context differs (docs/method.md §3).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, _EVAL_STREAM]))
    offsets_N = rng.integers(0, stream_size - length + 1, size=n)
    index_N = rng.integers(1, length, size=n).astype(np.int32)
    return offsets_N, index_N


def build(cfg: Config, files: list[corpus.SourceFile], fp: str, user_tok: Tokenizer | None, out: Path,
          eval_length: int, progress: bool) -> None:
    """Fills (or resumes filling) `out`; metadata.json, written last, marks it complete."""
    d = cfg.data
    eod_hint = user_tok.token_to_id(corpus.EOD) if user_tok is not None else -1
    if d.source_weights is None:
        pieces, piece_source = sources.plan(files, d, sources.PIECE_BYTES, eod_hint), None
    else:
        pieces, piece_source = _mixture_plan(files, d, eod_hint)
    plan_id = hashlib.sha256(repr([([f.name for f in p.files], p.start, p.stop) for p in pieces]).encode())
    vocab = max(cfg.model.vocab_size, user_tok.get_vocab_size() if user_tok is not None else 0)
    state = _load_state(out, plan_id.hexdigest(), vocab)
    if piece_source is not None:
        state.setdefault("source_tokens", {s: [0] * len(d.sources) for s in SPLITS})
    done = (state["pieces"], state.get("parts", 0))  # the first piece, and part of it, not committed
    # workers for the pieces, or for the parts of a streamed corpus
    parallel = len(pieces) if not any(p.streamed for p in pieces) else os.cpu_count() or 1
    with _workers(min(d.workers or os.cpu_count() or 1, parallel), d, vocab) as pmap:
        tok = _tokenizer(cfg, user_tok, pieces, state, out, pmap, progress)
        bos_id, eod_id = (tok.token_to_id(s) for s in corpus.SPECIAL_TOKENS)
        tok_path = str(out / "tokenizer.json")
        streams = {s: tokenstore.Stream(out, f"{s}_tokens", state["tokens"][s]) for s in SPLITS}
        name_files = {s: _names_file(out, s, state["names_bytes"][s]) for s in SPLITS}
        content = hashlib.sha256()
        try:
            finished = ((unit, tok_path, eod_id) for _, _, _, unit, _ in _units(pieces, d, stop=done))
            for digests in tqdm(pmap(_digest_task, finished), desc="hashing finished pieces", unit="piece",
                                disable=not progress or done == (0, 0)):
                content.update(digests)
            with tqdm(total=sum(p.size for p in pieces), initial=sum(p.size for p in pieces[:done[0]]),
                      desc="copying tokens" if files[0].pretokenized else "tokenizing",
                      unit="B", unit_scale=True, disable=not progress) as bar:
                where = collections.deque()  # (piece, part, last, stored bytes) of each task handed out

                def tasks():
                    for i, k, last, unit, size in _units(pieces, d, start=done, skipped=bar.update):
                        where.append((i, k, last, size))
                        yield unit, tok_path, eod_id

                t0 = time.perf_counter()
                for docs in pmap(_encode_task, tasks()):
                    i, k, last, size = where.popleft()
                    for s in SPLITS:
                        streams[s].append(docs.tokens[s])
                        if piece_source is not None:
                            state["source_tokens"][s][piece_source[i]] += int(docs.tokens[s].size)
                    _commit(state, docs, name_files)
                    content.update(docs.digests)
                    state["pieces"], state["parts"] = (i + 1, 0) if last else (i, k + 1)
                    state["encode_seconds"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    _save_state(out, state)
                    bar.update(size)
        finally:
            for f in name_files.values():
                f.close()
    _finish(cfg, files, fp, user_tok is None, tok, bos_id, eod_id, state, content.hexdigest(), out, eval_length,
            progress)


def _mixture_plan(files: list[corpus.SourceFile], d, eod_hint: int) -> tuple[list[sources.Piece], list[int]]:
    """The pieces of a weighted mixture, each source's planned apart (no piece holds two sources' files), so each
    source's tokens form one contiguous range of each stream; and the index of the source of each piece."""
    pieces, piece_source = [], []
    for k, src in enumerate(d.source_paths):
        own = [f for f in files if f.source == src]
        if not own:  # resolve() keeps a file once, for the first source that names it
            raise ConfigError(f"data.sources[{k}]: {src!r}: every file is also in an earlier source; the sources "
                              "of a mixture must not overlap")
        planned = sources.plan(own, d, sources.PIECE_BYTES, eod_hint)
        pieces += planned
        piece_source += [k] * len(planned)
    return pieces, piece_source


def _check_splits(cfg: Config, files: list[corpus.SourceFile], state: dict) -> None:
    d = cfg.data
    if state["skipped"]:
        worst = sorted(state["skipped_by_file"].items(), key=lambda kv: -kv[1])
        where = ", ".join(f"{name}: {n}" for name, n in worst[:3]) + (", ..." if len(worst) > 3 else "")
        print(f"warning: data.sources: skipped {state['skipped']} record(s) without a string {d.text_field!r} "
              f"field ({where})", file=sys.stderr, flush=True)
    for line in state["fault_lines"]:
        print(f"warning: data.sources: {line}", file=sys.stderr, flush=True)
    if state["faults"] > len(state["fault_lines"]):
        print(f"warning: data.sources: {state['faults'] - len(state['fault_lines'])} more damaged file(s) or "
              f"archive member(s) that are not text, skipped", file=sys.stderr, flush=True)
    for src in dict.fromkeys(f.source for f in files):
        compressed = state.get("compressed", {}).get(src)
        if not state["per_source"].get(src) and compressed:
            n, path, kind = compressed
            if kind == "zip":
                raise ConfigError(f"data.sources: {src!r}: no readable text: {n} file(s) are zip archives, e.g. "
                                  f"{path}, which are not read; unpack them, or pack them as .tar.gz")
            suffix = {"gzip": ".gz", "bzip2": ".bz2", "xz": ".xz", "zstd": ".zst"}[kind]
            raise ConfigError(f"data.sources: {src!r}: no readable text: {n} file(s) are compressed ({kind}) but "
                              f"not named {suffix}, e.g. {path}; add the suffix, which has them decompressed")
        if not state["per_source"].get(src):
            raise ConfigError(f"data.sources: {src!r}: no readable text (binary, undecodable, empty, damaged, or "
                              f"records without a string {d.text_field!r} field)")
    docs = state["documents"]
    if not docs["train"] or not docs["eval"]:
        which = "train" if not docs["train"] else "held-out"
        raise ConfigError(f"data.sources: {', '.join(d.source_paths)}: the {which} split is empty "
                          f"({docs['train'] + docs['eval']} documents, data.eval_fraction={d.eval_fraction}); "
                          f"add files or change data.eval_fraction")


def _check_mixture(cfg: Config, per_source: dict, length: int) -> None:
    """Every source of a mixture needs train text and at least one eval window of held-out text."""
    d = cfg.data
    for k, src in enumerate(d.source_paths):
        train, held = per_source["train"][k], per_source["eval"][k]
        if not train:
            raise ConfigError(f"data.sources[{k}]: {src!r}: no train text (documents are held out by a hash of "
                              f"their name, data.eval_fraction={d.eval_fraction}); give the source more documents")
        if held < length:
            raise ConfigError(f"data.sources[{k}]: {src!r}: the held-out split has {held} tokens, fewer than one "
                              f"eval window of {length} (a mixture's eval set is per source; documents are held "
                              f"out by a hash of their name, data.eval_fraction={d.eval_fraction}); give the "
                              f"source more documents or raise data.eval_fraction")


def _finish(cfg: Config, files, fp: str, trained: bool, tok: Tokenizer, bos_id: int, eod_id: int, state: dict,
            content_sha: str, out: Path, length: int, progress: bool) -> None:
    d = cfg.data
    _check_splits(cfg, files, state)
    train = tokenstore.open_array(out, "train_tokens")
    held = tokenstore.open_array(out, "eval_tokens")
    if held.shape[0] < length:
        raise ConfigError(f"data.sources: {', '.join(d.source_paths)}: the held-out split has {held.shape[0]} "
                          f"tokens, fewer than one eval window of {length}; raise data.eval_fraction")
    per_source = state.get("source_tokens")
    if per_source is None:
        offsets_N, index_N = eval_offsets(held.shape[0], d.eval_examples, length, d.eval_seed)
        source_N = None
    else:
        _check_mixture(cfg, per_source, length)
        offsets_N, index_N, source_N = mixture_eval_offsets(per_source["eval"], d.eval_examples, length,
                                                            d.eval_seed)
    windows_NL = tokenstore.windows(held, offsets_N, length)
    tokens_sha = hashlib.sha256()
    with tqdm(total=train.shape[0] + held.shape[0], desc="hashing the token store", unit="tok", unit_scale=True,
              disable=not progress) as bar:
        tokenstore.update_sha256(tokens_sha, train, bar)
        tokenstore.update_sha256(tokens_sha, held, bar)
    tokens_sha.update(tok.to_str().encode())
    tokenstore.write(out, "eval_windows", windows_NL)
    tokenstore.write(out, "eval_index", index_N)
    if source_N is not None:
        tokenstore.write(out, "eval_source", source_N)
    tokenstore.write(out, "frequencies", np.asarray(state["frequencies"], np.int64))
    metadata = {
        "code_version": CODE_VERSION, "fingerprint": fp, "python_version": sys.version.split()[0],
        "sources": list(d.source_paths), "site_packages": d.site_packages, "content_sha256": content_sha,
        "pretokenized": files[0].pretokenized,
        "files": {"read": state["files_read"], "skipped_binary": state["binary"],
                  "skipped_undecodable": state["undecodable"], "skipped_records": state["skipped"],
                  "skipped_damaged": state["damaged"], "empty_documents": state["empty"]},
        "faults": state["fault_lines"],
        "documents": state["documents"], "bytes": state["bytes"],
        "tokens": {"train": int(train.shape[0]), "eval": int(held.shape[0])},
        "tokens_sha256": tokens_sha.hexdigest(),
        "tokenizer": {"trained": trained, "source": d.tokenizer or "trained on the train split",
                      "vocab": tok.get_vocab_size(), "seconds": state["tokenizer_seconds"],
                      "sample_bytes": state["sample_bytes"], "encode_seconds": round(state["encode_seconds"], 3),
                      "tokenizers_version": tokenizers.__version__},
        "vocab_size": cfg.model.vocab_size, "bos_id": bos_id, "eod_id": eod_id,
        "eval": {"examples": d.eval_examples, "length": length, "seed": d.eval_seed,
                 "fraction": d.eval_fraction, "sha256": sha256_eval(windows_NL, index_N, source_N)},
    }
    if per_source is not None:
        # Where each source's tokens lie in the two streams (consecutive ranges, in source order); the weights
        # are not here: they change only the loader, so every weighting of the same sources shares this store.
        metadata["mixture"] = {"sources": list(d.source_paths), "tokens": per_source}
        metadata["eval"]["per_source"] = np.bincount(source_N, minlength=len(d.sources)).tolist()
    (out / "progress.json").unlink()
    # Written last: a directory with metadata.json is complete, whatever else happened to it.
    (out / "metadata.json").write_text(json.dumps(metadata, indent=1))
