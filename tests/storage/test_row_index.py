"""The cache's row -> slot indexes answer like a dict under any mix of batched inserts,
removals and lookups, including tombstone rebuilds of the hash table."""

from __future__ import annotations

import numpy as np
import pytest

from storage_node.row_index import DenseRowIndex, HashRowIndex

ROW_SPACE = 10**12  # far beyond a dense array: row ids as a 50 GB table's arena numbers them


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("capacity", [600, 5_000])
def test_a_hash_index_answers_like_a_dict_through_churn_and_rebuilds(seed, capacity):
    rng = np.random.default_rng(seed)
    index, oracle = HashRowIndex(capacity), {}
    for _ in range(200):
        live = np.fromiter(oracle, dtype=np.int64, count=len(oracle))
        if live.size and rng.random() < 0.5:  # a cache's eviction: drop some cached rows
            gone = rng.choice(live, size=int(rng.integers(1, live.size + 1)), replace=False)
            index.remove(gone)
            for row in gone.tolist():
                del oracle[row]
        room = capacity - len(oracle)
        if room:  # admissions: unique rows not cached, up to the capacity
            new = np.unique(rng.integers(0, ROW_SPACE, size=int(rng.integers(1, room + 1))))
            new = new[~np.isin(new, live)]
            slots = rng.integers(0, capacity, size=new.size)
            index.insert(new, slots)
            oracle.update(zip(new.tolist(), slots.tolist(), strict=True))
        probe = np.concatenate([live[: rng.integers(0, live.size + 1)], rng.integers(0, 99, 50)])
        expected = [oracle.get(row, -1) for row in probe.tolist()]
        assert index.find(probe).tolist() == expected
    assert len(index) == len(oracle)
    index.clear()
    assert len(index) == 0 and (index.find(live) == -1).all()


def test_rows_that_hash_to_neighbouring_buckets_probe_past_each_other_and_past_removals():
    index = HashRowIndex(512)
    rows = np.arange(0, 1024 * 7, 7, dtype=np.int64)[:512]  # a full cache
    index.insert(rows, np.arange(rows.size))
    index.remove(rows[::2])  # tombstones in every probe chain
    np.testing.assert_array_equal(index.find(rows[1::2]), np.arange(1, rows.size, 2))
    assert (index.find(rows[::2]) == -1).all()
    index.insert(rows[::2], np.arange(0, rows.size, 2))  # reuse the tombstones
    np.testing.assert_array_equal(index.find(rows), np.arange(rows.size))


def test_more_rows_than_the_capacity_grow_the_table_instead_of_filling_it():
    index = HashRowIndex(10)  # buckets for 512 rows at least
    rows = np.arange(3_000, dtype=np.int64) * 11
    index.insert(rows, np.arange(rows.size))
    np.testing.assert_array_equal(index.find(rows), np.arange(rows.size))


def test_the_dense_index_is_one_slot_per_row():
    index = DenseRowIndex(100)
    index.insert(np.array([3, 97]), np.array([0, 1]))
    index.remove(np.array([3]))
    assert index.find(np.array([3, 97, 5])).tolist() == [-1, 1, -1]
