"""Data pipeline: sources, tokenizer, token store, fixed eval set, and the stateless multi-host loader."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from corpus import one_line_error
from induction_jax.base import cli
from induction_jax.base.config import ConfigError, from_dict
from induction_jax.data import build, corpus, dataset, evalset, sources
from induction_jax.data.__main__ import main as data_main
from induction_jax.measures import heads

REPO = Path(__file__).resolve().parents[1]
SEQ, BATCH = 32, 8


def write_corpus(root: Path, n_files: int = 40, seed: int = 0, eval_fraction: float = 0.2) -> Path:
    """Random 'sentences' over a 400-word vocabulary: enough distinct tokens for a 300-token BPE.

    The split hashes each file's absolute path, which differs from run to run; where all files land in one split
    (1 run in 7,500 at 40 files and 0.2) more files are added until both splits have one, so no test is flaky."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 8))) for _ in range(400)]
    root.mkdir(parents=True, exist_ok=True)
    splits: set[bool] = set()
    i = 0
    while i < n_files or len(splits) < 2:
        lines = [" ".join(rng.choice(words, 10)) for _ in range(60)]
        (root / f"doc{i:02d}.txt").write_text(f"# file {i}: café ünïcode\n\t" + "\n".join(lines) + "\n")
        splits.add(corpus.held_out(f"{root}/doc{i:02d}.txt", eval_fraction))
        i += 1
    return root


def make_cfg(sources, cache, **data_kw):
    d = {"sources": [str(s) for s in sources], "cache_dir": str(cache), "eval_fraction": 0.2,
         "eval_examples": 16, "eval_length": 64, **data_kw}
    # A short context needs a short prefix-matching sequence (1 + 7 x 4 tokens), or the config is refused.
    return from_dict({"model": {"vocab_size": 300, "context": SEQ}, "data": d, "eval": {"prefix_tokens": 7}})


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text")


@pytest.fixture(scope="module")
def prepared(corpus_dir, tmp_path_factory):
    return dataset.prepare(make_cfg([corpus_dir], tmp_path_factory.mktemp("cache")), progress=False)


def test_global_batch_is_a_pure_function_of_seed_and_step(prepared):
    a = dataset.Loader(prepared, SEQ, BATCH, seed=3)
    run = [a.global_batch(s) for s in range(12)]
    resumed = dataset.Loader(prepared, SEQ, BATCH, seed=3)  # a fresh process resuming at step 7
    for s in (7, 11, 8):
        np.testing.assert_array_equal(resumed.global_batch(s), run[s])
    assert run[0].shape == (BATCH, SEQ) and run[0].dtype == np.int32
    other = dataset.Loader(prepared, SEQ, BATCH, seed=4)
    assert not np.array_equal(other.global_batch(0), run[0])


def in_memory_batch(tokens_M, seq_len, batch, seed, step):
    """The global batch as the in-memory loader made it (the demo's recorded data order): the whole stream cut
    into windows, visited in the order of a Grain shuffle seeded per epoch by SeedSequence([seed, epoch])."""
    w = tokens_M.size // seq_len
    windows_WT = tokens_M[: w * seq_len].reshape(-1, seq_len)
    rows = []
    for g in range(step * batch, (step + 1) * batch):
        epoch, p = divmod(g, w)
        epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint32)[0])
        rows.append(grain.MapDataset.range(w).shuffle(seed=epoch_seed).map(lambda i: windows_WT[i])[p])
    return np.stack(rows).astype(np.int32)


def test_lazy_loader_gives_the_in_memory_loaders_batches(prepared):
    tokens_M = prepared.train_tokens()
    for seed, seq_len, batch in [(0, SEQ, BATCH), (7, 24, 5)]:
        loader = dataset.Loader(prepared, seq_len, batch, seed)
        steps = 3 * loader.windows_per_epoch // batch + 2  # several epochs, batches straddling their ends
        for step in list(range(0, steps, 7)) + [steps - 1]:
            np.testing.assert_array_equal(loader.global_batch(step),
                                          in_memory_batch(tokens_M, seq_len, batch, seed, step))


def test_each_window_once_per_epoch_and_epochs_differ(prepared):
    loader = dataset.Loader(prepared, SEQ, BATCH, seed=0)
    w = loader.windows_per_epoch
    windows_WT = prepared.train_tokens()[: w * SEQ].reshape(w, SEQ).astype(np.int32)
    steps = -(-2 * w // BATCH)
    rows = np.concatenate([loader.global_batch(s) for s in range(steps)])
    # Map each row back to its window id (windows of random text are distinct).
    lookup = {row.tobytes(): i for i, row in enumerate(windows_WT)}
    assert len(lookup) == w
    ids = np.array([lookup[r.tobytes()] for r in rows])
    assert sorted(ids[:w]) == list(range(w)), "epoch 0 is not a permutation of the windows"
    assert sorted(ids[w:2 * w]) == list(range(w)), "epoch 1 is not a permutation of the windows"
    assert not np.array_equal(ids[:w], ids[w:2 * w])
    assert not np.array_equal(ids[:w], np.arange(w)), "windows are not shuffled"


def test_train_and_eval_files_are_disjoint(prepared, corpus_dir):
    splits = prepared.splits()
    assert splits["train"] and splits["eval"]
    assert not set(splits["train"]) & set(splits["eval"])
    assert set(splits["train"]) | set(splits["eval"]) == {f"{corpus_dir}/{p.name}" for p in corpus_dir.iterdir()}
    # Only held-out text reaches the eval stream: decode it back into exactly the held-out files, in order.
    tok = prepared.tokenizer()
    stream = prepared.eval_tokens().astype(int)
    cuts = np.flatnonzero(stream == prepared.eod_id)
    docs = [tok.decode(part[:-1].tolist()) for part in np.split(stream, cuts + 1)[:-1]]
    assert docs == [Path(name).read_text() for name in splits["eval"]]


def test_round_trip_text_tokens_text(prepared):
    tok = prepared.tokenizer()
    text = "def f(x):\n\treturn x  # naïve — 東京 🙂\r\n\n    trailing   \x01"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert max(ids) < 300
    assert tok.token_to_id("<|bos|>") == prepared.bos_id and tok.token_to_id("<|eod|>") == prepared.eod_id


def test_the_head_measures_random_tokens_skip_common_rare_and_special(prepared):
    """The pool the trainer stores with the eval set (evalset.from_prepared), drawn from as the head measures
    draw (heads.pool_sampler)."""
    exclude = 0.1
    freq = prepared.frequencies[: prepared.metadata["tokenizer"]["vocab"]]
    ids = [i for i in range(freq.size) if i not in (prepared.bos_id, prepared.eod_id)]
    ranked = sorted(ids, key=lambda i: (freq[i], i))
    k = int(exclude * len(ranked))
    banned = set(ranked[:k]) | set(ranked[-k:]) | {prepared.bos_id, prepared.eod_id}
    banned |= {i for i in ids if freq[i] == 0}
    sample = heads.pool_sampler(evalset.from_prepared(prepared, exclude).pool_P)
    draws = sample(np.random.default_rng(0), (200, 50))
    assert draws.shape == (200, 50) and draws.dtype == np.int32
    assert not set(draws.ravel().tolist()) & banned
    assert set(draws.ravel().tolist()) == set(ids) - banned  # uniform over all the rest: each one drawn
    assert prepared.frequencies.dtype == np.int64 and prepared.frequencies.shape == (300,)


def test_eval_set_fixed_across_prepares_and_hashed(prepared, corpus_dir, tmp_path):
    again = dataset.prepare(make_cfg([corpus_dir], tmp_path / "other_cache"), progress=False)
    assert again.path != prepared.path
    w1, i1 = prepared.eval_set()
    w2, i2 = again.eval_set()
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_array_equal(i1, i2)
    assert again.eval_hash == prepared.eval_hash == dataset.sha256_eval(w1, i1)
    assert w1.shape == (16, SEQ) and w1.dtype == np.int32  # eval_length 64 capped at the context
    assert i1.min() >= 1 and i1.max() <= SEQ - 1
    # Windows start at arbitrary offsets of the held-out stream, not just after document ends.
    stream = prepared.eval_tokens().astype(np.int32)
    views = np.lib.stride_tricks.sliding_window_view(stream, SEQ)
    starts = [int(np.flatnonzero((views == w).all(axis=1))[0]) for w in w1]
    assert sum(s == 0 or stream[s - 1] == prepared.eod_id for s in starts) < len(starts) // 2


def test_second_prepare_is_a_no_op_and_keyed_on_content(tmp_path, monkeypatch):
    corpus_dir = write_corpus(tmp_path / "text")
    cfg = make_cfg([corpus_dir], tmp_path / "cache")
    first = dataset.prepare(cfg, progress=False)

    def must_not_run(*a, **k):
        raise AssertionError("prepare rebuilt the corpus")

    monkeypatch.setattr(build, "build", must_not_run)
    assert dataset.prepare(cfg, progress=False).path == first.path
    assert dataset.open_prepared(first.path).metadata == first.metadata
    # New mtimes on the same bytes (a reinstalled venv) are the same corpus.
    os.utime(corpus_dir / "doc00.txt", ns=(1, 1))
    assert dataset.prepare(cfg, progress=False).path == first.path
    # Changed content is a new fingerprint, so it is rebuilt.
    monkeypatch.undo()
    (corpus_dir / "doc00.txt").write_text((corpus_dir / "doc00.txt").read_text().replace("café", "cafe"))
    assert dataset.prepare(cfg, progress=False).path != first.path


def test_large_files_are_hashed_by_size_and_sampled_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "FULL_HASH_BYTES", 1000)
    path = tmp_path / "big.txt"
    body = bytearray(np.random.default_rng(0).integers(97, 123, 200_000, dtype=np.uint8).tobytes())
    path.write_bytes(body)
    f = corpus.resolve(make_cfg([path], tmp_path).data)[0]
    before = corpus.content_digest(f)
    body[0] ^= 1  # the first block is always sampled
    path.write_bytes(body)
    assert corpus.content_digest(f) != before
    body[0] ^= 1
    path.write_bytes(body)
    assert corpus.content_digest(f) == before


def _interrupt(monkeypatch, target, name, after):
    """Makes `target.name` raise KeyboardInterrupt on its call number `after` (a kill at that point)."""
    real, calls = getattr(target, name), []

    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) == after:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(target, name, wrapped)


@pytest.mark.parametrize("where", ["before_commit", "after_commit"])
def test_interrupted_prepare_resumes_without_redoing_finished_pieces(corpus_dir, tmp_path, monkeypatch, where):
    monkeypatch.setattr(sources, "PIECE_BYTES", 8 << 10)  # several pieces from the small corpus
    cfg = make_cfg([corpus_dir], tmp_path / "cache", workers=1)
    whole = dataset.prepare(make_cfg([corpus_dir], tmp_path / "whole", workers=1), progress=False)
    n_pieces = len(sources.plan(corpus.resolve(cfg.data), cfg.data))
    assert n_pieces >= 5
    # Killed while the fourth piece was being committed: its tokens written, progress.json not yet, or after.
    _interrupt(monkeypatch, build, *(("_save_state", 5) if where == "before_commit" else ("_commit", 4)))
    with pytest.raises(KeyboardInterrupt):
        dataset.prepare(cfg, progress=False)
    partial = list((tmp_path / "cache").glob(".*tmp-*"))
    assert len(partial) == 1 and not (partial[0] / "metadata.json").exists()
    done = json.loads((partial[0] / "progress.json").read_text())["pieces"]
    assert done == 3
    monkeypatch.undo()
    monkeypatch.setattr(sources, "PIECE_BYTES", 8 << 10)
    encoded = []
    real = build._encode_task
    monkeypatch.setattr(build, "_encode_task", lambda task: encoded.append(task[0]) or real(task))
    monkeypatch.setattr(corpus, "train_tokenizer", lambda *a, **k: pytest.fail("the tokenizer was trained again"))
    resumed = dataset.prepare(cfg, progress=False)
    assert len(encoded) == n_pieces - done
    assert list((tmp_path / "cache").glob(".*tmp-*")) == []
    for key in ("tokens_sha256", "content_sha256", "tokens", "documents", "bytes", "files", "eval"):
        assert resumed.metadata[key] == whole.metadata[key], key
    assert resumed.splits() == whole.splits()
    np.testing.assert_array_equal(resumed.frequencies, whole.frequencies)


def test_bad_input_leaves_no_build_directory(corpus_dir, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="no readable text"):
        dataset.prepare(make_cfg([corpus_dir, junk], tmp_path / "cache"), progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_errors_are_one_line_and_name_the_source(corpus_dir, tmp_path):
    missing = tmp_path / "nope"
    one_line_error(make_cfg([missing], tmp_path), str(missing))
    pattern = f"{corpus_dir}/*.md"
    one_line_error(make_cfg([pattern], tmp_path), pattern)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.bin").write_bytes(b"\x00\x01")
    (junk / "b.txt").write_bytes(b"\xff\xfe")
    (junk / "c.txt").write_text("")
    one_line_error(make_cfg([corpus_dir, junk], tmp_path), str(junk), "no readable text")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(make_cfg([empty], tmp_path), str(empty))
    big = make_cfg([corpus_dir], tmp_path)
    big = dataclasses.replace(big, model=dataclasses.replace(big.model, vocab_size=70_000))
    one_line_error(big, "model.vocab_size", "70000")
    one_line_error(make_cfg([corpus_dir], tmp_path, tokenizer=str(tmp_path / "tok.json")), "tok.json")
    assert not any(p.name != "junk" and p.name != "empty" for p in tmp_path.iterdir())


def test_user_tokenizer_is_used_and_checked(prepared, corpus_dir, tmp_path):
    path = tmp_path / "tokenizer.json"
    prepared.tokenizer().save(str(path))
    used = dataset.prepare(make_cfg([corpus_dir], tmp_path / "c", tokenizer=str(path)), progress=False)
    assert not used.metadata["tokenizer"]["trained"]
    np.testing.assert_array_equal(used.train_tokens(), prepared.train_tokens())
    wrong = make_cfg([corpus_dir], tmp_path / "c", tokenizer=str(path))
    wrong = dataclasses.replace(wrong, model=dataclasses.replace(wrong.model, vocab_size=512))
    one_line_error(wrong, str(path), "512")


def test_jsonl_records_split_one_by_one(tmp_path):
    rng = np.random.default_rng(1)
    words = ["".join(rng.choice(list("abcdefghij"), 5)) for _ in range(300)]
    lines = [json.dumps({"body": " ".join(rng.choice(words, 40))}) for _ in range(200)]
    lines += [json.dumps({"other": "x"}), "not json"]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    p = dataset.prepare(make_cfg([path], tmp_path / "cache", text_field="body"), progress=False)
    assert p.metadata["files"]["skipped_records"] == 2
    splits = p.splits()
    assert len(splits["train"]) + len(splits["eval"]) == 200 and splits["eval"]
    one_line_error(make_cfg([path], tmp_path / "cache", text_field="missing"), str(path), "'missing'")


def test_python_stdlib_source_resolves():
    stdlib = corpus.resolve(from_dict({"data": {"sources": ["python-stdlib"]}}).data)
    names = [f.name for f in stdlib]
    assert "python-stdlib/json/decoder.py" in names
    assert all(n.endswith(".py") and "site-packages" not in n for n in names)
    held = sum(corpus.held_out(n, 0.03) for n in names) / len(names)
    assert 0.01 < held < 0.06, held


def test_site_packages_leave_out_editable_finders(tmp_path, monkeypatch):
    # The finder of an editable install names the checkout's path, which differs from clone to clone.
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "__editable___induction_jax_0_1_0_finder.py").write_text("MAPPING = {'a': '/tmp/x'}\n")
    paths = dict(corpus.sysconfig.get_paths(), purelib=str(tmp_path))
    monkeypatch.setattr(corpus.sysconfig, "get_paths", lambda: paths)
    files = corpus.resolve(from_dict({"data": {"sources": ["python-stdlib"], "site_packages": True}}).data)
    site = [f.name for f in files if f.name.startswith("site-packages/")]
    assert site == ["site-packages/pkg/mod.py"]


def test_loader_errors(prepared):
    with pytest.raises(ConfigError, match="fewer than one batch"):
        dataset.Loader(prepared, SEQ, 10**6, seed=0)
    with pytest.raises(ConfigError, match="not a prepared data directory"):
        dataset.open_prepared(Path(prepared.path).parent)


def test_device_batch_single_process(prepared):
    loader = dataset.Loader(prepared, SEQ, 16, seed=2)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    for spec in (P(("data", "fsdp")), P("data"), P(None, "fsdp")):
        arr = loader.device_batch(5, NamedSharding(mesh, spec))
        np.testing.assert_array_equal(np.asarray(arr), loader.global_batch(5))


def test_cli_prepare(corpus_dir, tmp_path, capsys):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"model: {{vocab_size: 300, context: {SEQ}}}\neval: {{prefix_tokens: 7}}\n")
    args = ["prepare", "--no-progress", "--config", str(cfg_path), f"data.sources=[{corpus_dir}]",
            f"data.cache_dir={tmp_path / 'cache'}", "data.eval_fraction=0.2", "data.eval_examples=4"]

    def exit_code(argv) -> int:
        with pytest.raises(SystemExit) as e:
            cli.run(data_main, argv)
        return e.value.code

    assert exit_code(args) == 0
    out = capsys.readouterr().out
    assert "tokens:" in out and "prepared data:" in out
    assert exit_code(args[:-3] + [f"data.sources=[{tmp_path / 'nope'}]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err


WORKER = textwrap.dedent("""
    import sys, numpy as np, jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    pid, port, path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
    from induction_jax.data import dataset
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    loader = dataset.Loader(dataset.open_prepared(path), 32, 16, seed=7)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = {}
    for step in (0, 9, 150):
        arr = loader.device_batch(step, NamedSharding(mesh, P("data")))
        assert arr.shape == (16, 32)
        for shard in arr.addressable_shards:
            rows[f"{step}_{shard.index[0].start}"] = np.asarray(shard.data)
    np.savez(out, **rows)
    jax.distributed.shutdown()
""")


@pytest.mark.slow
def test_two_processes_read_the_global_batch(prepared, tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), prepared.path,
                               str(tmp_path / f"p{i}.npz")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    parts = [dict(np.load(tmp_path / f"p{i}.npz")) for i in range(2)]
    reference = dataset.Loader(prepared, SEQ, 16, seed=7)
    for step in (0, 9, 150):
        want = reference.global_batch(step)
        got = np.full_like(want, -1)
        for part in parts:
            for key, rows in part.items():
                if key.startswith(f"{step}_"):
                    start = int(key.split("_")[1])
                    got[start:start + rows.shape[0]] = rows
        np.testing.assert_array_equal(got, want)
