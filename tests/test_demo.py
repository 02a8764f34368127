import json
import subprocess
import sys

from induction_jax import demo


def test_children_get_one_single_threaded_device():
    """A child started with the demo's environment sees one CPU device, whatever the parent was given."""
    env = dict(demo.single_device_env(), JAX_NUM_CPU_DEVICES="1")
    env.pop("XLA_FLAGS_EXTRA", None)
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count(), jax.default_backend())"],
                         env=env, capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert out == ["1", "cpu"]


def test_progress_readers_take_the_newest_records(tmp_path):
    lines = [{"step": s, "loss": 1.0} for s in range(1, 40)]
    lines.insert(20, {"step": 20, "probe_icl": -0.1, "probe_max_prefix": 0.2})
    lines.append({"step": 39, "probe_icl": -0.4, "probe_max_prefix": 0.6})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + '\n{"step": 4')  # torn line
    assert demo._steps_done(tmp_path) == 39
    assert demo._last_probe(tmp_path)["probe_max_prefix"] == 0.6
    assert demo._steps_done(tmp_path / "missing") == 0 and demo._last_probe(tmp_path / "missing") == {}


def test_ablation_steps_cover_before_during_and_after_the_window():
    steps = list(range(100, 4100, 100))
    picks = demo.ablation_steps(steps, {"i": 10, "j": 20})  # RunResults.window's snapshot indices
    assert picks[0] == 100 and picks[-1] == 4000
    assert 1000 in picks and 2200 in picks  # the snapshots just before and just after the window
    assert sum(1100 <= s <= 2100 for s in picks) >= 3


def test_the_demo_names_the_corpus_it_reads_and_compares_digests_only_for_the_embedded_one():
    from induction_jax.base import config
    embedded = config.load(demo.RUNS["attn_only_2l"])
    assert demo.is_embedded(embedded)
    assert demo.corpus_label(embedded) == "the Python standard library and site-packages"
    own = config.load(demo.RUNS["attn_only_2l"], ["data.sources=[/data/books, /data/more.jsonl]"])
    assert not demo.is_embedded(own) and demo.corpus_label(own) == "/data/books, /data/more.jsonl"
