"""Belady's offline optimal cache (MIN, with bypass): the ceiling a cache policy is held to.

Two forms over the same trace of row ids:

- `belady_hits(rows, capacity_rows)`: one access at a time, the textbook MIN. On a miss the
  row is kept only if its next use comes sooner than that of some cached row, which is then
  evicted (the cached row used farthest in the future, or never again). A max-heap of next
  uses with lazy deletion makes it O(n log n) after a vectorised next-use precomputation.
- `belady_hits_batched(rows, batch_offsets, capacity_rows)`: the same optimum when the cache
  is consulted a *batch* at a time, as a storage node's `RowCache` is (one training step's
  unique rows per call: hits are judged against the state before the batch). After each
  batch the cache keeps the `capacity_rows` rows, among those cached or just read, whose next
  use (in batches) is soonest. Each batch is one vectorised selection, O(C + b).

Why both: the batched form is the fair ceiling for a cache driven in steps (same
granularity, same capacity); the per-access form is the classical bound, and the gap between
the two is what batching costs. With one access per batch the two agree (a test checks it).

Why MIN with bypass: a demand cache must admit every miss; allowing a miss to bypass the
cache is never worse, so this is an upper bound on every policy, admitting or not.
"""

from __future__ import annotations

import heapq

import numpy as np

NEVER = np.iinfo(np.int64).max
"""Next-use position of an access whose row is never used again."""


def next_use(keys: np.ndarray) -> np.ndarray:
    """For each position i, the next position j > i with keys[j] == keys[i], else `NEVER`.

    Vectorised: a stable sort by key puts the occurrences of each key in order, so each
    occurrence's successor is its right neighbour when the neighbour has the same key.

    Args:
        keys: int [n] (row ids, or any integer labels).

    Returns:
        int64 [n].
    """
    keys = np.asarray(keys)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    result = np.full(keys.size, NEVER, dtype=np.int64)
    same = sorted_keys[1:] == sorted_keys[:-1]
    result[order[:-1][same]] = order[1:][same]
    return result


def belady_hits(rows: np.ndarray, capacity_rows: int) -> int:
    """Hits of the offline optimal cache of `capacity_rows` rows on the access trace `rows`.

    Args:
        rows: int [n], accessed row ids in order (repeats allowed anywhere).
        capacity_rows: rows the cache can hold (>= 0).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if capacity_rows <= 0 or rows.size == 0:
        return 0
    upcoming = next_use(rows).tolist()
    cached_until: dict[int, int] = {}  # row -> position of its next use (the heap's live key)
    farthest: list[tuple[int, int]] = []  # (-next use, row), stale entries skipped lazily
    hits = 0
    for row, following in zip(rows.tolist(), upcoming, strict=True):
        if row in cached_until:
            hits += 1
        elif len(cached_until) >= capacity_rows:
            while -farthest[0][0] != cached_until.get(farthest[0][1], -1):
                heapq.heappop(farthest)
            if -farthest[0][0] <= following:
                continue  # bypass: every cached row is needed sooner than this one
            del cached_until[heapq.heappop(farthest)[1]]
        if following == NEVER:
            cached_until.pop(row, None)  # never used again: the slot is free from now on
            continue
        cached_until[row] = following
        heapq.heappush(farthest, (-following, row))
    return hits


def belady_hits_batched(rows: np.ndarray, batch_offsets: np.ndarray, capacity_rows: int) -> int:
    """Hits of the offline optimal cache consulted one batch at a time.

    Args:
        rows: int [n], row ids of all batches back to back; each batch's rows are made unique
            first (a cache call sees a step's unique rows), so repeats within a batch count
            as one access.
        batch_offsets: int [num_batches + 1], batch k is rows[offsets[k]:offsets[k + 1]].
        capacity_rows: rows the cache can hold (>= 0).

    Returns:
        Hits counted over the unique rows of each batch (the accesses of `unique_per_batch`).
    """
    batch_ids, row_ids = unique_per_batch(rows, batch_offsets)
    if capacity_rows <= 0 or row_ids.size == 0:
        return 0
    following = next_use(row_ids)
    following_batch = np.full(row_ids.size, NEVER, dtype=np.int64)
    again = following != NEVER
    following_batch[again] = batch_ids[following[again]]
    num_batches = len(batch_offsets) - 1
    starts = np.searchsorted(batch_ids, np.arange(num_batches + 1), side="left")
    cached = np.zeros(int(row_ids.max()) + 1, dtype=bool)
    in_batch = np.zeros_like(cached)
    cache_rows = np.zeros(0, dtype=np.int64)
    cache_next = np.zeros(0, dtype=np.int64)
    hits = 0
    for k in range(num_batches):
        batch_rows = row_ids[starts[k] : starts[k + 1]]
        batch_next = following_batch[starts[k] : starts[k + 1]]
        hits += int(cached[batch_rows].sum())
        # a cached row read again carries the batch's (later) next use instead of its old one
        in_batch[batch_rows] = True
        keep_old = ~in_batch[cache_rows]
        in_batch[batch_rows] = False
        candidates = np.concatenate([cache_rows[keep_old], batch_rows])
        candidate_next = np.concatenate([cache_next[keep_old], batch_next])
        useful = candidate_next != NEVER
        candidates, candidate_next = candidates[useful], candidate_next[useful]
        if candidates.size > capacity_rows:
            chosen = np.argpartition(candidate_next, capacity_rows - 1)[:capacity_rows]
            candidates, candidate_next = candidates[chosen], candidate_next[chosen]
        cached[cache_rows] = False
        cache_rows, cache_next = candidates, candidate_next
        cached[cache_rows] = True
    return hits


def unique_per_batch(rows: np.ndarray, batch_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (batch, row) accesses of a batched trace with repeats inside a batch removed.

    Row ids are replaced by dense ids 0..U-1 (order-preserving), which is all a cache needs.

    Returns:
        batch_ids int64 [m] (non-decreasing), dense row ids int64 [m] (sorted within a batch).
    """
    rows = np.asarray(rows, dtype=np.int64)
    offsets = np.asarray(batch_offsets, dtype=np.int64)
    if rows.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    _, dense = np.unique(rows, return_inverse=True)
    num_distinct = np.int64(dense.max() + 1)
    batch_of = np.repeat(np.arange(offsets.size - 1, dtype=np.int64), np.diff(offsets))
    keys = np.unique(batch_of * num_distinct + dense.astype(np.int64))
    return keys // num_distinct, keys % num_distinct
