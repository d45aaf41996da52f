"""An arena's shard files as one row space: a batch of rows of every file read and written in
one batch of requests, with the same bytes, counters and detached-read staleness as the files
read one by one; writes left in flight (write-behind) are never seen half done."""

from __future__ import annotations

import errno
import os
import time

import numpy as np
import pytest

from ndp.config import EmulationConfig
from storage_node.arena import ArenaFlash
from storage_node.errors import ShardFileError
from storage_node.flash import IO_BUFFERS, FlashStore

SIZES = (40, 7, 90)  # rows per file; 5 rows per 512-byte block (dim 8 + state 16 = 96 B)


def open_files(
    directory, *, merge_gap_bytes=1024, io_threads=2, emulation=None
) -> list[FlashStore]:
    return [
        FlashStore(
            directory / f"t{index}",
            table_name=f"t{index}",
            table_num_rows=rows,
            row_start=0,
            num_rows=rows,
            embedding_dim=8,
            state_width=16,
            seed=index,
            page_bytes=512,
            io_threads=io_threads,
            merge_gap_bytes=merge_gap_bytes,
            emulation=emulation,
        )
        for index, rows in enumerate(SIZES)
    ]


@pytest.fixture
def arena(tmp_path):
    arena = ArenaFlash(open_files(tmp_path / "batched"))
    yield arena
    arena.close()


WRITE_LATENCY_S = 0.1
"""Emulated latency of each file's part of a write batch: long enough that a write is still
in flight when the next call comes."""


def slow_writes(directory, latency_s: float) -> ArenaFlash:
    """An arena whose device takes `latency_s` per file written (reads are instant)."""
    slow = EmulationConfig(flash_write_latency_us=latency_s * 1e6)
    return ArenaFlash(open_files(directory, emulation=slow))


@pytest.fixture
def slow_writes_arena(tmp_path):
    arena = slow_writes(tmp_path / "slow", WRITE_LATENCY_S)
    yield arena
    arena.close()


@pytest.fixture
def one_by_one(tmp_path):
    """The same files, read and written one file at a time (the per-file path)."""
    stores = open_files(tmp_path / "per-file")
    yield stores
    for store in stores:
        store.close()


def per_file_read(stores, bases, rows):
    out = np.empty((rows.size, 24), dtype=np.float32)
    piece = np.searchsorted(bases, rows, side="right") - 1
    for index, store in enumerate(stores):
        where = np.flatnonzero(piece == index)
        if where.size:
            out[where] = store.read_rows(rows[where] - bases[index])
    return out


def test_the_files_of_an_arena_are_batched_and_gaps_never_bridge_two_files(arena):
    assert arena._geometry is not None
    gap = arena._geometry.max_gap_blocks
    # between the last block of one file and the first of the next lie more than the gap
    for index, store in enumerate(arena.stores[:-1]):
        last = arena.block_bases[index] + store.layout.num_blocks - 1
        assert arena.block_bases[index + 1] - last - 1 > gap


def test_a_batch_over_every_file_reads_what_each_file_holds(arena, one_by_one):
    rows = np.array([0, 39, 40, 46, 47, 136, 5, 41, 100, 39], dtype=np.int64)
    expected = per_file_read(one_by_one, arena.bases, rows)
    np.testing.assert_array_equal(arena.read_rows(rows), expected)
    # one read batch per file touched, the pages of each file counted in its own counters
    for store, mine in zip(arena.stores, one_by_one, strict=True):
        assert store.counters.read_batches == 1
        assert store.counters.bytes_read == mine.counters.bytes_read


def test_writes_over_every_file_land_in_their_files_and_leave_the_rest(arena, one_by_one):
    rng = np.random.default_rng(0)
    rows = np.array([1, 38, 40, 45, 50, 136, 90], dtype=np.int64)
    records = rng.standard_normal((rows.size, 24)).astype(np.float32)
    arena.write_rows(rows, records)
    everything = np.arange(arena.layout.num_rows, dtype=np.int64)
    expected = per_file_read(one_by_one, arena.bases, everything)
    expected[rows] = records
    np.testing.assert_array_equal(arena.read_rows(everything), expected)
    # and on disk, through each file alone
    arena.drain()  # the files read behind the arena's back: its writes landed first
    np.testing.assert_array_equal(per_file_read(arena.stores, arena.bases, everything), expected)
    assert [s.counters.write_batches for s in arena.stores] == [1, 1, 1]


def test_held_blocks_make_a_write_back_skip_the_re_read_and_keep_earlier_writes(arena):
    rows = np.array([2, 41, 60], dtype=np.int64)
    first = np.full((3, 24), 1.0, dtype=np.float32)
    second = np.full((2, 24), 2.0, dtype=np.float32)
    with arena.holding_reads():
        arena.read_rows(rows)
        reads = sum(s.counters.read_requests for s in arena.stores)
        arena.write_rows(rows, first)
        with arena.holding_reads():  # nested: joins the outer hold
            arena.write_rows(np.array([3, 61]), second)  # same blocks as rows 2 and 60
        assert sum(s.counters.read_requests for s in arena.stores) == reads
        assert sum(s.counters.blocks_from_held for s in arena.stores) >= 5
    got = arena.read_rows(np.array([2, 3, 41, 60, 61]))
    np.testing.assert_array_equal(got[[0, 2, 3]], first)
    np.testing.assert_array_equal(got[[1, 4]], second)


def test_a_detached_read_names_the_rows_a_batched_write_changed(arena, one_by_one):
    rows = np.array([0, 40, 50], dtype=np.int64)
    detached = arena.detached_read(rows)
    # every file's rows in one batch (one read per file touched), without the lock
    np.testing.assert_array_equal(detached.read(), per_file_read(one_by_one, arena.bases, rows))
    assert [s.counters.read_batches for s in arena.stores] == [1, 1, 1]
    some = np.array([130, 3], dtype=np.int64)  # files 2 and 0 only
    other = arena.detached_read(some)
    np.testing.assert_array_equal(other.read(), per_file_read(one_by_one, arena.bases, some))
    assert other.finish().tolist() == [False, False]
    arena.write_rows(np.array([1, 51], dtype=np.int64), np.zeros((2, 24), dtype=np.float32))
    # rows 0 and 1 share a block of t0; 50 and 51 (t2 rows 3, 4) one of t2; t1 not written
    assert detached.finish().tolist() == [True, False, True]


def test_an_arena_of_files_with_different_merging_goes_file_by_file(tmp_path, one_by_one):
    stores = open_files(tmp_path / "a", merge_gap_bytes=0)[:2] + open_files(tmp_path / "b")[2:]
    arena = ArenaFlash(stores)
    try:
        assert arena._geometry is None
        rows = np.array([0, 45, 100], dtype=np.int64)
        np.testing.assert_array_equal(
            arena.read_rows(rows), per_file_read(one_by_one, arena.bases, rows)
        )
    finally:
        for store in stores:
            store.close()


def _reads(arena) -> int:
    return sum(s.counters.read_requests for s in arena.stores)


def test_a_carry_keeps_a_lookups_blocks_for_the_update_and_release_gives_them_back(arena):
    rows = np.array([0, 6, 41, 50, 130], dtype=np.int64)
    with arena.carrying(3):
        looked_up = arena.read_rows(rows)  # step 3's lookup, outside any holding block
    reads = _reads(arena)
    with arena.holding_reads():  # the update: read, change, write back
        again = arena.read_rows(rows)
        arena.write_rows(rows, again + 1.0)
    # the update read nothing from the files and the carry outlived its holding block
    assert _reads(arena) == reads
    np.testing.assert_array_equal(again, looked_up)
    np.testing.assert_array_equal(arena.read_rows(rows), looked_up + 1.0)
    arena.release_held(up_to_step=2)  # an earlier step's release keeps step 3's copies
    assert arena._held
    arena.release_held(up_to_step=3)
    assert arena._held == [] and arena._held_bytes == 0
    # what the files hold is what the carry said
    arena.drain()  # the files read behind the arena's back: its writes landed first
    np.testing.assert_array_equal(per_file_read(arena.stores, arena.bases, rows), looked_up + 1.0)
    arena.read_rows(rows)
    assert _reads(arena) > reads  # from the files again


def test_an_early_lookups_blocks_outlive_the_previous_steps_update_and_stay_exact(arena):
    """Lookahead: step 4's rows are read (early lookup) before step 3's update writes some of
    the same blocks; step 4's update then reads none of them, and finds step 3's changes."""
    step3 = np.array([0, 41, 130], dtype=np.int64)
    step4 = np.array([1, 41, 50, 131], dtype=np.int64)  # shares blocks and a row with step 3
    with arena.carrying(3):
        arena.read_rows(step3)
    with arena.carrying(4):
        early = arena.read_rows(step4)
    with arena.holding_reads():  # step 3's update
        arena.write_rows(step3, arena.read_rows(step3) + 1.0)
    arena.release_held(up_to_step=3)
    assert arena._held_tags and all(tag == 4 for tag in arena._held_tags)
    expected = early.copy()
    expected[1] += 1.0  # row 41 was step 3's too
    reads = _reads(arena)
    with arena.holding_reads():  # step 4's update
        current = arena.read_rows(step4)
        np.testing.assert_array_equal(current, expected)
        arena.write_rows(step4, current * 2.0)
    assert _reads(arena) == reads
    arena.release_held(up_to_step=4)
    assert arena._held == []
    arena.drain()  # the files read behind the arena's back: its writes landed first
    np.testing.assert_array_equal(per_file_read(arena.stores, arena.bases, step4), expected * 2.0)


def test_a_write_updates_every_held_copy_so_dropping_any_copy_is_safe(arena):
    rows = np.array([0, 47], dtype=np.int64)
    with arena.carrying(6):
        arena.read_rows(rows)  # a copy kept for step 6 (an early lookup)
    with arena.carrying(5):
        arena.write_rows(rows, np.full((2, 24), 3.0, dtype=np.float32))  # a newer copy
    arena.release_held(up_to_step=5)  # drops the newer copy, keeps step 6's older one
    assert arena._held_tags == [6]
    reads = _reads(arena)
    np.testing.assert_array_equal(arena.read_rows(rows), np.full((2, 24), 3.0))
    assert _reads(arena) == reads  # served by step 6's copy, which the write brought up to date
    arena.release_held()


def test_a_carry_drops_its_oldest_copies_past_its_cap_and_stays_exact(arena, monkeypatch):
    from storage_node import arena as arena_module

    monkeypatch.setattr(arena_module, "CARRY_MAX_BYTES", 2 * 512)
    first = np.array([0, 47], dtype=np.int64)  # one block of t0, one of t2
    with arena.carrying(1):
        arena.write_rows(first, np.full((2, 24), 7.0, dtype=np.float32))
        arena.read_rows(np.array([100, 120], dtype=np.int64))  # two more blocks: the first go
    assert arena._held_bytes <= 2 * 512
    reads = _reads(arena)
    np.testing.assert_array_equal(arena.read_rows(first), np.full((2, 24), 7.0))
    assert _reads(arena) > reads  # dropped: read again
    arena.release_held()


@pytest.mark.parametrize(
    ("device", "seed"), [("instant", 0), ("instant", 1), ("instant", 2), ("slow_writes", 3)]
)
@pytest.mark.parametrize("cap_blocks", [6, 64], ids=["copies-dropped", "copies-kept"])
def test_any_mix_of_carried_reads_writes_and_releases_reads_what_was_last_written(
    request, tmp_path, one_by_one, device, seed, cap_blocks, monkeypatch
):
    """Lookahead's pattern at random: lookups and early lookups carried for their steps,
    updates (read, write back) in holding blocks, releases by step, a small cap dropping old
    copies; every read must equal the same writes applied to the files one by one (on a slow
    device every write is still in flight when the next call comes)."""
    from storage_node import arena as arena_module

    if device == "instant":
        arena = request.getfixturevalue("arena")
    else:
        arena = slow_writes(tmp_path / "slow", 0.002)
        request.addfinalizer(arena.close)

    monkeypatch.setattr(arena_module, "CARRY_MAX_BYTES", cap_blocks * 512)
    rng = np.random.default_rng(seed)
    total = int(arena.bases[-1])
    for step in range(12):
        for carried in (step, step + 1):  # the lookup, then the next step's early lookup
            rows = rng.choice(total, size=int(rng.integers(1, 20)), replace=False)
            with arena.carrying(carried):
                got = arena.read_rows(rows)
            np.testing.assert_array_equal(got, per_file_read(one_by_one, arena.bases, rows))
        rows = np.sort(rng.choice(total, size=int(rng.integers(1, 15)), replace=False))
        with arena.holding_reads():  # the update
            current = arena.read_rows(rows)
            np.testing.assert_array_equal(current, per_file_read(one_by_one, arena.bases, rows))
            changed = current + rng.standard_normal(current.shape).astype(np.float32)
            arena.write_rows(rows, changed)
        piece = np.searchsorted(arena.bases, rows, side="right") - 1
        for index, store in enumerate(one_by_one):
            mine = piece == index
            if mine.any():
                store.write_rows(rows[mine] - arena.bases[index], changed[mine])
        arena.release_held(up_to_step=step)
    everything = np.arange(total)
    np.testing.assert_array_equal(
        arena.read_rows(everything), per_file_read(one_by_one, arena.bases, everything)
    )
    arena.release_held()
    assert arena._held == [] and arena._held_bytes == 0


# ---------------------------------------------------------------------- write-behind


def test_a_write_returns_in_flight_and_only_a_read_of_its_blocks_waits_for_it(
    slow_writes_arena,
):
    arena = slow_writes_arena
    rows = np.array([1, 41], dtype=np.int64)  # t0's block 0 and t1's block 0
    written = np.full((2, 24), 5.0, dtype=np.float32)
    started = time.monotonic()
    arena.write_rows(rows, written)
    assert arena.writes.in_flight  # the device needs 2 x WRITE_LATENCY_S for it
    arena.read_rows(np.array([100, 130], dtype=np.int64))  # t2: blocks the write leaves alone
    assert arena.writes.in_flight and arena.writes.waits == 0
    np.testing.assert_array_equal(arena.read_rows(rows), written)  # waits, then reads
    assert not arena.writes.in_flight and arena.writes.waits == 1
    assert time.monotonic() - started >= 2 * WRITE_LATENCY_S


def test_a_second_write_waits_for_the_first_so_the_last_write_lands_last(slow_writes_arena):
    arena = slow_writes_arena
    rows = np.array([3, 50], dtype=np.int64)
    arena.write_rows(rows, np.full((2, 24), 1.0, dtype=np.float32))
    arena.write_rows(rows, np.full((2, 24), 2.0, dtype=np.float32))
    assert arena.writes.waits == 1
    arena.drain()
    np.testing.assert_array_equal(
        per_file_read(arena.stores, arena.bases, rows), np.full((2, 24), 2.0)
    )


def test_the_buffer_of_a_write_in_flight_is_not_handed_out_until_it_is_written(
    slow_writes_arena,
):
    arena = slow_writes_arena
    arena.write_rows(np.array([0], dtype=np.int64), np.ones((1, 24), dtype=np.float32))
    (in_flight,) = arena.writes._batch.buffers  # given back by the write (nothing holds it)...
    size = len(in_flight)
    taken = [IO_BUFFERS.take(size) for _ in range(4)]
    assert all(buf is not in_flight for buf in taken)  # ...but only once written
    for buf in taken:
        IO_BUFFERS.give(buf)
    arena.drain()
    again = [IO_BUFFERS.take(size) for _ in range(8)]
    assert any(buf is in_flight for buf in again)
    for buf in again:
        IO_BUFFERS.give(buf)


def test_a_failed_write_in_flight_is_raised_by_the_next_call_that_waits_for_it(arena, monkeypatch):
    def device_error(fd, buffers, offset):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "pwritev", device_error)
    rows = np.array([2, 45], dtype=np.int64)
    arena.write_rows(rows, np.zeros((2, 24), dtype=np.float32))
    monkeypatch.undo()
    with pytest.raises(OSError, match="Input/output error"):
        arena.read_rows(rows)
    arena.drain()  # raised once: nothing is in flight any more


def test_a_detached_read_and_a_release_of_everything_drain_the_writes(slow_writes_arena):
    arena = slow_writes_arena
    arena.write_rows(np.array([5], dtype=np.int64), np.ones((1, 24), dtype=np.float32))
    arena.detached_read(np.array([5], dtype=np.int64)).finish()
    assert not arena.writes.in_flight
    arena.write_rows(np.array([6], dtype=np.int64), np.ones((1, 24), dtype=np.float32))
    arena.release_held()  # a restore or close: the files are used behind the arena next
    assert not arena.writes.in_flight


def test_with_o_direct_a_write_goes_out_of_the_held_copies_and_a_fresh_read(tmp_path):
    """O_DIRECT needs every buffer page-aligned: the held copies a write changes in place and
    writes from, and the buffer of the blocks no copy had, are all pool buffers."""
    try:
        stores = [
            FlashStore(
                tmp_path / f"d{index}",
                table_name=f"d{index}",
                table_num_rows=300,
                row_start=0,
                num_rows=300,
                embedding_dim=8,
                state_width=16,
                seed=index,
                page_bytes=4096,
                io_threads=2,
                use_odirect=True,
            )  # fmt: skip
            for index in range(2)
        ]
    except ShardFileError as exc:  # e.g. tmpfs
        pytest.skip(f"file system refuses O_DIRECT: {exc}")
    arena = ArenaFlash(stores)
    try:
        with arena.carrying(1):
            arena.read_rows(np.array([0, 350], dtype=np.int64))  # block 0 of each file
        rows = np.array([1, 200, 351], dtype=np.int64)  # held, fresh (file 0 block 1), held
        records = np.arange(3 * 24, dtype=np.float32).reshape(3, 24)
        with arena.holding_reads():
            arena.write_rows(rows, records)
        arena.release_held()
        np.testing.assert_array_equal(per_file_read(arena.stores, arena.bases, rows), records)
    finally:
        arena.close()
