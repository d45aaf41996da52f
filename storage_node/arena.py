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
writes, and moves a batch of rows of every file as one batch of I/O: arena rows map to
*arena blocks* (file i's block b is `block_bases[i] + b`, the files' block ranges spaced
further apart than the merge gap), so one dedupe, one gap fill and one coalescing into runs
serve every file, and the runs of all files go out in one call to the I/O threads. The shard
files themselves are unchanged (one file per piece), so checkpoints, restore streams and
resharding keep their format.

Why batched: at cache_5pct (13 files per node, each step touching most blocks) the per-file
loop cost ~0.3 ms of numpy and thread hand-offs per file and call, 87 calls per step for two
nodes; one batch per call took the in-process step (two nodes and a worker) from 110.7 to
89.6-96.9 CPU-ms with the same bytes and requests.

Why the arena: with a cache per piece every stage of a step looped over tables (a lookup
per feature, an update per table); with one row space a step's lookup of every feature is
one `embedding_bag` over the slot tensor, and its update one dedupe and one optimizer call.
"""

from __future__ import annotations

import functools
import mmap
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np

from ndp.plan import ShardSpec
from ndp.rows import unique_inverse
from storage_node.cache import RowCache
from storage_node.flash import (
    IO_BUFFERS,
    DetachedRead,
    FlashStore,
    IoGeometry,
    block_runs,
    fill_gaps,
    held_sources,
    issue_runs,
)
from storage_node.keyed_bags import FeaturePlace
from storage_node.write_behind import WriteBehind, block_runs_from


@dataclass(frozen=True)
class ArenaLayout:
    """What a `RowCache` needs of its flash: the row space's size and the record width."""

    num_rows: int
    row_floats: int

    @property
    def row_bytes(self) -> int:
        return 4 * self.row_floats


CARRY_MAX_BYTES = 32 << 20
"""Most bytes of blocks an arena carries from a step's lookup to its update (about the room
os_paged's memory cgroup leaves a step above its page-cache budget: 34 MiB at cache_5pct)."""


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
        shapes = {store.io_geometry() for store in stores}
        self._geometry: IoGeometry | None = (
            shapes.pop() if len(stores) > 1 and len(shapes) == 1 else None
        )
        """Set when the files' I/O is batched: every file has this block shape and merging."""
        self.writes = WriteBehind(self._geometry.io_threads) if self._geometry else None
        """Batched writes are left in flight (`storage_node.write_behind`)."""
        spacing = [
            store.layout.num_blocks + store.io_geometry().max_gap_blocks + 1 for store in stores
        ]
        self.block_bases = np.concatenate([[0], np.cumsum(spacing)]).astype(np.int64)
        """int64 [pieces + 1]: arena block id of each file's block 0. Ids between two files
        (more than the merge gap) belong to no file, so neither gap filling nor runs of
        consecutive blocks ever bridge two files."""
        self._held: list[tuple[np.ndarray, np.ndarray, mmap.mmap]] = []
        """Held copies of blocks (batched I/O): (sorted arena blocks, their bytes [n,
        block_bytes], the pool buffer holding them) per read or write, oldest first. A block
        is in at most one copy, and a copy equals its blocks on the files once the write in
        flight is done (a write changes the copy and writes from it), so any copy may be
        dropped at any time: it only costs a read."""
        self._held_tags: list[int | None] = []
        """Per held copy: the step whose update keeps it (`carrying`), or None: dropped
        when the outermost `holding_reads` ends."""
        self._held_bytes = 0
        self._hold_depth = 0
        """Open `holding_reads` blocks (nested)."""
        self._carry_step: int | None = None
        """Inside `carrying(step)`: the step the copies made now are kept for."""
        self.peak_held_bytes = 0
        """Most bytes of held copies at any time: DRAM beyond the cache's budget."""
        self.peak_carried_bytes = 0
        """Most bytes still held right after a step's update released its copies (kept for
        later steps' updates: lookahead's early lookups), i.e. held across a step boundary."""

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
        """Records of arena `rows` (any order): float32 [n, row_floats]; the blocks of every
        file in one batch of requests."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._geometry is None:
            out = np.empty((rows.size, self.layout.row_floats), dtype=np.float32)
            for index, positions, local in self.split(rows):
                out[positions] = self.stores[index].read_rows(local)
            return out
        if rows.size == 0:
            return np.zeros((0, self.layout.row_floats), dtype=np.float32)
        places = self._places(*self._span(rows))
        records = np.empty((places.in_block.shape[0], self.layout.row_floats), dtype=np.float32)
        for blocks, mine, block_at, in_block in places.by_buffer():
            records[mine] = blocks[block_at, in_block]
        if places.fresh_buf is not None:
            self._hold(places.fresh_blocks, places.fresh_buf)  # after the copy
        return records

    def write_rows(self, rows: np.ndarray, records: np.ndarray) -> None:
        """Write records of unique arena `rows`; every file's blocks in one batch, left in
        flight (`storage_node.write_behind`: whatever could see the files first waits).

        A write is read-modify-write of whole blocks. A block a held copy has is changed in
        that copy and written from it; the others are read (in one batch), changed and held
        like a read's (`_hold`). Why in place: each block is held once, so the copy is the
        block's only image in memory; assembling the blocks into a buffer of their own and
        copying it back into the held copies cost two copies of every written block (~7 MB
        per node and step at cache_5pct: 6 of the 10 CPU-ms `write_rows` took per node and
        step in process)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._geometry is None:
            for index, positions, local in self.split(rows):
                self.stores[index].write_rows(local, records[positions])
            return
        if rows.size == 0:
            return
        self.writes.wait()  # one batch in flight: it may be writing from the copies changed now
        geo = self._geometry
        span, where = self._span(rows)
        places = self._places(span, where)
        for blocks, mine, block_at, in_block in places.by_buffer():
            blocks[block_at, in_block] = records[mine]
        piece_of_block = self._piece_of(span)
        touched, firsts, ends = _groups(piece_of_block)
        for index, first, end in zip(touched.tolist(), firsts.tolist(), ends.tolist(), strict=True):
            self.stores[index].note_write(span[first:end] - self.block_bases[index])
        started = time.monotonic()
        runs = block_runs_from(span, places.source, places.at, places.buffers, geo)
        files, offsets, requests = self._run_targets(runs.firsts, self.stores)
        done_at = self._throttle(touched, ends - firsts, started, write=True, sleep=False)
        self.writes.start(span, runs.chunks, files, offsets, places.buffers, runs.views, done_at)
        if places.fresh_buf is not None:
            self._hold(places.fresh_blocks, places.fresh_buf)
        for index, first, end in zip(touched.tolist(), firsts.tolist(), ends.tolist(), strict=True):
            counters = self.stores[index].counters
            nbytes = (end - first) * geo.block_bytes
            counters.bytes_written += nbytes
            counters.pages_written += nbytes // geo.page_bytes
            counters.write_batches += 1
            counters.write_requests += int(requests[index])

    @contextmanager
    def holding_reads(self) -> Iterator[None]:
        """Keep the blocks read or written inside this block so that writes to them skip
        the re-read (`FlashStore.holding_reads`, for the arena's batched I/O; of every file
        where the files are not batched). Nested blocks hold into the outermost one; inside
        `carrying(step)` the copies are kept for that step's update instead."""
        if self._geometry is None:
            with ExitStack() as stack:
                for store in self.stores:
                    stack.enter_context(store.holding_reads())
                yield
            return
        self._hold_depth += 1
        try:
            yield
        finally:
            self._hold_depth -= 1
            if self._hold_depth == 0:
                self._drop_held(lambda tag: tag is None)

    @contextmanager
    def carrying(self, step: int) -> Iterator[None]:
        """Keep every block this arena reads or writes inside this block until the update of
        `step` is applied (`release_held(up_to_step=step)`).

        The node carries a training lookup's reads to its step's update, and an early
        lookup's reads (lookahead: step s + 1's rows, read before step s's update) to the
        update of the step they were pooled for: the update's read-modify-write then finds
        those blocks in memory instead of reading them again (at cache_5pct each step's
        misses touch nearly every block, so this is a whole second read pass). Why that is
        fair to the baselines: os_paged's memory cgroup leaves each step tens of MiB above
        its page-cache budget (`baselines.PageCacheBudget`), and its update finds the
        lookup's pages cached. At most `CARRY_MAX_BYTES` are held (oldest copies dropped
        first: every copy equals the files, so a dropped copy only costs a read). A no-op
        where the files are not batched."""
        if self._geometry is None:
            yield
            return
        outer, self._carry_step = self._carry_step, step
        try:
            yield
        finally:
            self._carry_step = outer

    def release_held(self, *, up_to_step: int | None = None) -> None:
        """Give back the copies kept for the updates of steps <= `up_to_step` (after that
        update), or every held copy (None: call before anything writes the files other than
        through this arena, such as a restore, and at close)."""
        if up_to_step is None:
            self.drain()
            self._drop_held(lambda tag: True)
        else:
            self._drop_held(lambda tag: tag is not None and tag <= up_to_step)
            self.peak_carried_bytes = max(self.peak_carried_bytes, self._held_bytes)

    def drain(self) -> None:
        """Return once every write is on the files (before anything reads or copies them
        other than through this arena: a checkpoint's sync, a detached read); raises a
        write's error."""
        if self.writes is not None:
            self.writes.wait()

    def close(self) -> None:
        """Drain, give back every held copy, and close the files (the node's close)."""
        try:
            self.release_held()
        finally:
            if self.writes is not None:
                self.writes.close()
            for store in self.stores:
                store.close()

    def _give(self, buf: mmap.mmap) -> None:
        """Give `buf` back to the pool (once written, if a write is still using it)."""
        if self.writes is not None:
            self.writes.give(buf)
        else:
            IO_BUFFERS.give(buf)

    def _drop_held(self, dropped: Callable[[int | None], bool]) -> None:
        kept: list[tuple[np.ndarray, np.ndarray, mmap.mmap]] = []
        kept_tags: list[int | None] = []
        for entry, tag in zip(self._held, self._held_tags, strict=True):
            if dropped(tag):
                self._held_bytes -= entry[0].size * self._geometry.block_bytes
                self._give(entry[2])
            else:
                kept.append(entry)
                kept_tags.append(tag)
        self._held, self._held_tags = kept, kept_tags

    # ------------------------------------------------------------------ batched I/O

    def _span(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sorted arena blocks to move for `rows`, gaps filled; float offsets [n, row_floats]
        of each row's record in a buffer of those blocks)."""
        geo = self._geometry
        piece = np.searchsorted(self.bases, rows, side="right") - 1
        local = rows - self.bases[piece]
        arena_blocks = self.block_bases[piece] + local // geo.rows_per_block
        blocks, block_pos, _ = unique_inverse(arena_blocks, int(self.block_bases[-1]))
        span = fill_gaps(blocks, geo.max_gap_blocks)
        if span is not blocks:
            block_pos = np.searchsorted(span, blocks)[block_pos]
        start = (
            block_pos * (geo.block_bytes // 4)
            + (local % geo.rows_per_block) * self.layout.row_floats
        )
        return span, start[:, None] + np.arange(self.layout.row_floats)[None, :]

    def _piece_of(self, blocks: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.block_bases, blocks, side="right") - 1

    def _runs(
        self, span: np.ndarray, stores: list[FlashStore]
    ) -> tuple[np.ndarray, list, list[int], np.ndarray]:
        """The runs of sorted arena blocks `span`, every file's in one list: (lengths in
        blocks, and `_run_targets` of their first blocks)."""
        firsts, lengths = block_runs(span, self._geometry.max_run_blocks)
        return (lengths, *self._run_targets(firsts, stores))

    def _run_targets(
        self, firsts: np.ndarray, stores: list[FlashStore]
    ) -> tuple[list, list[int], np.ndarray]:
        """For runs starting at arena blocks `firsts`: (descriptor, path) of each run's file
        in `stores`, its byte offset there, and the requests per piece (int64 [pieces])."""
        geo = self._geometry
        run_piece = self._piece_of(firsts)
        offsets = geo.page_bytes + (firsts - self.block_bases[run_piece]) * geo.block_bytes
        files = [(store.fd, store.path) for store in stores]
        run_files = [files[i] for i in run_piece.tolist()]
        return run_files, offsets.tolist(), np.bincount(run_piece, minlength=len(files))

    def _places(self, span: np.ndarray, where: np.ndarray) -> _RowPlaces:
        """Where the records of a read or write of sorted arena blocks `span` live (`where`:
        each row's float offsets in a buffer of those blocks, `_span`): in the held copy of
        their block, or in one buffer of the blocks no copy has, read now in one batch (the
        caller holds it, `_hold`). Counts the blocks copies gave, and inside
        `carrying(step)` keeps the copies used for that step too.

        Why rows, not whole blocks: a row is a few dozen bytes of a 4 KiB block; assembling
        a step's held blocks into one buffer (and, for a write, copying it back into the
        copies) cost ~5 ms per node and step at cache_5pct."""
        block_floats = self._geometry.block_bytes // 4
        source, at = held_sources(self._held, span)
        fresh = source < 0
        self._count_from_held(span[~fresh])
        used = np.unique(source[~fresh])
        self._keep_for_carry(used.tolist())
        buffers = [self._held[p][2] for p in used.tolist()]
        blocks = [self._held[p][1].view(np.float32) for p in used.tolist()]  # only those used
        source = np.searchsorted(used, source)  # index into `buffers`; the fresh fixed below
        fresh_blocks, fresh_buf = span[fresh], None
        if fresh_blocks.size:
            fresh_buf = self._read_span(fresh_blocks)
            source[fresh], at[fresh] = len(buffers), np.arange(fresh_blocks.size)
            buffers.append(fresh_buf)
            floats = np.frombuffer(fresh_buf, np.float32, count=fresh_blocks.size * block_floats)
            blocks.append(floats.reshape(fresh_blocks.size, -1))
        block_of_row = where[:, 0] // block_floats
        in_block = where - (block_of_row * block_floats)[:, None]
        return _RowPlaces(
            source, at, buffers, blocks, block_of_row, in_block, fresh_blocks, fresh_buf
        )

    def _read_span(self, span: np.ndarray) -> mmap.mmap:
        """Read sorted arena blocks into one page-aligned buffer, counted per file (under the
        node's lock: a block still being written is read once it is)."""
        self.writes.wait(span)
        return self._read_blocks(span, self.stores)

    def _read_blocks(self, span: np.ndarray, stores: list[FlashStore]) -> mmap.mmap:
        """`_read_span` from `stores` without waiting for writes: touches no held copy and
        no write in flight, so a detached read may call it without the lock."""
        geo = self._geometry
        buf = IO_BUFFERS.take(span.size * geo.block_bytes)
        started = time.monotonic()
        lengths, files, offsets, requests = self._runs(span, stores)
        threads = issue_runs(
            os.preadv, buf, geo.block_bytes, lengths, files, offsets, stores[0].io_pool,
            geo.io_threads,
        )  # fmt: skip
        seconds = time.monotonic() - started
        touched, firsts, ends = _groups(self._piece_of(span))
        for index, first, end in zip(touched.tolist(), firsts.tolist(), ends.tolist(), strict=True):
            stores[index].count_read(
                (end - first) * geo.block_bytes,
                requests=int(requests[index]),
                threads=threads,
                seconds=seconds * (end - first) / span.size,
            )
        self._throttle(touched, ends - firsts, started, write=False, stores=stores)
        return buf

    def _throttle(
        self,
        pieces: np.ndarray,
        blocks: np.ndarray,
        started: float,
        *,
        write: bool,
        sleep: bool = True,
        stores: list[FlashStore] | None = None,
    ) -> float:
        """Each file's emulated device time, one after another (one device per node, as when
        the files were read one by one); returns when the device is done. With `sleep`
        False the caller does not wait for it (a write left in flight)."""
        geo = self._geometry
        stores = self.stores if stores is None else stores
        for index, count in zip(pieces.tolist(), blocks.tolist(), strict=True):
            started = stores[index].throttle_transfer(
                count * geo.block_bytes, started, write=write, sleep=sleep
            )
        return started

    def _hold(self, blocks: np.ndarray, buf: mmap.mmap) -> None:
        """Keep sorted arena `blocks` (no held copy has any of them; their bytes at the start
        of `buf`) while a `holding_reads` is open (until it ends) or inside `carrying(step)`
        (until that step's update); else `buf` goes back to the pool. Past
        `CARRY_MAX_BYTES` the oldest copies are dropped.

        Why each block once: a block held in two copies would need every write to change
        both, and reads to pick the newer."""
        if self._hold_depth == 0 and self._carry_step is None:
            self._give(buf)
            return
        block_bytes = self._geometry.block_bytes
        data = np.frombuffer(buf, dtype=np.uint8, count=blocks.size * block_bytes)
        self._held.append((blocks, data.reshape(blocks.size, -1), buf))
        self._held_tags.append(self._carry_step)
        self._held_bytes += blocks.size * block_bytes
        self.peak_held_bytes = max(self.peak_held_bytes, self._held_bytes)
        while self._held_bytes > CARRY_MAX_BYTES and len(self._held) > 1:
            old_blocks, _, old_buf = self._held.pop(0)
            self._held_tags.pop(0)
            self._held_bytes -= old_blocks.size * block_bytes
            self._give(old_buf)

    def _keep_for_carry(self, positions: list[int]) -> None:
        """Inside `carrying(step)`: the held copies at `positions` served this step, so they
        are kept until its update too."""
        step = self._carry_step
        if step is None:
            return
        for position in positions:
            tag = self._held_tags[position]
            if tag is None or tag < step:
                self._held_tags[position] = step

    def _count_from_held(self, blocks: np.ndarray) -> None:
        """Count arena `blocks` a held copy gave (instead of the device) on their files."""
        counts = np.bincount(self._piece_of(blocks), minlength=len(self.stores))
        for index in np.flatnonzero(counts).tolist():
            self.stores[index].counters.blocks_from_held += int(counts[index])

    def detached_read(self, rows: np.ndarray) -> ArenaDetachedRead:
        """A `FlashStore.detached_read` of each file that `rows` touch (call under the lock).
        Drains first: a write still in flight would not be named stale by `finish`."""
        self.drain()
        parts = [
            (self.stores[index], positions, local, self.stores[index].detached_read())
            for index, positions, local in self.split(rows)
        ]
        batch = None
        if self._geometry is not None:  # the files as they are now (a restore replaces them)
            batch = functools.partial(self._read_rows_unlocked, stores=list(self.stores))
        rows = np.asarray(rows, dtype=np.int64)
        return ArenaDetachedRead(rows, self.layout.row_floats, parts, batch)

    def _read_rows_unlocked(self, rows: np.ndarray, stores: list[FlashStore]) -> np.ndarray:
        """Records of arena `rows` from the files of `stores`, every file's blocks in one
        batch, without the node's lock (`ArenaDetachedRead`: `finish` names the rows a
        write changed meanwhile)."""
        span, where = self._span(rows)
        buf = self._read_blocks(span, stores)
        try:
            return np.frombuffer(buf, dtype=np.float32)[where]
        finally:
            IO_BUFFERS.give(buf)


def _groups(sorted_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct ids, first index, end index) of each run of equal ids in sorted `sorted_ids`."""
    if sorted_ids.size == 0:
        return sorted_ids, sorted_ids, sorted_ids
    starts = np.flatnonzero(np.concatenate([[True], sorted_ids[1:] != sorted_ids[:-1]]))
    ends = np.concatenate([starts[1:], [sorted_ids.size]])
    return sorted_ids[starts], starts, ends


class ArenaDetachedRead:
    """Detached reads of one set of arena rows across the files holding them."""

    def __init__(
        self,
        rows: np.ndarray,
        row_floats: int,
        parts: list[tuple[FlashStore, np.ndarray, np.ndarray, DetachedRead]],
        batch: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.rows, self._row_floats, self.parts = rows, row_floats, parts
        self._batch = batch
        """Reads the rows of every file in one batch (`ArenaFlash._read_rows_unlocked`);
        None: file by file. Why: file by file, a prefetch of 13 files cost 13 batches of
        numpy and thread hand-offs (~3 of the ~6 CPU-ms a prefetch took per node and step
        at cache_5pct in process)."""

    def read(self) -> np.ndarray:
        """Records of the rows, float32 [n, row_floats] (without the node lock)."""
        if self._batch is not None and self.rows.size:
            with ExitStack() as reading:
                for _, _, _, reader in self.parts:
                    reading.enter_context(reader.reading_elsewhere())
                return self._batch(self.rows)
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
class _RowPlaces:
    """`ArenaFlash._places`: block i of the span is block `at[i]` of `buffers[source[i]]`
    (`blocks[source[i]]`: the same bytes as float32 [n, block_floats])."""

    source: np.ndarray
    at: np.ndarray
    buffers: list[mmap.mmap]
    blocks: list[np.ndarray]
    block_of_row: np.ndarray
    """Each row's block (position in the span)."""
    in_block: np.ndarray
    """Each row's float offsets in its block, int64 [rows, row_floats]."""
    fresh_blocks: np.ndarray
    fresh_buf: mmap.mmap | None
    """The blocks no held copy had, read for this call, and their buffer."""

    def by_buffer(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Per buffer the rows are in: (its blocks as float32, the rows' positions, their
        block in it [m, 1], their float offsets [m, row_floats]): index the blocks with the
        last two to reach the rows' records."""
        row_source = self.source[self.block_of_row]
        for position in np.unique(row_source).tolist():
            mine = np.flatnonzero(row_source == position)
            yield (
                self.blocks[position],
                mine,
                self.at[self.block_of_row[mine]][:, None],
                (self.in_block[mine]),
            )


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
