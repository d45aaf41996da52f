"""The flash tier: paged layout, chunked init, persistence, header checks, throttles."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest

from ndp.config import EmulationConfig, EnergyConfig
from ndp.model.init import init_rows
from storage_node import flash as flash_module
from storage_node.errors import ShardFileError
from storage_node.flash import FlashLayout, FlashStore, IoBuffers, fill_gaps
from storage_node.stats import CacheCounters, energy_pj, link_delay_s, transfer_delay_s


def open_store(path, *, num_rows=50, dim=8, state=8, row_start=10, **kwargs) -> FlashStore:
    return FlashStore(
        path,
        table_name="t",
        table_num_rows=max(100, row_start + num_rows),
        row_start=row_start,
        num_rows=num_rows,
        embedding_dim=dim,
        state_width=state,
        seed=3,
        page_bytes=512,
        io_threads=2,
        **kwargs,
    )


def test_no_row_straddles_a_page_when_it_fits():
    layout = FlashLayout(num_rows=100, embedding_dim=20, state_width=1, page_bytes=512)
    assert layout.row_bytes == 84 and layout.rows_per_block == 6 and layout.block_bytes == 512
    slots = np.arange(layout.rows_per_block)
    assert ((slots * layout.row_bytes + layout.row_bytes) <= layout.page_bytes).all()


def test_a_row_larger_than_a_page_takes_whole_pages():
    layout = FlashLayout(num_rows=3, embedding_dim=64, state_width=128, page_bytes=512)
    assert layout.rows_per_block == 1 and layout.block_bytes == 1024
    assert layout.file_bytes == 512 + 3 * 1024


def test_new_shard_holds_init_rows_and_zero_state(tmp_path):
    store = open_store(tmp_path / "s")
    records = store.read_rows(np.array([0, 49, 7, 7]))
    expected = init_rows(
        seed=3, table_name="t", num_rows=100, embedding_dim=8, row_start=10, row_end=60
    )
    np.testing.assert_array_equal(records[:, :8], expected[[0, 49, 7, 7]])
    assert (records[:, 8:] == 0).all()
    store.close()


def test_chunked_init_of_a_shard_larger_than_a_chunk_equals_init_of_the_whole_range(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(flash_module, "INIT_CHUNK_BYTES", 1024)  # 2 pages = 32 rows per chunk
    store = open_store(tmp_path / "s", num_rows=90, state=0)
    assert store.layout.num_blocks * store.layout.block_bytes > 2 * flash_module.INIT_CHUNK_BYTES
    expected = init_rows(
        seed=3, table_name="t", num_rows=100, embedding_dim=8, row_start=10, row_end=100
    )
    np.testing.assert_array_equal(store.read_rows(np.arange(90)), expected)
    store.close()


def test_init_never_builds_more_than_one_chunk_of_rows_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(flash_module, "INIT_CHUNK_BYTES", 1024)  # 2 pages = 32 rows of 32 B
    sizes: list[int] = []

    def recording_init_rows(**kwargs):
        sizes.append(kwargs["row_end"] - kwargs["row_start"])
        return init_rows(**kwargs)

    monkeypatch.setattr(flash_module, "init_rows", recording_init_rows)
    open_store(tmp_path / "s", num_rows=90, state=0).close()
    assert sizes == [32, 32, 26]


def test_writes_survive_close_and_reopen(tmp_path):
    store = open_store(tmp_path / "s")
    rows = np.array([3, 40, 17])
    records = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    store.write_rows(rows, records)
    untouched = store.read_rows(np.array([4]))
    store.close()
    reopened = open_store(tmp_path / "s")
    np.testing.assert_array_equal(reopened.read_rows(rows), records)
    np.testing.assert_array_equal(reopened.read_rows(np.array([4])), untouched)
    reopened.close()


def test_reopening_with_another_shape_names_the_mismatch(tmp_path):
    open_store(tmp_path / "s").close()
    with pytest.raises(ShardFileError, match="num_rows: file 50 != expected 51"):
        open_store(tmp_path / "s", num_rows=51)


def test_an_interrupted_init_is_redone(tmp_path):
    store = open_store(tmp_path / "s")
    initial = store.read_rows(np.array([5]))
    store.write_rows(np.array([5]), np.full((1, 16), 9.0, dtype=np.float32))
    store.close()
    with open(tmp_path / "s", "r+b") as f:  # clear the header's "complete" flag
        f.seek(12)
        f.write(b"\0\0\0\0")
    store = open_store(tmp_path / "s")
    np.testing.assert_array_equal(store.read_rows(np.array([5])), initial)
    store.close()


def test_reads_are_whole_pages_and_coalesced(tmp_path):
    store = open_store(tmp_path / "s", merge_gap_bytes=0)  # 64-byte rows, 8 rows per page
    store.read_rows(np.array([0, 1, 8, 9, 40]))  # pages 0, 1, 5
    assert store.counters.pages_read == 3
    assert store.counters.bytes_read == 3 * 512
    assert store.counters.read_batches == 1
    assert store.counters.read_requests == 2  # pages 0-1 in one request, page 5 in another
    store.close()


def test_fill_gaps_adds_exactly_the_gaps_up_to_the_limit():
    blocks = np.array([3, 4, 7, 21, 23])
    np.testing.assert_array_equal(fill_gaps(blocks, 3), [3, 4, 5, 6, 7, 21, 22, 23])
    np.testing.assert_array_equal(fill_gaps(blocks, 1), [3, 4, 7, 21, 22, 23])
    np.testing.assert_array_equal(fill_gaps(blocks, 0), blocks)
    np.testing.assert_array_equal(fill_gaps(blocks, 13), np.arange(3, 24))


def test_small_gaps_are_read_in_the_same_request_and_counted_as_pages(tmp_path):
    store = open_store(tmp_path / "s", merge_gap_bytes=2 * 512)  # gaps of <= 2 pages merge
    store.read_rows(np.array([0, 24, 48]))  # pages 0, 3, 6: gaps of 2 pages each
    assert store.counters.read_requests == 1
    assert store.counters.pages_read == 7
    store.read_rows(np.array([0, 32]))  # pages 0, 4: a gap of 3 pages stays a gap
    assert store.counters.read_requests == 3
    assert store.counters.pages_read == 7 + 2
    store.close()


def test_merged_writes_leave_the_gap_rows_as_they_were(tmp_path):
    """A write merged across a gap rewrites the gap pages with what they hold, and a
    random mix of merged reads and writes always returns what a plain array holds."""
    rng = np.random.default_rng(4)
    store = open_store(tmp_path / "s", num_rows=400, merge_gap_bytes=3 * 512)
    oracle = store.read_rows(np.arange(400))
    for _ in range(40):
        rows = np.unique(rng.integers(0, 400, rng.integers(1, 30)))
        if rng.random() < 0.5:
            records = rng.standard_normal((rows.size, 16)).astype(np.float32)
            store.write_rows(rows, records)
            oracle[rows] = records
        else:
            np.testing.assert_array_equal(store.read_rows(rows), oracle[rows])
    assert store.counters.pages_written > store.counters.write_batches  # merging happened
    store.close()
    reopened = open_store(tmp_path / "s", num_rows=400, merge_gap_bytes=0)
    np.testing.assert_array_equal(reopened.read_rows(np.arange(400)), oracle)
    reopened.close()


def test_emulated_flash_delay_is_computed_from_bytes(tmp_path):
    emulation = EmulationConfig(flash_read_bandwidth_mbps=100.0, flash_read_latency_us=50.0)
    store = open_store(tmp_path / "s", emulation=emulation)
    store.read_rows(np.array([0]))  # one 512-byte page
    assert store.counters.emulated_delay_s == pytest.approx(50e-6 + 512 / 100e6)
    store.close()


def test_emulation_is_off_by_default(tmp_path):
    store = open_store(tmp_path / "s")
    store.write_rows(np.array([0]), np.ones((1, 16), dtype=np.float32))
    store.read_rows(np.arange(50))
    assert store.counters.emulated_delay_s == 0.0
    store.close()


def test_writes_count_whole_pages_delay_and_energy(tmp_path):
    emulation = EmulationConfig(flash_write_bandwidth_mbps=10.0, flash_write_latency_us=200.0)
    store = open_store(tmp_path / "s", emulation=emulation)
    store.write_rows(np.array([1, 2]), np.ones((2, 16), dtype=np.float32))  # both in page 0
    flash = store.counters
    assert (flash.bytes_written, flash.pages_written, flash.write_batches) == (512, 1, 1)
    assert (flash.bytes_read, flash.pages_read) == (512, 1)  # read-modify-write of the page
    assert flash.emulated_delay_s == pytest.approx(200e-6 + 512 / 10e6)
    energy = EnergyConfig()
    expected = (
        512 * energy.flash_read_pj_per_byte
        + 512 * energy.flash_write_pj_per_byte
        + 2 * energy.flash_pj_per_page
    )
    assert energy_pj(CacheCounters(), flash, energy) == pytest.approx(expected)
    store.close()


def test_link_delay_helper_uses_the_link_bandwidth():
    assert link_delay_s(EmulationConfig(), 10**6) == 0.0
    assert link_delay_s(EmulationConfig(link_bandwidth_mbps=1000.0), 10**6) == pytest.approx(1e-3)
    assert transfer_delay_s(0, None, 20.0) == pytest.approx(20e-6)


def test_odirect_reads_and_writes_whole_aligned_pages(tmp_path):
    try:
        store = open_store(tmp_path / "s", use_odirect=True)
    except ShardFileError as exc:  # e.g. tmpfs: the error says what to change
        assert "O_DIRECT" in str(exc)
        pytest.skip(f"file system refuses O_DIRECT: {exc}")
    records = np.ones((2, 16), dtype=np.float32)
    store.write_rows(np.array([1, 30]), records)
    np.testing.assert_array_equal(store.read_rows(np.array([30, 1])), records)
    store.close()


def test_a_write_back_of_rows_just_read_while_holding_reads_skips_the_re_read(tmp_path):
    store = open_store(tmp_path / "s", merge_gap_bytes=0)  # 8 rows per 512-byte block
    rows = np.array([1, 9, 30])  # blocks 0, 1, 3
    records = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    with store.holding_reads():
        store.read_rows(rows)
        pages = store.counters.pages_read
        store.write_rows(rows, records)
        assert store.counters.pages_read == pages, "the held blocks were not read again"
    store.write_rows(rows, records)
    assert store.counters.pages_read == pages + 3, "outside the block a write reads its pages"
    store.close()
    reopened = open_store(tmp_path / "s")
    np.testing.assert_array_equal(reopened.read_rows(rows), records)
    reopened.close()


def test_held_blocks_follow_every_write_so_a_later_write_keeps_the_earlier_one(tmp_path):
    store = open_store(tmp_path / "s")
    rng = np.random.default_rng(2)
    first, second = (rng.standard_normal((1, 16)).astype(np.float32) for _ in range(2))
    neighbour_before = store.read_rows(np.array([5]))
    with store.holding_reads():
        store.read_rows(np.array([4, 5]))  # block 0 held
        store.write_rows(np.array([5]), first)  # e.g. an eviction's write-back into block 0
        store.write_rows(np.array([4]), second)  # from the held copy: must include row 5's write
    store.close()
    reopened = open_store(tmp_path / "s")
    np.testing.assert_array_equal(reopened.read_rows(np.array([5])), first)
    np.testing.assert_array_equal(reopened.read_rows(np.array([4])), second)
    assert not np.array_equal(neighbour_before, first)
    reopened.close()


def test_a_write_partly_over_held_blocks_reads_only_the_others_and_nests_in_an_outer_hold(
    tmp_path,
):
    store = open_store(tmp_path / "s", merge_gap_bytes=0)  # 8 rows per 512-byte block
    rng = np.random.default_rng(3)
    records = rng.standard_normal((4, 16)).astype(np.float32)
    rows = np.array([2, 10, 17, 40])  # blocks 0, 1, 2, 5
    neighbours = store.read_rows(np.array([3, 11, 41]))  # rows that share those blocks
    with store.holding_reads():
        store.read_rows(np.array([1, 9]))  # blocks 0 and 1 held
        with store.holding_reads():  # nested (a fetch inside an update): holds into the outer
            pages = store.counters.pages_read
            store.write_rows(rows, records)
            assert store.counters.pages_read == pages + 2, "only blocks 2 and 5 come from disk"
            assert store.counters.blocks_from_held == 2
        store.write_rows(rows[:1], records[:1] + 1)  # block 0 from the write just held
        assert store.counters.pages_read == pages + 2
    store.close()
    reopened = open_store(tmp_path / "s")
    np.testing.assert_array_equal(reopened.read_rows(rows[1:]), records[1:])
    np.testing.assert_array_equal(reopened.read_rows(rows[:1]), records[:1] + 1)
    np.testing.assert_array_equal(reopened.read_rows(np.array([3, 11, 41])), neighbours)
    reopened.close()


def test_io_buffers_are_reused_by_size_class_and_the_pool_is_bounded():
    pool = IoBuffers(max_cached_bytes=8192)
    first = pool.take(5000)  # rounded up to 8 KiB
    assert len(first) == 8192
    pool.give(first)
    assert pool.take(6000) is first
    pool.give(first)
    pool.give(pool.take(4096))  # 8 KiB + 4 KiB cached would exceed the bound: dropped
    assert pool.take(4096) is not first and len(pool.take(8192)) == 8192


def test_two_shards_sharing_reused_buffers_never_see_each_others_bytes(tmp_path):
    """Buffers go back to one pool after each read and write (and after holding_reads):
    a mix of reads and writes on two shards, with and without holding, matches plain arrays."""
    rng = np.random.default_rng(5)
    stores = [
        open_store(tmp_path / f"s{k}", num_rows=300, row_start=k * 300, merge_gap_bytes=1024)
        for k in range(2)
    ]
    oracles = [store.read_rows(np.arange(300)) for store in stores]
    assert not np.array_equal(oracles[0], oracles[1])
    for _ in range(60):
        k = int(rng.integers(2))
        store, oracle = stores[k], oracles[k]
        rows = np.unique(rng.integers(0, 300, rng.integers(1, 40)))
        other = np.unique(rng.integers(0, 300, rng.integers(1, 40)))
        with store.holding_reads() if rng.random() < 0.5 else _no_hold():
            np.testing.assert_array_equal(store.read_rows(rows), oracle[rows])
            np.testing.assert_array_equal(stores[1 - k].read_rows(other), oracles[1 - k][other])
            np.testing.assert_array_equal(store.read_rows(other), oracle[other])
            records = rng.standard_normal((rows.size, 16)).astype(np.float32)
            store.write_rows(rows, records)
            oracle[rows] = records
            np.testing.assert_array_equal(store.read_rows(rows), records)
    for store, oracle in zip(stores, oracles, strict=True):
        np.testing.assert_array_equal(store.read_rows(np.arange(300)), oracle)
        store.close()


@contextlib.contextmanager
def _no_hold():
    yield


def test_a_detached_read_names_the_rows_written_since_it_began(tmp_path):
    store = open_store(tmp_path / "s", merge_gap_bytes=0)  # 8 rows per block
    before = store.read_rows(np.arange(50))
    reader = store.detached_read()
    records = reader.read(np.array([1, 9, 17]))  # blocks 0, 1, 2
    store.write_rows(np.array([10]), np.ones((1, 16), dtype=np.float32))  # block 1
    np.testing.assert_array_equal(records, before[[1, 9, 17]])
    np.testing.assert_array_equal(reader.finish(np.array([1, 9, 17])), [False, True, False])
    later = store.detached_read()  # no read open in between: the old write is forgotten
    assert not later.finish(np.array([9])).any()
    store.close()


def test_close_waits_for_a_detached_read_in_flight(tmp_path, monkeypatch):
    import threading

    copy = open_store(tmp_path / "copy")
    expected = copy.read_rows(np.arange(50))
    copy.close()
    store = open_store(tmp_path / "s")
    go = threading.Event()
    original = FlashStore._read_blocks

    def read_when_told(self, blocks):
        go.wait(30)
        return original(self, blocks)

    monkeypatch.setattr(FlashStore, "_read_blocks", read_when_told)
    reader = store.detached_read()
    got: list[np.ndarray] = []
    read = threading.Thread(target=lambda: got.append(reader.read(np.arange(50))))
    close = threading.Thread(target=store.close)
    read.start()
    close.start()
    close.join(0.2)
    assert close.is_alive(), "close returned while a read still needed the descriptor"
    go.set()
    read.join(30)
    close.join(30)
    reader.finish(np.arange(50))
    np.testing.assert_array_equal(got[0], expected)


def test_a_detached_read_that_never_ran_does_not_block_close(tmp_path):
    store = open_store(tmp_path / "s")
    reader = store.detached_read()
    reader.finish(np.array([0]))
    store.close()  # would wait forever if the unread reader still counted


def test_a_transfer_of_more_buffers_than_one_call_takes_moves_every_byte_in_order(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    try:
        count = flash_module.IOV_MAX * 2 + 5  # three calls
        chunks = [bytes([i % 251]) * 16 for i in range(count)]
        flash_module.transfer_vectors(os.pwritev, fd, chunks, 32, path)
        back = [bytearray(16) for _ in range(count)]
        flash_module.transfer_vectors(os.preadv, fd, back, 32, path)
        assert [bytes(b) for b in back] == chunks
        # a read past the end names the file instead of returning short
        with pytest.raises(ShardFileError, match="ends at byte"):
            flash_module.transfer_vectors(os.preadv, fd, [bytearray(64)], 32 + 16 * count - 8, path)
    finally:
        os.close(fd)
