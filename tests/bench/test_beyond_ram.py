"""The beyond_ram scenario at small sizes: sizing from a memory figure, its config, os_paged
on the nodes' own shard files, the flash-rate comparison with the probe, and a flash_dir
without room refused before anything is written."""

from __future__ import annotations

import copy
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from ndp.bench import beyond_ram
from ndp.bench.baselines import _mapped_shard_files
from ndp.bench.device_probe import DepthResult, ProbeResult
from ndp.bench.train import CRITEO_ROWS, ROW_BYTES, SCENARIOS, BenchOptions, scenario_config
from ndp.cli.bench import _scenarios, build_parser
from ndp.config import StorageConfig, config_from_dict
from ndp.errors import ConfigError
from ndp.plan import ShardSpec
from ndp.planner import shards_for
from storage_node.errors import FlashDirError
from storage_node.shard_files import creating_shard_files, file_stem, open_shard_file

GIB = 1 << 30


def _config(memory_bytes: int, fraction: float = 0.05, flash_dir: str = "/unused") -> dict:
    options = BenchOptions().scaled(0.05)
    rows = beyond_ram.beyond_ram_rows(CRITEO_ROWS, ROW_BYTES, 2 * memory_bytes)
    base = scenario_config(options, "large_zipf")
    return beyond_ram.beyond_ram_config(
        base, rows=rows, cache_fraction=fraction, flash_dir=flash_dir, num_nodes=2
    )


@pytest.mark.parametrize("memory_bytes", [23 * GIB, 256 * GIB, 5_000_000])
def test_state_is_at_least_twice_the_memory_figure(memory_bytes):
    rows = beyond_ram.beyond_ram_rows(CRITEO_ROWS, ROW_BYTES, 2 * memory_bytes)
    state = sum(rows) * ROW_BYTES
    assert 2 * memory_bytes <= state <= 2 * memory_bytes * 1.001 + len(rows) * ROW_BYTES
    largest = CRITEO_ROWS.index(max(CRITEO_ROWS))
    assert rows.index(max(rows)) == largest  # the Criteo shape, scaled
    assert min(rows) >= 1


def test_physical_memory_is_read_from_the_machine():
    with open("/proc/meminfo") as meminfo:
        total_kib = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1])
    assert beyond_ram.physical_memory_bytes() == pytest.approx(total_kib * 1024, rel=0.02)


@pytest.mark.parametrize("fraction", list(beyond_ram.CACHE_FRACTIONS.values()))
def test_config_reads_odirect_with_caches_at_the_fraction_of_the_state(fraction):
    raw = _config(8 * GIB, fraction, flash_dir="/var/tmp/x")
    cfg = config_from_dict(copy.deepcopy(raw))
    state = sum(t.num_rows for t in cfg.model.effective_tables()) * ROW_BYTES
    budget = cfg.storage.cache_bytes * cfg.cluster.num_storage_nodes
    assert budget == pytest.approx(fraction * state, rel=1e-6)
    assert cfg.storage.use_odirect and cfg.storage.flash_dir == "/var/tmp/x"
    assert 1.05 <= cfg.data.synthetic.zipf_exponent <= 1.2
    assert cfg.cluster.node_capacity_bytes * cfg.cluster.num_storage_nodes >= state


def test_beyond_ram_runs_only_when_named():
    assert "beyond_ram" not in BenchOptions().scenarios
    assert "beyond_ram" not in BenchOptions.quick().scenarios
    assert "beyond_ram" not in SCENARIOS
    assert _scenarios("beyond_ram") == ["beyond_ram"]
    args = build_parser().parse_args(
        [
            "train",
            "--scenarios",
            "beyond_ram",
            "--flash-dir",
            "/d",
            "--beyond-ram-memory-bytes",
            "9",
        ]
    )
    assert (args.flash_dir, args.beyond_ram_memory_bytes) == ("/d", 9)


def test_a_flash_dir_without_room_fails_before_anything_is_written(tmp_path):
    stat = os.statvfs(tmp_path)
    free = stat.f_bavail * stat.f_frsize
    flash_dir = tmp_path / "flash"
    cfg = config_from_dict(_config(2 * free, flash_dir=str(flash_dir)))  # state: 4x free
    shards = shards_for(cfg, 0, None)
    with pytest.raises(FlashDirError) as error:
        with creating_shard_files(flash_dir, "0", shards, optimizer="sgd", storage=cfg.storage):
            pytest.fail("the node's files were opened")
    message = str(error.value)
    assert str(flash_dir) in message and "bytes free" in message
    needed = int(message.split(" need ")[1].split(" bytes")[0].replace(",", ""))
    assert needed > free
    assert not flash_dir.exists(), "nothing is created"


def _pieces(tmp_path, bounds: list[int], num_rows: int) -> list:
    storage = StorageConfig(page_bytes=4096)
    for node, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        spec = ShardSpec("t7", num_rows, 16, start, end, "sum", ("cat_7",))
        open_shard_file(tmp_path, str(node), spec, optimizer="sgd", seed=5, storage=storage).close()
    return beyond_ram.shard_pieces(tmp_path, {"t7": num_rows}, 4096)


def test_os_paged_maps_the_nodes_shard_files_row_for_row(tmp_path):
    num_rows, bounds = 1000, [0, 300, 1000]
    pieces = _pieces(tmp_path, bounds, num_rows)
    assert [(p.row_start, p.row_end) for p in pieces] == [(0, 300), (300, 1000)]
    cfg = config_from_dict(
        {
            "model": {
                "tables": [
                    {"name": "t7", "num_rows": num_rows, "embedding_dim": 16, "features": ["cat_7"]}
                ]
            }
        }  # fmt: skip
    )
    table = _mapped_shard_files(cfg, [asdict(p) for p in pieces])["t7"]
    rows = np.array([0, 5, 299, 300, 301, 999])
    storage = StorageConfig(page_bytes=4096)
    specs = [ShardSpec("t7", num_rows, 16, s, e, "sum", ("cat_7",)) for s, e in [(0, 300), (300, 1000)]]  # fmt: skip
    stores = [
        open_shard_file(tmp_path, str(n), spec, optimizer="sgd", seed=5, storage=storage)
        for n, spec in enumerate(specs)
    ]
    expected = np.concatenate(
        [stores[0].read_rows(rows[rows < 300]), stores[1].read_rows(rows[rows >= 300] - 300)]
    )
    np.testing.assert_array_equal(table[rows], expected)
    for store in stores:
        store.close()

    table[rows] = np.full((rows.size, 16), 7.0, dtype=np.float32)  # os_paged's SGD update
    table.flush()
    again = open_shard_file(tmp_path, "1", specs[1], optimizer="sgd", seed=5, storage=storage)
    assert again.counters.files_reused == 1  # the header page is untouched
    np.testing.assert_array_equal(again.read_rows(np.array([0, 1, 699])), 7.0)
    again.close()


def _resident_pages(path) -> int:
    """Pages of `path` in the page cache (mincore over a fresh mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    size = os.path.getsize(path)
    with open(path, "r+b") as file:  # ctypes needs a writable buffer; nothing is written
        mapping = mmap.mmap(file.fileno(), 0)
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    first = ctypes.c_char.from_buffer(mapping)
    try:
        address = ctypes.c_void_p(ctypes.addressof(first))
        assert libc.mincore(address, ctypes.c_size_t(size), vec) == 0
        return sum(v & 1 for v in vec)
    finally:
        del first
        mapping.close()


def test_os_paged_starts_with_none_of_the_shard_files_in_the_page_cache(tmp_path):
    """Pages cached before os_paged maps the files (the nodes' buffered initialisation, an
    earlier round) are charged to other memory cgroups, out of reach of its budget: they are
    dropped before it maps them."""
    num_rows = 3000
    pieces = _pieces(tmp_path, [0, num_rows], num_rows)
    path = pieces[0].path
    Path(path).read_bytes()  # every page cached
    if _resident_pages(path) == 0:
        pytest.skip("this file system keeps no page cache for the file")
    cfg = config_from_dict(
        {"model": {"tables": [{"name": "t7", "num_rows": num_rows, "embedding_dim": 16,
                               "features": ["cat_7"]}]}}
    )  # fmt: skip
    if _file_system(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("tmpfs pages cannot be dropped: they are the file")
    _mapped_shard_files(cfg, [asdict(p) for p in pieces])
    assert _resident_pages(path) == 0


def _file_system(path) -> str:
    """Type of the file system `path` is on (the longest mount point above it)."""
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if str(Path(path).resolve()).startswith(mount) and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


def test_shard_files_of_another_size_in_the_flash_dir_are_refused(tmp_path):
    _pieces(tmp_path, [0, 300, 1000], 1000)
    (tmp_path / file_stem("1", ShardSpec("t7", 1000, 16, 300, 1000, "sum", ()))).unlink()
    with pytest.raises(ConfigError, match=r"table t7 cover rows \[\(0, 300\)\], not \[0, 1000\)"):
        beyond_ram.shard_pieces(tmp_path, {"t7": 1000}, 4096)


def _probe() -> ProbeResult:
    depths = [
        DepthResult(
            queue_depth=d,
            reads=n,
            seconds=1.0,
            iops=n,
            mb_per_s=n * 4096 / 1e6,
            mean_latency_us=lat,
        )  # fmt: skip
        for d, n, lat in [(1, 5_000, 200.0), (16, 40_000, 400.0), (64, 50_000, 1280.0)]
    ]
    return ProbeResult(
        directory="/d", odirect=True, random_read=depths, seq_write_mb_per_s=1000.0,
        seq_write_bytes=1 << 30, read_span_bytes=1 << 34,
    )  # fmt: skip


def _node(requests: int, seconds: float, depth: float, kib: float) -> dict:
    return {
        "flash_read_requests": requests,
        "flash_read_seconds": seconds,
        "flash_read_depth_sum": int(requests * depth),
        "flash_bytes_read": int(requests * kib * 1024),
    }


def test_flash_rate_sets_each_node_beside_the_probe_at_its_queue_depth():
    rate = beyond_ram.flash_rate(
        [_node(30_000, 1.0, 15.0, 4.0), _node(10_000, 1.0, 3.0, 12.0), _node(0, 0.0, 0, 0)],
        _probe(),
        io_threads=16,
    )
    first, second, idle = rate["per_node"]
    assert first["probe_queue_depth"] == 16 and first["ratio"] == pytest.approx(0.75)
    assert second["probe_queue_depth"] == 1 and second["ratio"] == pytest.approx(2.0)
    assert idle == {"node": 2, "requests": 0}
    assert rate["worst_ratio"] == pytest.approx(0.75)
    assert "queue depth" not in first["limit"] and "merging" not in first["limit"]
    assert (
        "queue depth: 3.0" in second["limit"]
        and "merging: requests average 12.0" in (second["limit"])
    )
    lines = beyond_ram.flash_rate_lines("2. ndp/beyond_ram_1pct", rate)
    assert "0.75x" in lines[0] and lines[0].endswith("met") and len(lines) == 4
    assert "(0.75x in bytes)" in lines[1]


def test_a_flash_rate_under_half_the_probe_is_missed_and_says_why():
    rate = beyond_ram.flash_rate([_node(8_000, 1.0, 16.0, 4.0)], _probe(), io_threads=16)
    line, node_line = beyond_ram.flash_rate_lines("2. ndp/x", rate)
    assert "0.20x" in line and "MISSED" in line
    assert "2000 us in flight vs the probe's 400 us" in node_line


def test_init_line_against_the_sequential_write_and_on_reuse():
    init = {"flash_dir": "/d", "state_bytes": 4 * 10**9, "seconds": 12.0,
            "node_init_seconds": [6.0, 8.0], "files_initialised": 26, "files_reused": 0,
            "bytes_written": 4 * 10**9}  # fmt: skip
    line = beyond_ram.init_line(init, _probe())
    assert "500 MB/s" in line and "0.50x" in line and line.endswith("engine up in 12.0 s")
    assert " met;" in line
    reused = beyond_ram.init_line({**init, "bytes_written": 0, "files_reused": 26}, _probe())
    assert "reused 26 files" in reused and "nothing rewritten" in reused


def test_speedup_is_not_claimed_without_a_memory_limit_on_os_paged():
    runs = {
        "ndp_lookahead": {"beyond_ram_5pct": {"samples_per_s": 900.0}},
        "os_paged": {"beyond_ram_5pct": {"samples_per_s": 100.0, "memory_limit": {}}},
    }
    assert "not comparable" in beyond_ram.speedup_line(runs)
    runs["os_paged"]["beyond_ram_5pct"]["memory_limit"] = {"applied": True}
    assert beyond_ram.speedup_line(runs).endswith("9.00x (target >= 3x) met")
    assert "not measured" in beyond_ram.speedup_line({"ndp_lookahead": {}, "os_paged": {}})
