"""Corpus sources beyond text files: parquet, arrow / HF `datasets` directories, pre-tokenized .bin / .npy / zarr.

Each kind goes end to end (prepare -> train a few steps -> analyze) on small files the tests make, its documents
are checked against what was written, and each bad input is refused with one line naming the file.
"""

import json
import sys

import numpy as np
import pytest
import tensorstore as ts

from corpus import make_corpus, one_line_error
from induction_jax.analysis import scoring, store
from induction_jax.analysis.run import Run
from induction_jax.base import config
from induction_jax.base.config import ConfigError
from induction_jax.data import corpus, dataset, sources
from induction_jax.training import loop

TINY = "configs/cpu/tiny.yaml"
PYARROW = "pyarrow (the `data` extra: pip install 'induction_jax[data]') reads parquet and arrow sources"


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """(names, texts) of a small real corpus: standard-library modules, one document each."""
    root = make_corpus(tmp_path_factory.mktemp("src"))
    paths = sorted(p for p in root.rglob("*.py") if p.stat().st_size)
    return [p.relative_to(root).as_posix() for p in paths], [p.read_text() for p in paths]


@pytest.fixture(scope="module")
def tokenizer(docs, tmp_path_factory):
    """A 512-token BPE trained here (the vocabulary of configs/cpu/tiny.yaml), saved as a user's tokenizer.json."""
    tok = corpus.train_tokenizer(docs[1], 512, progress=False)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return tok, str(path)


def token_stream(tok, texts) -> np.ndarray:
    """What a pre-tokenizing pipeline writes: every document's ids followed by <|eod|>."""
    eod = tok.token_to_id(corpus.EOD)
    return np.concatenate([np.append(tok.encode(t, add_special_tokens=False).ids, eod) for t in texts])


def overrides(tmp_path, source, *extra) -> list[str]:
    return [f"data.sources=[{source}]", f"data.cache_dir={tmp_path / 'cache'}", "data.eval_fraction=0.15",
            "data.workers=1", *extra]


def tiny(tmp_path, source, *extra):
    return config.load(TINY, overrides(tmp_path, source, *extra))


def documents(prepared, split) -> list[str]:
    """The split's stream decoded back into documents (cut at <|eod|>)."""
    tok = prepared.tokenizer()
    stream = (prepared.train_tokens() if split == "train" else prepared.eval_tokens()).astype(int)
    cuts = np.flatnonzero(stream == prepared.eod_id)
    return [tok.decode(part[:-1].tolist()) for part in np.split(stream, cuts + 1)[:-1]]


def check_end_to_end(tmp_path, source, *extra):
    """Trains 4 steps with a snapshot at 4 and analyzes it: finite, plausible per-token losses."""
    cfg = tiny(tmp_path, source, *extra, "train.steps=4", "snapshots.every=4", "train.probe_every=0")
    out = tmp_path / "run"
    assert loop.train(cfg, out, progress=False)["step"] == 4
    run = Run(out)
    scoring.analyze_run(run, progress=False)
    assert sorted(run.store.steps(store.EVAL)) == [4]
    losses = run.store.read(store.EVAL, "per_token_loss")
    assert np.isfinite(losses).all() and 0 < losses.mean() < 10


def test_parquet_end_to_end(docs, tmp_path):
    pa = pytest.importorskip("pyarrow", reason=PYARROW)
    pq = pytest.importorskip("pyarrow.parquet", reason=PYARROW)
    names, texts = docs
    table = pa.table({"id": list(range(len(texts))), "body": texts})
    path = tmp_path / "corpus.parquet"
    pq.write_table(table, path, row_group_size=40)  # several row groups, so several pieces below
    cfg = tiny(tmp_path, path, "data.text_field=body")
    prepared = dataset.prepare(cfg, progress=False)
    splits = prepared.splits()
    assert sorted(splits["train"] + splits["eval"]) == sorted(f"{path}#{i}" for i in range(len(texts)))
    by_name = {f"{path}#{i}": t for i, t in enumerate(texts)}
    assert documents(prepared, "eval") == [by_name[n] for n in splits["eval"]]
    assert documents(prepared, "train") == [by_name[n] for n in splits["train"]]
    check_end_to_end(tmp_path, path, "data.text_field=body")


def test_hf_datasets_directory_end_to_end(docs, tmp_path):
    pytest.importorskip("pyarrow", reason=PYARROW)
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets writes the save_to_disk directory")
    names, texts = docs
    path = tmp_path / "hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:-20]}),
                          "validation": datasets.Dataset.from_dict({"text": texts[-20:]})}).save_to_disk(str(path))
    cfg = tiny(tmp_path, path)
    prepared = dataset.prepare(cfg, progress=False)
    read = documents(prepared, "train") + documents(prepared, "eval")
    assert sorted(read) == sorted(texts)  # every split's rows, each once
    assert prepared.metadata["files"]["read"] == 2
    check_end_to_end(tmp_path, path)


def test_arrow_file_without_the_text_column_is_refused(docs, tmp_path):
    pa = pytest.importorskip("pyarrow", reason=PYARROW)
    path = tmp_path / "docs.arrow"
    with pa.ipc.new_file(str(path), pa.schema([("content", pa.string())])) as w:
        w.write_table(pa.table({"content": docs[1][:5]}))
    with pytest.raises(ConfigError) as e:
        dataset.prepare(tiny(tmp_path, path), progress=False)
    assert "\n" not in str(e.value) and str(path) in str(e.value) and "'text'" in str(e.value)
    assert "content" in str(e.value)


def test_parquet_without_the_text_column_is_refused(docs, tmp_path):
    pa = pytest.importorskip("pyarrow", reason=PYARROW)
    pq = pytest.importorskip("pyarrow.parquet", reason=PYARROW)
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": docs[1][:5]}), path)
    with pytest.raises(ConfigError) as e:
        dataset.prepare(tiny(tmp_path, path), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "'text'" in msg and "content" in msg, msg
    pq.write_table(pa.table({"text": list(range(5))}), path)
    with pytest.raises(ConfigError, match="not text"):
        dataset.prepare(tiny(tmp_path, path), progress=False)
    assert not list((tmp_path / "cache").glob(".*tmp-*")), "a refused build leaves its directory"


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    for name in ("pyarrow", "pyarrow.parquet", "pyarrow.ipc"):
        monkeypatch.setitem(sys.modules, name, None)  # what an install without the extra sees
    path = tmp_path / "docs.parquet"
    path.write_bytes(b"PAR1")
    one_line_error(tiny(tmp_path, path), str(path), "pip install 'induction_jax[data]'")


@pytest.mark.parametrize("kind", ["bin", "npy", "zarr"])
def test_pretokenized_end_to_end(kind, docs, tokenizer, tmp_path):
    tok, tok_path = tokenizer
    names, texts = docs
    stream = token_stream(tok, texts)
    path = tmp_path / f"tokens.{kind}"
    if kind == "bin":
        stream.astype("<u2").tofile(path)
    elif kind == "npy":
        np.save(path, stream.astype(np.int32))  # any integer dtype: ids are checked, then stored as uint16
    else:
        ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}, "create": True,
                 "metadata": {"dtype": "<u2", "shape": [stream.size], "chunks": [4096]}}
                ).result().write(stream.astype(np.uint16)).result()
    cfg = tiny(tmp_path, path, f"data.tokenizer={tok_path}")
    prepared = dataset.prepare(cfg, progress=False)
    assert prepared.metadata["pretokenized"] and not prepared.metadata["tokenizer"]["trained"]
    # No re-tokenization: the stored streams are the given ids, each document routed whole to its split.
    got = sorted(documents(prepared, "train") + documents(prepared, "eval"))
    assert got == sorted(texts)
    assert prepared.metadata["tokens"]["train"] + prepared.metadata["tokens"]["eval"] == stream.size
    check_end_to_end(tmp_path, path, f"data.tokenizer={tok_path}")


def test_pieces_do_not_change_what_is_prepared(docs, tokenizer, tmp_path, monkeypatch):
    """Reading in many small pieces (and in two worker processes) gives the bytes of reading in one."""
    tok, tok_path = tokenizer
    texts = docs[1]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    binf = tmp_path / "tokens.bin"
    token_stream(tok, texts).astype("<u2").tofile(binf)
    for source, extra in [(jsonl, []), (binf, [f"data.tokenizer={tok_path}"])]:
        whole = dataset.prepare(tiny(tmp_path / "a", source, *extra), progress=False)
        monkeypatch.setattr(sources, "PIECE_BYTES", 64 << 10)
        assert len(sources.plan(corpus.resolve(tiny(tmp_path, source, *extra).data),
                                tiny(tmp_path, source, *extra).data, eod_id=tok.token_to_id(corpus.EOD))) > 8
        pieces = dataset.prepare(tiny(tmp_path / "b", source, *extra, "data.workers=2"), progress=False)
        monkeypatch.undo()
        assert pieces.path != whole.path
        for key in ("tokens_sha256", "content_sha256", "tokens", "documents", "eval"):
            assert pieces.metadata[key] == whole.metadata[key], key
        assert pieces.splits() == whole.splits()


def test_tokenizer_trains_on_a_bounded_sample(tmp_path, monkeypatch):
    root = make_corpus(tmp_path)
    monkeypatch.setattr(sources, "PIECE_BYTES", 32 << 10)
    p = dataset.prepare(tiny(tmp_path, root, "data.tokenizer_sample_bytes=200000"), progress=False)
    k = p.metadata["tokenizer"]
    assert k["trained"] and 0 < k["sample_bytes"] <= 200_000 < p.metadata["bytes"]["train"]
    assert k["vocab"] == 512
    text = "def f(x):\n    return x\n"
    assert p.tokenizer().decode(p.tokenizer().encode(text, add_special_tokens=False).ids) == text


def test_bad_pretokenized_inputs_are_refused(docs, tokenizer, tmp_path):
    tok, tok_path = tokenizer
    stream = token_stream(tok, docs[1][:50])
    odd = tmp_path / "odd.bin"
    odd.write_bytes(stream.astype("<u2").tobytes() + b"\x01")
    one_line_error(tiny(tmp_path, odd, f"data.tokenizer={tok_path}"), str(odd), "odd length")
    high = tmp_path / "high.npy"
    bad = stream.astype(np.int64)
    bad[1234] = 512
    np.save(high, bad)
    one_line_error(tiny(tmp_path, high, f"data.tokenizer={tok_path}"), str(high), "512", "index 1234")
    floats = tmp_path / "floats.npy"
    np.save(floats, stream.astype(np.float32))
    one_line_error(tiny(tmp_path, floats, f"data.tokenizer={tok_path}"), str(floats), "integer")
    good = tmp_path / "good.bin"
    stream.astype("<u2").tofile(good)
    one_line_error(tiny(tmp_path, good), str(good), "data.tokenizer")
    one_line_error(tiny(tmp_path, f"{good},{odd}", f"data.tokenizer={tok_path}"), str(odd), "odd length")
    text = tmp_path / "t.txt"
    text.write_text("hello\n")
    one_line_error(config.load(TINY, [f"data.sources=[{good},{text}]", f"data.tokenizer={tok_path}",
                                f"data.cache_dir={tmp_path / 'cache'}"]), "pre-tokenized", str(text))


def test_corpus_too_small_for_one_batch_is_one_line_error(docs, tokenizer, tmp_path):
    tok, tok_path = tokenizer
    small = tmp_path / "small.bin"
    token_stream(tok, docs[1][:40]).astype("<u2").tofile(small)
    cfg = tiny(tmp_path, small, f"data.tokenizer={tok_path}", "train.batch_size=65536")  # 2M tokens a step
    with pytest.raises(ConfigError) as e:
        loop.train(cfg, tmp_path / "run", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "too small for one batch" in msg and str(small) in msg, msg
