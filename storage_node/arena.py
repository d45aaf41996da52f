"""Arenas: the pieces of a node that share a row layout, as one row space behind one cache.

A node's pieces (one per table) that have the same embedding dim (and so, on one node with one
optimizer, the same record width) live in one arena. The arena numbers their rows one after
another, so one tensor of arena rows addresses every table at once:

    arena row:   0 .......... n0-1 | n0 .............. n0+n1-1 | n0+n1 ......
    piece:       t0 (local 0..n0-1) | t3 (local 0..n1-1)         | t7 ...
    bases:       [0,                  n0,                          n0+n1, ..., total]

One `cache.RowCache` serves the whole arena: one DRAM slot tensor (weights + optimizer state
of every piece), one index from arena row to slot, one eviction policy whose statistics count
accesses across pieces (a statistics-driven cache, not a fixed split per table). Behind it,
`ArenaFlash` presents the pieces' shard files as the one row space the cache reads and
writes: each batch of rows is split by piece with one `searchsorted` and each file gets one
batched call. The shard files themselves are unchanged (one file per piece), so checkpoints,
restore streams and resharding keep their format.

Why the arena: with a cache per piece every stage of a step looped over tables (a lookup
per feature, an update per table); with one row space a step's lookup of every feature is
one `embedding_bag` over the slot tensor, and its update one dedupe and one optimizer call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np

from ndp.plan import ShardSpec
from storage_node.cache import RowCache
from storage_node.flash import DetachedRead, FlashStore
from storage_node.keyed_bags import FeaturePlace


@dataclass(frozen=True)
class ArenaLayout:
    """What a `RowCache` needs of its flash: the row space's size and the record width."""

    num_rows: int
    row_floats: int

    @property
    def row_bytes(self) -> int:
        return 4 * self.row_floats


class ArenaFlash:
    """The shard files of an arena's pieces as one row space (arena row = base + local row).

    Args:
        stores: one `FlashStore` per piece, in arena order; all with the same record width.
            `stores[i]` may be replaced (a restore reopens a file); the bases stay.
    """

    def __init__(self, stores: list[FlashStore]) -> None:
        assert stores, "an arena has at least one piece"
        widths = {store.layout.row_floats for store in stores}
        assert len(widths) == 1, f"one record width per arena, got {sorted(widths)}"
        self.stores = list(stores)
        sizes = [store.layout.num_rows for store in stores]
        self.bases = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        """int64 [pieces + 1]: the first arena row of each piece, and the total."""
        self.layout = ArenaLayout(num_rows=int(self.bases[-1]), row_floats=widths.pop())

    def split(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(piece, positions in `rows`, local rows) for every piece that `rows` touch."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(self.stores) == 1:
            if rows.size:
                yield 0, np.arange(rows.size), rows
            return
        piece = np.searchsorted(self.bases, rows, side="right") - 1
        # piece ids are few: as int16 numpy's stable sort is a radix sort, O(n)
        small = piece.astype(np.int16) if len(self.stores) < 2**15 else piece
        order = np.argsort(small, kind="stable")
        counts = np.bincount(piece, minlength=len(self.stores))
        start = 0
        for index in np.flatnonzero(counts):
            positions = order[start : start + counts[index]]
            start += int(counts[index])
            yield int(index), positions, rows[positions] - self.bases[index]

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Records of arena `rows` (any order): float32 [n, row_floats], one read per file."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.size, self.layout.row_floats), dtype=np.float32)
        for index, positions, local in self.split(rows):
            out[positions] = self.stores[index].read_rows(local)
        return out

    def write_rows(self, rows: np.ndarray, records: np.ndarray) -> None:
        """Write records of unique arena `rows`, one batched write per file."""
        for index, positions, local in self.split(rows):
            self.stores[index].write_rows(local, records[positions])

    @contextmanager
    def holding_reads(self) -> Iterator[None]:
        """`FlashStore.holding_reads` of every file (an update's read-then-write-back)."""
        with ExitStack() as stack:
            for store in self.stores:
                stack.enter_context(store.holding_reads())
            yield

    def detached_read(self, rows: np.ndarray) -> ArenaDetachedRead:
        """A `FlashStore.detached_read` of each file that `rows` touch (call under the lock)."""
        parts = [
            (self.stores[index], positions, local, self.stores[index].detached_read())
            for index, positions, local in self.split(rows)
        ]
        return ArenaDetachedRead(np.asarray(rows, dtype=np.int64), self.layout.row_floats, parts)


class ArenaDetachedRead:
    """Detached reads of one set of arena rows across the files holding them."""

    def __init__(
        self,
        rows: np.ndarray,
        row_floats: int,
        parts: list[tuple[FlashStore, np.ndarray, np.ndarray, DetachedRead]],
    ) -> None:
        self.rows, self._row_floats, self.parts = rows, row_floats, parts

    def stores(self) -> list[FlashStore]:
        return [store for store, _, _, _ in self.parts]

    def read(self) -> np.ndarray:
        """Records of the rows, float32 [n, row_floats] (without the node lock)."""
        out = np.empty((self.rows.size, self._row_floats), dtype=np.float32)
        for _, positions, local, reader in self.parts:
            out[positions] = reader.read(local)
        return out

    def finish(self) -> np.ndarray:
        """bool [n]: rows written since the reads began (under the lock; exactly once)."""
        stale = np.zeros(self.rows.size, dtype=bool)
        for _, positions, local, reader in self.parts:
            stale[positions] = reader.finish(local)
        return stale


@dataclass
class Arena:
    """Pieces with one record width: their files as one row space behind one cache."""

    dim: int
    pieces: list[Piece]
    flash: ArenaFlash
    cache: RowCache


@dataclass
class Piece:
    """One table piece on this node: its place in its arena."""

    spec: ShardSpec
    arena: Arena | None
    index: int
    """Position in the arena (its file is `arena.flash.stores[index]`)."""
    base: int
    """The piece's first arena row."""

    @property
    def num_rows(self) -> int:
        return self.spec.row_end - self.spec.row_start

    @property
    def flash(self) -> FlashStore:
        return self.arena.flash.stores[self.index]

    @property
    def cache(self) -> RowCache:
        """The arena's cache (shared with the arena's other pieces; rows are arena rows)."""
        return self.arena.cache

    @property
    def place(self) -> FeaturePlace:
        return FeaturePlace(self.spec, self.base)
