"""Shard files on a flash_dir: reused when made for this config, refused when made for another,
initialised in parallel chunks with progress and timing counters."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from ndp.model.init import init_rows
from storage_node import flash as flash_module
from storage_node.errors import ShardFileError
from storage_node.flash import FlashStore


def open_store(path, *, seed=3, table_num_rows=100, dim=8, state=8, num_rows=50, **kwargs):
    return FlashStore(
        path,
        table_name="t",
        table_num_rows=table_num_rows,
        row_start=10,
        num_rows=num_rows,
        embedding_dim=dim,
        state_width=state,
        seed=seed,
        page_bytes=512,
        io_threads=2,
        **kwargs,
    )


def test_a_file_of_the_same_config_is_reused_not_rewritten(tmp_path):
    path = tmp_path / "s"
    store = open_store(path)
    assert store.counters.files_initialised == 1 and store.counters.files_reused == 0
    assert store.counters.init_bytes_written == store.layout.file_bytes
    rows = np.array([0, 7, 49])
    trained = np.full((3, 16), 0.25, dtype=np.float32)
    store.write_rows(rows, trained)
    store.close()
    modified = os.stat(path).st_mtime_ns

    again = open_store(path)
    assert again.counters.files_reused == 1 and again.counters.files_initialised == 0
    assert again.counters.init_bytes_written == 0
    np.testing.assert_array_equal(again.read_rows(rows), trained)  # a rewrite would lose them
    again.close()
    assert os.stat(path).st_mtime_ns == modified


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"seed": 4}, "seed: file 3 != expected 4"),
        ({"table_num_rows": 200}, "table_num_rows: file 100 != expected 200"),
        ({"num_rows": 60}, "num_rows: file 50 != expected 60"),
        ({"dim": 4, "state": 12}, "embedding_dim: file 8 != expected 4"),
    ],
)
def test_a_file_made_for_another_config_is_refused_naming_what_differs(tmp_path, change, named):
    path = tmp_path / "s"
    open_store(path).close()
    before = path.read_bytes()
    with pytest.raises(ShardFileError) as error:
        open_store(path, **change)
    message = str(error.value)
    assert named in message and str(path) in message and "another config" in message
    assert "delete the file" in message
    assert path.read_bytes() == before, "a refused file is left as it was"


def test_a_version_1_file_is_reused_on_its_shape(tmp_path):
    path = tmp_path / "s"
    open_store(path).close()
    with open(path, "r+b") as f:  # rewrite the header as version 1 wrote it (no seed)
        head = bytearray(f.read(512))
        fields = list(flash_module._HEADER.unpack_from(head, 0))
        head[: flash_module._HEADER.size] = bytes(flash_module._HEADER.size)
        flash_module._HEADER_V1.pack_into(head, 0, fields[0], 1, *fields[2:9])
        f.seek(0)
        f.write(head)
    store = open_store(path, seed=99)
    assert store.counters.files_reused == 1
    store.close()


def test_an_unknown_format_version_is_refused(tmp_path):
    path = tmp_path / "s"
    open_store(path).close()
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", 7))
    with pytest.raises(ShardFileError, match="format version 7"):
        open_store(path)


@pytest.mark.parametrize(("dim", "state"), [(16, 0), (8, 8), (12, 1), (100, 60)])
def test_parallel_chunked_init_writes_the_shared_initialiser_rows(
    tmp_path, monkeypatch, dim, state
):
    monkeypatch.setattr(flash_module, "INIT_CHUNK_BYTES", 1024)  # several chunks per file
    monkeypatch.setattr(flash_module, "init_threads", lambda: 3)
    store = open_store(tmp_path / "s", dim=dim, state=state, num_rows=97, table_num_rows=200)
    records = store.read_rows(np.arange(97))
    expected = init_rows(
        seed=3, table_name="t", num_rows=200, embedding_dim=dim, row_start=10, row_end=107
    )
    np.testing.assert_array_equal(records[:, :dim], expected)
    assert (records[:, dim:] == 0).all()
    store.close()


def test_init_padding_is_zero_even_from_a_reused_buffer(tmp_path, monkeypatch):
    dirty = flash_module.IO_BUFFERS.take(4096)
    dirty[:] = b"\xff" * len(dirty)
    flash_module.IO_BUFFERS.give(dirty)
    monkeypatch.setattr(flash_module, "INIT_CHUNK_BYTES", 4096)
    store = open_store(tmp_path / "s", dim=12, state=1, num_rows=20)  # 52 B rows: 44 B pad
    store.close()
    raw = np.frombuffer((tmp_path / "s").read_bytes()[512:], dtype=np.uint8).reshape(-1, 512)
    assert (raw[:, 9 * 52 :] == 0).all()


def test_a_long_init_reports_progress_and_its_rate(tmp_path, monkeypatch):
    monkeypatch.setattr(flash_module, "INIT_CHUNK_BYTES", 1024)
    monkeypatch.setattr(flash_module, "INIT_PROGRESS_INTERVAL_S", 0.0)
    lines: list[str] = []
    store = open_store(tmp_path / "s", num_rows=80, report=lines.append)
    store.close()
    assert lines and all("s:" in line for line in lines)
    assert any("%" in line and "MB/s" in line for line in lines[:-1])
    assert lines[-1].startswith("initialised s:") and "MB/s" in lines[-1]
    assert store.counters.init_seconds > 0


def test_reads_count_their_seconds_and_queue_depth(tmp_path):
    store = open_store(tmp_path / "s", num_rows=50, merge_gap_bytes=0)
    store.read_rows(np.array([0, 20, 40]))  # 8 rows per 512 B block: 3 runs, 2 threads
    counters = store.counters
    assert counters.read_requests == 3 and counters.read_depth_sum == 3 * 2
    assert counters.read_seconds > 0
    store.close()
