"""The DRAM row cache against a plain in-memory array as oracle, plus policy specifics."""

from __future__ import annotations

import numpy as np
import pytest

from storage_node import cache as cache_module
from storage_node.cache import RowCache, split_budget
from storage_node.flash import FlashStore
from storage_node.row_index import HashRowIndex

NUM_ROWS, DIM, STATE = 64, 4, 1
FLOATS = DIM + STATE


def make_cache(tmp_path, *, rows: int, policy: str, hot_fraction: float = 0.5) -> RowCache:
    store = FlashStore(
        tmp_path / "shard",
        table_name="t",
        table_num_rows=NUM_ROWS,
        row_start=0,
        num_rows=NUM_ROWS,
        embedding_dim=DIM,
        state_width=STATE,
        seed=1,
        page_bytes=512,
        io_threads=2,
    )
    from storage_node.cache import SLOT_METADATA_BYTES

    return RowCache(
        store,
        capacity_bytes=rows * (4 * FLOATS + SLOT_METADATA_BYTES),
        policy=policy,
        hot_fraction=hot_fraction,
        weight_floats=DIM,  # as a node's cache: weights and optimizer state in two arrays
    )


def assert_index_consistent(cache: RowCache) -> None:
    occupied = np.flatnonzero(cache.slot_rows >= 0)
    np.testing.assert_array_equal(cache.index.find(cache.slot_rows[occupied]), occupied)
    assert np.unique(cache.slot_rows[occupied]).size == occupied.size
    # the free slots are a suffix: the watermark `_place` takes new slots from
    np.testing.assert_array_equal(occupied, np.arange(cache._filled))


@pytest.mark.parametrize("scale", ["small", "large"])
@pytest.mark.parametrize("index", ["dense", "hashed"])
@pytest.mark.parametrize("policy", ["lru", "lfu", "hot+lfu"])
def test_random_operations_agree_with_an_in_memory_oracle(
    tmp_path, policy, index, scale, monkeypatch
):
    """Whatever the policy decides, every read is exact. `large`: the shortcuts of caches of
    millions of slots (victims from a sample, the hot set re-selected only every so many
    accesses) switched on at this size."""
    if scale == "large":
        monkeypatch.setattr(cache_module, "SAMPLED_EVICTION_MIN_SLOTS", 2)
        monkeypatch.setattr(cache_module, "EVICTION_SAMPLE_FACTOR", 1)
        monkeypatch.setattr(cache_module, "EVICTION_SAMPLE_MIN", 1)
        monkeypatch.setattr(cache_module, "HOT_RESELECT_MIN_SLOTS", 2)
    cache = make_cache(tmp_path, rows=6, policy=policy)
    if index == "hashed":
        cache.index = HashRowIndex(cache.capacity_rows)
    oracle = cache.flash.read_rows(np.arange(NUM_ROWS))
    rng = np.random.default_rng(42)
    pinned: list[np.ndarray] = []
    for _ in range(300):
        op = rng.choice(["fetch", "store", "pin", "unpin", "step"], p=[0.4, 0.35, 0.1, 0.1, 0.05])
        rows = np.unique(rng.integers(0, NUM_ROWS, size=rng.integers(1, 9)))
        if op == "fetch":
            np.testing.assert_array_equal(cache.fetch(rows), oracle[rows])
        elif op == "store":
            records = rng.standard_normal((rows.size, FLOATS)).astype(np.float32)
            cache.store(rows, records)
            oracle[rows] = records
        elif op == "pin":
            pinned.append(cache.pin(rows))
        elif op == "unpin" and pinned:
            cache.unpin(pinned.pop(0))
        elif op == "step":
            cache.on_step()
        for still_pinned in pinned:  # pinned rows are never evicted
            assert (cache.index.find(still_pinned) >= 0).all()
        assert_index_consistent(cache)
    assert cache.counters.evictions > 0 and cache.counters.write_backs > 0
    cache.flush()
    np.testing.assert_array_equal(cache.flash.read_rows(np.arange(NUM_ROWS)), oracle)
    cache.flash.close()


def test_lru_evicts_the_least_recently_used_row(tmp_path):
    cache = make_cache(tmp_path, rows=3, policy="lru")
    for row in (0, 1, 2):
        cache.fetch(np.array([row]))
    cache.fetch(np.array([0]))  # 1 is now least recently used
    cache.fetch(np.array([9]))
    assert sorted(cache.cached_rows().tolist()) == [0, 2, 9]
    cache.flash.close()


def test_lfu_evicts_the_least_frequently_used_row(tmp_path):
    cache = make_cache(tmp_path, rows=3, policy="lfu")
    for rows in ([0], [1], [2], [0], [1], [0], [1], [2]):  # 2 used twice, 0 and 1 thrice
        cache.fetch(np.array(rows))
    cache.fetch(np.array([9]))
    assert sorted(cache.cached_rows().tolist()) == [0, 1, 9]
    cache.flash.close()


@pytest.mark.parametrize("policy", ["lfu", "hot+lfu"])
def test_hot_set_stays_pinned_until_the_next_reselection(tmp_path, policy):
    cache = make_cache(tmp_path, rows=4, policy=policy, hot_fraction=0.5)
    for _ in range(5):
        cache.fetch(np.array([0, 1]))
    cache.on_step()  # hot+lfu: 0 and 1 become the pinned hot set
    for rows in ([10, 11], [12, 13]):  # other rows become more frequent than 0 and 1
        for _ in range(10):
            cache.fetch(np.array(rows))
    kept = {0, 1} <= set(cache.cached_rows().tolist())
    assert kept == (policy == "hot+lfu")
    if policy == "hot+lfu":
        hits_before = cache.counters.hot_hits
        cache.fetch(np.array([0]))
        assert cache.counters.hot_hits == hits_before + 1
        cache.on_step()  # re-selection: the now-frequent rows take over the hot set
        assert not cache.hot[cache.index.find(np.array([0]))].any()
    cache.flash.close()


def test_a_batch_larger_than_the_cache_is_served_exactly(tmp_path):
    cache = make_cache(tmp_path, rows=2, policy="lru")
    rows = np.arange(10)
    records = np.arange(10 * FLOATS, dtype=np.float32).reshape(10, FLOATS)
    cache.store(rows, records)  # 2 rows cached dirty, 8 written through
    np.testing.assert_array_equal(cache.fetch(rows), records)
    cache.flash.close()


def test_dirty_rows_are_written_back_when_evicted(tmp_path):
    cache = make_cache(tmp_path, rows=1, policy="lru")
    record = np.full((1, FLOATS), 5.0, dtype=np.float32)
    cache.store(np.array([3]), record)
    assert cache.counters.write_backs == 0
    cache.fetch(np.array([4]))  # evicts row 3
    assert cache.counters.write_backs == 1 and cache.counters.evictions == 1
    np.testing.assert_array_equal(cache.flash.read_rows(np.array([3])), record)
    cache.flash.close()


def test_when_everything_is_pinned_new_rows_bypass_the_cache(tmp_path):
    cache = make_cache(tmp_path, rows=2, policy="lru")
    assert cache.pin(np.array([0, 1])).tolist() == [0, 1]
    assert cache.pin(np.array([5])).size == 0  # no slot: not pinned, served from flash
    np.testing.assert_array_equal(cache.fetch(np.array([5])), cache.flash.read_rows(np.array([5])))
    assert sorted(cache.cached_rows().tolist()) == [0, 1]
    cache.flash.close()


def test_a_pin_reads_from_flash_only_the_rows_it_can_place(tmp_path):
    """Staging more rows than the cache can take would read the rest now and again on use."""
    cache = make_cache(tmp_path, rows=4, policy="lru")
    cache.pin(np.array([0, 1]))  # two slots pinned, two free
    assert cache.staging_room() == 2
    requested: list[int] = []
    read_rows = cache.flash.read_rows
    cache.flash.read_rows = lambda rows: (requested.extend(rows.tolist()), read_rows(rows))[1]
    pinned = cache.pin(np.array([10, 20, 30, 40]))
    assert pinned.tolist() == [10, 20] and requested == [10, 20]
    cache.flash.close()


@pytest.mark.parametrize("bound", [7, 50, 100_000])
def test_distinct_slots_equal_numpy_unique_for_dense_and_sparse_bounds(bound):
    from ndp.rows import distinct_below

    rng = np.random.default_rng(bound)
    for size in (0, 1, 5, 300):
        values = rng.integers(0, bound, size=size)
        assert np.array_equal(distinct_below(values, bound), np.unique(values))


def test_a_budget_is_split_by_traffic_and_no_piece_gets_more_than_holds_all_its_rows():
    # equal traffic: equal shares of what the small piece (need 50) leaves
    assert split_budget(1000, [50, 10_000, 10_000], [1.0, 1.0, 1.0]) == [50, 475, 475]
    # shares follow the weights
    assert split_budget(900, [10_000, 10_000, 10_000], [2.0, 1.0, 1.0]) == [450, 225, 225]
    # what a capped piece leaves can cap another one in the next round
    assert split_budget(1000, [10_000, 10_000, 300, 100], [1.0] * 4) == [300, 300, 300, 100]
    # everything fits: each piece gets exactly its need
    assert split_budget(10_000, [100, 200], [1.0, 5.0]) == [100, 200]
    # never more than the budget, with shares rounded down
    shares = split_budget(1001, [10_000] * 3, [1.0, 1.0, 1.0])
    assert shares == [333, 333, 333] and sum(shares) <= 1001


def test_a_large_cache_takes_victims_from_a_sample_of_its_evictable_slots(tmp_path, monkeypatch):
    """Past `SAMPLED_EVICTION_MIN_SLOTS` the victims are the weakest of a random sample of
    occupied slots, never a pinned or hot one."""
    monkeypatch.setattr(cache_module, "SAMPLED_EVICTION_MIN_SLOTS", 4)
    monkeypatch.setattr(cache_module, "EVICTION_SAMPLE_FACTOR", 3)
    monkeypatch.setattr(cache_module, "EVICTION_SAMPLE_MIN", 4)
    cache = make_cache(tmp_path, rows=40, policy="lfu")
    cache.fetch(np.arange(40))
    cache.pins[:10] = 1  # a prefetch's rows
    for _ in range(20):
        candidates = cache._eviction_candidates(3)
        assert candidates.size >= 3 and (candidates >= 10).all()  # evictable only
        assert candidates.size <= 9  # a sample of 3 x 3 slots, not all 30 evictable
    cache.fetch(np.arange(40, 45))  # misses: five victims, none pinned
    assert (cache.index.find(np.arange(10)) >= 0).all()
    cache.flash.close()
