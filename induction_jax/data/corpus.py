"""Sources -> files with a kind and a content digest; the train / held-out rule; the byte-level BPE tokenizer.

A source (`data.sources` entry) is `python-stdlib`, a file, a directory (every file below it), or a glob pattern.
Files ending in `.jsonl`, `.parquet` or `.arrow` hold one document per record (the `data.text_field` string or
column). A `.json` file is JSON lines, read as a `.jsonl` file is, when its first non-empty line is a JSON object
holding a `data.text_field` string (C4's `.json.gz` files), and one text document otherwise (`json_lines` decides
from the file's first bytes, decompressed if it is compressed). A directory written by Hugging Face `datasets`
(`save_to_disk`, a Dataset or a DatasetDict) is read through its arrow files. A pre-tokenized source is a flat
uint16 `.bin` (nanoGPT's format), a 1-D integer `.npy`, or a zarr array directory, named as a source or matched by
a glob (not swept up by a directory walk, where such files count as binary), and read with `data.tokenizer`.
Every user mistake is a one-line `ConfigError` naming the source.

A text, JSON or JSONL file may be compressed (`.gz`, `.bz2`, `.xz`, `.zst`), and a `.tar` archive (also `.tar.gz`,
`.tgz`, `.tar.bz2`, `.tar.xz`, `.tar.zst`) holds documents: its members are read as files of their names would be
(`data.streams` reads both). A compressed file is named without its compression suffix, so `dir/a.txt.gz` gives
the documents, and the split, of `dir/a.txt`; a member is named `<archive>!<member>` by the same rule.

Each document carries a machine-independent `name` (e.g. `python-stdlib/json/decoder.py`): the train/held-out
split is a hash of that name, so the same interpreter version splits identically on every machine.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..base.config import MAX_VOCAB, ConfigError, DataConfig

STDLIB = "python-stdlib"
BOS = "<|bos|>"
EOD = "<|eod|>"
SPECIAL_TOKENS = (BOS, EOD)
# 256 byte symbols plus the special tokens: a byte-level BPE cannot be smaller.
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
# Installed-package trees inside the stdlib directory belong to `site_packages`, not to the stdlib.
_NOT_STDLIB = frozenset({"site-packages", "dist-packages", "__pycache__"})
RECORD_KINDS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
TOKEN_SUFFIXES = {".bin": "bin", ".npy": "npy"}
CODECS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
# A `.json` file's first non-empty line must end within this many bytes for it to count as JSON lines.
SNIFF_BYTES = 1 << 20
# Files up to this size are hashed whole for the fingerprint; larger ones by their size and sampled blocks.
FULL_HASH_BYTES = 4 << 20
_SAMPLE_BLOCKS, _SAMPLE_BLOCK = 16, 64 << 10


@dataclass(frozen=True)
class SourceFile:
    name: str  # machine-independent; hashed for the split
    path: str  # absolute
    source: str  # the `data.sources` entry it came from
    size: int  # of the file as stored (compressed), or of an archive member
    # text | jsonl | json (JSON lines or text, settled by `read_as` before it is cut) | parquet | arrow | bin | npy
    # | zarr | tar
    kind: str = "text"
    codec: str = ""  # the file's (or member's) compression: gzip | bz2 | xz | zstd, or none
    member: str = ""  # a member of the archive at `path`: its name in the archive

    @property
    def pretokenized(self) -> bool:
        return self.kind in ("bin", "npy", "zarr")

    @property
    def streamed(self) -> bool:
        """Read as a stream (decompressed, or an archive's members in turn): it cannot be cut by byte offset."""
        return bool(self.codec) or self.kind == "tar"

    @property
    def label(self) -> str:
        """Where it is, for messages: the path, or `<archive path>!<member>`."""
        return f"{self.path}!{self.member}" if self.member else self.path


def split_codec(name: str) -> tuple[str, str]:
    """(the name without its compression suffix, the codec): `a.jsonl.gz` -> (`a.jsonl`, gzip); `b.tgz` ->
    (`b.tar`, gzip); a name without one is returned as it is, with codec ""."""
    for suffix, codec in CODECS.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], codec
    if name.endswith(".tgz") and len(name) > 4:
        return name[:-4] + ".tar", "gzip"
    return name, ""


def kind_of(name: str, codec: str = "") -> str:
    """The kind of a file (or archive member) named `name` (its compression suffix removed)."""
    if name.endswith(".tar"):
        return "tar"
    kind = RECORD_KINDS.get(Path(name).suffix, "text")
    # parquet and arrow are read by seeking in the file: compressed whole, they are read as (binary) text
    return "text" if codec and kind not in ("jsonl", "json") else kind


def json_lines(head: bytes, text_field: str) -> bool:
    """Whether a `.json` file whose first bytes are `head` (SNIFF_BYTES + 1 of them, or fewer when the file or its
    first non-empty line ends sooner) is JSON lines: that line lies within the file's first SNIFF_BYTES and is a
    JSON object holding a `text_field` string."""
    start = 0
    while (end := head.find(b"\n", start, SNIFF_BYTES + 1)) >= 0 and not head[start:end].strip():
        start = end + 1  # a blank line
    if end < 0 and len(head) > SNIFF_BYTES:  # the line goes on past the bound
        return False
    try:
        rec = json.loads(head[start:end if end >= 0 else len(head)])
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deeply for the parser
        return False
    return isinstance(rec, dict) and isinstance(rec.get(text_field), str)


def head(fh: BinaryIO) -> bytes:
    """The first bytes of a file, as `json_lines` needs them: up to the end of its first non-empty line, at most
    SNIFF_BYTES + 1."""
    out = b""
    while len(out) <= SNIFF_BYTES:
        line = fh.readline(SNIFF_BYTES + 1 - len(out))
        out += line
        if not line or line.strip():
            break
    return out


def read_as(f: SourceFile, head: bytes, text_field: str) -> SourceFile:
    """f with its kind settled: a `json` file becomes `jsonl` or `text` by its first bytes (`json_lines`)."""
    if f.kind != "json":
        return f
    return dataclasses.replace(f, kind="jsonl" if json_lines(head, text_field) else "text")


def _walk(root: Path, suffix: str = "", prune: frozenset[str] = frozenset()) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in prune)
        # ordered by the names the documents get: a compressed copy of a directory is read in the same order
        for f in sorted(filenames, key=lambda f: (split_codec(f)[0], f)):
            if f.endswith(suffix):
                yield Path(dirpath) / f


def _stat(name: str, path: Path, source: str, kind: str | None = None) -> SourceFile:
    if kind:
        return SourceFile(name, str(path.resolve()), source, path.stat().st_size, kind)
    name, codec = split_codec(name)
    return SourceFile(name, str(path.resolve()), source, path.stat().st_size, kind_of(name, codec), codec)


def _stdlib_files(site_packages: bool) -> list[SourceFile]:
    paths = sysconfig.get_paths()
    stdlib = Path(paths["stdlib"])
    out = [_stat(f"{STDLIB}/{p.relative_to(stdlib).as_posix()}", p, STDLIB, "text")
           for p in _walk(stdlib, ".py", _NOT_STDLIB)]
    if site_packages:
        purelib = Path(paths["purelib"])
        # An editable install's finder module holds the checkout's absolute path: keeping it would make the
        # corpus, hence the data order and the demo's outcome, depend on where the repository was cloned.
        out += [_stat(f"site-packages/{p.relative_to(purelib).as_posix()}", p, STDLIB, "text")
                for p in _walk(purelib, ".py", frozenset({"__pycache__"})) if not p.name.startswith("__editable__")]
    return out


def _hf_arrow_files(src: str, path: Path) -> list[SourceFile] | None:
    """The arrow files of a `datasets` save_to_disk directory (every split of a DatasetDict), else None."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        return [f for split in splits for f in _hf_arrow_files(src, path / split) or []]
    if not (path / "state.json").is_file() or not (path / "dataset_info.json").is_file():
        return None
    names = [d["filename"] for d in json.loads((path / "state.json").read_text()).get("_data_files", [])]
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise ConfigError(f"data.sources: {src!r}: {path / missing[0]} is listed in state.json but missing")
    root = Path(os.path.expanduser(src))
    return [_stat(f"{src.rstrip('/')}/{(path / n).relative_to(root).as_posix()}", path / n, src, "arrow")
            for n in names]


def _zarr_source(src: str, path: Path) -> SourceFile:
    size = sum(p.stat().st_size for p in _walk(path))
    return SourceFile(src, str(path.resolve()), src, size, "zarr")


def _resolve_one(src: str, site_packages: bool) -> list[SourceFile]:
    if src == STDLIB:
        return _stdlib_files(site_packages)
    if glob.has_magic(src):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(src), recursive=True))
        found = [_stat(p.as_posix(), p, src, TOKEN_SUFFIXES.get(p.suffix)) for p in matches if p.is_file()]
        if not found:
            raise ConfigError(f"data.sources: {src!r}: no files match this pattern")
        return found
    path = Path(os.path.expanduser(src))
    if path.is_dir():
        if (path / ".zarray").is_file() or (path / "zarr.json").is_file():
            return [_zarr_source(src, path)]
        hf = _hf_arrow_files(src, path)
        if hf is not None:
            return hf
        return [_stat(f"{src.rstrip('/')}/{p.relative_to(path).as_posix()}", p, src) for p in _walk(path)]
    if path.is_file():
        return [_stat(src, path, src, TOKEN_SUFFIXES.get(path.suffix))]
    raise ConfigError(f"data.sources: {src!r}: no such file or directory")


def resolve(cfg: DataConfig) -> list[SourceFile]:
    """Every file the sources name, deduplicated by real path, in source order."""
    files: list[SourceFile] = []
    for src in cfg.source_paths:
        found = _resolve_one(src, cfg.site_packages)
        if not found:
            raise ConfigError(f"data.sources: {src!r}: contains no files")
        files += found
    seen: set[str] = set()
    files = [f for f in files if not (f.path in seen or seen.add(f.path))]
    tokens = [f for f in files if f.pretokenized]
    if tokens and len(tokens) < len(files):
        text = next(f for f in files if not f.pretokenized)
        raise ConfigError(f"data.sources: {tokens[0].source!r} is pre-tokenized but {text.source!r} is text; "
                          f"a corpus is one or the other")
    if tokens and not cfg.tokenizer:
        raise ConfigError(f"data.sources: {tokens[0].source!r} is pre-tokenized: set data.tokenizer to the "
                          f"tokenizer.json its ids come from")
    return files


def _file_digest(path: Path, size: int) -> str:
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            h.update(f.read())
        else:  # evenly spaced blocks, the first and last included
            for i in range(_SAMPLE_BLOCKS):
                f.seek((size - _SAMPLE_BLOCK) * i // (_SAMPLE_BLOCKS - 1))
                h.update(f.read(_SAMPLE_BLOCK))
    return h.hexdigest()


def content_digest(f: SourceFile) -> str:
    """A digest of the file's bytes (sampled for large files); a zarr directory's metadata, chunk names and sizes
    and a spread of its chunks."""
    if f.kind != "zarr":
        return _file_digest(Path(f.path), f.size)
    root = Path(f.path)
    chunks = list(_walk(root))
    h = hashlib.sha256()
    step = max(1, len(chunks) // _SAMPLE_BLOCKS)
    for i, p in enumerate(chunks):
        size = p.stat().st_size
        h.update(f"{p.relative_to(root).as_posix()}:{size}\n".encode())
        if p.name in (".zarray", "zarr.json") or i % step == 0:
            h.update(_file_digest(p, size).encode())
    return h.hexdigest()


def held_out(name: str, eval_fraction: float) -> bool:
    """Whether a document belongs to the held-out split: a hash of its name, not of its contents or order."""
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < eval_fraction


def train_tokenizer(texts: Iterable[str], vocab_size: int, progress: bool = True,
                    length: int | None = None) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation, lossless round trip) with `<|bos|>` and `<|eod|>`."""
    check_vocab(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    tok.train_from_iterator(texts, trainer, length=length)
    return tok


def check_vocab(vocab_size: int) -> None:
    if vocab_size > MAX_VOCAB:
        raise ConfigError(f"model.vocab_size: {vocab_size} exceeds {MAX_VOCAB} (tokens are stored as uint16)")
    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"model.vocab_size: {vocab_size} is below {MIN_VOCAB} (256 bytes + special tokens)")


def load_tokenizer(path: str, vocab_size: int) -> Tokenizer:
    """A user's tokenizer.json; it must match the model's vocabulary and carry both special tokens."""
    check_vocab(vocab_size)
    if not Path(path).is_file():
        raise ConfigError(f"data.tokenizer: {path!r}: no such file")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises bare Exceptions for malformed files
        raise ConfigError(f"data.tokenizer: {path!r}: not a tokenizers JSON file ({str(e).splitlines()[0]})") \
            from None
    if tok.get_vocab_size() != vocab_size:
        raise ConfigError(f"data.tokenizer: {path!r}: vocabulary of {tok.get_vocab_size()} tokens, but "
                          f"model.vocab_size={vocab_size}")
    missing = [s for s in SPECIAL_TOKENS if tok.token_to_id(s) is None]
    if missing:
        raise ConfigError(f"data.tokenizer: {path!r}: lacks the special token(s) {', '.join(missing)}")
    return tok


def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
