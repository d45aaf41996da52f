"""`ndp-bench train`: end-to-end training throughput of ndp against its baselines.

Every system trains the same DLRM (Criteo-shaped: 26 tables, 13 dense features, dim 16) on
the same synthetic batches, one after the other in this process tree:

    all_gpu        ReferenceEngine: everything on the worker's device
    hybrid         tables in host memory (EmbeddingBag + CPU sparse SGD), dense on the device
    os_paged       tables as memory-mapped files, in a subprocess; in a memory cgroup with
                   the storage nodes' DRAM budget where /sys/fs/cgroup/memory is writable
    ndp            NdpEngine, lookahead 0
    ndp_lookahead  NdpEngine, lookahead `BenchOptions.lookahead_depth`

Scenarios: `fits_in_dram` (node caches hold every row), `large_zipf` (embedding state >= 4x
the nodes' cache budget), `cache_5pct` (cache = 5% of the tables) against `cache_full` (the
same run with the whole table in DRAM; ndp systems only), `multihot` (mean pooling factor
20). Each run: `warmup_steps`, then `steps` timed; samples/s, per-step phase seconds, link
bytes per sample (workers' counters), cache hit rates (node stats), peak RSS per process.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ndp.bench.baselines import HybridEngine, peak_rss_bytes
from ndp.bench.report import machine_info, timestamp
from ndp.config import Config, config_from_dict
from ndp.data.loader import build_datasets
from ndp.pipeline import with_lookahead

CRITEO_ROWS = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
    14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
SYSTEMS = ("all_gpu", "hybrid", "os_paged", "ndp", "ndp_lookahead")
DIM = 16
ROW_BYTES = DIM * 4  # fp32 weights; SGD keeps no optimizer state


@dataclass(frozen=True)
class BenchOptions:
    """Sizes of one benchmark run."""

    batch_size: int = 1024
    warmup_steps: int = 5
    steps: int = 30
    fits_rows: int = 100_000
    """Row cap per table for the in-DRAM scenarios."""
    large_rows: int = 1_000_000
    """Row cap per table for `large_zipf`."""
    multihot_pooling: float = 20.0
    lookahead_depth: int = 2
    device: str = "auto"

    @classmethod
    def quick(cls) -> BenchOptions:
        return cls(batch_size=512, warmup_steps=2, steps=8, fits_rows=20_000, large_rows=100_000)

    def scaled(self, scale: float) -> BenchOptions:
        """Smaller (scale < 1) for tests: fewer rows, smaller batches, fewer steps."""
        return replace(
            self,
            batch_size=max(32, int(self.batch_size * scale)),
            steps=max(2, int(self.steps * scale)),
            warmup_steps=1,
            fits_rows=max(200, int(self.fits_rows * scale)),
            large_rows=max(800, int(self.large_rows * scale)),
        )


def scenario_config(options: BenchOptions, scenario: str) -> dict:
    """The raw config dict of one scenario (what every system of it trains)."""
    rows = options.large_rows if scenario == "large_zipf" else options.fits_rows
    table_rows = [min(r, rows) for r in CRITEO_ROWS]
    table_bytes = sum(table_rows) * ROW_BYTES
    num_nodes = 2
    per_node = {
        "fits_in_dram": table_bytes,
        "cache_full": table_bytes,
        "multihot": table_bytes,
        "large_zipf": table_bytes // 4 // num_nodes // 2,  # state = 8x the total budget
        "cache_5pct": table_bytes * 5 // 100 // num_nodes,
    }[scenario]
    steps = options.warmup_steps + options.steps + options.lookahead_depth + 1
    pooling = options.multihot_pooling if scenario == "multihot" else 1.0
    return {
        "model": {
            "bottom_mlp": [512, 256, 64, DIM],
            "top_mlp": [512, 256, 1],
            "tables": [
                {
                    "name": f"t{i}",
                    "num_rows": n,
                    "embedding_dim": DIM,
                    "pooling": "mean" if scenario == "multihot" else "sum",
                    "features": [f"cat_{i}"],
                }
                for i, n in enumerate(table_rows)
            ],
        },
        "data": {
            "source": "synthetic",
            "synthetic": {
                "num_samples": steps * options.batch_size,
                "num_val_samples": options.batch_size,
                "zipf_exponent": 1.05,
                "pooling_factor": pooling,
                "pooling_distribution": "poisson" if pooling > 1 else "fixed",
                "seed": 11,
            },
        },
        "optimizer": {"dense": {"name": "sgd", "lr": 0.01}, "sparse": {"name": "sgd", "lr": 0.01}},
        "train": {"batch_size": options.batch_size, "seed": 5, "device": options.device},
        "cluster": {"num_storage_nodes": num_nodes, "num_gpu_workers": 1},
        "storage": {"cache_bytes": max(per_node, 4096), "cache_policy": "hot+lfu"},
        "logging": {"progress_bar": False},
    }


def measure_engine(
    engine: Any,
    train_data: Any,
    batch_size: int,
    warmup: int,
    steps: int,
    cfg: Config | None = None,
) -> dict[str, Any]:
    """Train `warmup` untimed then `steps` timed steps; samples/s and per-step phase seconds."""
    total = warmup + steps
    batches = list(train_data.batches(batch_size))[: total + 8]
    stream = ((step, batches[step]) for step in range(total))
    if cfg is not None:
        stream = with_lookahead(stream, engine, cfg.pipeline)
    start = None
    for step, batch in stream:
        if step == warmup:
            engine.timings()
            start = time.perf_counter()
        engine.train_step(step, batch)
    elapsed = time.perf_counter() - start
    timings = engine.timings()
    return {
        "samples_per_s": steps * batch_size / elapsed,
        "step_s": elapsed / steps,
        "per_step": {k: v / steps for k, v in timings.items() if k.endswith("_s")},
        "link_bytes_per_sample": {
            k: v / (steps * batch_size) for k, v in timings.items() if k.startswith("link_bytes")
        },
    }


def _actor_peak_rss(actor: Any) -> int:
    import ray

    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    return peak_rss_bytes(pid)


def _run_ndp(cfg: Config, data: Any, options: BenchOptions) -> dict[str, Any]:
    from ndp.coordinator import NdpEngine

    with NdpEngine(cfg) as engine:
        result = measure_engine(
            engine, data, cfg.train.batch_size, options.warmup_steps, options.steps, cfg
        )
        stats = engine.node_stats()
        result["cache_hit_rate"] = [node["cache"]["hit_rate"] for node in stats]
        result["peak_rss_bytes"] = {
            **{f"storage_node_{i}": _actor_peak_rss(n) for i, n in enumerate(engine._nodes)},
            **{f"gpu_worker_{i}": _actor_peak_rss(w) for i, w in enumerate(engine._workers)},
        }
    return result


def _cgroup_for(limit_bytes: int) -> tuple[Path | None, str]:
    """A child memory cgroup (v1) with `limit_bytes`, or None and why not."""
    root = Path("/sys/fs/cgroup/memory")
    group = root / f"ndp-bench-{os.getpid()}"
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
    except OSError as exc:
        return None, f"no memory cgroup ({root} not writable: {exc.strerror}); ran unlimited"
    return group, f"memory cgroup {group.name} limited to {limit_bytes} bytes"


def _run_os_paged(raw: dict, options: BenchOptions, dram_budget: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ndp-bench-") as tmp:
        config_path, out_path = Path(tmp) / "config.json", Path(tmp) / "out.json"
        config_path.write_text(json.dumps(raw))
        # the process also holds Python, torch and the dense half: budget on top of those
        group, note = _cgroup_for(dram_budget + (768 << 20))
        command = [sys.executable, "-m", "ndp.bench.baselines", str(config_path), str(out_path)]
        command += [str(options.warmup_steps), str(options.steps)]

        def enter_group() -> None:
            if group is not None:
                (group / "cgroup.procs").write_text(str(os.getpid()))

        try:
            subprocess.run(command, check=True, preexec_fn=enter_group)
        finally:
            if group is not None:
                try:
                    group.rmdir()
                except OSError:
                    pass
        result = json.loads(out_path.read_text())
    result["memory_limit"] = note
    return result


def run_train_bench(
    options: BenchOptions, *, command: str, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run every system on every scenario; the results dict for `write_results`."""
    import ray

    from ndp.ray_local import init_local_ray

    started_ray = not ray.is_initialized()
    if started_ray:  # one Ray for every ndp run (an engine that starts Ray stops it again)
        init_local_ray()
    try:
        systems = _run_all(options, log)
    finally:
        if started_ray:
            ray.shutdown()
    results = {
        "benchmark": "train",
        "command": command,
        "date": timestamp(),
        "machine": machine_info(),
        "options": options.__dict__,
        "systems": systems,
    }
    results["summary"] = target_lines(systems, options)
    results["tables"] = [_throughput_table(systems)]
    results["plots"] = [_throughput_plot(systems)]
    return results


def _run_all(options: BenchOptions, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    systems: dict[str, dict[str, Any]] = {name: {} for name in SYSTEMS}
    scenarios = ("fits_in_dram", "large_zipf", "cache_5pct", "cache_full", "multihot")
    for scenario in scenarios:
        raw = scenario_config(options, scenario)
        cfg = config_from_dict(copy.deepcopy(raw))
        train_data, _ = build_datasets(cfg)
        budget = cfg.storage.cache_bytes * cfg.cluster.num_storage_nodes
        state = sum(t.num_rows for t in cfg.model.effective_tables()) * ROW_BYTES
        info = {"embedding_state_bytes": state, "node_cache_budget_bytes": budget}
        for system in SYSTEMS:
            if scenario == "cache_full" and not system.startswith("ndp"):
                continue
            log(f"{scenario}: {system}")
            result = _run_system(system, raw, cfg, train_data, options, budget)
            systems[system][scenario] = {**info, **result}
        if scenario == "fits_in_dram":
            fp16 = replace(cfg, storage=replace(cfg.storage, wire_dtype="fp16"))
            log(f"{scenario}: ndp (fp16 wire)")
            systems["ndp"]["fits_in_dram_fp16_wire"] = {
                **info,
                **_run_ndp(fp16, train_data, options),
            }
    return systems


def _run_system(
    system: str, raw: dict, cfg: Config, data: Any, options: BenchOptions, budget: int
) -> dict[str, Any]:
    """One system's measurement on one scenario."""
    from ndp.reference import ReferenceEngine

    if system == "all_gpu":
        return _in_process(ReferenceEngine(cfg), data, options)
    if system == "hybrid":
        return _in_process(HybridEngine(cfg), data, options)
    if system == "os_paged":
        return _run_os_paged(raw, options, budget)
    if system == "ndp_lookahead":
        depth = options.lookahead_depth
        cfg = replace(cfg, pipeline=replace(cfg.pipeline, lookahead_depth=depth))
    return _run_ndp(cfg, data, options)


def _in_process(engine: Any, data: Any, options: BenchOptions) -> dict[str, Any]:
    try:
        result = measure_engine(
            engine, data, options.batch_size, options.warmup_steps, options.steps
        )
    finally:
        engine.close()
    result["peak_rss_bytes"] = {"bench_process (cumulative)": peak_rss_bytes()}
    return result


def _ratio_line(name: str, got: float, target: float) -> str:
    verdict = (
        "met" if got >= target else f"MISSED by {target - got:.2f}x ({got / target:.0%} of target)"
    )
    return f"{name}: {got:.2f}x (target >= {target}x) {verdict}"


def target_lines(systems: dict[str, dict[str, Any]], options: BenchOptions) -> list[str]:
    """The four targets, each with its ratio and whether (by how much) it was missed."""

    def sps(system: str, scenario: str) -> float:
        return systems[system][scenario]["samples_per_s"]

    lines = [
        _ratio_line(
            "1. fits in DRAM: ndp_lookahead / all_gpu",
            sps("ndp_lookahead", "fits_in_dram") / sps("all_gpu", "fits_in_dram"),
            0.7,
        ),
        _ratio_line(
            "2. large_zipf: ndp / os_paged",
            sps("ndp", "large_zipf") / sps("os_paged", "large_zipf"),
            3.0,
        ),
        _ratio_line(
            "3. cache at 5%: ndp_lookahead / whole table in DRAM",
            sps("ndp_lookahead", "cache_5pct") / sps("ndp_lookahead", "cache_full"),
            0.8,
        ),
    ]
    fp32 = systems["ndp"]["fits_in_dram"]["link_bytes_per_sample"].get("link_bytes_in", 0.0)
    fp16 = systems["ndp"]["fits_in_dram_fp16_wire"]["link_bytes_per_sample"].get(
        "link_bytes_in", 0.0
    )
    expected = len(CRITEO_ROWS) * DIM * 4
    lines.append(
        f"4. link bytes per sample (pooled in): {fp32:.0f} measured vs {expected} = 26 features x "
        f"{DIM} dim x 4 B ({'equal' if abs(fp32 - expected) < 1e-6 else 'DIFFERENT'}); fp16 wire: "
        f"{fp16:.0f} ({fp16 / fp32 if fp32 else 0:.2f}x of fp32)"
    )
    return lines


def _throughput_table(systems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    scenarios = sorted({s for runs in systems.values() for s in runs})
    rows = []
    for system, runs in systems.items():
        row: list[Any] = [system]
        for scenario in scenarios:
            run = runs.get(scenario)
            row.append(round(run["samples_per_s"], 1) if run else "-")
        rows.append(row)
    return {"title": "samples/s", "columns": ["system", *scenarios], "rows": rows}


def _throughput_plot(systems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    scenarios = ["fits_in_dram", "large_zipf", "cache_5pct", "multihot"]
    return {
        "title": "training throughput (x: scenario index)",
        "xlabel": " / ".join(f"{i}={s}" for i, s in enumerate(scenarios)),
        "ylabel": "samples/s",
        "xscale": "linear",
        "series": [
            {
                "label": system,
                "x": [i for i, s in enumerate(scenarios) if s in runs],
                "y": [runs[s]["samples_per_s"] for s in scenarios if s in runs],
            }
            for system, runs in systems.items()
        ],
    }
