"""`ndp-bench storage`: pooled-lookup throughput and cache hit rates, with their targets.

Two measurements (see `lookups.py` and `hitrate.py` for how each is taken):

1. lookups/s of a storage node over gRPC (separate process, unix socket and TCP, fp32 and
   fp16 on the wire) vs `embedding_bag` in process, at pooling factors 1, 8, 32.
   Targets (fp32): >= 0.3x in-process at pooling 1, >= 0.5x at 8, >= 0.7x at 32.
   Each point also carries the transport's floor: a bare gRPC round trip of the same request
   and reply bytes to a server that does no work, and the ratios that floor bounds.
2. hit rate of each `RowCache` policy vs Belady's optimum at 1%, 5%, 20% of the distinct rows
   of each trace (the largest tables of the shipped Criteo sample; Zipf traces).
   Target: the default policy (hot+lfu) >= 0.9x Belady at every point and never below LRU.

`run_storage_bench` returns the results dict (raw figures + tables + plots for
`report.write_results`); nothing here prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ndp.bench.hitrate import POLICIES, hit_rate_point
from ndp.bench.lookups import LookupShape, measure_lookups
from ndp.bench.report import machine_info, timestamp
from ndp.bench.traces import KAGGLE_TABLE_ROWS, criteo_traces, zipf_trace
from ndp.errors import ConfigError

LOOKUP_TARGETS = {1: 0.3, 8: 0.5, 32: 0.7}
"""Minimum gRPC / in-process lookups/s ratio (fp32) per pooling factor."""
BELADY_TARGET = 0.9
"""Minimum hits of the default policy as a fraction of Belady's (same step granularity)."""
CACHE_FRACTIONS = (0.01, 0.05, 0.2)
DEFAULT_POLICY = "hot+lfu"


@dataclass(frozen=True, kw_only=True)
class StorageBenchOptions:
    """Sizes of one run; `quick()` and `full()` are the two the CLI offers."""

    num_features: int = 8
    """Features per lookup call (one table of `lookup_rows` rows each)."""
    lookup_rows: int = 50_000
    embedding_dim: int = 64
    batch_size: int = 2048
    pooling_factors: tuple[int, ...] = (1, 8, 32)
    transports: tuple[str, ...] = ("unix", "tcp")
    wire_dtypes: tuple[str, ...] = ("fp32", "fp16")
    rounds: int = 5
    """Interleaved measurement rounds per pooling factor."""
    calls_per_round: int = 4
    criteo_path: str | None = None
    """Criteo TSV for the real trace; None: the shipped data/criteo_day0_sample.tsv."""
    criteo_tables: int = 6
    """Largest tables (most distinct rows in the sample) replayed."""
    trace_batch_samples: int = 256
    """Samples per training step in the cache replays (one cache call per step)."""
    criteo_batch_samples: int = 128
    """Samples per step for the Criteo sample (8000 lines: keeps ~60 steps)."""
    zipf_rows: int = 1_000_000
    zipf_samples: int = 1_000_000
    zipf_exponents: tuple[float, ...] = (1.05, 1.2)
    hot_fraction: float = 0.5
    """`hot+lfu`'s pinned share of the cache (storage.hot_fraction)."""
    seed: int = 1234

    @staticmethod
    def full() -> StorageBenchOptions:
        return StorageBenchOptions()

    @staticmethod
    def quick() -> StorageBenchOptions:
        return StorageBenchOptions(
            lookup_rows=20_000,
            rounds=5,
            calls_per_round=3,
            criteo_tables=4,
            zipf_rows=200_000,
            zipf_samples=200_000,
        )

    def scaled(self, scale: float) -> StorageBenchOptions:
        """Every size multiplied by `scale` (for tests: --scale 0.01 runs in seconds)."""
        if not 0 < scale <= 1:
            raise ConfigError(f"--scale: {scale} must be in (0, 1]")

        def size(value: int, floor: int) -> int:
            return max(floor, int(value * scale))

        return StorageBenchOptions(
            **{
                **self.__dict__,
                "num_features": size(self.num_features, 2),
                "lookup_rows": size(self.lookup_rows, 256),
                "batch_size": size(self.batch_size, 16),
                "rounds": size(self.rounds, 1),
                "calls_per_round": size(self.calls_per_round, 1),
                "criteo_tables": size(self.criteo_tables, 1),
                "zipf_rows": size(self.zipf_rows, 2000),
                "zipf_samples": size(self.zipf_samples, 2000),
                "zipf_exponents": self.zipf_exponents[:1] if scale < 0.5 else self.zipf_exponents,
                "trace_batch_samples": size(self.trace_batch_samples, 16),
                "criteo_batch_samples": size(self.criteo_batch_samples, 16),
            }
        )


def _bytes_text(num_bytes: int) -> str:
    """A message size for people: kB below a megabyte, MB above (decimal units)."""
    if num_bytes >= 1e6:
        return f"{num_bytes / 1e6:.1f} MB"
    return f"{num_bytes / 1e3:.1f} kB"


def transport_floor_text(point: dict) -> str:
    """The bare round trip of a point's bytes and the ratios it bounds ("" if not measured).

    Why: it says whether the transport alone already misses the target, before any work in
    the node or any (de)serialisation is counted.
    """
    floor = point.get("transport_floor")
    if not floor:
        return ""
    size = _bytes_text(floor["request_bytes"] + floor["reply_bytes"])
    return (
        f"bare gRPC round trip of the same {size} ({_bytes_text(floor['request_bytes'])} "
        f"request, {_bytes_text(floor['reply_bytes'])} reply): "
        f"{floor['median_call_s'] * 1e3:.2f} ms, so even a node with no work reaches at most "
        f"{point['ratio_bound_transport_only']:.3f}x, and one with this node's lookup time at "
        f"most {point['ratio_bound_transport_and_node']:.3f}x"
    )


def lookup_limits_text(point: dict) -> str:
    """Where a gRPC lookup's time goes: the node's own work (measured inside it) and the rest
    (wire, protobuf, gRPC), against the in-process call and the bare transport's floor."""
    call = point["grpc"]["median_call_s"] * 1e3
    local = point["in_process"]["median_call_s"] * 1e3
    node = point["grpc"].get("node_lookup_s_per_call")
    floor = transport_floor_text(point)
    if not node:  # not measured (or no lookup reached the node)
        text = f"what limits it: a call takes {call:.2f} ms, in-process {local:.2f} ms"
        return text + (f"; {floor}" if floor else "")
    node *= 1e3
    return (
        f"what limits it: of a {call:.2f} ms call the node's lookup takes {node:.2f} ms and "
        f"the transport (wire, (de)serialisation, gRPC) {call - node:.2f} ms; in-process "
        f"{local:.2f} ms, so even a free transport would give at most {local / node:.2f}x"
        + (f"; {floor}" if floor else "")
    )


def lookup_target_lines(points: list[dict]) -> list[dict]:
    """Per pooling factor, the fp32 figure of each transport against its target."""
    checks = []
    for point in points:
        target = LOOKUP_TARGETS.get(point["pooling_factor"])
        if target is None or point["wire_dtype"] != "fp32":
            continue
        ratio = point["ratio"]
        checks.append(
            {
                "what": f"lookups pooling {point['pooling_factor']} fp32 {point['transport']}",
                "value": ratio,
                "target": target,
                "met": ratio >= target,
                "text": (
                    f"lookup ratio at pooling {point['pooling_factor']} (fp32, "
                    f"{point['transport']}): {ratio:.3f}x in-process, target >= {target}x: "
                    + ("met" if ratio >= target else f"MISSED by {target - ratio:.3f}")
                    + ("" if ratio >= target else "; " + lookup_limits_text(point))
                ),
            }
        )
    return checks


def cache_target_lines(points: list[dict]) -> list[dict]:
    """Per hit-rate point, the default policy against Belady and against LRU."""
    checks = []
    for point in points:
        default, lru = point[DEFAULT_POLICY], point["lru"]
        vs = default["vs_belady"]
        where = f"{point['trace']} at {point['cache_fraction']:.0%}"
        checks.append(
            {
                "what": f"{DEFAULT_POLICY} vs belady {where}",
                "value": vs,
                "target": BELADY_TARGET,
                "met": vs >= BELADY_TARGET,
                "text": (
                    f"{DEFAULT_POLICY} {where}: {vs:.3f}x Belady, target >= {BELADY_TARGET}x: "
                    + ("met" if vs >= BELADY_TARGET else f"MISSED by {BELADY_TARGET - vs:.3f}")
                ),
            }
        )
        checks.append(
            {
                "what": f"{DEFAULT_POLICY} vs lru {where}",
                "value": default["hits"] - lru["hits"],
                "target": 0,
                "met": default["hits"] >= lru["hits"],
                "text": (
                    f"{DEFAULT_POLICY} {where}: {default['hits']} hits vs LRU {lru['hits']}: "
                    + ("not below LRU" if default["hits"] >= lru["hits"] else "BELOW LRU")
                ),
            }
        )
    return checks


def _lookup_table(points: list[dict]) -> dict:
    return {
        "title": "Pooled lookups/s: storage node over gRPC vs in-process embedding_bag",
        "columns": [
            "pooling", "transport", "wire", "gRPC lookups/s", "in-process lookups/s",
            "ratio", "target", "gRPC ms/call (median)", "node lookup ms/call",
            "in-process ms/call", "gRPC calls", "floor ms/call (bare gRPC, same bytes)",
            "bound: transport only", "bound: transport + node",
        ],
        "rows": [
            [
                p["pooling_factor"], p["transport"], p["wire_dtype"],
                p["grpc"]["lookups_per_s"], p["in_process"]["lookups_per_s"], p["ratio"],
                LOOKUP_TARGETS.get(p["pooling_factor"], "") if p["wire_dtype"] == "fp32" else "",
                1000 * p["grpc"]["median_call_s"], 1000 * p["grpc"]["node_lookup_s_per_call"],
                1000 * p["in_process"]["median_call_s"], p["grpc"]["calls"],
                1000 * p["transport_floor"]["median_call_s"], p["ratio_bound_transport_only"],
                p["ratio_bound_transport_and_node"],
            ]
            for p in points
        ],
    }  # fmt: skip


def _hit_rate_table(points: list[dict]) -> dict:
    return {
        "title": "Cache hit rate (hits / unique rows per step) vs Belady, cache = % of distinct rows",
        "columns": [
            "trace", "cache", "rows", "accesses", "belady", *POLICIES,
            f"{DEFAULT_POLICY}/belady", "belady per access",
        ],
        "rows": [
            [
                p["trace"], f"{p['cache_fraction']:.0%}", p["capacity_rows"], p["unique_accesses"],
                p["belady"]["hit_rate"], *(p[policy]["hit_rate"] for policy in POLICIES),
                p[DEFAULT_POLICY]["vs_belady"], p.get("belady_per_access", {}).get("hit_rate", ""),
            ]
            for p in points
        ],
    }  # fmt: skip


def _plots(lookups: list[dict], hit_points: list[dict]) -> list[dict]:
    series = []
    pooling = sorted({p["pooling_factor"] for p in lookups})
    if lookups:
        first = {p["pooling_factor"]: p for p in lookups}
        series.append(
            {
                "label": "in-process embedding_bag",
                "x": pooling,
                "y": [first[k]["in_process"]["lookups_per_s"] for k in pooling],
            }
        )
    for transport in sorted({p["transport"] for p in lookups}):
        for dtype in sorted({p["wire_dtype"] for p in lookups}):
            chosen = {
                p["pooling_factor"]: p
                for p in lookups
                if p["transport"] == transport and p["wire_dtype"] == dtype
            }
            series.append(
                {
                    "label": f"gRPC {transport} {dtype}",
                    "x": pooling,
                    "y": [chosen[k]["grpc"]["lookups_per_s"] for k in pooling],
                }
            )
    hit_series = []
    fractions = sorted({p["cache_fraction"] for p in hit_points})
    for name in ("belady", *POLICIES):
        # hits summed over all traces at each cache fraction
        y = []
        for fraction in fractions:
            at = [p for p in hit_points if p["cache_fraction"] == fraction]
            y.append(
                sum(p[name]["hits"] for p in at) / max(1, sum(p[name]["accesses"] for p in at))
            )
        hit_series.append({"label": name, "x": [100 * f for f in fractions], "y": y})
    return [
        {
            "title": "Pooled lookups/s vs pooling factor",
            "xlabel": "pooling factor (rows per bag)",
            "ylabel": "lookups (pooled bags) / s",
            "xscale": "log",
            "series": series,
        },
        {
            "title": "Hit rate vs cache size (all traces pooled)",
            "xlabel": "cache size, % of distinct rows",
            "ylabel": "hit rate",
            "xscale": "log",
            "series": hit_series,
        },
    ]


def run_storage_bench(
    options: StorageBenchOptions, *, command: str, log=lambda message: None
) -> dict:
    """Run both measurements and return the results dict (raw figures, checks, tables, plots).

    Args:
        command: the command line, recorded in the results.
        log: progress callback (one line per stage).
    """
    started = timestamp()
    load_before = os.getloadavg()
    shape = LookupShape(
        num_features=options.num_features,
        num_rows=options.lookup_rows,
        embedding_dim=options.embedding_dim,
        batch_size=options.batch_size,
    )
    log(f"lookups: {shape} at pooling {options.pooling_factors}")
    lookups = measure_lookups(
        shape,
        pooling_factors=options.pooling_factors,
        transports=options.transports,
        wire_dtypes=options.wire_dtypes,
        rounds=options.rounds,
        calls_per_round=options.calls_per_round,
    )
    from ndp.bench.traces import default_criteo_sample

    traces = criteo_traces(
        options.criteo_path or default_criteo_sample(),
        table_rows=KAGGLE_TABLE_ROWS,
        batch_samples=options.criteo_batch_samples,
        largest=options.criteo_tables,
    )
    traces += [
        zipf_trace(
            num_rows=options.zipf_rows,
            exponent=exponent,
            num_samples=options.zipf_samples,
            pooling_factor=1,
            batch_samples=options.trace_batch_samples,
            seed=options.seed,
        )
        for exponent in options.zipf_exponents
    ]
    hit_points = []
    for trace in traces:
        log(f"cache replay: {trace.describe()}")
        for fraction in CACHE_FRACTIONS:
            hit_points.append(
                hit_rate_point(trace, fraction=fraction, hot_fraction=options.hot_fraction)
            )
    checks = lookup_target_lines(lookups) + cache_target_lines(hit_points)
    return {
        "benchmark": "storage",
        "command": command,
        "date": started,
        "finished": timestamp(),
        "machine": {
            **machine_info(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "options": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in options.__dict__.items()
        },
        "lookups": lookups,
        "hit_rates": hit_points,
        "checks": checks,
        "summary": [c["text"] for c in checks],
        "tables": [_lookup_table(lookups), _hit_rate_table(hit_points)],
        "plots": _plots(lookups, hit_points),
        "notes": [
            "lookups/s counts pooled bags (samples x features); rates use the median call",
            "floor = bare gRPC unary round trip of the Lookup's request and reply bytes to a "
            "server that does no work (same transport, same rounds); bound: transport only = "
            "in-process ms / floor ms, bound: transport + node = in-process ms / (floor ms + "
            "node lookup ms)",
            "hit rate = hits / unique rows per step; cache sizes are % of the trace's distinct rows",
            "belady = offline optimum with bypass at the same step granularity as the cache; "
            "belady_per_access = the classical per-access bound",
            f"criteo traces: {Path(options.criteo_path or default_criteo_sample()).name}, "
            "categorical ids hashed raw_id mod Kaggle table rows, one-hot",
        ],
    }
