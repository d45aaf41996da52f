"""DRAM row cache in front of a flash shard: write-back, pinning, LRU / LFU / hot+LFU.

Everything is arrays indexed by *slot* (no per-row Python objects)::

    slot_rows  int64   [C]      local row held by the slot, -1 = free
    weights    float32 [C, D]   the row's weights  } together the row's record [F = D + S],
    state      float32 [C, S]   optimizer state    } as flash stores it (weights | state)
    dirty      bool    [C]      newer than flash; written back on eviction / flush
    pins       int32   [C]      > 0: a pending prefetch needs it; never evicted
    hot        bool    [C]      pinned hot set (`hot+lfu` only); never evicted
    last_use   int64   [C]      tick of the last access (LRU, and LFU tie-break)
    freq       float64 [C]      access count since admission (`lfu`)

Weights and state are two arrays, not one [C, F] record array, because FBGEMM's
table-batched kernels read weights with row stride D and the optimizer state as a tensor of
its own (`storage_node.fused_update` hands them `weights` and `state` in place); records are
assembled only where rows cross to or from flash.

And a row -> slot index (`storage_node.row_index`): a dense int32 array for row spaces up to
`DENSE_INDEX_MAX_ROWS` rows, otherwise a hash table of two buckets per slot, probed in
vectorised rounds (O(batch) per batch).

Policies choose victims among slots that are occupied, unpinned and not hot, by the smallest
score: `lru` last use; `lfu` access count since admission, then last use.

`hot+lfu` is frequency-aware in the TinyLFU way. Why: counts that restart at admission (plain
LFU) or decay every step make a cache forget exactly the popularity that power-law traces
reward. So `hot+lfu` keeps an access count for *every row of the shard*, cached or not
(`RowFrequency`: a dense float32 array up to `DENSE_FREQ_MAX_ROWS` rows, else a count-min
sketch), halved only after `FREQ_WINDOW_FACTOR` x capacity accesses (slow ageing, so shifts in
popularity still win in time). A missed row is admitted only if its count beats the count of
the victim it would replace (ties go to the newcomer: recency); rows not admitted are served
from a temporary buffer like any row that finds no slot. Victims are the evictable slots with
the smallest count, then oldest use. Once per applied step (`on_step`) the `hot_fraction` of
slots with the highest counts becomes the pinned hot set.

When a batch needs more rows than the cache can hold (everything else pinned, or simply a
batch larger than the cache), the rows that do not fit are *served from a temporary buffer*:
reads come straight from flash without being cached, writes go straight to flash. Results
are always exact; only the hit rate suffers. Nothing raises for lack of space.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from ndp.rows import distinct_below
from storage_node.flash import FlashStore
from storage_node.row_index import (
    DENSE_INDEX_MAX_ROWS,
    HASH_INDEX_BYTES_PER_SLOT,
    DenseRowIndex,
    HashRowIndex,
)
from storage_node.stats import CacheCounters

SLOT_METADATA_BYTES = 34
"""Bytes of bookkeeping per slot (row id, flags, pins, last use, frequency, index entry);
charged to the cache budget together with the row record."""
HOT_RESELECT_MIN_SLOTS = 1 << 16
"""Caches with more occupied slots re-select the hot set only after enough accesses
(`RowCache.on_step`); smaller ones every applied step."""
HOT_RESELECT_DIVISOR = 8
SAMPLED_EVICTION_MIN_SLOTS = 1 << 20
"""Caches with more occupied slots choose victims among a random sample of them."""
EVICTION_SAMPLE_FACTOR = 16
EVICTION_SAMPLE_MIN = 1024
FREQ_WINDOW_FACTOR = 100
"""`hot+lfu` halves every row count after this many x capacity counted accesses (TinyLFU's
reset: old popularity fades, but over many steps, not at every step)."""
DENSE_FREQ_MAX_ROWS = 1 << 24
"""Shards up to this many rows keep exact per-row counts (4 bytes per row); larger shards
use a count-min sketch."""
SKETCH_DEPTH = 4
SKETCH_WIDTH_PER_SLOT = 8
"""Count-min sketch width per cache slot (rounded up to a power of two, at least 1024)."""
_SKETCH_MULTIPLIERS = np.array(
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93],
    dtype=np.uint64,
)


class RowFrequency:
    """Access counts of every row of a shard: exact (dense) or a count-min sketch.

    Why both: exact counts cost 4 bytes per shard row, fine up to `DENSE_FREQ_MAX_ROWS`; a
    sketch keeps the memory proportional to the cache and only overestimates (collisions).
    """

    def __init__(self, num_rows: int, capacity_rows: int) -> None:
        self.dense = num_rows <= DENSE_FREQ_MAX_ROWS
        if self.dense:
            self._counts = np.zeros(num_rows, dtype=np.float32)
        else:
            width = max(1024, 1 << int(np.ceil(np.log2(capacity_rows * SKETCH_WIDTH_PER_SLOT))))
            self._mask = np.uint64(width - 1)
            self._counts = np.zeros((SKETCH_DEPTH, width), dtype=np.float32)

    def _buckets(self, rows: np.ndarray) -> np.ndarray:
        """[depth, n] bucket of each row in each sketch line (multiply-shift hashing)."""
        keys = rows.astype(np.uint64)
        return ((keys[None, :] * _SKETCH_MULTIPLIERS[:SKETCH_DEPTH, None]) >> np.uint64(32)) & (
            self._mask
        )

    def add(self, rows: np.ndarray) -> None:
        """Count one access of each of the unique `rows`."""
        if self.dense:
            self._counts[rows] += 1.0
            return
        buckets = self._buckets(rows)
        for line in range(SKETCH_DEPTH):
            np.add.at(self._counts[line], buckets[line], 1.0)

    def get(self, rows: np.ndarray) -> np.ndarray:
        """float32 [n] count of each row (a sketch may overestimate, never underestimate)."""
        if self.dense:
            return self._counts[rows]
        buckets = self._buckets(rows)
        return self._counts[np.arange(SKETCH_DEPTH)[:, None], buckets].min(axis=0)

    def halve(self) -> None:
        self._counts *= 0.5

    def clear(self) -> None:
        self._counts.fill(0.0)


def slot_bytes(row_bytes: int, num_rows: int) -> int:
    """DRAM one cache slot costs in a row space of `num_rows` rows: the record, its
    bookkeeping (`SLOT_METADATA_BYTES`, with a dense index's 4-byte entry) and, where the
    row space is too large for a dense index, the hash index's buckets instead."""
    hashed = num_rows > DENSE_INDEX_MAX_ROWS
    return row_bytes + SLOT_METADATA_BYTES + (HASH_INDEX_BYTES_PER_SLOT - 4 if hashed else 0)


def split_budget(budget: int, needs: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Bytes of a node's cache budget for each piece: shares in proportion to `weights`,
    none above its `needs` (what caching all its rows costs), the excess shared again.

    Why by expected lookups and not by bytes: every piece's hits grow with its share in
    much the same concave way scaled by its traffic (power-law rows; one lookup per
    feature and sample), so traffic is what a share should follow. By bytes, a 3-row table
    looked up by every sample got a 1-row cache beside 20,000-row tables and missed on two
    thirds of its lookups; capped at `needs`, such a table is held whole for a few hundred
    bytes and the rest goes to the large pieces.

    Args:
        budget: the node's cache bytes.
        needs: per piece, the bytes that hold all of its rows (records + slot metadata).
        weights: per piece, expected lookups per step (> 0).
    """
    shares = [0] * len(needs)
    unsettled = [i for i, need in enumerate(needs) if need > 0]
    left = budget
    while unsettled:
        total = sum(weights[i] for i in unsettled)
        full = [i for i in unsettled if needs[i] * total <= left * weights[i]]
        if not full:
            for i in unsettled:
                shares[i] = int(left * weights[i] / total)
            break
        for i in full:
            shares[i] = needs[i]
            left -= needs[i]
        unsettled = [i for i in unsettled if i not in full]
    return shares


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
        weight_floats: int | None = None,
    ) -> None:
        """Args:
        weight_floats: D, the record's leading floats that are the row's weights (the rest
            is optimizer state); default: the whole record.
        """
        self.flash = flash
        self.policy = policy
        lay = flash.layout
        self.row_bytes = lay.row_bytes
        self.capacity_rows = max(
            1, min(lay.num_rows, capacity_bytes // slot_bytes(lay.row_bytes, lay.num_rows))
        )
        cap = self.capacity_rows
        self.hot_rows = min(int(hot_fraction * cap), cap - 1) if policy == "hot+lfu" else 0
        self.counters = counters or CacheCounters()
        self.slot_rows = np.full(cap, -1, dtype=np.int64)
        self._filled = 0
        """Slots [0, _filled) are occupied and [_filled, C) free. Why a watermark, not a scan
        of `slot_rows`: slots are taken lowest first and freed only by an eviction that
        refills them at once or by `invalidate` (all), so the free slots are always a
        suffix; scanning C slots per admission cost ~40 ms per step with a 5% cache of a
        50 GB table (40M slots)."""
        dim = lay.row_floats if weight_floats is None else weight_floats
        assert 0 < dim <= lay.row_floats, f"{dim} weight floats in a {lay.row_floats}-float record"
        self.row_floats = lay.row_floats
        self.weights = np.zeros((cap, dim), dtype=np.float32)
        self.state = np.zeros((cap, lay.row_floats - dim), dtype=np.float32)
        self.dirty = np.zeros(cap, dtype=bool)
        self.pins = np.zeros(cap, dtype=np.int32)
        self.hot = np.zeros(cap, dtype=bool)
        self.last_use = np.zeros(cap, dtype=np.int64)
        self.freq = np.zeros(cap, dtype=np.float64)
        self.row_freq = RowFrequency(lay.num_rows, cap) if policy == "hot+lfu" else None
        self._freq_window = FREQ_WINDOW_FACTOR * cap
        self._counted = 0
        self._since_hot = 0
        """Accesses counted since the hot set was last selected (`on_step`)."""
        self._sampler = np.random.default_rng(0)
        """Samples eviction candidates in a large cache (`_eviction_candidates`)."""
        self._tick = 0
        self.index: DenseRowIndex | HashRowIndex = (
            DenseRowIndex(lay.num_rows)
            if lay.num_rows <= DENSE_INDEX_MAX_ROWS
            else HashRowIndex(cap)
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
        out = np.empty((rows.size, self.row_floats), dtype=np.float32)
        out[hit] = self._records(hit_slots)
        if count:
            self._count(rows, hit_slots)
        if not hit.all():
            # held: the dirty rows that admitting the misses evicts are written back mostly
            # into the blocks this read just brought in, without reading them again
            with self.flash.holding_reads():
                miss_rows = rows[~hit]
                miss_records = self.flash.read_rows(miss_rows)
                out[~hit] = miss_records
                if admit:
                    self._admit(miss_rows, miss_records, dirty=False)
        return out

    def preload(self, chunk_rows: int = 1 << 16) -> bool:
        """Read every row into an empty cache if all fit; True when it did.

        Why: a cache that can hold the whole row space is DRAM-resident storage, and
        filling it on first touch costs one flash page read per cold row inside the first
        steps' lookups (~10% misses over the first 40 steps of a zipf workload); read
        sequentially at open, in large batches, the same bytes cost a fraction of that and
        no step waits for them. Counts no accesses (nothing asked for these rows yet).
        """
        num_rows = self.flash.layout.num_rows
        if self.capacity_rows < num_rows or self._filled > 0:
            return False  # too small, or already holding rows (only an empty cache fills)
        written = self.counters.bytes_written  # filling is not traffic of any request
        for start in range(0, num_rows, chunk_rows):
            rows = np.arange(start, min(start + chunk_rows, num_rows), dtype=np.int64)
            self._place(rows, self.flash.read_rows(rows), dirty=False)
        self.counters.bytes_written = written
        return True

    def all_resident(self, rows: np.ndarray) -> bool:
        """Whether every one of `rows` is cached now (a question, not an access: nothing is
        counted, as nothing is read)."""
        slots = self.index.find(np.asarray(rows, dtype=np.int64))
        return not (slots.size and int(slots.min()) < 0)

    def resident_slots(self, rows: np.ndarray) -> np.ndarray | None:
        """Slots of `rows` (any order, repeats allowed) if every one is cached, else None.

        Why: a lookup whose rows are all resident can pool straight from `weights` with
        these slot ids, without copying rows out. Counts one access per distinct row, as
        `fetch` of the unique rows would.
        """
        rows = np.asarray(rows, dtype=np.int64)
        slots = self.index.find(rows)
        if slots.size and int(slots.min()) < 0:
            return None
        unique_slots = distinct_below(slots, self.capacity_rows)
        self._count(self.slot_rows[unique_slots], unique_slots)
        return slots

    def resident_for_update(self, rows: np.ndarray) -> np.ndarray | None:
        """Slots of unique `rows` if every one is cached, marked dirty; else None (nothing
        changed or counted).

        Why: an update whose rows are all resident changes them in place in `weights`/`state`
        (`storage_node.optimizers.apply_update_at`) instead of copying them out with `fetch`
        and back with `store`. Counts the accesses as `fetch` would (one hit per row) and
        the bytes as read and written.
        """
        rows = np.asarray(rows, dtype=np.int64)
        slots = self.index.find(rows)
        if slots.size and int(slots.min()) < 0:
            return None
        self._count(rows, slots)
        self.dirty[slots] = True
        self.counters.bytes_written += int(slots.size) * self.row_bytes
        return slots

    def resident_values_for_update(
        self, values: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(slot of each of `values` (repeats allowed), their distinct slots in slot order)
        if every row is cached, with the distinct rows counted and marked dirty as
        `resident_for_update` does; else None (nothing changed or counted).

        Why per value: FBGEMM's backward kernel (`storage_node.fused_update`) dedupes the
        values itself, so the caller needs no sorted distinct rows of its own; the distinct
        slots (found here anyway, for the counters) tell kept early pools what changed.
        """
        slots = self.index.find(np.asarray(values, dtype=np.int64))
        if slots.size and int(slots.min()) < 0:
            return None
        unique_slots = distinct_below(slots, self.capacity_rows)
        self._count(self.slot_rows[unique_slots], unique_slots)
        self.dirty[unique_slots] = True
        self.counters.bytes_written += int(unique_slots.size) * self.row_bytes
        return slots, unique_slots

    @property
    def holds_all(self) -> bool:
        """Every row of the row space has a slot: nothing is ever evicted, so the policy's
        statistics (recency, frequency, the hot set) decide nothing and are not kept."""
        return self.capacity_rows >= self.flash.layout.num_rows

    @property
    def every_row_resident(self) -> bool:
        """Every row of the row space is cached, for good (`holds_all` and all placed): no
        read of this cache can miss until `invalidate`."""
        return self.holds_all and self._filled >= self.flash.layout.num_rows

    def _count(self, rows: np.ndarray, hit_slots: np.ndarray) -> None:
        """Hit/miss counters and policy statistics for an access of unique `rows`."""
        n_hit = int(hit_slots.size)
        self.counters.hits += n_hit
        self.counters.misses += rows.size - n_hit
        self.counters.bytes_read += n_hit * self.row_bytes
        if self.holds_all:
            return
        self._touch(hit_slots)
        self.counters.hot_hits += int(self.hot[hit_slots].sum())
        if self.row_freq is not None and rows.size:
            self.row_freq.add(rows)
            self._counted += int(rows.size)
            self._since_hot += int(rows.size)
            if self._counted >= self._freq_window:
                self.row_freq.halve()
                self._counted = 0

    def store(self, rows: np.ndarray, records: np.ndarray) -> None:
        """Write records of unique `rows` (write-back: dirty in cache, flash on eviction)."""
        rows = np.asarray(rows, dtype=np.int64)
        slots = self.index.find(rows)
        hit = slots >= 0
        self._set_records(slots[hit], records[hit])
        self.dirty[slots[hit]] = True
        self.counters.bytes_written += int(hit.sum()) * self.row_bytes
        if not hit.all():
            miss_rows, miss_records = rows[~hit], records[~hit]
            admitted = self._admit(miss_rows, miss_records, dirty=True)
            # rows that found no slot go straight to flash (write-through fallback)
            self.flash.write_rows(miss_rows[~admitted], miss_records[~admitted])

    def _records(self, slots: np.ndarray) -> np.ndarray:
        """float32 [n, F] records (weights | state) of `slots`, as flash stores them."""
        if self.state.shape[1] == 0:
            return self.weights[slots]
        return np.concatenate([self.weights[slots], self.state[slots]], axis=1)

    def _set_records(self, slots: np.ndarray, records: np.ndarray) -> None:
        """Write float32 [n, F] records (weights | state) into `slots`."""
        dim = self.weights.shape[1]
        self.weights[slots] = records[:, :dim]
        if self.state.shape[1]:
            self.state[slots] = records[:, dim:]

    # ------------------------------------------------------------------ pinning

    def pin(
        self,
        rows: np.ndarray,
        staged: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Stage `rows` into the cache and pin them; returns the rows actually pinned.

        Args:
            staged: (sorted rows, their records) already read from flash (and still what
                flash holds): missing rows among them are placed from these records, the
                rest are read now.

        Rows that find no slot (the cache is full of pinned/hot rows) stay unpinned and are
        served from flash when used.
        """
        rows = np.asarray(rows, dtype=np.int64)
        miss_rows = self.rows_to_stage(rows)
        # Staging is a row access like a lookup's: rows already cached are hits, rows read
        # from flash misses (the policy's statistics count the step's own lookup instead).
        cached_before = int(np.count_nonzero(self.index.find(rows) >= 0))
        self.counters.hits += cached_before
        self.counters.misses += int(miss_rows.size)
        self.counters.staged_hits += cached_before
        self.counters.staged_misses += int(miss_rows.size)
        if miss_rows.size:
            # staged rows are needed soon: placed without the admission filter
            self._place(miss_rows, self._records_of(miss_rows, staged), dirty=False)
        slots = self.index.find(rows)
        cached = slots >= 0
        self.pins[slots[cached]] += 1
        return rows[cached]

    def staging_room(self) -> int:
        """Rows a `pin` can place now: free slots plus slots it may evict (unpinned, not hot).
        O(occupied slots): the free ones are the suffix past the watermark."""
        filled = self._filled
        evictable = np.count_nonzero((self.pins[:filled] == 0) & ~self.hot[:filled])
        return self.capacity_rows - filled + int(evictable)

    def rows_to_stage(self, rows: np.ndarray) -> np.ndarray:
        """The rows `pin(rows)` reads from flash: those not cached, in order, as many as can
        find a slot (a row read now and dropped would be read again on use)."""
        rows = np.asarray(rows, dtype=np.int64)
        return rows[self.index.find(rows) < 0][: self.staging_room()]

    def _records_of(
        self, rows: np.ndarray, staged: tuple[np.ndarray, np.ndarray] | None
    ) -> np.ndarray:
        """Flash records of `rows`: from `staged` where it has them, read for the rest."""
        if staged is None or staged[0].size == 0:
            return self.flash.read_rows(rows)
        staged_rows, staged_records = staged
        where = np.searchsorted(staged_rows, rows).clip(max=staged_rows.size - 1)
        have = staged_rows[where] == rows
        records = np.empty((rows.size, self.row_floats), dtype=np.float32)
        records[have] = staged_records[where[have]]
        if not have.all():
            records[~have] = self.flash.read_rows(rows[~have])
        return records

    def unpin(self, rows: np.ndarray) -> None:
        """Release one pin of each of `rows` (rows pinned by `pin`, still cached)."""
        slots = self.index.find(np.asarray(rows, dtype=np.int64))
        slots = slots[slots >= 0]
        self.pins[slots] = np.maximum(self.pins[slots] - 1, 0)

    def pinned_rows(self) -> np.ndarray:
        return self.slot_rows[self.pins > 0]

    # ------------------------------------------------------------------ policy

    def on_step(self) -> None:
        """End of an applied step: re-select the pinned hot set (`hot+lfu`).

        A cache of more than `HOT_RESELECT_MIN_SLOTS` occupied slots re-selects only once the
        accesses counted since the last selection reach 1/`HOT_RESELECT_DIVISOR` of them.
        Why: a selection looks up the count of every occupied slot's row (a count-min sketch
        for a large row space: four gathers each); at 5% of a 50 GB table that is tens of ms
        per node and step for a hot set that a few thousand accesses hardly move."""
        if self.hot_rows == 0 or self.row_freq is None or self.holds_all:
            return
        filled = self._filled
        if filled > HOT_RESELECT_MIN_SLOTS and self._since_hot * HOT_RESELECT_DIVISOR < filled:
            return
        self._since_hot = 0
        occupied = np.arange(filled)  # the watermark: slots below it are occupied
        self.hot[:] = False
        if occupied.size:
            k = min(self.hot_rows, occupied.size)
            counts = self.row_freq.get(self.slot_rows[occupied])
            top = np.argpartition(-counts, k - 1)[:k]
            self.hot[occupied[top]] = True

    def _touch(self, slots: np.ndarray) -> None:
        self._tick += 1
        self.last_use[slots] = self._tick
        self.freq[slots] += 1.0

    def _eviction_candidates(self, wanted: int) -> np.ndarray:
        """The evictable slots (occupied, unpinned, not hot) `wanted` victims are chosen from:
        all of them, or in a cache of more than `SAMPLED_EVICTION_MIN_SLOTS` occupied slots
        those of a random sample of `EVICTION_SAMPLE_FACTOR` x `wanted` occupied slots.

        Why a sample there (Redis's approximated LRU / LFU does the same): choosing among
        every slot costs O(slots) per batch of misses, and with tens of millions of slots
        that scan, not the flash, would bound a full cache's step. Smaller caches choose
        exactly among all."""
        filled = self._filled
        size = max(EVICTION_SAMPLE_FACTOR * wanted, EVICTION_SAMPLE_MIN)
        if filled > SAMPLED_EVICTION_MIN_SLOTS and size < filled:
            sample = np.unique(self._sampler.integers(0, filled, size=size))
            sample = sample[(self.pins[sample] == 0) & ~self.hot[sample]]
            if sample.size >= wanted:
                return sample
        return np.flatnonzero((self.slot_rows >= 0) & (self.pins == 0) & ~self.hot)

    def _victims(self, wanted: int) -> np.ndarray:
        """Up to `wanted` evictable slots with the smallest policy score."""
        candidates = self._eviction_candidates(wanted)
        if candidates.size <= wanted:
            return candidates
        score = self._victim_scores(candidates)
        return candidates[np.argpartition(score, wanted - 1)[:wanted]]

    def _victim_scores(self, slots: np.ndarray) -> np.ndarray:
        """Eviction order of `slots`: smallest first (frequency, then last use; or LRU)."""
        if self.policy == "lru":
            return self.last_use[slots].astype(np.float64)
        if self.row_freq is not None:
            counts = self.row_freq.get(self.slot_rows[slots]).astype(np.float64)
        else:
            counts = self.freq[slots]
        return counts * float(self._tick + 1) + self.last_use[slots]

    def _admission_order(self, rows: np.ndarray, free: int) -> np.ndarray:
        """Indices of missed `rows` worth a slot, best first (`hot+lfu`'s TinyLFU filter).

        The first `free` candidates take free slots; each further one must have a count at
        least that of the victim it would replace (victims paired weakest-first).
        """
        counts = self.row_freq.get(rows)
        order = np.argsort(-counts, kind="stable")
        if order.size <= free:
            return order
        candidates = self._eviction_candidates(order.size - free)
        if candidates.size == 0:
            return order[:free]
        victim_counts = np.sort(self.row_freq.get(self.slot_rows[candidates]))
        contenders = order[free : free + victim_counts.size]
        wins = counts[contenders] >= victim_counts[: contenders.size]
        # both sides sorted: the winners are a prefix
        n_win = int(np.argmin(wins)) if not wins.all() else int(wins.size)
        return order[: free + n_win]

    def _admit(self, rows: np.ndarray, records: np.ndarray, *, dirty: bool) -> np.ndarray:
        """Place as many of `rows` as fit (and pass admission); returns a mask of those placed."""
        if self.row_freq is not None:
            chosen = self._admission_order(rows, self.capacity_rows - self._filled)
            mask = np.zeros(rows.size, dtype=bool)
            if chosen.size:
                placed = self._place(rows[chosen], records[chosen], dirty=dirty)
                mask[chosen[placed]] = True
            return mask
        return self._place(rows, records, dirty=dirty)

    def _place(self, rows: np.ndarray, records: np.ndarray, *, dirty: bool) -> np.ndarray:
        """Put the first rows that find a slot (free, else evicted) in; mask of those placed."""
        free = np.arange(self._filled, min(self.capacity_rows, self._filled + rows.size))
        self._filled += free.size
        victims = self._victims(rows.size - free.size) if free.size < rows.size else free[:0]
        if victims.size:
            self._evict(victims)
        targets = np.concatenate([free, victims])
        admitted = np.zeros(rows.size, dtype=bool)
        admitted[: targets.size] = True
        placed = rows[: targets.size]
        self.slot_rows[targets] = placed
        self._set_records(targets, records[: targets.size])
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
        self.flash.write_rows(self.slot_rows[slots], self._records(slots))
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
        self._filled = 0
        self.dirty.fill(False)
        self.pins.fill(0)
        self.hot.fill(False)
        self.freq.fill(0.0)
        if self.row_freq is not None:
            self.row_freq.clear()
            self._counted = 0
        self.index.clear()

    def cached_rows(self) -> np.ndarray:
        return self.slot_rows[self.slot_rows >= 0]
