"""The `beyond_ram` scenario of `ndp-bench train`: table state larger than the machine.

Sizes come from the machine's physical memory (or a figure given for tests and small runs):
the Criteo shape is scaled until the embedding state is at least `factor` (2) times it, so
no page cache, node cache or process can hold it. Every system reads the same shard files
in `BenchOptions.flash_dir`:

    ndp, ndp_lookahead   storage nodes, O_DIRECT, caches at 1% and 5% of the state
    os_paged             the same files memory-mapped past their header page (an SGD row of
                         dim 16 is 64 B, so a 4 KiB block holds 64 rows and no padding: the
                         file after the header is the table's [rows, 16] float32 array),
                         in a memory cgroup with the nodes' DRAM budget, advised
                         MADV_RANDOM (with the default read-around, a small run read 25 MB
                         per sample: every fault pulled in pages the budget then dropped)

    shard file:  | header page | rows 0..63 | rows 64..127 | ...   (storage_node.flash)
    os_paged:                  ^ np.memmap(offset=page_bytes, shape=(rows, 16))

Why one set of files: the state is half the disk here; a second copy for os_paged would not
fit, and both systems then read exactly the same bytes. A later run with the same
flash_dir and seed reuses the files (the nodes find them complete); a file made for another
config is refused by the node (`storage_node.flash`).

The device probe (`ndp.bench.device_probe`) reads those files at queue depths 1, 16, 64, and
each ndp run's flash reads are set beside it at the depth the node's reads ran at.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ndp.bench.device_probe import ProbeResult
from ndp.errors import ConfigError

CACHE_FRACTIONS = {"beyond_ram_1pct": 0.01, "beyond_ram_5pct": 0.05}
"""Result name of each run -> node cache budget as a fraction of the embedding state."""
DEFAULT_FLASH_DIR = "/var/tmp/ndp-beyond-ram"
_SHARD_NAME = re.compile(r"^(?P<node>[^.]+)\.(?P<table>[^.]+)\.(?P<start>\d+)-(?P<end>\d+)\.shard$")


def physical_memory_bytes() -> int:
    """This machine's physical memory (what the scenario must exceed)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def beyond_ram_rows(shape: tuple[int, ...], row_bytes: int, state_bytes: int) -> list[int]:
    """Rows per table: `shape` scaled (up, or down for a small run; at least one row each)
    so that the state, rows x `row_bytes`, is at least `state_bytes`."""
    target_rows = -(-state_bytes // row_bytes)
    scale = target_rows / sum(shape)
    rows = [max(1, math.ceil(n * scale)) for n in shape]
    assert sum(rows) * row_bytes >= state_bytes
    return rows


def beyond_ram_config(
    base: dict, *, rows: list[int], cache_fraction: float, flash_dir: str, num_nodes: int
) -> dict:
    """`base` (a scenario's raw config) with the tables resized to `rows`, the node caches
    at `cache_fraction` of the state, and the shard files kept in `flash_dir`."""
    raw = {**base, "model": dict(base["model"]), "storage": dict(base["storage"])}
    raw["cluster"] = dict(base["cluster"])
    raw["model"]["tables"] = [
        {**table, "num_rows": n} for table, n in zip(base["model"]["tables"], rows, strict=True)
    ]
    dim = base["model"]["tables"][0]["embedding_dim"]
    state = sum(rows) * dim * 4
    raw["storage"].update(
        cache_bytes=max(4096, int(state * cache_fraction) // num_nodes),
        flash_dir=flash_dir,
        use_odirect=True,
        cache_policy="hot+lfu",
    )
    per_node = -(-state // num_nodes)
    capacity = raw["cluster"].get("node_capacity_bytes", 0)
    raw["cluster"]["node_capacity_bytes"] = max(capacity, 2 * per_node, 64 << 30)
    return raw


@dataclass(frozen=True)
class ShardPiece:
    """One shard file as os_paged maps it: rows [row_start, row_end) of `table`."""

    table: str
    row_start: int
    row_end: int
    path: str
    offset: int
    """Bytes before row 0 (the header page)."""


def shard_pieces(flash_dir: Path, tables: dict[str, int], page_bytes: int) -> list[ShardPiece]:
    """The shard files in `flash_dir` of the tables named in `tables` ({name: num_rows}),
    checked to cover each table exactly once.

    Raises:
        ConfigError: a table's files leave rows uncovered or overlap (files of another
            config's plan share the directory).
    """
    pieces = []
    for path in sorted(Path(flash_dir).glob("*.shard")):
        match = _SHARD_NAME.match(path.name)
        if match is None or match["table"] not in tables:
            continue
        start, end = int(match["start"]), int(match["end"])
        pieces.append(ShardPiece(match["table"], start, end, str(path), page_bytes))
    for table, num_rows in tables.items():
        spans = sorted((p.row_start, p.row_end) for p in pieces if p.table == table)
        covered = [0] + [end for _, end in spans]
        if [start for start, _ in spans] != covered[:-1] or covered[-1] != num_rows:
            raise ConfigError(
                f"--flash-dir {flash_dir}: the shard files of table {table} cover rows "
                f"{spans}, not [0, {num_rows}) once (files of another size's run are there); "
                "remove them or give another --flash-dir"
            )
    return pieces


def flash_rate(nodes: list[dict[str, Any]], probe: ProbeResult, io_threads: int) -> dict:
    """Each node's flash reads over a timed window against the probe at the same depth.

    The ratio is in requests per second (a node's request reads its wanted blocks and the
    gaps merged with them, so it moves more than 4 KiB: its bytes per second against the
    probe's 4 KiB bandwidth would flatter it); the ratio in bytes is kept beside it. The
    read seconds are the wall time of each batch's reads, so the rate is the one reached
    while reading, not diluted by the rest of the step.

    Args:
        nodes: per node, the change over the window of `flash_read_requests`,
            `flash_read_seconds`, `flash_read_depth_sum` and `flash_bytes_read`.
    """
    per_node = []
    for index, node in enumerate(nodes):
        requests, seconds = node["flash_read_requests"], node["flash_read_seconds"]
        if not requests or seconds <= 0:
            per_node.append({"node": index, "requests": 0})
            continue
        depth = node["flash_read_depth_sum"] / requests
        matched = probe.at_depth(depth)
        iops = requests / seconds
        per_node.append(
            {
                "node": index,
                "requests": requests,
                "read_seconds": seconds,
                "iops": iops,
                "mb_per_s": node["flash_bytes_read"] / seconds / 1e6,
                "mean_request_kib": node["flash_bytes_read"] / requests / 1024,
                "queue_depth": depth,
                "probe_queue_depth": matched.queue_depth,
                "probe_iops": matched.iops,
                "probe_mb_per_s": matched.mb_per_s,
                "probe_latency_us": matched.mean_latency_us,
                "request_wall_us": seconds * depth / requests * 1e6,
                "ratio": iops / matched.iops,
                "mb_ratio": node["flash_bytes_read"] / seconds / 1e6 / matched.mb_per_s,
                "limit": _gap_reason(depth, io_threads, node, requests, seconds, matched),
            }
        )
    measured = [n["ratio"] for n in per_node if "ratio" in n]
    return {"per_node": per_node, "worst_ratio": min(measured) if measured else None}


def _gap_reason(depth, io_threads, node, requests, seconds, matched) -> str:
    """What keeps a node's reads below the probe: depth, merged requests, or per-request CPU."""
    kib = node["flash_bytes_read"] / requests / 1024
    wall_us = seconds * depth / requests * 1e6
    reasons = []
    if depth < 0.5 * io_threads:
        reasons.append(
            f"queue depth: {depth:.1f} runs in flight per read batch (io_threads {io_threads})"
        )
    if kib > 6:
        reasons.append(f"merging: requests average {kib:.1f} KiB (gaps read with them)")
    reasons.append(
        f"per request {wall_us:.0f} us in flight vs the probe's {matched.mean_latency_us:.0f} us "
        f"(the difference is the node's CPU per request: Python, thread hand-off, packing)"
    )
    return "; ".join(reasons)


def flash_rate_lines(name: str, rate: dict) -> list[str]:
    """Target 2's line for one run, then one line per node."""
    worst = rate["worst_ratio"]
    if worst is None:
        return [f"{name}: flash read rate not measured (no flash reads in the timed steps)"]
    verdict = "met" if worst >= 0.5 else f"MISSED ({worst / 0.5:.0%} of target)"
    lines = [f"{name}: nodes' flash read rate / probe at matched depth {worst:.2f}x (worst node; "
             f"target >= 0.5x) {verdict}"]  # fmt: skip
    for node in rate["per_node"]:
        if "ratio" not in node:
            lines.append(f"  node {node['node']}: no flash reads")
            continue
        lines.append(
            f"  node {node['node']}: {node['iops']:,.0f} req/s ({node['mb_per_s']:,.1f} MB/s, "
            f"{node['mean_request_kib']:.1f} KiB/request) at qd {node['queue_depth']:.1f} vs "
            f"probe {node['probe_iops']:,.0f} IOPS ({node['probe_mb_per_s']:,.1f} MB/s) at qd "
            f"{node['probe_queue_depth']} = {node['ratio']:.2f}x in requests "
            f"({node['mb_ratio']:.2f}x in bytes); limits: {node['limit']}"
        )
    return lines


def init_line(init: dict, probe: ProbeResult) -> str:
    """Target 3: the shard initialisation's rate against the probe's sequential write.

    The time is the slowest node's (nodes make their files at the same time) summed over
    its files, measured around the writes: the engine's start (Ray actors, gRPC) is not
    part of it and is printed beside it."""
    if init["bytes_written"] == 0:
        return (
            f"3. shard init: reused {init['files_reused']} files in {init['flash_dir']} "
            f"({init['state_bytes'] / 1e9:.2f} GB), nothing rewritten; engine up in "
            f"{init['seconds']:.1f} s"
        )
    seconds = max(init["node_init_seconds"])
    rate = init["bytes_written"] / seconds / 1e6
    ratio = rate / probe.seq_write_mb_per_s
    verdict = "met" if ratio >= 0.5 else f"MISSED ({ratio / 0.5:.0%} of target)"
    return (
        f"3. shard init: {init['bytes_written'] / 1e9:.2f} GB in {seconds:.1f} s = "
        f"{rate:,.0f} MB/s vs probe sequential write {probe.seq_write_mb_per_s:,.0f} MB/s = "
        f"{ratio:.2f}x (target >= 0.5x) {verdict}; {init['files_initialised']} files made, "
        f"{init['files_reused']} reused; engine up in {init['seconds']:.1f} s"
    )


def speedup_line(systems: dict[str, dict[str, Any]]) -> str:
    """Target 1: beyond_ram at 5%, ndp_lookahead against os_paged."""
    name = "1. beyond_ram cache 5%: ndp_lookahead / os_paged"
    try:
        top = systems["ndp_lookahead"]["beyond_ram_5pct"]
        bottom = systems["os_paged"]["beyond_ram_5pct"]
    except KeyError:
        return f"{name}: not measured"
    if not bottom.get("memory_limit", {}).get("applied", False):
        why = bottom.get("memory_limit", {}).get("note", "no memory limit could be applied")
        return f"{name}: not comparable (os_paged ran with unlimited memory: {why})"
    got = top["samples_per_s"] / bottom["samples_per_s"]
    verdict = "met" if got >= 3.0 else f"MISSED ({got / 3.0:.0%} of target)"
    return f"{name}: {got:.2f}x (target >= 3x) {verdict}"
