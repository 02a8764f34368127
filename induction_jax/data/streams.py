"""Compressed files and tar archives -> segments of decompressed text, cut where a plain file of those bytes is.

A compressed stream cannot be entered at a byte offset, so it is read once, from its start, by the process that
plans the work (`sources.parts` gathers the segments into parts of about `sources.PIECE_BYTES`, which worker
processes split into documents and tokenize). Its decompressed bytes are cut exactly as `sources.plan` cuts a
plain file: a file shorter than a piece is one segment (one document, or its JSONL records); a longer one is cut
after the first newline past each piece's length, so the documents get the names, and the split, of the
decompressed file. Memory is bounded by two pieces of text (or one JSONL line longer than that), whatever the
file's size. A `.json` file is cut and read as JSON lines or as text by its first decompressed line
(`corpus.json_lines`), as a plain one is when it is planned.

A tar archive is read member by member, in archive order (regular files only); a member is read as a file of its
name would be (`a.jsonl` as JSONL, `b.txt.gz` decompressed), and its documents are named `<archive>!<member>`.

Damaged input is not fatal: a truncated or corrupt stream, or a truncated or corrupt archive, ends that file (or
archive) with a one-line fault naming it, and the member where it happened. What came before is kept: the
segments already cut, and, in a JSONL file, every complete line before the fault. An unfinished text document is
dropped.

zstandard (the `data` extra) is imported only when a `.zst` file is read.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

from ..base.config import ConfigError, first_line
from .corpus import SNIFF_BYTES, SourceFile, kind_of, read_as, split_codec

READ = 1 << 20  # decompressed bytes asked for at a time (at most)
_ZSTD_IN = 1 << 16  # compressed bytes fed to zstd at a time: bounds what one call returns
_TAIL = 1 << 16  # bytes of an archive's stream kept to look at the block where tarfile stopped (it reads 10 KiB ahead)
_BLOCK = tarfile.BLOCKSIZE
# What decompressors and tarfile raise on damaged input (zstd's errors are raised as OSError below).
ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, tarfile.TarError)
_CODEC_NAMES = {"gzip": "gzip", "bz2": "bzip2", "xz": "xz", "zstd": "zstd"}


@dataclass(frozen=True)
class Segment:
    file: SourceFile  # the file or archive member; its name names the documents
    offset: int  # of `data` in the decompressed file or member
    data: bytes
    whole: bool  # all of a file shorter than a piece: one document named by the file alone
    consumed: int  # bytes of the stored (compressed) file read so far: progress


@dataclass(frozen=True)
class _Fault:
    error: BaseException
    kept: bool  # some of the file's text came before it and is kept


def zstandard(f: SourceFile):
    try:
        import zstandard
    except ImportError:
        raise ConfigError(f"data.sources: {f.label}: reading .zst files needs zstandard: "
                          f"pip install 'induction_jax[data]'") from None
    return zstandard


class _Chunks(io.RawIOBase):
    """A readable file over an iterator of byte strings."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks, self._left = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._left:
            self._left = next(self._chunks, b"")
            if not self._left:
                return 0
        n = min(len(b), len(self._left))
        b[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


def _zstd_chunks(raw: BinaryIO, f: SourceFile) -> Iterator[bytes]:
    """Every frame in turn. zstandard's stream reader ends a truncated frame silently; this raises EOFError."""
    zstd = zstandard(f)
    dctx, frame = zstd.ZstdDecompressor(), None
    while data := raw.read(_ZSTD_IN):
        while data:
            if frame is None:
                frame = dctx.decompressobj()
            try:
                out = frame.decompress(data)
            except zstd.ZstdError as e:
                raise OSError(str(e)) from None
            if out:
                yield out
            data, frame = (frame.unused_data, None) if frame.eof else (b"", frame)
    if frame is not None:
        raise EOFError("the file ends inside a zstd frame")


def open_stream(f: SourceFile, raw: BinaryIO) -> BinaryIO:
    """The decompressed bytes of `raw`, by f's codec (none: raw itself)."""
    if f.codec == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if f.codec == "bz2":
        return bz2.BZ2File(raw)
    if f.codec == "xz":
        return lzma.LZMAFile(raw)
    if f.codec == "zstd":
        return io.BufferedReader(_Chunks(_zstd_chunks(raw, f)), READ)
    return raw


def _cut(f: SourceFile, stream: BinaryIO, piece_bytes: int, text_field: str, consumed: Callable[[], int]):
    """Segments of f's decompressed bytes, cut as `sources._line_cuts` cuts a plain file of them (a `.json` file
    as JSON lines or text, by its decompressed start: `corpus.json_lines`); a read error ends them with a
    _Fault."""
    buf, base, eof, fault = bytearray(), 0, False, None

    def fill(n: int) -> None:
        nonlocal eof, fault
        while len(buf) < n and not eof:
            try:  # read1: what one read of the stored file gives, so a fault loses no text decompressed before it
                chunk = stream.read1(READ)
            except ERRORS as e:
                fault, eof = e, True
                return
            eof = not chunk
            buf.extend(chunk)

    if f.kind == "json":
        fill(SNIFF_BYTES + 1)
        f = read_as(f, bytes(buf[:SNIFF_BYTES + 1]), text_field)
    while True:
        fill(piece_bytes + 1)
        if fault:
            break
        if len(buf) <= piece_bytes:  # at the end: the rest, or all of a file shorter than a piece
            if buf or base == 0:
                yield Segment(f, base, bytes(buf), base == 0 and len(buf) < piece_bytes, consumed())
            return
        if f.kind == "jsonl":  # a record is never cut
            at = piece_bytes
            while (i := buf.find(b"\n", at)) < 0 and not eof:
                at = len(buf)
                fill(len(buf) + READ)
            if fault:
                break
            cut = i + 1 if i >= 0 else len(buf)
        else:  # a newline within one more piece, else a UTF-8 character boundary
            fill(2 * piece_bytes)
            if fault:
                break
            i = buf.find(b"\n", piece_bytes, 2 * piece_bytes)
            cut = i + 1 if i >= 0 else piece_bytes
            while i < 0 and cut < min(piece_bytes + 4, len(buf)) and (buf[cut] & 0xC0) == 0x80:
                cut += 1
        yield Segment(f, base, bytes(buf[:cut]), False, consumed())
        del buf[:cut]
        base += cut
    kept = base > 0
    if f.kind == "jsonl" and (end := buf.rfind(b"\n")) >= 0:  # the complete records before the fault
        yield Segment(f, base, bytes(buf[:end + 1]), False, consumed())
        kept = True
    yield _Fault(fault, kept)


def _reason(e: BaseException, codec: str) -> str:
    what = _CODEC_NAMES.get(codec, "tar")
    if isinstance(e, EOFError) or (isinstance(e, tarfile.ReadError) and "unexpected end" in str(e)):
        return f"truncated {what} {'stream' if codec else 'archive'} ({first_line(e)})"
    return f"corrupt {what} {'stream' if codec else 'archive'} ({type(e).__name__}: {first_line(e)})"


class _Tracked:
    """An archive's (decompressed) byte stream for tarfile: it remembers how far it was read and its last bytes,
    and a decompression error ends it (kept in `failed`), so tarfile keeps every byte that came before."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.count, self.tail = stream, 0, bytearray()
        self.failed: BaseException | None = None
        self.eof = False

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.stream.read1(n) if n > 0 else self.stream.read()
        except ERRORS as e:
            self.failed, data = e, b""
        self.eof = self.eof or not data
        self.count += len(data)
        self.tail.extend(data)
        del self.tail[:-_TAIL]
        return data

    def block(self, offset: int) -> bytes:
        """The block at `offset` (short at the end of the stream)."""
        while self.count < offset + _BLOCK and not self.eof:
            self.read(offset + _BLOCK - self.count)
        start = offset - (self.count - len(self.tail))
        return bytes(self.tail[max(start, 0):start + _BLOCK]) if start + _BLOCK > 0 else b""


def _tar(f: SourceFile, stream: BinaryIO, piece_bytes: int, text_field: str,
         consumed: Callable[[], int]) -> Iterator[Segment | str]:
    tracked = _Tracked(stream)
    last = ""  # the last member read

    def fault(e: BaseException, where: str = "") -> str:
        """The line for a fault that ends the archive: of its compression, else of the tar format."""
        rest = f"the members after {last!r} are skipped" if last else "skipped"
        cause = tracked.failed or e
        codec = f.codec if tracked.failed or not isinstance(cause, tarfile.TarError) else ""
        return f"{f.path}{where}: {_reason(cause, codec)}; {rest}"

    try:
        tar = tarfile.open(fileobj=tracked, mode="r|")
    except ERRORS as e:
        yield fault(e)
        return
    while True:
        try:
            info = tar.next()
        except ERRORS as e:
            yield fault(e)
            return
        if info is None:
            break
        tar.members.clear()  # tarfile keeps every header it reads; memory would grow with the archive
        if not info.isreg():
            continue
        name, codec = split_codec(info.name)
        kind = kind_of(name, codec)
        member = SourceFile(f"{f.name}!{name}", f.path, f.source, info.size, "text" if kind == "tar" else kind,
                            codec, info.name)
        for item in _cut(member, open_stream(member, tar.extractfile(info)), piece_bytes, text_field, consumed):
            if not isinstance(item, _Fault):
                yield item
            elif tracked.failed or isinstance(item.error, tarfile.TarError):  # the archive's, not the member's
                yield fault(item.error, f"!{info.name}")
                return
            else:  # the member's own compression
                yield _fault_line(member, item)
        last = info.name
    end = tracked.block(tar.offset)
    if tracked.failed:  # tarfile took the end of the decompressed bytes for the end of the archive
        yield fault(tracked.failed)
        return
    if not end:
        yield f"{f.path}: truncated tar archive (it ends without its end-of-archive block)" + (
            f"; the members up to {last!r} are kept" if last else "")
    elif end.strip(b"\0"):
        yield (f"{f.path}: corrupt tar archive (an unreadable header at byte {tar.offset:,}); "
               + (f"the members after {last!r} are skipped" if last else "skipped"))


def _fault_line(f: SourceFile, fault: _Fault) -> str:
    return f"{f.label}: {_reason(fault.error, f.codec)}; " + (
        "the text after it is skipped" if fault.kept else "skipped")


def segments(f: SourceFile, piece_bytes: int, text_field: str) -> Iterator[Segment | str]:
    """The segments of a compressed file or archive, in order, and a one-line fault (a str) where it is damaged;
    `text_field` is the field a `.json` file's first record must hold for it to be read as JSON lines."""
    with open(f.path, "rb") as raw:
        stream = open_stream(f, raw)
        if f.kind == "tar":
            yield from _tar(f, stream, piece_bytes, text_field, raw.tell)
            return
        for item in _cut(f, stream, piece_bytes, text_field, raw.tell):
            yield _fault_line(f, item) if isinstance(item, _Fault) else item
