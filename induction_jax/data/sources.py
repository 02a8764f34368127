"""Source files -> pieces -> documents of one piece, split into train and held-out.

A piece is the unit of parallel reading, tokenizing and resuming: a run of small files, or a part of one large
file (newline-aligned bytes of a text or JSONL file, row groups of a parquet file, record batches of an arrow
file, an `<|eod|>`-aligned token range of a pre-tokenized array). Planning reads only metadata and a few bytes
at each cut, so its cost and memory do not grow with the text. Documents are named so that the name, hashed,
decides the split: a file's path; `<file>@<byte offset>` for a JSONL record or a part of a large text file;
`<file>#<row>` for a parquet or arrow record; `<file>@<token offset>` for a pre-tokenized document.

Compressed files and tar archives cannot be cut by byte offset. Such a file is a piece of its own, or joins a run
of small ones; the planning process decompresses the piece once, from its start (`data.streams`), and hands the
workers parts of about PIECE_BYTES of its text, cut where the decompressed file would be cut, so the names are
the decompressed file's (`<file>` without the compression suffix, `@<offset>` into the decompressed bytes, and
`<archive>!<member>` for a member). A part is committed as a piece is: a killed prepare resumes after the last
committed part, decompressing the piece's earlier parts again but not tokenizing them.

pyarrow (the `data` extra) is imported only when a parquet or arrow source is read.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..base.config import ConfigError, DataConfig, first_line
from . import corpus, streams
from .corpus import SourceFile, held_out

PIECE_BYTES = 16 << 20  # source bytes per piece: bounds a worker's memory and the work a kill loses
_SCAN = 1 << 16  # bytes (or tokens) read at a time while looking for a cut
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Piece:
    files: tuple[SourceFile, ...]
    start: int = 0  # byte offset, row group, record batch or token index of the first file
    stop: int = -1  # -1: the files whole
    first_row: int = 0  # row number of the first record of a parquet or arrow piece
    size: int = 0  # source bytes covered: progress, and the tokenizer's sample

    @property
    def whole(self) -> bool:
        return self.stop < 0

    @property
    def streamed(self) -> bool:
        """Compressed files or archives: read in parts (`parts`)."""
        return self.files[0].streamed


@dataclass
class Part:
    """Decompressed text of a streamed piece, cut as its plain files would be, and the faults found reading it."""

    segments: list[streams.Segment] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    size: int = 0  # stored (compressed) bytes read for it: progress

    @property
    def text_bytes(self) -> int:
        return sum(len(s.data) for s in self.segments)


@dataclass
class PieceDocs:
    """One piece's documents split by name: texts (text sources) or token streams ending in eod (pre-tokenized)."""

    names: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    texts: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    tokens: dict[str, np.ndarray] | None = None
    bytes: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    digests: bytearray = field(default_factory=bytearray)  # sha256(name) + sha256(content) per document
    binary: int = 0
    undecodable: int = 0
    empty: int = 0
    skipped: int = 0  # records without a string text field
    skipped_by_file: dict[str, int] = field(default_factory=dict)
    damaged: int = 0  # compressed streams or archives cut short by a fault
    faults: list[str] = field(default_factory=list)  # one line each: damaged streams, archive members not text
    used: list[tuple[str, str]] = field(default_factory=list)  # (file, source) of files that gave a document
    compressed: dict[str, list] = field(default_factory=dict)  # source -> [files, the first's path, format]

    def add(self, f: SourceFile, name: str, doc: str, eval_fraction: float) -> None:
        if not doc:
            self.empty += 1
            return
        data = doc.encode("utf-8")
        self.digests += hashlib.sha256(name.encode()).digest() + hashlib.sha256(data).digest()
        split = "eval" if held_out(name, eval_fraction) else "train"
        self.names[split].append(name)
        self.texts[split].append(doc)
        self.bytes[split] += len(data)
        if not self.used or self.used[-1][0] != f.name:
            self.used.append((f.name, f.source))

    def skip(self, f: SourceFile, n: int = 1) -> None:
        self.skipped += n
        self.skipped_by_file[f.name] = self.skipped_by_file.get(f.name, 0) + n


def _pyarrow(f: SourceFile):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConfigError(f"data.sources: {f.path}: reading {f.kind} files needs pyarrow: "
                          f"pip install 'induction_jax[data]'") from None
    return pyarrow


def _check_column(f: SourceFile, schema, column: str) -> None:
    pa = _pyarrow(f)
    if column not in schema.names:
        raise ConfigError(f"data.sources: {f.path}: no column {column!r} (data.text_field); it has "
                          f"{', '.join(schema.names) or 'no columns'}")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise ConfigError(f"data.sources: {f.path}: column {column!r} (data.text_field) holds {kind}, not text")


def _parquet_file(f: SourceFile):
    """The opened parquet file; a damaged one (a truncated download, another format) is refused in one line rather
    than skipped: it may hold most of the corpus, and training on what is left would go unnoticed."""
    pa = _pyarrow(f)
    try:
        return pa.parquet.ParquetFile(f.path)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"data.sources: {f.path}: not a readable parquet file ({first_line(e)}); fetch it again or "
                          "remove it from the sources") from None


def _arrow_batches(f: SourceFile):
    """(reader, batch count or None) for an arrow IPC file or stream, memory-mapped."""
    pa = _pyarrow(f)
    source = pa.memory_map(f.path)
    try:
        reader = pa.ipc.open_file(source)
        return reader, reader.num_record_batches
    except pa.ArrowInvalid:
        source.seek(0)
        try:
            return pa.ipc.open_stream(source), None
        except pa.ArrowInvalid as e:
            raise ConfigError(f"data.sources: {f.path}: not an arrow IPC file or stream ({e})") from None


def _iter_arrow(reader, count, start: int = 0, stop: int | None = None):
    if count is not None:
        return (reader.get_batch(i) for i in range(start, count if stop is None else stop))
    return itertools.islice(reader, start, stop)


def _group(f: SourceFile, units: list[tuple[int, int]], piece_bytes: int) -> list[Piece]:
    """Pieces of consecutive (rows, bytes) units of a record file, each at least piece_bytes where possible."""
    out, start, row, first, size = [], 0, 0, 0, 0
    for i, (rows, nbytes) in enumerate(units):
        row += rows
        size += nbytes
        if size >= piece_bytes or i == len(units) - 1:
            out.append(Piece((f,), start, i + 1, first, size))
            start, first, size = i + 1, row, 0
    return out


def _line_cuts(path: str, size: int, piece_bytes: int, whole_lines: bool) -> list[int]:
    """Piece boundaries just after a newline; text without one for a whole piece is cut at a character boundary
    (JSONL records are never cut)."""
    cuts = [0]
    with open(path, "rb") as fh:
        while cuts[-1] + piece_bytes < size:
            pos = cuts[-1] + piece_bytes
            limit = size if whole_lines else min(pos + piece_bytes, size)
            cut, at = None, pos
            while at < limit and cut is None:
                fh.seek(at)
                block = fh.read(min(_SCAN, limit - at))
                i = block.find(b"\n")
                cut = at + i + 1 if i >= 0 else None
                at += len(block)
            if cut is None:
                cut = limit if whole_lines else pos
                fh.seek(cut)
                head = fh.read(4)
                while head and (head[0] & 0xC0) == 0x80:  # the next piece starts at a UTF-8 character
                    cut, head = cut + 1, head[1:]
            cuts.append(cut)
    return cuts if cuts[-1] == size else cuts + [size]


class TokenArray:
    """Random access to a pre-tokenized source's ids (read lazily, checked when read)."""

    def __init__(self, f: SourceFile):
        self.file = f
        if f.kind == "bin":
            if f.size % 2:
                raise ConfigError(f"data.sources: {f.path}: {f.size} bytes, an odd length for a flat uint16 .bin")
            self._array = np.memmap(f.path, "<u2", "r", shape=(f.size // 2,)) if f.size else np.zeros(0, "<u2")
        elif f.kind == "npy":
            try:
                self._array = np.load(f.path, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                raise ConfigError(f"data.sources: {f.path}: not a .npy array ({e})") from None
        else:
            import tensorstore as ts
            try:
                self._array = ts.open({"driver": "zarr3" if (Path(f.path) / "zarr.json").is_file() else "zarr",
                                       "kvstore": {"driver": "file", "path": f.path}}, open=True, read=True).result()
            except ValueError as e:
                raise ConfigError(f"data.sources: {f.path}: not a readable zarr array ({e})") from None
        dtype = np.dtype(self._array.dtype.numpy_dtype if f.kind == "zarr" else self._array.dtype)
        if len(self._array.shape) != 1 or dtype.kind not in "iu":
            raise ConfigError(f"data.sources: {f.path}: holds {dtype} of shape {list(self._array.shape)}; token "
                              f"ids must be a 1-D integer array")
        self.size = int(self._array.shape[0])

    def read(self, start: int, stop: int) -> np.ndarray:
        part = self._array[start:stop]
        return np.asarray(part.read().result() if self.file.kind == "zarr" else part)

    def checked(self, start: int, stop: int, vocab: int, tokenizer: str) -> np.ndarray:
        """ids [start, stop) as uint16, refused with one line when one is not in [0, vocab)."""
        ids = self.read(start, stop)
        if ids.size and (ids.max() >= vocab or ids.min() < 0):
            bad = int(np.flatnonzero((ids >= vocab) | (ids < 0))[0])
            raise ConfigError(f"data.sources: {self.file.path}: token id {int(ids[bad])} at index {start + bad} "
                              f"is outside the vocabulary of {vocab} of data.tokenizer {tokenizer}")
        return ids.astype(np.uint16)


def _token_pieces(f: SourceFile, eod_id: int, piece_bytes: int) -> list[Piece]:
    arr, per = TokenArray(f), max(1, piece_bytes // 2)
    cuts = [0]
    while cuts[-1] + per < arr.size:
        pos = at = cuts[-1] + per
        limit = min(pos + per, arr.size)
        cut = pos  # no eod within one more piece: the document is cut where it stands
        while at < limit:
            block = arr.read(at, min(at + _SCAN, limit))
            hit = np.flatnonzero(block == eod_id)
            if hit.size:
                cut = at + int(hit[0]) + 1
                break
            at += block.size
        cuts.append(cut)
    cuts.append(arr.size)
    return [Piece((f,), a, b, 0, 2 * (b - a)) for a, b in zip(cuts, cuts[1:]) if b > a]


def plan(files: list[SourceFile], cfg: DataConfig, piece_bytes: int = 0, eod_id: int = -1) -> list[Piece]:
    """The pieces of every file (of about `piece_bytes`, default PIECE_BYTES), in source order; checks record
    files' text column and pre-tokenized arrays, and settles whether a plain `.json` file is JSON lines (a
    compressed one is settled when it is read, on its decompressed start)."""
    piece_bytes = piece_bytes or PIECE_BYTES
    pieces: list[Piece] = []
    run: list[SourceFile] = []  # small text files gathered into one piece
    run_bytes = 0

    def flush():
        nonlocal run_bytes
        if run:
            pieces.append(Piece(tuple(run), size=run_bytes))
            run.clear()
            run_bytes = 0

    for f in files:
        if f.kind == "json" and not f.streamed:  # JSON lines or text: cut and read as the one it is
            with open(f.path, "rb") as fh:
                f = corpus.read_as(f, corpus.head(fh), cfg.text_field)
        if f.pretokenized:
            flush()
            pieces += _token_pieces(f, eod_id, piece_bytes)
        elif f.streamed:  # whole, in runs of their own: read in parts however large
            if f.codec == "zstd":
                streams.zstandard(f)  # a missing package is refused before anything is read
            if run and not run[0].streamed:
                flush()
            run.append(f)
            run_bytes += f.size
            if run_bytes >= piece_bytes:
                flush()
        elif f.kind == "parquet":
            flush()
            meta = _parquet_file(f)
            _check_column(f, meta.schema_arrow, cfg.text_field)
            groups = [meta.metadata.row_group(i) for i in range(meta.num_row_groups)]
            pieces += _group(f, [(g.num_rows, g.total_byte_size) for g in groups], piece_bytes)
        elif f.kind == "arrow":
            flush()
            reader, count = _arrow_batches(f)
            _check_column(f, reader.schema, cfg.text_field)
            units = [(b.num_rows, b.column(cfg.text_field).nbytes) for b in _iter_arrow(reader, count)]
            pieces += _group(f, units, piece_bytes)
        elif f.size >= piece_bytes:
            flush()
            cuts = _line_cuts(f.path, f.size, piece_bytes, f.kind == "jsonl")
            pieces += [Piece((f,), a, b, 0, b - a) for a, b in zip(cuts, cuts[1:])]
        else:
            if run and run[0].streamed:
                flush()
            run.append(f)
            run_bytes += f.size
            if run_bytes >= piece_bytes:
                flush()
    flush()
    return pieces


def parts(piece: Piece, cfg: DataConfig, piece_bytes: int = 0) -> Iterator[Part]:
    """A streamed piece's parts, in order, each about `piece_bytes` (default PIECE_BYTES) of text; at least one,
    and together they account for all of the piece's stored bytes (Part.size)."""
    piece_bytes = piece_bytes or PIECE_BYTES
    part, done, reported = Part(), 0, 0  # stored bytes: of the files finished, and in the parts yielded
    for f in piece.files:
        for item in streams.segments(f, piece_bytes, cfg.text_field):
            if isinstance(item, str):
                part.faults.append(item)
                continue
            part.segments.append(item)
            if part.text_bytes >= piece_bytes:
                part.size = done + item.consumed - reported
                reported += part.size
                yield part
                part = Part()
        done += f.size
    part.size = done - reported
    yield part


# Magic numbers of compressed data in a file whose name does not say so (one that does is decompressed first):
# skipped like other binary files, but named when a source holds nothing else (bzip2's block header follows its
# level digit).
_COMPRESSED = (("gzip", re.compile(rb"\x1f\x8b")), ("bzip2", re.compile(rb"BZh[1-9]1AY&SY")),
               ("xz", re.compile(rb"\xfd7zXZ\x00")), ("zstd", re.compile(rb"\x28\xb5\x2f\xfd")),
               ("zip", re.compile(rb"PK\x03\x04")))


def _read_text(f: SourceFile, raw: bytes, offset: int, whole: bool, cfg: DataConfig, out: PieceDocs) -> None:
    if offset == 0:
        kind = next((name for name, magic in _COMPRESSED if magic.match(raw)), None)
        if kind:
            out.binary += 1
            seen = out.compressed.setdefault(f.source, [0, f.label, kind])
            seen[0] += 1
            return
    # NUL bytes never occur in text, and mark the binary files a directory source sweeps up.
    if b"\0" in raw:
        out.binary += 1
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        out.undecodable += 1
        return
    if f.kind != "jsonl":
        out.add(f, f.name if whole else f"{f.name}@{offset}", text, cfg.eval_fraction)
        return
    # Records split one by one: a single JSONL file may hold the whole corpus.
    for line in raw.split(b"\n"):
        if line.strip():
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError):  # not JSON, or nested past the parser's depth
                rec = None
            value = rec.get(cfg.text_field) if isinstance(rec, dict) else None
            if isinstance(value, str):
                out.add(f, f"{f.name}@{offset}", value, cfg.eval_fraction)
            else:
                out.skip(f)
        offset += len(line) + 1


def _read_records(piece: Piece, cfg: DataConfig, out: PieceDocs) -> None:
    f = piece.files[0]
    if f.kind == "parquet":
        batches = _parquet_file(f).iter_batches(
            batch_size=4096, row_groups=list(range(piece.start, piece.stop)), columns=[cfg.text_field])
    else:
        reader, count = _arrow_batches(f)
        batches = _iter_arrow(reader, count, piece.start, piece.stop)
    row = piece.first_row
    try:
        for batch in batches:
            for value in batch.column(cfg.text_field).to_pylist():
                if isinstance(value, str):
                    out.add(f, f"{f.name}#{row}", value, cfg.eval_fraction)
                else:
                    out.skip(f)
                row += 1
    except (_pyarrow(f).ArrowException, OSError) as e:  # a damaged row group or record batch past the footer
        raise ConfigError(f"data.sources: {f.path}: unreadable {f.kind} file at row {row} ({first_line(e)}); fetch it "
                          "again or remove it from the sources") from None


def _read_tokens(piece: Piece, cfg: DataConfig, vocab: int, eod_id: int, out: PieceDocs) -> None:
    f = piece.files[0]
    ids = TokenArray(f).checked(piece.start, piece.stop, vocab, cfg.tokenizer)
    if ids.size and ids[-1] != eod_id:  # every document ends in eod, the last of a file or a cut one too
        ids = np.append(ids, np.uint16(eod_id))
    ends = np.flatnonzero(ids == eod_id) + 1
    starts = np.concatenate([[0], ends[:-1]])
    held = np.zeros(starts.size, bool)
    for d, (a, b) in enumerate(zip(starts, ends)):
        name = f"{f.name}@{piece.start + a}"
        if b - a == 1:
            out.empty += 1
            continue
        body = ids[a:b - 1].tobytes()
        out.digests += hashlib.sha256(name.encode()).digest() + hashlib.sha256(body).digest()
        held[d] = held_out(name, cfg.eval_fraction)
        split = "eval" if held[d] else "train"
        out.names[split].append(name)
        out.bytes[split] += len(body)
    mask = np.repeat(held, ends - starts)
    empty = np.repeat(ends - starts == 1, ends - starts)
    out.tokens = {"train": ids[~mask & ~empty], "eval": ids[mask & ~empty]}
    if any(out.names.values()):
        out.used.append((f.name, f.source))


def _read_part(part: Part, cfg: DataConfig, out: PieceDocs) -> None:
    for seg in part.segments:
        binary, undecodable = out.binary, out.undecodable
        _read_text(seg.file, seg.data, seg.offset, seg.whole, cfg, out)
        if seg.file.member and (out.binary > binary or out.undecodable > undecodable):
            line = f"{seg.file.label}: not text ({'binary' if out.binary > binary else 'not UTF-8'}); skipped"
            if out.faults[-1:] != [line]:  # a large member: once, not for each of its segments
                out.faults.append(line)
    out.faults += part.faults
    out.damaged += len(part.faults)


def read_piece(piece: Piece | Part, cfg: DataConfig, vocab: int = 0, eod_id: int = -1) -> PieceDocs:
    """The documents of one piece or part (pre-tokenized pieces need the tokenizer's vocabulary size and eod
    id)."""
    out = PieceDocs()
    if isinstance(piece, Part):
        _read_part(piece, cfg, out)
        return out
    f = piece.files[0]
    if f.pretokenized:
        _read_tokens(piece, cfg, vocab, eod_id, out)
    elif f.kind in ("parquet", "arrow"):
        _read_records(piece, cfg, out)
    elif piece.whole:
        for g in piece.files:
            _read_text(g, Path(g.path).read_bytes(), 0, True, cfg, out)
    else:
        with open(f.path, "rb") as fh:
            fh.seek(piece.start)
            _read_text(f, fh.read(piece.stop - piece.start), piece.start, False, cfg, out)
    return out


def sample(pieces: list[Piece], budget: int) -> list[int]:
    """Indices of pieces spread evenly over the corpus whose source bytes add up to about `budget`: every piece
    when the corpus is no larger. A streamed piece counts as PIECE_BYTES, what its first part holds: the sample
    reads only its first parts (`sample_cap`), so a corpus of a few large compressed files is sampled across its
    files."""
    total = sum(PIECE_BYTES if p.streamed else p.size for p in pieces)
    if total <= budget:
        return list(range(len(pieces)))
    k = max(1, min(len(pieces), round(len(pieces) * budget / total)))
    return sorted(set(np.linspace(0, len(pieces) - 1, k).round().astype(int).tolist()))


def sample_cap(pieces: list[Piece], chosen: list[int], budget: int) -> int:
    """The text a sample takes from each chosen streamed piece: its share of the budget when the sample leaves
    pieces out, else no limit (0), so a corpus within the budget is sampled whole."""
    return budget // len(chosen) if len(chosen) < len(pieces) else 0
