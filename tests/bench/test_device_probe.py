"""The device probe: random 4 KiB O_DIRECT reads per queue depth and a sequential write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tmpfs_mounts import tmpfs_mounts

from ndp.bench.device_probe import BLOCK_BYTES, probe_device, random_reads, sequential_write


def _file(path: Path, num_bytes: int) -> Path:
    path.write_bytes(os.urandom(num_bytes))
    return path


def test_probe_reports_each_depth_and_the_sequential_write(tmp_path):
    files = [_file(tmp_path / "a.shard", 1 << 20), _file(tmp_path / "b.shard", 3 << 20)]
    result = probe_device(
        files,
        tmp_path,
        depths=(1, 4),
        seconds_per_depth=0.2,
        max_reads_per_depth=400,
        write_bytes=4 << 20,
    )
    assert [r.queue_depth for r in result.random_read] == [1, 4]
    for r in result.random_read:
        assert 0 < r.reads <= 400
        assert r.iops == pytest.approx(r.reads / r.seconds)
        assert r.mb_per_s == pytest.approx(r.iops * BLOCK_BYTES / 1e6)
    assert result.seq_write_mb_per_s > 0 and result.seq_write_bytes == 4 << 20
    assert result.read_span_bytes == 4 << 20
    assert not list(tmp_path.glob(".ndp-device-probe-*")), "the write probe's file is removed"
    assert len(result.lines()) == 1 + 2 + 1


def test_probe_uses_odirect_on_a_disk_file_system(tmp_path):
    if Path(tmp_path).resolve().as_posix().startswith("/dev/shm"):
        pytest.skip("tmp_path is on tmpfs here")
    path = _file(tmp_path / "a.shard", 1 << 20)
    _, odirect, note = random_reads([path], 2, seconds=0.1, max_reads=64)
    assert odirect and note == ""


def test_probe_falls_back_to_buffered_io_where_odirect_is_refused(tmp_path):
    with tmpfs_mounts(tmp_path) as mount:
        directory = mount(8 << 20)
        path = _file(directory / "a.shard", 1 << 20)
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
            pytest.skip("this kernel's tmpfs takes O_DIRECT (Linux >= 6.6): nothing refuses it")
        except OSError:
            pass
        result, odirect, note = random_reads([path], 2, seconds=0.1, max_reads=64)
        assert not odirect and "O_DIRECT" in note and str(directory) in note
        assert result.reads > 0
        _, odirect, note = sequential_write(directory, 1 << 20)
        assert not odirect and "buffered" in note


def test_matched_depth_is_the_nearest_measured_one(tmp_path):
    path = _file(tmp_path / "a.shard", 1 << 20)
    result = probe_device(
        [path],
        tmp_path,
        depths=(1, 16, 64),
        seconds_per_depth=0.05,
        max_reads_per_depth=64,
        write_bytes=1 << 20,
    )
    assert result.at_depth(1).queue_depth == 1
    assert result.at_depth(12).queue_depth == 16
    assert result.at_depth(40).queue_depth == 64
    assert result.at_depth(500).queue_depth == 64


def test_random_reads_refuse_files_with_nothing_to_read(tmp_path):
    with pytest.raises(ValueError, match="nothing to read"):
        random_reads([_file(tmp_path / "tiny", 100)], 1, seconds=0.1, max_reads=8)
