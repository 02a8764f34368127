"""Compressed files (.gz, .bz2, .xz, .zst) and tar archives are read as the files they hold.

The same corpus compressed gives the documents, names and split of the plain files (large files cut into the same
parts, JSONL records named by their offsets in the decompressed bytes), and gzipped, the same token store; a
prepare killed inside a compressed file resumes there; damaged input gets one line naming the file (and member),
and the rest is kept. A `.json` file (C4's `.json.gz`), plain, compressed or in an archive, is read as JSONL when
its first non-empty line is a record with the text field, and as one text document otherwise.
"""

import bz2
import gzip
import io
import json
import lzma
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from corpus import one_line_error
from induction_jax.base.config import from_dict
from induction_jax.data import build, corpus, dataset, sources

PIECE = 8 << 10  # several parts from the large files below
ZSTD = "zstandard (the `data` extra; `make test` installs it beside the venv) reads .zst sources"


def _zstd():
    return pytest.importorskip("zstandard", reason=ZSTD)


COMPRESS = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress,
            "zst": lambda data: _zstd().ZstdCompressor().compress(data)}


def write_corpus(root: Path) -> Path:
    """Small text files, JSONL records, a text file and a JSONL file of several pieces (one with a line longer
    than two pieces, of 2-byte characters, so a part is cut at a character boundary), empty and binary files."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyzé"), rng.integers(2, 8))) for _ in range(300)]

    def lines(n: int) -> str:
        return "".join(" ".join(rng.choice(words, 10)) + "\n" for _ in range(n))

    (root / "sub").mkdir(parents=True)
    for i in range(30):
        (root / ("sub" if i % 3 == 0 else ".") / f"doc{i:02d}.txt").write_text(lines(20))
    (root / "note").write_text(lines(5))  # sorted before note-1, while note.gz sorts after note-1.gz
    (root / "note-1").write_text(lines(5))
    (root / "recs.jsonl").write_text("".join(json.dumps({"text": lines(2)}) + "\n" for _ in range(100)) + "[1]\n")
    (root / "big.txt").write_text(lines(300) + "é" * (3 * PIECE) + "\n" + lines(300))
    (root / "big.jsonl").write_text("".join(json.dumps({"text": lines(3)}) + "\n" for _ in range(400)))
    (root / "empty.txt").write_text("")
    (root / "blob.dat").write_bytes(b"\0\1\2" * 100)
    return root


def compress_in_place(root: Path, suffix: str) -> None:
    for p in [p for p in root.rglob("*") if p.is_file()]:
        p.with_name(p.name + "." + suffix).write_bytes(COMPRESS[suffix](p.read_bytes()))
        p.unlink()


def cfg_for(source, cache, **data):
    d = {"sources": [str(source)], "cache_dir": str(cache), "eval_fraction": 0.2, "eval_examples": 16,
         "eval_length": 64, "workers": 1, **data}
    return from_dict({"model": {"vocab_size": 300, "context": 32}, "data": d, "eval": {"prefix_tokens": 7}})


def read_all(source, piece_bytes: int = PIECE, **data) -> dict:
    """What a prepare reads, without tokenizing: every document (name, split, text) in order, the counts of what
    was skipped, and the number of pieces and parts."""
    cfg = cfg_for(source, "unused", **data).data
    out = {"docs": [], "binary": 0, "undecodable": 0, "empty": 0, "skipped": 0, "damaged": 0, "faults": [],
           "units": 0}
    for piece in sources.plan(corpus.resolve(cfg), cfg, piece_bytes):
        for unit in sources.parts(piece, cfg, piece_bytes) if piece.streamed else [piece]:
            docs = sources.read_piece(unit, cfg)
            out["units"] += 1
            for s in sources.SPLITS:
                out["docs"] += [(name, s, text) for name, text in zip(docs.names[s], docs.texts[s])]
            for key in ("binary", "undecodable", "empty", "skipped", "damaged"):
                out[key] += getattr(docs, key)
            out["faults"] += docs.faults
    return out


def same_reading(a: dict, b: dict) -> None:
    assert sorted(a["docs"]) == sorted(b["docs"])
    for split in sources.SPLITS:  # in the order of each split's token stream
        assert [d[0] for d in a["docs"] if d[1] == split] == [d[0] for d in b["docs"] if d[1] == split]
    for key in ("binary", "undecodable", "empty", "skipped", "damaged", "faults"):
        assert a[key] == b[key], key


@pytest.mark.parametrize("suffix", ["gz", "bz2", "xz", "zst"])
def test_compressed_files_are_read_as_the_plain_files(suffix, tmp_path):
    root = write_corpus(tmp_path / "corpus")
    plain = read_all(root)
    names = {d[0] for d in plain["docs"]}
    assert f"{root}/big.txt@0" in names and f"{root}/sub/doc00.txt" in names and f"{root}/recs.jsonl@0" in names
    assert plain["skipped"] == 1 and plain["binary"] == 1 and plain["empty"] == 1
    compress_in_place(root, suffix)
    assert {f.name for f in corpus.resolve(cfg_for(root, "unused").data)} == {
        f"{root}/{p.relative_to(root).with_suffix('').as_posix()}" for p in root.rglob(f"*.{suffix}")}
    packed = read_all(root)
    assert packed["units"] > 10  # the large files came in several parts
    same_reading(packed, plain)


def make_tar(path: Path, root: Path, member_codec: dict[str, str] | None = None) -> Path:
    """A tar of root's files (relative names), some members compressed on their own."""
    with tarfile.open(path, "w") as tar:
        for p in sorted(q for q in root.rglob("*") if q.is_file()):
            data, name = p.read_bytes(), p.relative_to(root).as_posix()
            if name in (member_codec or {}):
                suffix = member_codec[name]
                data, name = COMPRESS[suffix](data), f"{name}.{suffix}"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("suffix", ["tar.gz", "tgz", "tar.bz2", "tar.xz", "tar.zst"])
def test_archives_are_read_member_by_member(suffix, tmp_path):
    root = write_corpus(tmp_path / "corpus")
    directory = read_all(root)
    tar = make_tar(tmp_path / "books.tar", root, {"recs.jsonl": "gz", "note": "xz"})
    plain = read_all(tar)
    # A member is named as its file is, after `<archive>!`, and read as a file of its name would be.
    as_files = sorted((name.replace(f"{tar}!", f"{root}/"), text) for name, _, text in plain["docs"])
    assert as_files == sorted((name, text) for name, _, text in directory["docs"])
    assert plain["faults"] == [f"{tar.resolve()}!blob.dat: not text (binary); skipped"]
    packed_path = tmp_path / f"books.{suffix}"
    packed_path.write_bytes(COMPRESS[suffix.replace("tgz", "gz").removeprefix("tar.")](tar.read_bytes()))
    tar.unlink()
    packed = read_all(packed_path)
    at = {"faults": [line.replace(f"{tar.resolve()}!", f"{packed_path.resolve()}!") for line in plain["faults"]]}
    same_reading(packed, {**plain, **at})


def test_gzipped_corpus_gives_the_same_token_store(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", PIECE)
    root = write_corpus(tmp_path / "corpus")
    plain = dataset.prepare(cfg_for(root, tmp_path / "cache"), progress=False)
    compress_in_place(root, "gz")
    packed = dataset.prepare(cfg_for(root, tmp_path / "cache"), progress=False)
    assert packed.path != plain.path  # the fingerprint keys on the compressed bytes
    for key in ("tokens_sha256", "content_sha256", "documents", "bytes", "tokens", "files", "eval"):
        assert packed.metadata[key] == plain.metadata[key], key
    assert packed.splits() == plain.splits()
    np.testing.assert_array_equal(packed.train_tokens(), plain.train_tokens())
    np.testing.assert_array_equal(packed.eval_tokens(), plain.eval_tokens())
    assert packed.tokenizer().to_str() == plain.tokenizer().to_str()


def test_a_prepare_killed_inside_a_compressed_file_resumes_there(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", PIECE)
    root = write_corpus(tmp_path / "corpus")
    (root / "blob.dat").unlink()
    big = root / "big.jsonl"
    big.with_name("big.jsonl.gz").write_bytes(gzip.compress(big.read_bytes()))
    big.unlink()
    cfg = cfg_for(root, tmp_path / "cache")
    whole = dataset.prepare(cfg_for(root, tmp_path / "whole"), progress=False)
    real_save = build._save_state

    def killed(out, state):  # a kill just after the third part of the compressed file was committed
        real_save(out, state)
        if state["parts"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(build, "_save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        dataset.prepare(cfg, progress=False)
    (partial,) = (tmp_path / "cache").glob(".*tmp-*")
    progress = json.loads((partial / "progress.json").read_text())
    assert progress["parts"] == 3
    monkeypatch.setattr(build, "_save_state", real_save)
    encoded, real = [], build._encode_task
    monkeypatch.setattr(build, "_encode_task", lambda task: encoded.append(task[0]) or real(task))
    monkeypatch.setattr(corpus, "train_tokenizer", lambda *a, **k: pytest.fail("the tokenizer was trained again"))
    resumed = dataset.prepare(cfg, progress=False)
    pieces = sources.plan(corpus.resolve(cfg.data), cfg.data, PIECE)
    n_parts = len(list(sources.parts(pieces[progress["pieces"]], cfg.data, PIECE)))
    assert len(encoded) == n_parts - 3 + len(pieces) - progress["pieces"] - 1  # the finished parts not again
    for key in ("tokens_sha256", "content_sha256", "documents", "bytes", "files", "eval"):
        assert resumed.metadata[key] == whole.metadata[key], key
    assert resumed.splits() == whole.splits()


def _records(n: int) -> bytes:
    return "".join(json.dumps({"text": f"record {i}: " + "words and more words " * 20}) + "\n"
                   for i in range(n)).encode()


def test_damaged_files_are_named_in_one_line_each_and_the_rest_is_kept(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", PIECE)
    root = write_corpus(tmp_path / "corpus")
    (root / "blob.dat").unlink()
    records = _records(400)
    packed = gzip.compress(records)
    (root / "cut.jsonl.gz").write_bytes(packed[: len(packed) * 3 // 4])  # an interrupted download
    (root / "trunc.txt.xz").write_bytes(lzma.compress(b"a whole document\n" * 100)[:-40])
    (root / "bad.txt.bz2").write_bytes(bz2.compress(b"text " * 1000)[:30] + b"\xff" * 200)
    books = tmp_path / "books"
    (books / "ch").mkdir(parents=True)
    (books / "ch" / "one.txt").write_text("chapter one\n" * 50)  # 600 bytes: 512 of header, 1024 of data
    (books / "ch" / "two.txt").write_text("chapter two\n" * 50)
    (books / "ch" / "z-cover.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" * 20)
    whole_tar = make_tar(tmp_path / "books.tar", books).read_bytes()
    (root / "books.tar.gz").write_bytes(gzip.compress(whole_tar))
    (root / "cut.tar").write_bytes(whole_tar[:1536 + 512 + 100])  # inside the second member's data
    packed_tar = gzip.compress(make_tar(tmp_path / "sub.tar", root / "sub").read_bytes(), mtime=0)
    (root / "cutgz.tar.gz").write_bytes(packed_tar[:len(packed_tar) // 2])
    (root / "ends.tar").write_bytes(whole_tar[:1536])  # after the first member: no end-of-archive block
    prepared = dataset.prepare(cfg_for(root, tmp_path / "cache"), progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    at = root.resolve()
    expected = [
        f"{at}/bad.txt.bz2: corrupt bzip2 stream (OSError: Invalid data stream); skipped",
        f"{at}/books.tar.gz!ch/z-cover.png: not text (binary); skipped",
        f"{at}/cut.jsonl.gz: truncated gzip stream (Compressed file ended before the end-of-stream marker was "
        f"reached); the text after it is skipped",
        f"{at}/cut.tar!ch/two.txt: truncated tar archive (unexpected end of data); the members after "
        f"'ch/one.txt' are skipped",
        f"{at}/cutgz.tar.gz!doc12.txt: truncated gzip stream (Compressed file ended before the end-of-stream marker "
        f"was reached); the members after 'doc09.txt' are skipped",
        f"{at}/ends.tar: truncated tar archive (it ends without its end-of-archive block); the members up to "
        f"'ch/one.txt' are kept",
        f"{at}/trunc.txt.xz: truncated xz stream (Compressed file ended before the end-of-stream marker was "
        f"reached); skipped",
    ]
    records_line = f"skipped 1 record(s) without a string 'text' field ({root}/recs.jsonl: 1)"
    assert sorted(warnings) == sorted(f"warning: data.sources: {line}" for line in expected + [records_line])
    files = prepared.metadata["files"]
    assert files["skipped_damaged"] == 6 and files["skipped_binary"] == 1
    assert sorted(prepared.metadata["faults"]) == sorted(expected)
    names = set(sum(prepared.splits().values(), []))
    # Every complete record before the cut is kept, the rest is not; the good files and members are all kept.
    kept = sorted(int(n.rsplit("@", 1)[1]) for n in names if n.startswith(f"{root}/cut.jsonl@"))
    assert kept == [sum(len(line) + 1 for line in records.split(b"\n")[:i]) for i in range(len(kept))]
    assert 100 < len(kept) < 400
    assert {f"{root}/books.tar!ch/one.txt", f"{root}/books.tar!ch/two.txt", f"{root}/cut.tar!ch/one.txt",
            f"{root}/ends.tar!ch/one.txt", f"{root}/cutgz.tar!doc09.txt", f"{root}/sub/doc00.txt",
            f"{root}/big.txt@0"} <= names
    assert not any("trunc.txt" in n or "bad.txt" in n or "cut.tar!ch/two" in n or "cutgz.tar!doc12" in n
                   for n in names)


def test_archive_faults_name_the_archive_and_the_member(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (books / name).write_text(f"the text of {name}\n" * 40)
    (books / "b.txt").write_bytes(gzip.compress((books / "b.txt").read_bytes()))
    (books / "b.txt").rename(books / "b.txt.gz")
    whole = make_tar(tmp_path / "whole.tar", books).read_bytes()
    root = tmp_path / "corpus"
    root.mkdir()
    inner = bytearray(whole)
    inner[2048 + 12: 2048 + 20] = b"\xff" * 8  # inside the deflate data of member b.txt.gz
    (root / "inner.tar").write_bytes(bytes(inner))
    header = bytearray(whole)
    header[1536: 1536 + 100] = b"x" * 100  # the second member's header
    (root / "header.tar").write_bytes(bytes(header))
    (root / "junk.tar").write_bytes(b"not an archive at all\n" * 100)
    (root / "junk.tar.gz").write_bytes(gzip.compress(b"not an archive at all\n" * 100))
    out = read_all(root)
    at = root.resolve()
    header_line, inner_line, *junk = out["faults"]
    assert header_line == (f"{at}/header.tar: corrupt tar archive (an unreadable header at byte 1,536); the "
                           f"members after 'a.txt' are skipped")
    assert inner_line.startswith(f"{at}/inner.tar!b.txt.gz: corrupt gzip stream (BadGzipFile: CRC check failed ")
    assert inner_line.endswith("); skipped") and "\n" not in inner_line
    assert junk == [f"{at}/junk.tar: corrupt tar archive (ReadError: invalid header); skipped",
                    f"{at}/junk.tar.gz: corrupt tar archive (ReadError: invalid header); skipped"]
    # A member's own damage skips only that member.
    assert sorted(d[0] for d in out["docs"]) == [f"{root}/header.tar!a.txt", f"{root}/inner.tar!a.txt",
                                                  f"{root}/inner.tar!c.txt"]
    assert out["damaged"] == 4


def test_corrupt_and_truncated_zstd_streams_are_named(tmp_path):
    zstd = _zstd()
    root = tmp_path / "corpus"
    root.mkdir()
    frame = zstd.ZstdCompressor().compress(b"one document\n" * 500)
    (root / "good.txt.zst").write_bytes(frame + zstd.ZstdCompressor().compress(b"a second frame\n"))
    (root / "cut.txt.zst").write_bytes(frame[: len(frame) // 2])
    (root / "junk.txt.zst").write_bytes(frame[:4] + b"\xff" * 64)
    out = read_all(root)
    assert [d[0] for d in out["docs"]] == [f"{root}/good.txt"]
    assert out["docs"][0][2] == "one document\n" * 500 + "a second frame\n"
    assert out["damaged"] == 2 and out["faults"][0].startswith(
        f"{root}/cut.txt.zst: truncated zstd stream (the file ends inside a zstd frame); skipped")
    assert out["faults"][1].startswith(f"{root}/junk.txt.zst: corrupt zstd stream (OSError: ")


def test_zst_without_zstandard_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # what an install without the extra sees
    path = tmp_path / "docs.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 16)
    one_line_error(cfg_for(path, tmp_path / "cache"), f"{path}: reading .zst files needs zstandard",
                   "pip install 'induction_jax[data]'")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_large_compressed_file_is_read_in_bounded_parts(tmp_path):
    """A file of many pieces is handed on in parts of about a piece, never whole."""
    path = tmp_path / "many.jsonl.gz"
    path.write_bytes(gzip.compress(_records(2000)))
    cfg = cfg_for(path, "unused").data
    (piece,) = sources.plan(corpus.resolve(cfg), cfg, PIECE)
    parts = list(sources.parts(piece, cfg, PIECE))
    assert len(parts) > 50 and all(p.text_bytes < PIECE + 1000 for p in parts)
    assert sum(p.size for p in parts) == path.stat().st_size  # progress accounts for every stored byte
    shutil.rmtree(tmp_path)


def test_the_tokenizer_samples_across_large_compressed_files(tmp_path, monkeypatch):
    """Each large compressed file is one piece: the sample takes the first parts of pieces spread over the corpus,
    not the whole of the first file."""
    monkeypatch.setattr(sources, "PIECE_BYTES", PIECE)
    root = tmp_path / "corpus"
    root.mkdir()
    rng = np.random.default_rng(1)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 8))) for _ in range(2000)]
    for i in range(4):  # each more than a piece when stored: a piece of its own
        text = "".join(json.dumps({"text": " ".join(rng.choice(words, 80))}) + "\n" for _ in range(200))
        (root / f"shard-{i}.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    sampled, real = [], build._sample_task
    monkeypatch.setattr(build, "_sample_task", lambda task: sampled.append(task[0]) or real(task))
    prepared = dataset.prepare(cfg_for(root, tmp_path / "cache", tokenizer_sample_bytes=2 * PIECE), progress=False)
    files = [{s.file.name for s in part.segments} for part in sampled]
    assert set().union(*files) == {f"{root}/shard-0.jsonl", f"{root}/shard-3.jsonl"}  # 2 of 4 pieces, spread
    assert all(sum(len(f) == 1 for f in files if name in f) == 1 for name in set().union(*files))  # one part each
    assert 0 < prepared.metadata["tokenizer"]["sample_bytes"] <= 2 * PIECE


def _c4_lines(rng) -> bytes:
    """C4-style JSON lines after a blank line: records of several fields, one longer than two pieces (a text file
    would be cut inside it, a JSONL file never is), a line that is not JSON and a record without the text field."""
    recs = [{"text": f"document {i} " + "lorem ipsum " * int(rng.integers(5, 60)), "timestamp": "2019-04-25",
             "url": f"https://example.com/{i}"} for i in range(300)]
    recs[120]["text"] = "é" * (3 * PIECE)
    lines = [json.dumps(r) for r in recs]
    lines[200:200] = ["not json", json.dumps({"url": "https://example.com/no-text"})]
    return ("\n" + "\n".join(lines) + "\n").encode()


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_json_lines_in_a_json_file_are_read_as_jsonl(suffix, tmp_path):
    data = _c4_lines(np.random.default_rng(2))
    jsonl = tmp_path / "jsonl" / "c4-train.00000-of-01024.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_bytes(data)
    expected = read_all(jsonl)
    assert expected["skipped"] == 2 and len(expected["docs"]) == 300
    assert f"{jsonl}@1" in {d[0] for d in expected["docs"]}  # the records' byte offsets, after the blank line
    root = tmp_path / "c4"
    root.mkdir()
    path = root / f"c4-train.00000-of-01024.json{suffix}"
    path.write_bytes(COMPRESS[suffix[1:]](data) if suffix else data)
    tar = make_tar(tmp_path / "c4.tar", root)
    # the file, a directory, an archive: the records of the JSONL file, named by their file and offsets
    for source, stem in [(path, f"{root}/{jsonl.stem}.json"), (root, f"{root}/{jsonl.stem}.json"),
                         (tar, f"{tar}!{jsonl.stem}.json")]:
        got = read_all(source)
        assert sorted((n, t) for n, _, t in got["docs"]) == sorted(
            (n.replace(str(jsonl), stem), t) for n, _, t in expected["docs"])
        assert got["skipped"] == 2 and got["faults"] == [] and got["binary"] == got["undecodable"] == 0


def test_json_files_that_are_not_json_lines_stay_one_text_document(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    files = {
        # one object across lines, text field and all
        "pretty.json": json.dumps({"text": "a document", "meta": {"id": 1}}, indent=2) + "\n",
        # records, but not of the text field
        "body.json": "".join(json.dumps({"id": i, "body": f"body {i}"}) + "\n" for i in range(5)),
        "number.json": json.dumps({"text": 7}) + "\n" + json.dumps({"text": "a string"}) + "\n",
        "list.json": json.dumps([{"text": "a"}]) + "\n",
        "broken.json": '{"text": "unfinished\n{"text": "a record"}\n',
        # a first line past the sniff's bound
        "long.json": json.dumps({"text": "x" * corpus.SNIFF_BYTES}) + "\n" + json.dumps({"text": "b"}) + "\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
        (root / f"{name}.gz").write_bytes(gzip.compress(text.encode()))
        for stored in (name, f"{name}.gz"):
            out = read_all(root / stored)
            # the file as text: one document, or parts named by their offsets when it is longer than a piece
            offsets = [int(n.split("@")[1]) if "@" in n else 0 for n, _, _ in out["docs"]]
            assert {n.split("@")[0] for n, _, _ in out["docs"]} == {f"{root}/{name}"}, stored
            assert "".join(d[2] for _, d in sorted(zip(offsets, out["docs"]))) == text, stored
            assert out["skipped"] == 0 and (len(out["docs"]) == 1) == (len(text) < PIECE), stored
    # The same records with data.text_field naming their field are JSON lines.
    body = read_all(root / "body.json.gz", text_field="body")
    assert sorted(t for _, _, t in body["docs"]) == [f"body {i}" for i in range(5)]


def test_a_json_lines_prepare_uses_the_configured_text_field(tmp_path):
    """The field reaches the reading of compressed `.json` files in a prepare."""
    rng = np.random.default_rng(3)
    lines = "".join(json.dumps({"content": " ".join(rng.choice(["ab", "cd", "ef", "gh"], 40)), "id": i}) + "\n"
                    for i in range(300))
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "shard.json.gz").write_bytes(gzip.compress(lines.encode()))
    prepared = dataset.prepare(cfg_for(root, tmp_path / "cache", text_field="content"), progress=False)
    names = sorted(sum(prepared.splits().values(), []))
    assert len(names) == 300 and all(n.startswith(f"{root}/shard.json@") for n in names)


def test_json_lines_is_decided_by_the_first_non_empty_line():
    line = json.dumps({"text": "a"}).encode()
    assert corpus.json_lines(line, "text") and corpus.json_lines(b"\n  \r\n" + line + b"\nnot json\n", "text")
    assert not corpus.json_lines(line, "body") and not corpus.json_lines(b"", "text")
    assert not corpus.json_lines(b"not json\n" + line + b"\n", "text")
    assert not corpus.json_lines(b"[" * 100_000 + b"]" * 100_000, "text")  # nested past the parser's limit
    long = json.dumps({"text": "x" * (corpus.SNIFF_BYTES - 12)}).encode()
    assert len(long) == corpus.SNIFF_BYTES and corpus.json_lines(long + b"\n" + b"y" * 10, "text")
    assert not corpus.json_lines(b"\n" + long + b"\n", "text")  # it ends past the bound
    with io.BytesIO(b"\n\n" + line + b"\nmore\n") as fh:
        assert corpus.head(fh) == b"\n\n" + line + b"\n"


def test_a_record_nested_past_the_parsers_depth_is_skipped_like_any_bad_record(tmp_path):
    path = tmp_path / "c4.jsonl.gz"
    lines = [json.dumps({"text": "kept one"}), "[" * 100_000, json.dumps({"text": "kept two"})]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    out = read_all(path)
    assert sorted(text for _, _, text in out["docs"]) == ["kept one", "kept two"] and out["skipped"] == 1
