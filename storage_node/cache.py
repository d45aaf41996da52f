"""DRAM row cache in front of a flash shard: write-back, pinning, LRU / LFU / hot+LFU.

Everything is arrays indexed by *slot* (no per-row Python objects)::

    slot_rows  int64   [C]      local row held by the slot, -1 = free
    records    float32 [C, F]   row record (weights [D] | optimizer state [S])
    dirty      bool    [C]      newer than flash; written back on eviction / flush
    pins       int32   [C]      > 0: a pending prefetch needs it; never evicted
    hot        bool    [C]      pinned hot set (`hot+lfu` only); never evicted
    last_use   int64   [C]      tick of the last access (LRU, and LFU tie-break)
    freq       float64 [C]      access count, halved at each hot-set re-selection

and a row -> slot index: a dense int32 array for shards up to `DENSE_INDEX_MAX_ROWS` rows,
otherwise a pair of sorted arrays (keys, slots) searched with `np.searchsorted` and updated
with vectorised insert/delete (O(C) per batch, no hashing in Python).

Policies choose victims among slots that are occupied, unpinned and not hot, by the smallest
score: `lru` last use; `lfu` and the dynamic part of `hot+lfu` frequency, then last use.
`hot+lfu` re-selects, once per applied step (`on_step`), the `hot_fraction` of slots with the
highest decayed counts as the pinned hot set (power-law accesses: a few rows take most hits).

When a batch needs more rows than the cache can hold (everything else pinned, or simply a
batch larger than the cache), the rows that do not fit are *served from a temporary buffer*:
reads come straight from flash without being cached, writes go straight to flash. Results
are always exact; only the hit rate suffers. Nothing raises for lack of space.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from storage_node.flash import FlashStore
from storage_node.stats import CacheCounters

DENSE_INDEX_MAX_ROWS = 1 << 24
"""Shards up to this many rows use a dense row -> slot array (4 bytes per row)."""
SLOT_METADATA_BYTES = 34
"""Bytes of bookkeeping per slot (row id, flags, pins, last use, frequency, index entry);
charged to the cache budget together with the row record."""
FREQ_DECAY = 0.5
"""Factor applied to access counts at each hot-set re-selection (ages out old popularity)."""


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


class SortedRowIndex:
    """row -> slot as sorted keys + values, for shards too large for a dense array."""

    def __init__(self) -> None:
        self._keys = np.zeros(0, dtype=np.int64)
        self._slots = np.zeros(0, dtype=np.int64)

    def _positions(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.searchsorted(self._keys, rows)
        inside = pos < self._keys.size
        found = np.zeros(rows.shape, dtype=bool)
        found[inside] = self._keys[pos[inside]] == rows[inside]
        return pos, found

    def find(self, rows: np.ndarray) -> np.ndarray:
        pos, found = self._positions(rows)
        out = np.full(rows.shape, -1, dtype=np.int64)
        out[found] = self._slots[pos[found]]
        return out

    def insert(self, rows: np.ndarray, slots: np.ndarray) -> None:
        order = np.argsort(rows)
        rows, slots = rows[order], slots[order]
        pos = np.searchsorted(self._keys, rows)
        self._keys = np.insert(self._keys, pos, rows)
        self._slots = np.insert(self._slots, pos, slots)

    def remove(self, rows: np.ndarray) -> None:
        pos, found = self._positions(rows)
        self._keys = np.delete(self._keys, pos[found])
        self._slots = np.delete(self._slots, pos[found])

    def clear(self) -> None:
        self.__init__()


class RowCache:
    """Write-back row cache of one shard. Callers pass unique local row ids (int64)."""

    def __init__(
        self,
        flash: FlashStore,
        *,
        capacity_bytes: int,
        policy: Literal["lru", "lfu", "hot+lfu"] = "lru",
        hot_fraction: float = 0.0,
        counters: CacheCounters | None = None,
    ) -> None:
        self.flash = flash
        self.policy = policy
        lay = flash.layout
        self.row_bytes = lay.row_bytes
        self.capacity_rows = max(
            1, min(lay.num_rows, capacity_bytes // (lay.row_bytes + SLOT_METADATA_BYTES))
        )
        cap = self.capacity_rows
        self.hot_rows = min(int(hot_fraction * cap), cap - 1) if policy == "hot+lfu" else 0
        self.counters = counters or CacheCounters()
        self.slot_rows = np.full(cap, -1, dtype=np.int64)
        self.records = np.zeros((cap, lay.row_floats), dtype=np.float32)
        self.dirty = np.zeros(cap, dtype=bool)
        self.pins = np.zeros(cap, dtype=np.int32)
        self.hot = np.zeros(cap, dtype=bool)
        self.last_use = np.zeros(cap, dtype=np.int64)
        self.freq = np.zeros(cap, dtype=np.float64)
        self._tick = 0
        self.index: DenseRowIndex | SortedRowIndex = (
            DenseRowIndex(lay.num_rows)
            if lay.num_rows <= DENSE_INDEX_MAX_ROWS
            else SortedRowIndex()
        )

    # ------------------------------------------------------------------ reads and writes

    def fetch(self, rows: np.ndarray, *, admit: bool = True, count: bool = True) -> np.ndarray:
        """Records of unique `rows`: float32 [n, F]; misses come from flash (and are cached).

        Args:
            admit: cache the missed rows (evicting per policy); False only peeks.
            count: update hit/miss counters and access statistics.
        """
        rows = np.asarray(rows, dtype=np.int64)
        slots = self.index.find(rows)
        hit = slots >= 0
        hit_slots = slots[hit]
        out = np.empty((rows.size, self.records.shape[1]), dtype=np.float32)
        out[hit] = self.records[hit_slots]
        if count:
            self._touch(hit_slots)
            n_hit = int(hit_slots.size)
            self.counters.hits += n_hit
            self.counters.hot_hits += int(self.hot[hit_slots].sum())
            self.counters.misses += rows.size - n_hit
            self.counters.bytes_read += n_hit * self.row_bytes
        if not hit.all():
            miss_rows = rows[~hit]
            miss_records = self.flash.read_rows(miss_rows)
            out[~hit] = miss_records
            if admit:
                self._admit(miss_rows, miss_records, dirty=False)
        return out

    def store(self, rows: np.ndarray, records: np.ndarray) -> None:
        """Write records of unique `rows` (write-back: dirty in cache, flash on eviction)."""
        rows = np.asarray(rows, dtype=np.int64)
        slots = self.index.find(rows)
        hit = slots >= 0
        self.records[slots[hit]] = records[hit]
        self.dirty[slots[hit]] = True
        self.counters.bytes_written += int(hit.sum()) * self.row_bytes
        if not hit.all():
            miss_rows, miss_records = rows[~hit], records[~hit]
            admitted = self._admit(miss_rows, miss_records, dirty=True)
            # rows that found no slot go straight to flash (write-through fallback)
            self.flash.write_rows(miss_rows[~admitted], miss_records[~admitted])

    # ------------------------------------------------------------------ pinning

    def pin(self, rows: np.ndarray) -> np.ndarray:
        """Stage `rows` into the cache and pin them; returns the rows actually pinned.

        Rows that find no slot (the cache is full of pinned/hot rows) stay unpinned and are
        served from flash when used.
        """
        rows = np.asarray(rows, dtype=np.int64)
        self.fetch(rows, admit=True, count=False)
        slots = self.index.find(rows)
        cached = slots >= 0
        self.pins[slots[cached]] += 1
        return rows[cached]

    def unpin(self, rows: np.ndarray) -> None:
        """Release one pin of each of `rows` (rows pinned by `pin`, still cached)."""
        slots = self.index.find(np.asarray(rows, dtype=np.int64))
        slots = slots[slots >= 0]
        self.pins[slots] = np.maximum(self.pins[slots] - 1, 0)

    def pinned_rows(self) -> np.ndarray:
        return self.slot_rows[self.pins > 0]

    # ------------------------------------------------------------------ policy

    def on_step(self) -> None:
        """End of an applied step: age counts and re-select the hot set (`hot+lfu`)."""
        if self.hot_rows == 0:
            return
        self.freq *= FREQ_DECAY
        occupied = np.flatnonzero(self.slot_rows >= 0)
        self.hot[:] = False
        if occupied.size:
            k = min(self.hot_rows, occupied.size)
            top = np.argpartition(-self.freq[occupied], k - 1)[:k]
            self.hot[occupied[top]] = True

    def _touch(self, slots: np.ndarray) -> None:
        self._tick += 1
        self.last_use[slots] = self._tick
        self.freq[slots] += 1.0

    def _victims(self, wanted: int) -> np.ndarray:
        """Up to `wanted` evictable slots with the smallest policy score."""
        candidates = np.flatnonzero((self.slot_rows >= 0) & (self.pins == 0) & ~self.hot)
        if candidates.size <= wanted:
            return candidates
        if self.policy == "lru":
            score = self.last_use[candidates].astype(np.float64)
        else:  # frequency first, then recency
            score = self.freq[candidates] * float(self._tick + 1) + self.last_use[candidates]
        return candidates[np.argpartition(score, wanted - 1)[:wanted]]

    def _admit(self, rows: np.ndarray, records: np.ndarray, *, dirty: bool) -> np.ndarray:
        """Place as many of `rows` as fit; returns a mask of the rows admitted."""
        free = np.flatnonzero(self.slot_rows < 0)[: rows.size]
        victims = self._victims(rows.size - free.size) if free.size < rows.size else free[:0]
        if victims.size:
            self._evict(victims)
        targets = np.concatenate([free, victims])
        admitted = np.zeros(rows.size, dtype=bool)
        admitted[: targets.size] = True
        placed = rows[: targets.size]
        self.slot_rows[targets] = placed
        self.records[targets] = records[: targets.size]
        self.dirty[targets] = dirty
        self.pins[targets] = 0
        self.hot[targets] = False
        self.freq[targets] = 0.0
        self._touch(targets)
        self.index.insert(placed, targets)
        self.counters.bytes_written += int(targets.size) * self.row_bytes
        return admitted

    def _evict(self, slots: np.ndarray) -> None:
        """Drop `slots`, writing their dirty rows back to flash in one batch."""
        self._write_back(slots[self.dirty[slots]])
        self.index.remove(self.slot_rows[slots])
        self.slot_rows[slots] = -1
        self.counters.evictions += int(slots.size)

    def _write_back(self, slots: np.ndarray) -> None:
        if slots.size == 0:
            return
        order = np.argsort(self.slot_rows[slots])
        slots = slots[order]
        self.flash.write_rows(self.slot_rows[slots], self.records[slots])
        self.dirty[slots] = False
        self.counters.write_backs += int(slots.size)
        self.counters.bytes_read += int(slots.size) * self.row_bytes

    # ------------------------------------------------------------------ whole cache

    def flush(self) -> None:
        """Write every dirty row back to flash (rows stay cached, now clean)."""
        self._write_back(np.flatnonzero(self.dirty & (self.slot_rows >= 0)))

    def invalidate(self) -> None:
        """Forget every cached row WITHOUT writing back (the flash file was replaced)."""
        self.slot_rows.fill(-1)
        self.dirty.fill(False)
        self.pins.fill(0)
        self.hot.fill(False)
        self.freq.fill(0.0)
        self.index.clear()

    def cached_rows(self) -> np.ndarray:
        return self.slot_rows[self.slot_rows >= 0]
