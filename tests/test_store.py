import numpy as np
import pytest

from induction_jax.analysis.store import LOCK_FILE, Store, StoreError, store_key


def test_write_read_in_step_order_and_rewrite(tmp_path):
    s = Store(tmp_path, store_key("abc" * 10))
    for step in (20, 10, 30):
        s.write("eval", step, {"loss": float(step)}, {"losses": np.full((3, 4), step, np.float32)})
    assert sorted(s.steps("eval")) == [10, 20, 30]
    np.testing.assert_array_equal(s.read("eval", "losses")[:, 0, 0], [10, 20, 30])
    np.testing.assert_array_equal(s.read("eval", "losses", step=20), np.full((3, 4), 20))
    s.write("eval", 20, {"loss": -1.0}, {"losses": np.zeros((3, 4), np.float32)})  # rewrite in place
    assert sorted(s.steps("eval")) == [10, 20, 30]
    assert [r["loss"] for r in s.sorted_records("eval")] == [10.0, -1.0, 30.0]


def test_uncommitted_slot_is_invisible_and_reused(tmp_path):
    s = Store(tmp_path, "k")
    s.write("eval", 1, {}, {"losses": np.ones((2,), np.float32)})
    # A job killed after writing slot 1's array but before committing the index: the array has grown...
    arr = s._array("eval.losses", (2,), np.float32)
    arr.resize(exclusive_max=(2, 2)).result()[1].write(np.full((2,), 7, np.float32)).result()
    assert s.steps("eval") == [1]  # ...but nothing is visible
    s.write("eval", 5, {}, {"losses": np.full((2,), 5, np.float32)})
    np.testing.assert_array_equal(s.read("eval", "losses"), [[1, 1], [5, 5]])


def test_shape_change_is_refused(tmp_path):
    s = Store(tmp_path, "k")
    s.write("eval", 1, {}, {"losses": np.ones((2,), np.float32)})
    with pytest.raises(ValueError, match="expected"):
        s.write("eval", 2, {}, {"losses": np.ones((3,), np.float32)})


def test_a_slot_that_does_not_match_its_digest_is_refused_and_dropped_by_verify(tmp_path):
    s = Store(tmp_path, "k")
    for step in (1, 2, 3):
        s.write("eval", step, {"loss": float(step)}, {"losses": np.full((2,), step, np.float32)})
    idx = s.index("eval")
    slot = idx["slots"][idx["steps"].index(2)]
    s._array("eval.losses", (2,), np.float32)[slot].write(np.full((2,), 3, np.float32)).result()  # crossed
    with pytest.raises(StoreError, match="step 2 do not match their digest"):
        s.read("eval", "losses")
    with pytest.raises(StoreError, match="step 2"):
        s.read("eval", "losses", step=2)
    np.testing.assert_array_equal(s.read("eval", "losses", step=3), [3, 3])  # the others stay readable
    dropped = s.verify("eval")
    assert [step for step, _ in dropped] == [2] and "eval.losses.zarr: the results of step 2" in dropped[0][1]
    assert sorted(s.steps("eval")) == [1, 3] and s.verify("eval") == []
    s.write("eval", 2, {"loss": 2.0}, {"losses": np.full((2,), 2, np.float32)})  # analysed again
    np.testing.assert_array_equal(s.read("eval", "losses"), [[1, 1], [2, 2], [3, 3]])


def test_the_writers_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    s, t = Store(tmp_path, "k"), Store(tmp_path, "other")  # two stores of one results directory
    with s.writing():
        with t.writing():
            t.write("eval", 1, {}, {"losses": np.ones((2,), np.float32)})
        assert (tmp_path / LOCK_FILE).exists()
    with s.writing():  # taken again once released
        pass
