"""Specifications of Belady's offline optimum (ndp/bench/belady.py)."""

from __future__ import annotations

import numpy as np
import pytest

from ndp.bench.belady import NEVER, belady_hits, belady_hits_batched, next_use, unique_per_batch
from storage_node.cache import SLOT_METADATA_BYTES, RowCache
from storage_node.flash import FlashStore


def test_next_use_points_to_the_following_occurrence_or_never():
    assert next_use(np.array([5, 7, 5, 5, 9])).tolist() == [2, NEVER, 3, NEVER, NEVER]


def test_textbook_trace_with_three_frames_has_five_hits():
    # 1 2 3 4 1 2 5 1 2 3 4 5 with 3 frames: OPT faults 7 times (Belady 1966 example)
    assert belady_hits([1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5], 3) == 5


def test_bypass_keeps_the_row_needed_sooner():
    # capacity 1: a b a -> keeping a (bypassing b) hits once; demand paging would not
    assert belady_hits([0, 1, 0], 1) == 1


@pytest.mark.parametrize(
    ("trace", "capacity", "hits"),
    [
        ([0, 0, 0, 0], 1, 3),
        ([0, 1, 2, 0, 1, 2], 2, 2),
        ([0, 1, 2, 3], 4, 0),
        ([0, 1, 0, 1], 0, 0),
        ([3, 1, 3, 2, 3, 1], 2, 3),
    ],
)
def test_small_traces_have_the_hand_counted_optimum(trace, capacity, hits):
    assert belady_hits(trace, capacity) == hits


def test_batched_counts_one_access_per_row_per_step_and_judges_against_the_prior_state():
    # steps: {0, 0, 1} {0, 2} {1}; capacity 1: after step 0 keep 0 (next use in step 1)
    rows = np.array([0, 0, 1, 0, 2, 1])
    offsets = np.array([0, 3, 5, 6])
    batch_ids, dense = unique_per_batch(rows, offsets)
    assert batch_ids.tolist() == [0, 0, 1, 1, 2]
    assert belady_hits_batched(rows, offsets, 1) == 1
    assert belady_hits_batched(rows, offsets, 2) == 2


def test_batched_with_one_access_per_step_equals_per_access():
    rng = np.random.default_rng(3)
    rows = rng.zipf(1.3, 600) % 50
    for capacity in (1, 4, 16):
        assert belady_hits_batched(rows, np.arange(rows.size + 1), capacity) == belady_hits(
            rows, capacity
        )


def _lru_hits(rows: np.ndarray, capacity: int, tmp_path) -> int:
    """Hits of the real RowCache (lru) fed one access at a time."""
    num_rows = int(rows.max()) + 1
    flash = FlashStore(
        tmp_path / f"lru-{capacity}.shard",
        table_name="t",
        table_num_rows=num_rows,
        row_start=0,
        num_rows=num_rows,
        embedding_dim=4,
        state_width=0,
        seed=0,
        io_threads=1,
    )
    cache = RowCache(flash, capacity_bytes=capacity * (16 + SLOT_METADATA_BYTES), policy="lru")
    for row in rows:
        cache.fetch(np.array([row]))
    flash.close()
    return cache.counters.hits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_never_below_lru_of_the_real_cache_on_random_traces(seed, tmp_path):
    rows = np.random.default_rng(seed).integers(0, 40, 300)
    for capacity in (2, 8, 20):
        optimal = belady_hits(rows, capacity)
        assert optimal >= _lru_hits(rows, capacity, tmp_path)
        assert optimal <= rows.size - np.unique(rows).size  # cold misses are unavoidable
