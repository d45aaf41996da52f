"""Cache hit rates of the real `RowCache` policies against Belady's optimum, on one trace.

The replay drives `storage_node.cache.RowCache` exactly as a storage node does during
training: per step one `fetch` of the step's unique rows (hits judged against the state
before the step), then `on_step()` (where `hot+lfu` re-selects its pinned hot set). The cache
sits on a real `FlashStore` over the trace's distinct rows (dense ids, 4 floats per row, so
the file stays small); its byte budget is set so that it holds exactly `capacity_rows`.

Belady is computed at the same step granularity (`belady_hits_batched`, the fair ceiling)
and per access (`belady_hits`, the classical bound).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ndp.bench.belady import belady_hits, belady_hits_batched, unique_per_batch
from ndp.bench.traces import Trace
from storage_node.cache import RowCache, slot_bytes
from storage_node.flash import FlashStore

POLICIES = ("lru", "lfu", "hot+lfu")
REPLAY_DIM = 4
"""Row width of the replay's flash file: only hits matter, so rows are as small as allowed."""


def replay_policy(
    trace: Trace,
    *,
    policy: str,
    capacity_rows: int,
    hot_fraction: float,
    flash_dir: str | Path,
) -> dict:
    """Replay `trace` through a `RowCache` of `policy` holding `capacity_rows` rows.

    Returns:
        {"hits", "accesses", "hit_rate", "elapsed_s"}; accesses are the unique rows per step.
    """
    batch_ids, rows = unique_per_batch(trace.rows, trace.batch_offsets)
    num_rows = int(rows.max()) + 1 if rows.size else 1
    flash = FlashStore(
        Path(flash_dir) / f"replay-{policy}-{capacity_rows}.shard",
        table_name="replay",
        table_num_rows=num_rows,
        row_start=0,
        num_rows=num_rows,
        embedding_dim=REPLAY_DIM,
        state_width=0,
        seed=0,
        io_threads=1,
    )
    try:
        cache = RowCache(
            flash,
            capacity_bytes=capacity_rows * slot_bytes(flash.layout.row_bytes, num_rows),
            policy=policy,  # type: ignore[arg-type]
            hot_fraction=hot_fraction,
        )
        assert cache.capacity_rows == min(capacity_rows, num_rows)
        starts = np.searchsorted(batch_ids, np.arange(trace.batch_offsets.size), side="left")
        began = time.perf_counter()
        for step in range(trace.batch_offsets.size - 1):
            cache.fetch(rows[starts[step] : starts[step + 1]])
            cache.on_step()
        elapsed = time.perf_counter() - began
    finally:
        flash.close()
    counters = cache.counters
    accesses = counters.hits + counters.misses
    return {
        "hits": counters.hits,
        "accesses": accesses,
        "hit_rate": counters.hits / accesses if accesses else 0.0,
        "elapsed_s": elapsed,
    }


def hit_rate_point(
    trace: Trace, *, fraction: float, hot_fraction: float, per_access_belady: bool = True
) -> dict:
    """All policies and Belady on `trace` with a cache of `fraction` of its distinct rows."""
    distinct = trace.distinct_rows
    capacity_rows = max(1, int(round(fraction * distinct)))
    accesses = int(unique_per_batch(trace.rows, trace.batch_offsets)[0].size)
    point: dict = {
        **trace.describe(),
        "cache_fraction": fraction,
        "cache_fraction_of": "distinct_rows",
        "capacity_rows": capacity_rows,
        "unique_accesses": accesses,
    }
    began = time.perf_counter()
    optimal = belady_hits_batched(trace.rows, trace.batch_offsets, capacity_rows)
    point["belady"] = {
        "hits": optimal,
        "accesses": accesses,
        "hit_rate": optimal / accesses if accesses else 0.0,
        "elapsed_s": time.perf_counter() - began,
    }
    if per_access_belady:
        began = time.perf_counter()
        sequential = belady_hits(trace.rows, capacity_rows)
        point["belady_per_access"] = {
            "hits": sequential,
            "accesses": int(trace.rows.size),
            "hit_rate": sequential / trace.rows.size if trace.rows.size else 0.0,
            "elapsed_s": time.perf_counter() - began,
        }
    with tempfile.TemporaryDirectory(prefix="ndp-bench-cache-") as flash_dir:
        for policy in POLICIES:
            point[policy] = replay_policy(
                trace,
                policy=policy,
                capacity_rows=capacity_rows,
                hot_fraction=hot_fraction,
                flash_dir=flash_dir,
            )
    for policy in POLICIES:
        point[policy]["vs_belady"] = point[policy]["hits"] / optimal if optimal else 1.0
    return point
