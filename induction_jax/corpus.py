"""Text sources -> documents split into train / held-out -> a byte-level BPE tokenizer.

A source (`data.sources` entry) is `python-stdlib`, a file, a directory (every file below it), or a glob pattern;
files ending in `.jsonl` yield one document per record (the `data.text_field` string). Every user mistake is a
one-line `ConfigError` naming the source.

Each document carries a machine-independent `name` (e.g. `python-stdlib/json/decoder.py`): the train/held-out
split is a hash of that name, so the same interpreter version splits identically on every machine.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from .config import MAX_VOCAB, ConfigError, DataConfig

STDLIB = "python-stdlib"
BOS = "<|bos|>"
EOD = "<|eod|>"
SPECIAL_TOKENS = (BOS, EOD)
# 256 byte symbols plus the special tokens: a byte-level BPE cannot be smaller.
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
# Installed-package trees inside the stdlib directory belong to `site_packages`, not to the stdlib.
_NOT_STDLIB = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class SourceFile:
    name: str  # machine-independent; hashed for the split
    path: str  # absolute
    source: str  # the `data.sources` entry it came from
    size: int
    mtime_ns: int

    @property
    def is_jsonl(self) -> bool:
        return self.path.endswith(".jsonl")


@dataclass
class Documents:
    """Decoded documents of one split, in source order."""

    names: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    bytes: int = 0

    def add(self, name: str, text: str) -> None:
        self.names.append(name)
        self.texts.append(text)
        self.bytes += len(text.encode("utf-8"))


@dataclass
class Corpus:
    train: Documents
    eval: Documents
    files: int  # files that contributed at least one document
    skipped_binary: int
    skipped_undecodable: int
    skipped_records: int  # JSONL lines that are not JSON objects with a string `text_field`
    empty: int
    content_hash: str
    skipped_by_file: dict[str, int] = field(default_factory=dict)  # the skipped JSONL lines of each file


def _walk(root: Path, suffix: str = "", prune: frozenset[str] = frozenset()) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in prune)
        for f in sorted(filenames):
            if f.endswith(suffix):
                yield Path(dirpath) / f


def _stat(name: str, path: Path, source: str) -> SourceFile:
    st = path.stat()
    return SourceFile(name, str(path.resolve()), source, st.st_size, st.st_mtime_ns)


def _stdlib_files(site_packages: bool) -> list[SourceFile]:
    paths = sysconfig.get_paths()
    stdlib = Path(paths["stdlib"])
    out = [_stat(f"{STDLIB}/{p.relative_to(stdlib).as_posix()}", p, STDLIB)
           for p in _walk(stdlib, ".py", _NOT_STDLIB)]
    if site_packages:
        purelib = Path(paths["purelib"])
        # An editable install's finder module holds the checkout's absolute path: keeping it would make the
        # corpus, hence the data order and the demo's outcome, depend on where the repository was cloned.
        out += [_stat(f"site-packages/{p.relative_to(purelib).as_posix()}", p, STDLIB)
                for p in _walk(purelib, ".py", frozenset({"__pycache__"})) if not p.name.startswith("__editable__")]
    return out


def resolve(cfg: DataConfig) -> list[SourceFile]:
    """Every file the sources name, deduplicated by real path, in source order."""
    files: list[SourceFile] = []
    for src in cfg.sources:
        if src == STDLIB:
            found = _stdlib_files(cfg.site_packages)
        elif glob.has_magic(src):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(src), recursive=True))
            found = [_stat(p.as_posix(), p, src) for p in matches if p.is_file()]
            if not found:
                raise ConfigError(f"data.sources: {src!r}: no files match this pattern")
        else:
            path = Path(os.path.expanduser(src))
            if path.is_dir():
                found = [_stat(f"{src.rstrip('/')}/{p.relative_to(path).as_posix()}", p, src)
                         for p in _walk(path)]
            elif path.is_file():
                found = [_stat(src, path, src)]
            else:
                raise ConfigError(f"data.sources: {src!r}: no such file or directory")
        if not found:
            raise ConfigError(f"data.sources: {src!r}: contains no files")
        files += found
    seen: set[str] = set()
    return [f for f in files if not (f.path in seen or seen.add(f.path))]


def held_out(name: str, eval_fraction: float) -> bool:
    """Whether a document belongs to the held-out split: a hash of its name, not of its contents or order."""
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < eval_fraction


def _jsonl_records(f: SourceFile, text: str, text_field: str) -> tuple[list[tuple[str, str]], int]:
    """(name, text) per record, and how many non-blank lines lacked a string `text_field`."""
    records, bad = [], 0
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        value = rec.get(text_field) if isinstance(rec, dict) else None
        if isinstance(value, str):
            records.append((f"{f.name}#{i}", value))
        else:
            bad += 1
    return records, bad


def read(files: list[SourceFile], cfg: DataConfig, progress: bool = True) -> Corpus:
    """Decodes every file, splits documents by name, and hashes the content in a fixed order."""
    train, held = Documents(), Documents()
    binary = undecodable = bad_records = empty = used_files = 0
    bad_by_file: dict[str, int] = {}
    per_source: dict[str, int] = {f.source: 0 for f in files}
    content = hashlib.sha256()
    for f in tqdm(files, desc="reading sources", unit="file", disable=not progress):
        raw = Path(f.path).read_bytes()
        # NUL bytes never occur in text, and mark the binary files a directory source sweeps up.
        if b"\0" in raw:
            binary += 1
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            undecodable += 1
            continue
        if f.is_jsonl:
            # Records split one by one: a single JSONL file may hold the whole corpus.
            docs, bad = _jsonl_records(f, text, cfg.text_field)
            bad_records += bad
            if bad:
                bad_by_file[f.name] = bad
        else:
            docs = [(f.name, text)]
        took = False
        for name, doc in docs:
            if not doc:
                empty += 1
                continue
            content.update(hashlib.sha256(name.encode()).digest() + hashlib.sha256(doc.encode()).digest())
            (held if held_out(name, cfg.eval_fraction) else train).add(name, doc)
            took = True
        per_source[f.source] += took
        used_files += took
    for src, n in per_source.items():
        if n == 0:
            raise ConfigError(f"data.sources: {src!r}: no readable text (binary, undecodable, empty, or JSONL "
                              f"records without a string {cfg.text_field!r} field)")
    if not train.texts or not held.texts:
        which = "train" if not train.texts else "held-out"
        raise ConfigError(f"data.sources: {', '.join(cfg.sources)}: the {which} split is empty "
                          f"({len(train.texts) + len(held.texts)} documents, data.eval_fraction="
                          f"{cfg.eval_fraction}); add files or change data.eval_fraction")
    return Corpus(train, held, used_files, binary, undecodable, bad_records, empty, content.hexdigest(),
                  bad_by_file)


def train_tokenizer(texts: list[str], vocab_size: int, progress: bool = True) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation, lossless round trip) with `<|bos|>` and `<|eod|>`."""
    check_vocab(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    tok.train_from_iterator(texts, trainer, length=len(texts))
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
