"""Row -> slot indexes of a `storage_node.cache.RowCache`: every operation a batch of rows.

`DenseRowIndex` is one int32 per row of the row space (up to `DENSE_INDEX_MAX_ROWS` rows);
`HashRowIndex` an open-addressing hash table (linear probing) sized by the cache's slots,
for row spaces too large for that (a 5% cache of a table twice the machine's memory).

Why a hash table and not sorted keys (what it replaces): inserting into or deleting from
sorted arrays moves every entry after the point, O(C) per batch; with 40M slots a batch of a
few thousand misses moved ~640 MB of keys and slots, several times per step. Here a batch
costs a few vectorised probe rounds over the batch itself.
"""

from __future__ import annotations

import numpy as np

DENSE_INDEX_MAX_ROWS = 1 << 24
"""Row spaces up to this many rows use a dense row -> slot array (4 bytes per row)."""
HASH_INDEX_BYTES_PER_SLOT = 24
"""A `HashRowIndex`'s bytes per cache slot: two buckets (load <= 0.5) of an int64 key and an
int32 slot."""

_EMPTY = -1
_DELETED = -2
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
"""Fibonacci hashing: consecutive row ids land far apart."""


class DenseRowIndex:
    """row -> slot as one int32 array over the shard's rows."""

    def __init__(self, num_rows: int) -> None:
        self._slot_of_row = np.full(num_rows, -1, dtype=np.int32)

    def find(self, rows: np.ndarray) -> np.ndarray:
        return self._slot_of_row[rows].astype(np.int64)

    def insert(self, rows: np.ndarray, slots: np.ndarray) -> None:
        self._slot_of_row[rows] = slots

    def remove(self, rows: np.ndarray) -> None:
        self._slot_of_row[rows] = -1

    def clear(self) -> None:
        self._slot_of_row.fill(-1)


class HashRowIndex:
    """row -> slot for at most `capacity` rows at a time, as a hash table with linear probing.

    Callers keep the cache's contract: `insert` takes unique rows not in the index, `remove`
    rows that are. A removed row leaves a tombstone (probes go on past it; inserts reuse it);
    when live rows and tombstones fill three quarters of the buckets the table is rebuilt
    from its live rows, O(buckets) once per ~capacity / 4 removals.
    """

    def __init__(self, capacity: int) -> None:
        self._buckets = 2 * max(int(capacity), 512)
        self._keys = np.full(self._buckets, _EMPTY, dtype=np.int64)
        self._slots = np.zeros(self._buckets, dtype=np.int32)
        self._used = 0
        """Buckets holding a row or a tombstone."""

    def find(self, rows: np.ndarray) -> np.ndarray:
        """Slot of each of `rows`, -1 where a row is not in the index: int64 [n]."""
        rows = np.asarray(rows, dtype=np.int64)
        at = self._lookup(rows)
        out = np.full(rows.shape, -1, dtype=np.int64)
        found = at >= 0
        out[found] = self._slots[at[found]]
        return out

    def insert(self, rows: np.ndarray, slots: np.ndarray) -> None:
        """Add unique `rows` (none in the index) at `slots`."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        if 4 * (self._used + rows.size) > 3 * self._buckets:
            self._rebuild(len(self) + rows.size)
        slots = np.asarray(slots, dtype=np.int32)
        at = self._home(rows)
        pending = np.arange(rows.size)
        while pending.size:
            keys = self._keys[at[pending]]
            open_ = pending[keys < 0]  # empty or a tombstone
            # several rows may probe the same open bucket: the first of each takes it
            _, first = np.unique(at[open_], return_index=True)
            taking = open_[first]
            self._used += int(np.count_nonzero(self._keys[at[taking]] == _EMPTY))
            self._keys[at[taking]] = rows[taking]
            self._slots[at[taking]] = slots[taking]
            placed = np.zeros(rows.size, dtype=bool)
            placed[taking] = True
            pending = pending[~placed[pending]]
            at[pending] = self._next(at[pending])

    def remove(self, rows: np.ndarray) -> None:
        """Drop `rows` (rows not in the index are ignored)."""
        at = self._lookup(np.asarray(rows, dtype=np.int64))
        self._keys[at[at >= 0]] = _DELETED

    def clear(self) -> None:
        self._keys.fill(_EMPTY)
        self._used = 0

    def __len__(self) -> int:
        return int(np.count_nonzero(self._keys >= 0))

    def _lookup(self, rows: np.ndarray) -> np.ndarray:
        """Bucket of each of `rows`, -1 where absent: probe until the row or an empty bucket."""
        out = np.full(rows.shape, -1, dtype=np.int64)
        at = self._home(rows)
        pending = np.arange(rows.size)
        while pending.size:
            keys = self._keys[at[pending]]
            hit = keys == rows[pending]
            out[pending[hit]] = at[pending[hit]]
            pending = pending[~hit & (keys != _EMPTY)]
            at[pending] = self._next(at[pending])
        return out

    def _home(self, rows: np.ndarray) -> np.ndarray:
        """First bucket of each row: the hash's top 32 bits scaled to [0, buckets)."""
        high = (rows.astype(np.uint64) * _MULTIPLIER) >> np.uint64(32)
        return ((high * np.uint64(self._buckets)) >> np.uint64(32)).astype(np.int64)

    def _next(self, at: np.ndarray) -> np.ndarray:
        at = at + 1
        at[at == self._buckets] = 0
        return at

    def _rebuild(self, rows_after: int) -> None:
        """Re-insert the live rows into a table without tombstones, with at least two
        buckets per row for `rows_after` rows (more than `capacity` only if a caller breaks
        the cache's contract; never a full table, whose probes would not end)."""
        live = np.flatnonzero(self._keys >= 0)
        rows, slots = self._keys[live], self._slots[live]
        if 2 * rows_after > self._buckets:
            self._buckets = 2 * rows_after
            self._keys = np.empty(self._buckets, dtype=np.int64)
            self._slots = np.zeros(self._buckets, dtype=np.int32)
        self.clear()
        self.insert(rows, slots)
