"""Weighted mixtures of sources: `{path, weight}` entries of data.sources, the MixtureLoader's proportions and
determinism, the per-source eval set, and per-source ICL scores in the analysis and the report.

The sources are written over disjoint alphabets, so the source of any window can be read off its decoded text,
independently of the store's own record of where each source lies.
"""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from corpus import one_line_error
from induction_jax.base import config
from induction_jax.base.config import ConfigError, WeightedSource
from induction_jax.data import corpus, dataset, evalset
from induction_jax.measures import evaluate

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/cpu/tiny.yaml"
ALPHABETS = {"lower": "abcdefghijklm", "upper": "nopqrstuvwxyz", "digits": "ABCDEFGHIJKLM"}
SEQ, BATCH = 32, 16
QUIET = ["train.probe_every=0"]


def write_source(root: Path, letters: str, n_files: int = 24, eval_fraction: float = 0.2, seed: int = 0) -> Path:
    """Files of random words over `letters` only; more files are added until both splits hold at least two."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list(letters), rng.integers(2, 7))) for _ in range(300)]
    root.mkdir(parents=True, exist_ok=True)
    held, i = [], 0
    while i < n_files or min(sum(held), len(held) - sum(held)) < 2:
        (root / f"doc{i:02d}.txt").write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(40)) + "\n")
        held.append(corpus.held_out(f"{root}/doc{i:02d}.txt", eval_fraction))
        i += 1
    return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("mix")
    return {name: write_source(base / name, letters, seed=i) for i, (name, letters) in enumerate(ALPHABETS.items())}


def mixture_overrides(roots, cache: Path, weights: dict[str, float]) -> list[str]:
    entries = ", ".join(f"{{path: {roots[name]}, weight: {w}}}" for name, w in weights.items())
    return [f"data.sources=[{entries}]", f"data.cache_dir={cache}", "data.site_packages=false",
            "data.eval_fraction=0.2", "data.workers=1"]


def load(roots, cache, weights, extra=()):
    return config.load(TINY, mixture_overrides(roots, cache, weights) + list(extra))


@pytest.fixture(scope="module")
def three(roots, tmp_path_factory):
    """(config, prepared) of a three-source mixture."""
    cfg = load(roots, tmp_path_factory.mktemp("cache3"), {"lower": 0.2, "upper": 0.3, "digits": 0.5})
    return cfg, dataset.prepare(cfg, progress=False)


def source_of(text: str) -> str:
    """The one alphabet a text's letters come from; fails on a text mixing two (a window across sources)."""
    found = {name for name, letters in ALPHABETS.items() if set(text) & set(letters)}
    assert len(found) == 1, f"{text!r} mixes sources {found}"
    return found.pop()


def decode_rows(prepared, rows_RT) -> list[str]:
    return prepared.tokenizer().decode_batch([r.tolist() for r in rows_RT], skip_special_tokens=True)


# -- config ----------------------------------------------------------------------------------------------------

def test_weighted_entries_parse_round_trip_and_leave_plain_lists_alone(roots, tmp_path):
    cfg = load(roots, tmp_path, {"lower": 0.3, "upper": 1})
    assert cfg.data.sources == (WeightedSource(str(roots["lower"]), 0.3), WeightedSource(str(roots["upper"]), 1.0))
    assert cfg.data.source_paths == (str(roots["lower"]), str(roots["upper"]))
    assert cfg.data.source_weights == (0.3, 1.0)
    saved = tmp_path / "config.yaml"
    saved.write_text(config.to_yaml(cfg))  # what a run directory keeps, read back on resume
    assert config.load(saved) == cfg
    plain = config.load(TINY, [f"data.sources=[{roots['lower']}, 7]"])
    assert plain.data.sources == (str(roots["lower"]), "7") and plain.data.source_weights is None
    assert config.to_yaml(config.load(TINY)).count("- python-stdlib") == 1


@pytest.mark.parametrize("entries,needle", [
    ("[{path: a, weight: 0}]", "data.sources[0].weight: must be > 0, got 0"),
    ("[{path: a, weight: 1}, {path: b, weight: -1}]", "data.sources[1].weight: must be > 0, got -1"),
    ("[{path: a, weight: .nan}]", "data.sources[0].weight: must be > 0, got nan"),
    ("[{path: a, weight: lots}]", "data.sources[0].weight: 'lots' is not a number"),
    ("[{path: a, weight: true}]", "data.sources[0].weight: True is not a number"),
    ("[{path: a, weight: 1}, b]", "data.sources[1].weight: missing for 'b' while data.sources[0] has one"),
    ("[a, {path: b, weight: 1}]", "data.sources[0].weight: missing for 'a' while data.sources[1] has one"),
    ("[{path: a}]", "data.sources[0].weight: missing for 'a'"),
    ("[{weight: 1}]", "data.sources[0].path: missing"),
    ("[{path: a, weight: 1, wieght: 2}]", "data.sources[0]: unknown key 'wieght'"),
    ("[{path: a, weight: 1}, {path: a, weight: 2}]", "data.sources[1].path: 'a' is also data.sources[0]"),
    ("[[a, b]]", "data.sources[0]: ['a', 'b'] is neither a path nor"),
])
def test_bad_weights_are_one_line_errors(entries, needle, tmp_path):
    for how in ("command line", "file"):
        with pytest.raises(ConfigError) as e:
            if how == "command line":
                config.load(TINY, [f"data.sources={entries}"])
            else:
                (tmp_path / "c.yaml").write_text(f"base: {REPO / TINY}\ndata:\n  sources: {entries}\n")
                config.load(tmp_path / "c.yaml")
        msg = str(e.value)
        assert "\n" not in msg and needle in msg, msg
        assert msg.startswith(f"{TINY} + command line: " if how == "command line" else f"{tmp_path / 'c.yaml'}: "), msg


def test_a_mixture_needs_an_eval_window_from_each_source():
    with pytest.raises(ConfigError, match=r"data.eval_examples: 2 is fewer than the mixture's 3 sources"):
        config.load(TINY, ["data.sources=[{path: a, weight: 1}, {path: b, weight: 1}, {path: c, weight: 1}]",
                           "data.eval_examples=2"])


# -- the token store and the eval set ---------------------------------------------------------------------------

def test_each_source_is_one_range_of_each_stream(three):
    cfg, prepared = three
    names = list(ALPHABETS)
    assert prepared.mixture["sources"] == list(cfg.data.source_paths)
    for split, stream in (("train", prepared.train_tokens()), ("eval", prepared.eval_tokens())):
        ranges = prepared.source_ranges(split)
        assert ranges[0][0] == 0 and ranges[-1][1] == stream.size
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        for name, (a, b) in zip(names, ranges):
            assert source_of(prepared.tokenizer().decode(stream[a:b].tolist(), skip_special_tokens=True)) == name


def test_the_eval_set_is_per_source_and_tagged(three, tmp_path):
    cfg, prepared = three
    windows_NL, _ = prepared.eval_set()
    source_N = prepared.eval_sources()
    n = cfg.data.eval_examples
    np.testing.assert_array_equal(source_N, np.arange(n) % 3)  # equal numbers, interleaved
    assert prepared.metadata["eval"]["per_source"] == np.bincount(np.arange(n) % 3).tolist()
    names = list(ALPHABETS)
    assert [source_of(t) for t in decode_rows(prepared, windows_NL)] == [names[k] for k in source_N]
    # Kept in the run directory with the source names, and covered by the hash.
    es = evalset.from_prepared(prepared, cfg.eval.exclude_common)
    evalset.save(tmp_path, es)
    back = evalset.load(tmp_path)
    np.testing.assert_array_equal(back.source_N, source_N)
    assert back.source_names == cfg.data.source_paths and back.eval_hash == prepared.eval_hash
    swapped = evalset.EvalSet(es.tokens_NL, es.random_index_N, es.eval_hash, es.bos_id, es.pool_P, es.exclude,
                              (es.source_N + 1) % 3, es.source_names)
    evalset.save(tmp_path, swapped)
    with pytest.raises(config.UserError, match="does not match its hash"):
        evalset.load(tmp_path)


def test_weights_share_the_store_and_the_unweighted_corpus_keeps_its_own(roots, three):
    cfg, prepared = three
    reweighted = load(roots, cfg.data.cache_dir, {"lower": 5, "upper": 1, "digits": 1})
    assert dataset.prepare(reweighted, progress=False).path == prepared.path
    plain = config.load(TINY, [f"data.sources=[{', '.join(cfg.data.source_paths)}]",
                               f"data.cache_dir={cfg.data.cache_dir}", "data.site_packages=false",
                               "data.eval_fraction=0.2", "data.workers=1"])
    unweighted = dataset.prepare(plain, progress=False)
    assert unweighted.path != prepared.path and unweighted.mixture is None
    # The same documents in the same order: only the record of where each source lies differs.
    np.testing.assert_array_equal(unweighted.train_tokens(), prepared.train_tokens())
    assert unweighted.eval_sources() is None


def test_overlapping_or_thin_sources_are_one_line_errors(roots, tmp_path):
    cache = tmp_path / "cache"
    inner = str(roots["lower"] / "doc00.txt")
    overlap = config.load(TINY, [f"data.sources=[{{path: {roots['lower']}, weight: 1}}, {{path: {inner}, weight: 1}}]",
                                 f"data.cache_dir={cache}", "data.workers=1"])
    one_line_error(overlap, "data.sources[1]", inner, "also in an earlier source")
    # One small file: all of it lands in one split, so it has no held-out (or no train) text.
    single = roots["upper"] / "doc00.txt"
    thin = config.load(TINY, [f"data.sources=[{{path: {roots['lower']}, weight: 1}}, {{path: {single}, weight: 1}}]",
                              f"data.cache_dir={cache}", "data.workers=1", "data.eval_fraction=0.2"])
    one_line_error(thin, "data.sources[1]", str(single))


# -- the loader ----------------------------------------------------------------------------------------------------

def test_proportions_over_10000_windows_match_the_weights(three):
    cfg, prepared = three
    weights = cfg.data.source_weights
    loader = dataset.make_loader(prepared, SEQ, BATCH, cfg.data.seed, weights)
    assert isinstance(loader, dataset.MixtureLoader)
    steps = 10_000 // BATCH
    rows = np.concatenate([loader.global_batch(s) for s in range(steps)])
    names = list(ALPHABETS)
    got = np.bincount([names.index(source_of(t)) for t in decode_rows(prepared, rows)], minlength=3)
    n = rows.shape[0]
    p = np.asarray(weights) / sum(weights)
    assert n == 10_000
    # Within sampling error of the weights (4 binomial standard deviations) ...
    assert np.all(np.abs(got - n * p) <= 4 * np.sqrt(n * p * (1 - p))), (got, n * p)
    # ... and in fact exact to within a window per source (docs/method.md §7).
    assert np.all(np.abs(got - n * p) <= 3), (got, n * p)
    # A source's windows do not repeat until it has given all of them: no repeat within the steps before its
    # first epoch ends (a step's rows are shuffled, so the step where it ends may hold the next epoch's first),
    # and over the 10,000 windows every window of every source is drawn.
    step_N = np.repeat(np.arange(steps), BATCH)
    source_N = np.array([names.index(source_of(t)) for t in decode_rows(prepared, rows)])
    for k, name in enumerate(names):
        own = source_N == k
        per_step = np.bincount(step_N[own], minlength=steps)
        whole = int(np.searchsorted(np.cumsum(per_step), loader.windows_K[k], side="right"))
        first = [r.tobytes() for r in rows[own & (step_N < whole)]]
        assert len(first) > 0.9 * loader.windows_K[k] and len(set(first)) == len(first), name
        assert len({r.tobytes() for r in rows[own]}) == loader.windows_K[k] < own.sum(), name


def test_mixture_batches_are_a_pure_function_of_seed_and_step(three):
    cfg, prepared = three
    weights = cfg.data.source_weights
    run = dataset.make_loader(prepared, SEQ, BATCH, 3, weights)
    batches = {s: run.global_batch(s) for s in (0, 1, 7, 11, 400)}
    fresh = dataset.make_loader(prepared, SEQ, BATCH, 3, weights)  # a resumed process, out of order
    for s in (400, 11, 7, 0, 1):
        np.testing.assert_array_equal(fresh.global_batch(s), batches[s])
    # Any subset of rows is the same rows of the global batch (what each process of a job reads).
    np.testing.assert_array_equal(fresh.rows(7, np.array([5, 0, 15])), batches[7][[5, 0, 15]])
    assert not np.array_equal(dataset.make_loader(prepared, SEQ, BATCH, 4, weights).global_batch(0), batches[0])
    other = dataset.make_loader(prepared, SEQ, BATCH, 3, (0.6, 0.2, 0.2))
    assert not np.array_equal(other.global_batch(0), batches[0])


def test_mixture_proportions_are_exact_integers_of_the_weights_as_written():
    assert dataset.integer_proportions((0.3, 0.7)) == (3, 7)
    assert dataset.integer_proportions((2, 0.5, 1.25)) == (8, 2, 5)
    # Over any prefix, each source's count is within a window or two of its share.
    props = (8, 2, 5)
    counts = np.zeros(3, int)
    for g in range(3000):
        k, n = dataset.mixture_position(g, props)
        assert n == counts[k]  # the n-th position of a source takes its n-th window
        counts[k] += 1
        assert np.all(np.abs(counts - (g + 1) * np.array(props) / 15) < 3)


def test_a_loader_refuses_an_unweighted_store_and_a_source_without_a_window(three, roots, tmp_path):
    cfg, prepared = three
    plain = dataset.prepare(config.load(TINY, [f"data.sources=[{roots['lower']}]", f"data.cache_dir={tmp_path}",
                                               "data.workers=1", "data.eval_fraction=0.2"]), progress=False)
    with pytest.raises(ConfigError, match="prepared from an unweighted corpus, not a mixture of 3"):
        dataset.make_loader(plain, SEQ, BATCH, 0, (1.0, 1.0, 1.0))
    smallest = min(b - a for a, b in prepared.source_ranges("train"))
    with pytest.raises(ConfigError, match=r"data.sources\[\d\]: .*train tokens, fewer than one window") as e:
        dataset.make_loader(prepared, smallest + 1, BATCH, 0, cfg.data.source_weights)
    assert "\n" not in str(e.value)


WORKER = textwrap.dedent("""
    import sys, numpy as np, jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    pid, port, path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
    from induction_jax.data import dataset
    loader = dataset.make_loader(dataset.open_prepared(path), 32, 16, 7, (0.2, 0.3, 0.5))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = {}
    for step in (0, 9, 150):
        arr = loader.device_batch(step, NamedSharding(mesh, P("data")))
        for shard in arr.addressable_shards:
            rows[f"{step}_{shard.index[0].start}"] = np.asarray(shard.data)
    np.savez(out, **rows)
    jax.distributed.shutdown()
""")


def test_two_processes_read_disjoint_rows_of_the_mixed_batch(three, tmp_path):
    _, prepared = three
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
    reference = dataset.make_loader(prepared, SEQ, 16, 7, (0.2, 0.3, 0.5))
    for step in (0, 9, 150):
        want = reference.global_batch(step)
        starts = [{int(k.split("_")[1]) for k in part if k.startswith(f"{step}_")} for part in parts]
        assert starts[0] and starts[1] and not starts[0] & starts[1], starts  # each row read by one process
        got = np.full_like(want, -1)
        for part in parts:
            for key, rows in part.items():
                if key.startswith(f"{step}_"):
                    start = int(key.split("_")[1])
                    got[start:start + rows.shape[0]] = rows
        np.testing.assert_array_equal(got, want)
        mine = [{r.tobytes() for k, rows in part.items() if k.startswith(f"{step}_") for r in rows}
                for part in parts]
        assert not mine[0] & mine[1]  # no window of the step reaches both processes


# -- training, resume, analysis, report ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two(roots, tmp_path_factory):
    """(root, overrides) of configs/cpu/tiny.yaml on a two-source mixture, its data prepared."""
    root = tmp_path_factory.mktemp("two")
    ov = mixture_overrides(roots, root / "cache", {"lower": 0.25, "upper": 0.75}) + ["data.eval_examples=32"]
    dataset.prepare(config.load(TINY, ov), progress=False)
    return root, ov


@pytest.fixture(scope="module")
def trained(two):
    from induction_jax.training import loop

    root, ov = two
    run_dir = root / "run"
    cfg = config.load(TINY, ov + QUIET + ["train.steps=8", "train.resume_every=4", "snapshots.every=4"])
    loop.train(cfg, run_dir, progress=False)
    return run_dir, cfg


def _final_params(run_dir):
    from induction_jax.training import checkpoint

    reader = checkpoint.SnapshotReader(run_dir)
    step = reader.steps()[-1]
    return step, jax.tree.map(np.asarray, reader.restore(step))


def test_a_crashed_mixture_run_resumes_bitwise(trained, monkeypatch, tmp_path):
    from induction_jax.training import loop, metrics

    ref_dir, cfg = trained
    real = dataset.MixtureLoader.device_batch

    def crash(self, step, sharding):
        if step == 6:  # after the resume checkpoint of step 4, before the one of step 8: nothing is saved
            raise RuntimeError("killed")
        return real(self, step, sharding)

    monkeypatch.setattr(dataset.MixtureLoader, "device_batch", crash)
    with pytest.raises(RuntimeError, match="killed"):
        loop.train(cfg, tmp_path / "crashed", progress=False)
    monkeypatch.undo()
    assert loop.train(cfg, tmp_path / "crashed", progress=False)["step"] == 8
    (s1, a), (s2, b) = _final_params(ref_dir), _final_params(tmp_path / "crashed")
    assert s1 == s2 == 8
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    losses = [[r["loss"] for r in metrics.read(d) if "loss" in r] for d in (ref_dir, tmp_path / "crashed")]
    assert losses[0] == losses[1] and len(losses[0]) == 8


def test_per_source_icl_scores_in_the_analysis_and_the_report(trained, roots):
    from induction_jax.analysis import scoring
    from induction_jax.analysis.results import RunResults
    from induction_jax.analysis.run import Run
    from induction_jax.report import markdown

    run_dir, cfg = trained
    run = Run(run_dir)
    scoring.analyze_run(run, progress=False)
    r = RunResults(run)
    es = run.eval_set
    assert r.source_names == cfg.data.source_paths
    assert r.icl_window_by_source.shape == (len(r.steps), 2)
    # Against a direct computation from the stored losses: mean over each source's windows of the mean loss
    # within ±window of the late index minus that of the early one (column c = token index c + 1).
    early, late = run.icl_indices
    w = cfg.eval.icl_window
    losses_SNP = r.losses_SNP.astype(np.float64)
    hi = losses_SNP.shape[2]
    band = lambda i: losses_SNP[:, :, max(1, i - w) - 1: min(hi, i + w)].mean(-1)
    for k in range(2):
        want = (band(late) - band(early))[:, es.source_N == k].mean(1)
        np.testing.assert_allclose(r.icl_window_by_source[:, k], want, rtol=1e-5, atol=1e-6)
    # Equal numbers of windows per source: the overall score is the plain mean of the two.
    np.testing.assert_allclose(r.icl_window_by_source.mean(1), r.icl_window, rtol=1e-5, atol=1e-6)
    report = markdown.write([run]).read_text()
    lower, upper = cfg.data.source_paths
    assert (f"Eval set: 32 windows of 32 tokens, per source: 16 from `{lower}` (training weight 0.25), 16 from "
            f"`{upper}` (training weight 0.75)") in report
    assert "It does not follow the training weights" in report
    line = next(ln for ln in report.splitlines() if ln.startswith("- ICL score by source"))
    for name, wt, icl in zip((lower, upper), (0.25, 0.75), r.icl_window_by_source.T):
        assert f"`{name}` (weight {wt:g}, 16 eval windows) {icl[0]:+.3f} → {icl[-1]:+.3f}" in line
    header = (run.store.dir / "summary.csv").read_text().splitlines()[0]
    assert header.endswith(f"icl_window:{lower},icl_window:{upper}")


def test_an_unweighted_eval_set_is_stated_as_one(three, roots, tmp_path):
    from types import SimpleNamespace

    from induction_jax.report import markdown

    plain = config.load(TINY, [f"data.sources=[{roots['lower']}]", f"data.cache_dir={tmp_path}", "data.workers=1",
                               "data.eval_fraction=0.2"])
    es = evalset.from_prepared(dataset.prepare(plain, progress=False), plain.eval.exclude_common)
    assert es.source_N is None and es.source_names == ()
    assert markdown.eval_set_statement(SimpleNamespace(eval_set=es, config=plain)) == (
        f"Eval set: 16 windows of 32 tokens at uniformly random offsets in the held-out documents of "
        f"`{roots['lower']}`.")
