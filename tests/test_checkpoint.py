import gc
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from induction_jax.training import checkpoint as ckpt
from induction_jax.training.checkpoint import (ResumeCheckpointer, RunDirError, SnapshotError, SnapshotReader,
                                               SnapshotWriter)
from induction_jax.base.config import TrainConfig
from induction_jax.training.schedule import optimizer


def _params(scale=1.0):
    return {"W_E": jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32) * scale,
            "ln": {"scale": jnp.ones(32) * scale}}


def _mesh(n):
    return jax.make_mesh((n,), ("fsdp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def _on_mesh(tree, mesh):
    """Shards the leading axis over fsdp where it divides; everything else replicated."""
    def spec(x):
        return P("fsdp") if x.ndim and x.shape[0] % mesh.size == 0 else P()
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), tree)


def _abstract(tree, sharding_of):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)), tree)


def _train_state(scale=1.0):
    params = _params(scale)
    tx = optimizer(TrainConfig(), tokens_per_step=64)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0), "rng": jax.random.key(7)}


def _assert_tree_equal(a, b):
    a = jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, a)
    b = jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_round_trip_keeps_latest_two(tmp_path):
    device0 = SingleDeviceSharding(jax.devices()[0])
    with ResumeCheckpointer(tmp_path / "state", every=2) as ck:
        saved = [step for step in range(1, 7)
                 if ck.save(step, _train_state(step), {"data_position": step * 10})]
        assert saved == [2, 4, 6]
        assert not ck.save(6, _train_state(), {}, force=True)  # an existing step is never overwritten
        ck.wait()
        assert ck.all_steps() == [4, 6]
    assert sorted(os.listdir(tmp_path / "state")) == ["4", "6"]

    with ResumeCheckpointer(tmp_path / "state", every=2) as ck:
        assert ck.latest_step() == 6
        state, extra = ck.restore(6, _abstract(_train_state(), lambda x: device0))
    assert extra == {"data_position": 60}
    _assert_tree_equal(state, _train_state(6))


def test_resume_restores_onto_another_device_count(tmp_path):
    # Saved from one device, restored FSDP-sharded over 8.
    state = jax.device_put(_train_state(3.0), jax.devices()[0])
    with ResumeCheckpointer(tmp_path / "state") as ck:
        assert ck.save(5, state, {"data_position": 1})
        ck.wait()
        mesh = _mesh(8)
        sharded = _on_mesh(_train_state(), mesh)
        restored, _ = ck.restore(5, _abstract(sharded, lambda x: x.sharding))
    assert restored["params"]["W_E"].sharding == NamedSharding(mesh, P("fsdp"))
    assert restored["opt_state"][1][0].mu["W_E"].sharding == NamedSharding(mesh, P("fsdp"))
    _assert_tree_equal(restored, state)


def test_restore_needs_target_shardings(tmp_path):
    with ResumeCheckpointer(tmp_path / "state") as ck:
        ck.save(1, _params(), {})
        ck.wait()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _params())
        with pytest.raises(ValueError, match="W_E has no sharding"):
            ck.restore(1, abstract)


def test_extra_must_be_json(tmp_path):
    with ResumeCheckpointer(tmp_path / "state") as ck:
        with pytest.raises(ValueError, match="not JSON-serialisable"):
            ck.save(1, _params(), {"position": object()})


def test_sigterm_flag_sets_preemption_and_forces_a_save(tmp_path):
    previous = ckpt.install_sigterm_handler()
    try:
        with ResumeCheckpointer(tmp_path / "state", every=1000) as ck:
            assert not ck.reached_preemption(3)
            assert not ck.save(3, _params(), {})
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.time() + 5
            while ckpt.stop_signal() is None and time.time() < deadline:
                time.sleep(0.01)
            assert ck.reached_preemption(3)
            assert ck.save(3, _params(), {})
            ck.wait()
            assert ck.latest_step() == 3
    finally:
        signal.signal(signal.SIGTERM, previous)
        ckpt._sigterm.clear()


def _write_snapshots(run_dir, steps, params):
    with SnapshotWriter(run_dir / "snapshots") as writer:
        for step in steps:
            assert writer.save(step, params, {"tokens_seen": step * 100, "loss": 1.5})
        writer.wait()


def test_snapshots_round_trip_onto_other_meshes(tmp_path):
    params = _on_mesh(_params(2.0), _mesh(8))
    _write_snapshots(tmp_path, [10, 20], params)
    with SnapshotWriter(tmp_path / "snapshots") as writer:  # a resumed run reaching a saved step again
        assert not writer.save(20, params, {"tokens_seen": 2000})

    reader = SnapshotReader(tmp_path)
    assert reader.steps() == [10, 20]
    meta = reader.metadata(20)
    assert meta["step"] == 20 and meta["tokens_seen"] == 2000 and meta["loss"] == 1.5
    assert abs(meta["wall_time"] - time.time()) < 600

    whole = reader.restore(20)
    assert whole["W_E"].sharding == SingleDeviceSharding(jax.local_devices()[0])
    _assert_tree_equal(whole, params)

    mesh = _mesh(4)
    on_four = reader.restore(10, _abstract(_on_mesh(_params(), mesh), lambda x: x.sharding))
    assert on_four["W_E"].sharding == NamedSharding(mesh, P("fsdp"))
    _assert_tree_equal(on_four, params)


def test_reader_lists_only_committed_snapshots(tmp_path):
    _write_snapshots(tmp_path, [10, 20], _params())
    snaps = tmp_path / "snapshots"
    # What an interrupted save leaves behind: the full content under Orbax's temporary name.
    shutil.copytree(snaps / "20", snaps / "30.orbax-checkpoint-tmp")
    shutil.copytree(snaps / "20", snaps / "40.orbax-checkpoint-tmp-1712345678")
    reader = SnapshotReader(tmp_path)
    assert reader.steps() == [10, 20]
    with pytest.raises(SnapshotError, match="no committed snapshot at step 30"):
        reader.restore(30)


def _files(directory):
    return sorted((os.path.join(root, f) for root, _, fs in os.walk(directory) for f in fs), key=os.path.getsize)


# When one array read fails, Orbax leaves the sibling read's exception unretrieved; Python reports it as
# unraisable. The failure that matters is the SnapshotError asserted below.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_or_foreign_snapshots_raise_snapshot_error(tmp_path):
    _write_snapshots(tmp_path, [1, 2, 3, 4], _params())
    snaps = tmp_path / "snapshots"
    biggest = _files(snaps / "1" / "params")[-1]
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    for data_file in _files(snaps / "2" / "params" / "ocdbt.process_0" / "d"):
        os.remove(data_file)
    os.remove(snaps / "3" / "meta" / "metadata")
    (snaps / "5").mkdir()  # a stray directory named like a step

    reader = SnapshotReader(tmp_path)
    abstract = _abstract(_params(), lambda x: SingleDeviceSharding(jax.devices()[0]))
    for step, read in [(1, lambda s: reader.restore(s, abstract)), (2, lambda s: reader.restore(s, abstract)),
                       (3, reader.metadata), (5, reader.restore), (5, reader.metadata)]:
        with pytest.raises(SnapshotError) as err:
            read(step)
        message = str(err.value)
        assert message.startswith(str(snaps / str(step))) and "\n" not in message, message

    other_model = _abstract({"W_E": jnp.zeros((32, 32)), "ln": {"scale": jnp.zeros(32)}},
                            lambda x: SingleDeviceSharding(jax.devices()[0]))
    with pytest.raises(SnapshotError, match="not compatible with the stored shape"):
        reader.restore(4, other_model)
    with pytest.raises(SnapshotError, match="do not match"):
        reader.restore(4, {"W_E": abstract["W_E"]})
    _assert_tree_equal(reader.restore(4, abstract), _params())
    gc.collect()  # reports those abandoned reads while the filter above still applies


def test_not_a_run_dir(tmp_path):
    with pytest.raises(RunDirError, match=f"{tmp_path}: not a run directory"):
        SnapshotReader(tmp_path)
    with pytest.raises(RunDirError, match="no such run directory"):
        SnapshotReader(tmp_path / "missing")
    (tmp_path / "config.yaml").write_text("model: {}\n")
    assert SnapshotReader(tmp_path).steps() == []
