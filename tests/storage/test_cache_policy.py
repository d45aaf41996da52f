"""`hot+lfu` (TinyLFU-like) against LRU and Belady on seeded traces: hit counts, not timings."""

from __future__ import annotations

import numpy as np
import pytest

from ndp.bench.belady import belady_hits_batched
from ndp.bench.hitrate import replay_policy
from ndp.bench.traces import zipf_trace
from storage_node.cache import SLOT_METADATA_BYTES, RowCache, RowFrequency
from storage_node.flash import FlashStore


@pytest.fixture(scope="module")
def small_zipf():
    return zipf_trace(
        num_rows=4000, exponent=1.1, num_samples=30_000, pooling_factor=1, batch_samples=256, seed=3
    )


def replay(trace, policy: str, capacity: int, tmp_path) -> int:
    out = replay_policy(
        trace, policy=policy, capacity_rows=capacity, hot_fraction=0.5, flash_dir=tmp_path
    )
    return out["hits"]


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.2])
def test_hot_lfu_beats_lru_on_a_zipf_trace(small_zipf, tmp_path, fraction):
    capacity = max(1, round(fraction * small_zipf.distinct_rows))
    assert replay(small_zipf, "hot+lfu", capacity, tmp_path) > replay(
        small_zipf, "lru", capacity, tmp_path
    )


def test_hot_lfu_is_within_0_9_of_batched_belady_on_a_small_zipf_trace(tmp_path):
    """A head-heavy trace (s=1.2) long enough that compulsory misses do not dominate."""
    trace = zipf_trace(
        num_rows=4000, exponent=1.2, num_samples=80_000, pooling_factor=1, batch_samples=256, seed=3
    )
    capacity = round(0.2 * trace.distinct_rows)
    optimal = belady_hits_batched(trace.rows, trace.batch_offsets, capacity)
    assert replay(trace, "hot+lfu", capacity, tmp_path) >= 0.9 * optimal


def make_cache(tmp_path, rows: int, *, num_rows: int = 64) -> RowCache:
    store = FlashStore(
        tmp_path / "shard",
        table_name="t",
        table_num_rows=num_rows,
        row_start=0,
        num_rows=num_rows,
        embedding_dim=4,
        state_width=0,
        seed=1,
        page_bytes=512,
        io_threads=1,
    )
    return RowCache(
        store,
        capacity_bytes=rows * (16 + SLOT_METADATA_BYTES),
        policy="hot+lfu",
        hot_fraction=0.0,
    )


def test_a_one_off_row_does_not_displace_a_frequent_row_but_is_still_served(tmp_path):
    cache = make_cache(tmp_path, rows=2)
    for _ in range(3):
        cache.fetch(np.array([1, 2]))
    expected = cache.flash.read_rows(np.array([9]))
    np.testing.assert_array_equal(cache.fetch(np.array([9])), expected)
    assert sorted(cache.cached_rows().tolist()) == [1, 2]
    cache.flash.close()


def test_a_row_that_becomes_frequent_is_admitted_in_time(tmp_path):
    cache = make_cache(tmp_path, rows=2)
    cache.fetch(np.array([1, 2]))
    for _ in range(3):
        cache.fetch(np.array([9]))
    assert 9 in cache.cached_rows().tolist()
    cache.flash.close()


def test_counts_survive_eviction(tmp_path):
    """Why TinyLFU: popularity is remembered for rows that are not cached."""
    cache = make_cache(tmp_path, rows=1)
    for _ in range(4):
        cache.fetch(np.array([5]))
    assert cache.row_freq.get(np.array([5]))[0] == 4
    cache.fetch(np.array([6]))  # not admitted: 1 < 4
    assert cache.cached_rows().tolist() == [5]
    cache.flash.close()


def test_unadmitted_writes_go_to_flash_exactly(tmp_path):
    cache = make_cache(tmp_path, rows=1)
    for _ in range(3):
        cache.fetch(np.array([0]))
    record = np.full((1, 4), 2.5, dtype=np.float32)
    cache.store(np.array([7]), record)
    assert cache.cached_rows().tolist() == [0]
    np.testing.assert_array_equal(cache.flash.read_rows(np.array([7])), record)
    cache.flash.close()


def test_resident_slots_only_when_every_row_is_cached(tmp_path):
    cache = make_cache(tmp_path, rows=4)
    cache.fetch(np.array([3, 4]))
    assert cache.resident_slots(np.array([3, 8])) is None
    slots = cache.resident_slots(np.array([4, 3, 4]))
    np.testing.assert_array_equal(cache.slot_rows[slots], [4, 3, 4])
    cache.flash.close()


def test_count_min_sketch_never_underestimates():
    freq = RowFrequency(num_rows=1 << 40, capacity_rows=16)
    assert not freq.dense
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 1 << 40, size=3000)
    for chunk in np.array_split(rows, 30):
        freq.add(np.unique(chunk))
    true = {}
    for chunk in np.array_split(rows, 30):
        for r in np.unique(chunk).tolist():
            true[r] = true.get(r, 0) + 1
    keys = np.array(list(true))
    assert (freq.get(keys) >= np.array([true[k] for k in keys.tolist()])).all()
