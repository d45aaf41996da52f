"""`ndp-bench train`: end-to-end training throughput of ndp against its baselines.

Every system trains the same DLRM (Criteo-shaped: 26 tables, 13 dense features, dim 16) on
the same synthetic batches, one after the other in this process tree:

    all_gpu        ReferenceEngine: everything on the worker's device (cpu without CUDA)
    hybrid         tables in host memory (EmbeddingBag + CPU sparse SGD), dense on the device
    os_paged       tables as memory-mapped files, in a subprocess inside a memory cgroup
                   (v1 or v2: `memory_limit`) whose limit holds its page cache to the
                   storage nodes' DRAM budget (`baselines.PageCacheBudget`, re-set after
                   every step)
    ndp            NdpEngine, lookahead 0
    ndp_lookahead  NdpEngine, lookahead `BenchOptions.lookahead_depth` (early pooling on)

Like with like: every system starts from a fresh engine (ndp: its own actors, so the
lookahead run finds no cache the ndp run warmed), trains the same batches in the same order
(`warmup_steps` untimed, then `steps` timed, batches 0 .. warmup + steps - 1), and its clock
stops only after its last update is applied (`measure_engine` flushes inside the window).
Every system of a scenario is measured `rounds` times, forward then backward in turn, and
each figure is the median of its rounds (`ndp.bench.rounds`: the machine's speed drifts by
15-25% over minutes; `beyond_ram` runs one round, its state is the size of the disk).
The storage nodes read flash with O_DIRECT, so their DRAM for rows is exactly
`storage.cache_bytes`, as the os_paged cgroup's page cache is.

Scenarios: `fits_in_dram` (node caches hold every row), `large_zipf` (embedding state >= 4x
the nodes' cache budget), `cache_5pct` (cache = 5% of the tables) against `cache_full` (the
same run with the whole table in DRAM; ndp systems only), `multihot` (mean pooling factor
20), and `beyond_ram` only when named (`ndp.bench.beyond_ram`: state twice the machine's
memory on disk, caches at 1% and 5%, ndp and os_paged on the same shard files, beside a
probe of the device). Each run reports samples/s, per-step phase seconds, machine CPU per sample (busy
CPU-us of the whole machine per trained sample, with its ratio to all_gpu: on a machine
whose cores every process shares, wall-clock ratios measure the sharing, CPU per sample the
design), CPU seconds per step of each process (`ndp.bench.cpu`), flash bytes read/written
per sample (ndp: the nodes' flash counters; os_paged: its I/O counters), the memory limit
that applied, and for ndp the link bytes per sample measured on the wire (the lengths of the
messages the gRPC clients sent and received) and cache hit rates over every row access the
nodes' caches served or missed (lookups, update reads and prefetch staging). A missed
target's line says what limits it: the CPU floor (busy CPU-seconds / usable cores) against
the step, and the largest phases. The storage-node engine's target divides the nodes' CPU
per step by all_gpu's FBGEMM forward + backward/update step, timed after all_gpu's window
in a loop of its own over the same timed batches on one intra-op thread
(`ndp.bench.embedding_probe`: the median of many steps, where the phase clock's median of one
window moved 35% between runs and a two-thread probe's 20-40%).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from ndp.bench import beyond_ram
from ndp.bench.baselines import SHARD_PIECES_KEY, HybridEngine
from ndp.bench.beyond_ram import CACHE_FRACTIONS
from ndp.bench.embedding_probe import embedding_step_cpu_s
from ndp.bench.energy import (
    baseline_counters,
    energy_lines,
    energy_model_record,
    energy_plot,
    energy_table,
    ndp_counters,
    price_runs,
)
from ndp.bench.measure import measure_engine
from ndp.bench.memory import peak_rss_bytes
from ndp.bench.memory_limit import make_memory_cgroup
from ndp.bench.report import machine_info, timestamp
from ndp.bench.rounds import rounds_line, rounds_table, run_interleaved
from ndp.config import Config, config_from_dict
from ndp.data.loader import build_datasets

CRITEO_ROWS = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
    14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
SYSTEMS = ("all_gpu", "hybrid", "os_paged", "ndp", "ndp_lookahead")
SCENARIOS = ("fits_in_dram", "large_zipf", "cache_5pct", "cache_full", "multihot")
OPT_IN_SCENARIOS = ("beyond_ram",)
"""Run only when named in `scenarios` (`beyond_ram` writes twice the machine's memory)."""
REPORTED_SCENARIOS = (*SCENARIOS, "fits_in_dram_fp16_wire", *CACHE_FRACTIONS)
NDP_ONLY_SCENARIOS = ("cache_full",)
MEASURED_WITH = {"cache_full": "cache_5pct"}
"""Scenarios measured in the rounds of another (when both run): target 3 divides
cache_5pct's samples/s by cache_full's, and measured minutes apart the two moved with the
machine (all_gpu at 26k samples/s in one scenario of a run and 37k in a later one)."""
DIM = 16
ROW_BYTES = DIM * 4  # fp32 weights; SGD keeps no optimizer state
WIRE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


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
    device_profile: str | None = None
    """`configs/devices/` profile every scenario's storage uses (`storage.device_profile`)."""
    scenarios: tuple[str, ...] = SCENARIOS
    """Which scenarios to run (the targets of the missing ones are reported as not measured)."""
    fp16_wire: bool = True
    """Also run ndp on `fits_in_dram` with fp16 on the wire (target 4)."""
    worker_cpus: float | None = None
    """Ray CPUs of the GPU-worker actor, which Ray turns into its torch threads. None: the
    cores this process may run on, capped at what the Ray instance has, i.e. as many threads
    as the in-process baselines' dense half uses (without a CPU request an actor gets one)."""
    beyond_ram_memory_bytes: int | None = None
    """Physical memory `beyond_ram` sizes its state from; None: this machine's."""
    beyond_ram_factor: float = 2.0
    """`beyond_ram` embedding state / physical memory."""
    flash_dir: str | None = None
    """Where `beyond_ram` keeps its shard files, reused by a later run with the same seed;
    None: `beyond_ram.DEFAULT_FLASH_DIR`."""
    probe_seconds_per_depth: float = 5.0
    """Device probe: seconds of random 4 KiB reads at each queue depth."""
    probe_write_bytes: int = 1 << 30
    """Device probe: bytes of the sequential-write measurement."""
    rounds: int = 2
    """Measurements of every system per scenario, interleaved (forward, then backward) and
    combined as medians (`ndp.bench.rounds`): one window per system moved 15-25% with the
    machine between runs minutes apart."""

    @classmethod
    def quick(cls) -> BenchOptions:
        """Why 8 + 60 steps: with 36 timed steps (~4 s per system) two runs on the 2-core
        machine differed by up to 40% in a ratio; the window is most of the noise. Why three
        rounds: with two, two runs still differed by 15-22% in two ratios (a median of two
        is their mean; one disturbed window moves it)."""
        return cls(
            batch_size=1024,
            warmup_steps=8,
            steps=60,
            fits_rows=20_000,
            large_rows=300_000,
            rounds=3,
        )

    def scaled(self, scale: float) -> BenchOptions:
        """Smaller (scale < 1) for tests: fewer rows, smaller batches, fewer steps."""
        return replace(
            self,
            batch_size=max(32, int(self.batch_size * scale)),
            steps=max(2, int(self.steps * scale)),
            warmup_steps=1,
            fits_rows=max(200, int(self.fits_rows * scale)),
            large_rows=max(800, int(self.large_rows * scale)),
            probe_seconds_per_depth=max(0.2, self.probe_seconds_per_depth * scale),
            probe_write_bytes=max(1 << 20, int(self.probe_write_bytes * scale)),
        )

    def __post_init__(self) -> None:
        known = SCENARIOS + OPT_IN_SCENARIOS
        unknown = [s for s in self.scenarios if s not in known]
        assert not unknown, f"unknown scenarios {unknown}; known: {known}"
        assert self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"


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
    # every system trains batches 0 .. warmup + steps - 1 (lookahead reads depth further)
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
        "cluster": {
            "num_storage_nodes": num_nodes,
            "num_gpu_workers": 1,
            "gpu_worker_resources": {"CPU": options.worker_cpus or 0.0},
        },
        "storage": {
            "cache_bytes": max(per_node, 4096),
            "cache_policy": "hot+lfu",
            "use_odirect": True,  # the node's DRAM for rows is its cache, no page cache
            **({"device_profile": options.device_profile} if options.device_profile else {}),
        },
        "pipeline": {"lookahead_depth": options.lookahead_depth},
        "logging": {"progress_bar": False},
    }


# --------------------------------------------------------------------------- ndp


def _node_counters(engine: Any) -> list[dict[str, int]]:
    """Per node: cache accesses (every kind, and staging's share) and flash bytes so far."""
    return [
        {
            "hits": n["cache"]["hits"],
            "misses": n["cache"]["misses"],
            "staged": n["cache"]["staged_hits"] + n["cache"]["staged_misses"],
            "staged_hits": n["cache"]["staged_hits"],
            "flash_bytes_read": n["flash"]["bytes_read"],
            "flash_bytes_written": n["flash"]["bytes_written"],
            "flash_pages_read": n["flash"]["pages_read"],
            "flash_pages_written": n["flash"]["pages_written"],
            "dram_bytes": n["cache"]["bytes_read"] + n["cache"]["bytes_written"],
            "flash_read_requests": n["flash"]["read_requests"],
            "flash_read_seconds": n["flash"]["read_seconds"],
            "flash_read_depth_sum": n["flash"]["read_depth_sum"],
        }
        for n in engine.node_stats()
    ]


def _measure_ndp(
    cfg: Config,
    batches: list,
    options: BenchOptions,
    *,
    lookahead: bool,
) -> dict[str, Any]:
    """One ndp measurement on a fresh engine (its own actors): throughput, measured wire
    bytes, hit rates over every cache access, flash bytes, peak RSS."""
    from ndp.coordinator import NdpEngine

    before: dict[str, Any] = {}
    with NdpEngine(cfg) as engine:
        pids: dict[str, int | str] = {"bench_process (coordinator)": "self"}
        pids.update(engine.component_pids())

        def reset() -> None:
            before["wire"] = engine.wire_bytes()
            before["nodes"] = _node_counters(engine)

        result = measure_engine(
            engine,
            batches,
            options.batch_size,
            options.warmup_steps,
            options.steps,
            cfg=cfg if lookahead else None,
            at_timed_start=reset,
            cpu_pids=pids,
        )
        wire, nodes = engine.wire_bytes(), _node_counters(engine)
        rss = {name: peak_rss_bytes(pid) for name, pid in engine.component_pids().items()}
        held = [n.get("held_blocks", {}) for n in engine.node_stats()]
    samples = options.steps * options.batch_size
    result["wire_bytes_per_sample"] = {
        k: (v - before["wire"].get(k, 0)) / samples for k, v in sorted(wire.items())
    }
    delta = [
        {k: after[k] - first[k] for k in after}
        for first, after in zip(before["nodes"], nodes, strict=True)
    ]
    result["cache_hit_rate"] = [_rate(d["hits"], d["hits"] + d["misses"]) for d in delta]
    result["cache_hit_rate_without_staging"] = [
        _rate(d["hits"] - d["staged_hits"], d["hits"] + d["misses"] - d["staged"]) for d in delta
    ]
    result["flash_bytes_read_per_sample"] = sum(d["flash_bytes_read"] for d in delta) / samples
    result["flash_bytes_written_per_sample"] = (
        sum(d["flash_bytes_written"] for d in delta) / samples
    )
    result["flash_bytes_source"] = "storage node flash counters (O_DIRECT preads/pwrites)"
    result["flash_read_nodes"] = [
        {k: d[k] for k in ("flash_read_requests", "flash_read_seconds", "flash_read_depth_sum")}
        | {"flash_bytes_read": d["flash_bytes_read"]}
        for d in delta
    ]
    wire_delta = {k: v - before["wire"].get(k, 0) for k, v in wire.items()}
    result["energy_counters"] = asdict(ndp_counters(delta, wire_delta, result, options.steps))
    result["memory_limit"] = {
        "applied": True,
        "kind": "storage.cache_bytes per node (row cache; flash read with O_DIRECT)",
        "bytes_per_node": cfg.storage.cache_bytes,
        "nodes": cfg.cluster.num_storage_nodes,
        # beyond the cache: flash blocks a node holds from a read to the update that writes
        # them (`ArenaFlash.carrying`), the most of any node, at any time and across steps
        "held_blocks_peak_bytes": max((h.get("peak_bytes", 0) for h in held), default=0),
        "held_blocks_peak_across_steps_bytes": max(
            (h.get("peak_across_steps_bytes", 0) for h in held), default=0
        ),
    }
    result["peak_rss_bytes"] = rss
    return result


def _rate(hits: int, accesses: int) -> float:
    return hits / accesses if accesses else 0.0


# --------------------------------------------------------------------------- os_paged


def _run_os_paged(raw: dict, options: BenchOptions, dram_budget: int) -> dict[str, Any]:
    """OsPagedEngine in a subprocess in its own memory cgroup (v2 or v1); the cgroup removed
    after. `memory_limit.applied` says whether a limit applied (else the note says why not);
    flash bytes are the subprocess's over the timed steps (`baselines.flash_bytes`)."""
    with tempfile.TemporaryDirectory(prefix="ndp-bench-") as tmp:
        config_path, out_path = Path(tmp) / "config.json", Path(tmp) / "out.json"
        config_path.write_text(json.dumps(raw))
        group, note = make_memory_cgroup(f"ndp-bench-{os.getpid()}-{time.monotonic_ns()}")
        command = [sys.executable, "-m", "ndp.bench.baselines", str(config_path), str(out_path)]
        command += [str(options.warmup_steps), str(options.steps)]
        if group is not None:
            command += [str(group.path), str(group.version), str(dram_budget)]
        try:  # the child moves itself into the group before it execs
            subprocess.run(
                command, check=True, preexec_fn=None if group is None else group.add_process
            )
        finally:
            if group is not None:
                group.remove()
        result = json.loads(out_path.read_text())
    if group is None:
        result["memory_limit"] = {"applied": False, "note": note}
    else:
        result["memory_limit"] = {**result["memory_limit"], "note": note}
    return result


# --------------------------------------------------------------------------- driver


def run_train_bench(
    options: BenchOptions, *, command: str, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run every system on every scenario; the results dict for `write_results`."""
    import ray

    from ndp.ray_local import init_local_ray

    started_ray = not ray.is_initialized()
    if started_ray:  # one Ray for every ndp run (an engine that starts Ray stops it again)
        init_local_ray()
    if options.worker_cpus is None:
        usable = len(os.sched_getaffinity(0))
        options = replace(
            options, worker_cpus=float(min(usable, ray.cluster_resources().get("CPU", 1.0)))
        )
    extras: dict[str, Any] = {}
    try:
        systems = _run_all(options, log, extras)
    finally:
        if started_ray:
            ray.shutdown()
    options_dict = asdict(options)
    options_dict["scenarios"] = list(options.scenarios)
    results = {
        "benchmark": "train",
        "command": command,
        "date": timestamp(),
        "machine": machine_info(),
        "load_average_at_end": list(os.getloadavg()),
        "options": options_dict,
        "systems": systems,
    }
    results["summary"] = target_lines(systems) + [rounds_line(systems, options.rounds)]
    results["tables"] = [
        _throughput_table(systems),
        _cpu_per_sample_table(systems),
        _flash_and_memory_table(systems),
        _breakdown_table(systems),
        _cpu_table(systems),
        _wire_table(systems),
        rounds_table(systems),
    ]
    results["plots"] = [_throughput_plot(systems)]
    if "beyond_ram" in extras:
        results["beyond_ram"] = extras["beyond_ram"]
        results["summary"] = extras["beyond_ram"]["summary"] + results["summary"]
    energy = config_from_dict(scenario_config(options, "fits_in_dram")).storage.energy
    price_runs(systems, energy, steps=options.steps, batch_size=options.batch_size)
    results["energy_model"] = energy_model_record(energy, options.device_profile)
    results["summary"] += energy_lines(systems)
    results["tables"].append(energy_table(systems))
    results["plots"].append(energy_plot(systems))
    return results


def _run_all(
    options: BenchOptions, log: Callable[[str], None], extras: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Every scenario's runs ({system: {scenario: run}}); `extras` gets what is not a run
    (`beyond_ram`: the device probe, the shard init, its summary lines)."""
    systems: dict[str, dict[str, Any]] = {name: {} for name in SYSTEMS}
    for group in scenario_groups(options.scenarios):
        if group == ["beyond_ram"]:
            extras["beyond_ram"] = _run_beyond_ram(options, systems, log)
            continue
        jobs: dict[str, Callable[[], dict[str, Any]]] = {}
        placed: dict[str, tuple[str, str, dict[str, Any]]] = {}
        for scenario in group:
            raw = scenario_config(options, scenario)
            cfg = config_from_dict(copy.deepcopy(raw))
            train_data, _ = build_datasets(cfg)
            batches = list(train_data.batches(options.batch_size))
            budget = cfg.storage.cache_bytes * cfg.cluster.num_storage_nodes
            state = sum(t.num_rows for t in cfg.model.effective_tables()) * ROW_BYTES
            info = {"embedding_state_bytes": state, "node_cache_budget_bytes": budget}
            for name, job in _scenario_jobs(scenario, raw, cfg, batches, options, budget).items():
                label = name if scenario == group[0] else f"{name} [{scenario}]"
                jobs[label] = job
                if name == FP16_JOB:
                    placed[label] = ("ndp", f"{scenario}_fp16_wire", info)
                else:
                    placed[label] = (name, scenario, info)
        measured = run_interleaved(
            jobs,
            options.rounds,
            headline=round_headline,
            log=lambda line, first=group[0]: log(f"{first}: {line}"),
        )
        for label, result in measured.items():
            system, key, info = placed[label]
            systems[system][key] = {**info, **result}
    return systems


def scenario_groups(scenarios: Sequence[str]) -> list[list[str]]:
    """`scenarios` in order, each alone except those measured in the rounds of another
    (`MEASURED_WITH`), which join its group when it runs too."""
    groups: dict[str, list[str]] = {}
    for scenario in scenarios:
        host = MEASURED_WITH.get(scenario)
        if host in scenarios:
            groups.setdefault(host, [host]).append(scenario)
        else:
            groups.setdefault(scenario, [scenario])
    return list(groups.values())


FP16_JOB = "ndp (fp16 wire)"


def _scenario_jobs(
    scenario: str, raw: dict, cfg: Config, batches: list, options: BenchOptions, budget: int
) -> dict[str, Callable[[], dict[str, Any]]]:
    """One measurement of each system of a scenario, as a call that makes a fresh engine."""
    jobs: dict[str, Callable[[], dict[str, Any]]] = {}
    if scenario not in NDP_ONLY_SCENARIOS:
        for system in ("all_gpu", "hybrid", "os_paged"):
            jobs[system] = partial(_baseline_run, system, raw, cfg, batches, options, budget)
    jobs["ndp"] = partial(_measure_ndp, cfg, batches, options, lookahead=False)
    jobs["ndp_lookahead"] = partial(_measure_ndp, cfg, batches, options, lookahead=True)
    if scenario == "fits_in_dram" and options.fp16_wire:
        fp16 = replace(cfg, storage=replace(cfg.storage, wire_dtype="fp16"))
        jobs[FP16_JOB] = partial(_measure_ndp, fp16, batches, options, lookahead=False)
    return jobs


def _baseline_run(
    system: str, raw: dict, cfg: Config, batches: list, options: BenchOptions, budget: int
) -> dict[str, Any]:
    """One baseline measurement with the energy counters of its timed batches."""
    result = _run_baseline(system, raw, cfg, batches, options, budget)
    timed = batches[options.warmup_steps : options.warmup_steps + options.steps]
    counters = baseline_counters(system, result, timed, cfg, options.steps)
    result["energy_counters"] = asdict(counters)
    return result


def round_headline(run: dict[str, Any]) -> dict[str, Any]:
    """The figures of one round that the report shows beside the median (their spread is how
    far one window could be trusted)."""
    phases = run.get("per_step_median") or {}
    return {
        "samples_per_s": run["samples_per_s"],
        "machine_cpu_us_per_sample": run.get("machine_cpu_us_per_sample"),
        "storage_nodes_cpu_s_per_step": node_cpu_s(run),
        "embedding_s_per_step_median": phases.get("embedding_forward_s", 0.0)
        + phases.get("embedding_backward_update_s", 0.0)
        if phases
        else None,
        "embedding_probe_s_per_step": (run.get("embedding_probe") or {}).get("wall_s_median"),
    }


def _run_beyond_ram(
    options: BenchOptions, systems: dict[str, dict[str, Any]], log: Callable[[str], None]
) -> dict[str, Any]:
    """`beyond_ram` (`ndp.bench.beyond_ram`): make or reuse the shard files (timed), probe
    the device under them, then ndp, ndp_lookahead and os_paged on the same files at each
    cache fraction. Adds the runs to `systems`; returns the init, the probe, summary lines."""
    from ndp.bench.device_probe import probe_device
    from ndp.coordinator import NdpEngine

    memory = options.beyond_ram_memory_bytes or beyond_ram.physical_memory_bytes()
    state_target = int(memory * options.beyond_ram_factor)
    rows = beyond_ram.beyond_ram_rows(CRITEO_ROWS, ROW_BYTES, state_target)
    state = sum(rows) * ROW_BYTES
    flash_dir = options.flash_dir or beyond_ram.DEFAULT_FLASH_DIR
    base = scenario_config(options, "large_zipf")
    num_nodes = base["cluster"]["num_storage_nodes"]

    def config(fraction: float) -> dict:
        return beyond_ram.beyond_ram_config(
            base, rows=rows, cache_fraction=fraction, flash_dir=flash_dir, num_nodes=num_nodes
        )

    source = "given" if options.beyond_ram_memory_bytes else "this machine's"
    log(
        f"beyond_ram: {state / 1e9:.2f} GB of embedding state = {state / memory:.2f}x "
        f"{source} memory {memory / 1e9:.2f} GB; shard files in {flash_dir}"
    )
    first = config_from_dict(copy.deepcopy(config(min(CACHE_FRACTIONS.values()))))
    started = time.perf_counter()
    with NdpEngine(first) as engine:  # the nodes make (or reuse) their shard files
        seconds = time.perf_counter() - started
        flash = [node["flash"] for node in engine.node_stats()]
    init = {
        "flash_dir": flash_dir,
        "state_bytes": state,
        "seconds": seconds,
        "bytes_written": sum(f["init_bytes_written"] for f in flash),
        "node_init_seconds": [f["init_seconds"] for f in flash],
        "files_initialised": sum(f["files_initialised"] for f in flash),
        "files_reused": sum(f["files_reused"] for f in flash),
    }
    tables = {t.name: t.num_rows for t in first.model.effective_tables()}
    pieces = beyond_ram.shard_pieces(Path(flash_dir), tables, first.storage.page_bytes)
    log(f"beyond_ram: device probe on {len(pieces)} shard files")
    probe = probe_device(
        [Path(p.path) for p in pieces],
        Path(flash_dir),
        seconds_per_depth=options.probe_seconds_per_depth,
        write_bytes=options.probe_write_bytes,
    )
    summary = [beyond_ram.init_line(init, probe)]
    for name, fraction in CACHE_FRACTIONS.items():
        raw = config(fraction)
        cfg = config_from_dict(copy.deepcopy(raw))
        train_data, _ = build_datasets(cfg)
        batches = list(train_data.batches(options.batch_size))
        budget = cfg.storage.cache_bytes * num_nodes
        info = {
            "embedding_state_bytes": state,
            "node_cache_budget_bytes": budget,
            "physical_memory_bytes": memory,
        }
        for system in ("ndp", "ndp_lookahead"):
            log(f"{name}: {system}")
            result = _measure_ndp(cfg, batches, options, lookahead=system == "ndp_lookahead")
            result["flash_rate"] = beyond_ram.flash_rate(
                result["flash_read_nodes"], probe, cfg.storage.io_threads
            )
            summary += beyond_ram.flash_rate_lines(f"2. {system}/{name}", result["flash_rate"])
            systems[system][name] = {**info, **result}
        log(f"{name}: os_paged (the same shard files, memory-mapped)")
        paged = {**raw, SHARD_PIECES_KEY: [asdict(p) for p in pieces]}
        result = _run_os_paged(paged, options, budget)
        timed = batches[options.warmup_steps : options.warmup_steps + options.steps]
        counters = baseline_counters("os_paged", result, timed, cfg, options.steps)
        result["energy_counters"] = asdict(counters)
        systems["os_paged"][name] = {**info, **result}
    summary = [beyond_ram.speedup_line(systems), *summary, *probe.lines()]
    return {
        "physical_memory_bytes": memory,
        "memory_source": source,
        "embedding_state_bytes": state,
        "table_rows": rows,
        "init": init,
        "device_probe": probe.to_dict(),
        "summary": summary,
    }


def _run_baseline(
    system: str, raw: dict, cfg: Config, batches: list, options: BenchOptions, budget: int
) -> dict[str, Any]:
    """One baseline's measurement on one scenario."""
    from ndp.reference import ReferenceEngine

    if system == "os_paged":
        return _run_os_paged(raw, options, budget)
    engine = ReferenceEngine(cfg) if system == "all_gpu" else HybridEngine(cfg)
    try:
        result = measure_engine(
            engine, batches, options.batch_size, options.warmup_steps, options.steps
        )
        if system == "all_gpu":  # the engine target's denominator (`ndp.bench.embedding_probe`)
            timed = batches[options.warmup_steps : options.warmup_steps + options.steps]
            result["embedding_probe"] = embedding_step_cpu_s(engine.embeddings, timed)
    finally:
        engine.close()
    result["peak_rss_bytes"] = {"bench_process (cumulative)": peak_rss_bytes()}
    result["memory_limit"] = {"applied": False, "kind": "none: every table in memory"}
    return result


# --------------------------------------------------------------------------- targets, tables


def _ratio_line(name: str, got: float, target: float) -> str:
    verdict = (
        "met" if got >= target else f"MISSED by {target - got:.2f}x ({got / target:.0%} of target)"
    )
    return f"{name}: {got:.2f}x (target >= {target}x) {verdict}"


def limits_text(name: str, run: dict[str, Any], baseline: dict[str, Any]) -> str:
    """What limits a run that missed its target, from its own measurements.

    The per-step CPU seconds of the whole machine over the usable cores is a floor under the
    step time (`ndp.bench.cpu`); when the step is close to it, the cores are the limit and no
    overlap can help. The largest phases say where the step's time goes.
    """
    step_ms = run["step_s"] * 1e3
    parts = [f"what limits it: {name} step {step_ms:.0f} ms vs {baseline['step_s'] * 1e3:.0f} ms"]
    cpu = run.get("cpu_per_step") or {}
    if cpu.get("floor_step_s"):  # None off Linux; 0 when a run is shorter than a clock tick
        floor_ms = cpu["floor_step_s"] * 1e3
        per_process = _per_process_ms(cpu, digits=0)
        parts.append(
            f"the machine was busy {cpu['machine_busy_s'] * 1e3:.0f} CPU-ms per step ({per_process})"
            f", so on {cpu['cores']} cores no schedule beats {floor_ms:.0f} ms per step "
            f"({floor_ms / step_ms:.0%} of the step: "
            + ("CPU-bound" if floor_ms >= 0.8 * step_ms else "not CPU-bound")
            + f"; the cores allow at most {baseline['step_s'] / cpu['floor_step_s']:.2f}x)"
        )
    phases = sorted(
        ((k.removesuffix("_s"), v) for k, v in run.get("per_step", {}).items() if v > 0),
        key=lambda kv: -kv[1],
    )[:3]
    if phases:
        parts.append("largest phases " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in phases))
    return "; ".join(parts)


def target_lines(systems: dict[str, dict[str, Any]]) -> list[str]:
    """The four targets, each with its ratio and whether (by how much) it was missed."""

    def ratio_line(name: str, top: tuple[str, str], bottom: tuple[str, str], target: float) -> str:
        try:
            top_run, bottom_run = systems[top[0]][top[1]], systems[bottom[0]][bottom[1]]
        except KeyError as missing:
            return f"{name}: not measured (scenario {missing} not run)"
        got = top_run["samples_per_s"] / bottom_run["samples_per_s"]
        line = _ratio_line(name, got, target)
        if got < target:
            line += "; " + limits_text(f"{top[0]}/{top[1]}", top_run, bottom_run)
        return line

    lines = [
        ratio_line(
            "1. fits in DRAM: ndp_lookahead / all_gpu",
            ("ndp_lookahead", "fits_in_dram"),
            ("all_gpu", "fits_in_dram"),
            0.7,
        ),
        _os_paged_line(systems, ratio_line),
        ratio_line(
            "3. cache at 5%: ndp_lookahead / whole table in DRAM",
            ("ndp_lookahead", "cache_5pct"),
            ("ndp_lookahead", "cache_full"),
            0.8,
        ),
    ]
    lines.append(_link_bytes_line(systems))
    lines.extend(engine_target_lines(systems))
    lines.append(cpu_per_sample_line(systems))
    return lines


def _os_paged_line(systems: dict[str, dict[str, Any]], ratio_line: Callable[..., str]) -> str:
    """Target 2, or 'not comparable' where os_paged ran without a memory limit."""
    name = "2. large_zipf: ndp / os_paged"
    os_paged = systems.get("os_paged", {}).get("large_zipf")
    if os_paged is not None and not os_paged.get("memory_limit", {}).get("applied", False):
        why = os_paged.get("memory_limit", {}).get("note", "no memory limit could be applied")
        return f"{name}: not comparable (os_paged ran with unlimited memory: {why})"
    return ratio_line(name, ("ndp", "large_zipf"), ("os_paged", "large_zipf"), 3.0)


def node_cpu_s(run: dict[str, Any]) -> float | None:
    """CPU seconds per step of all storage nodes together (None where not measured)."""
    per_process = (run.get("cpu_per_step") or {}).get("per_process_s") or {}
    nodes = [v for k, v in per_process.items() if k.startswith("storage-node")]
    if not nodes or any(v is None for v in nodes):
        return None
    return float(sum(nodes))


def engine_target_lines(systems: dict[str, dict[str, Any]]) -> list[str]:
    """The storage-node engine's targets: node CPU against FBGEMM's embedding time, machine
    CPU per sample against all_gpu, the 5% cache, and lookahead never costing."""
    lines = []
    for scenario in ("fits_in_dram", "multihot"):
        ndp, ref = systems["ndp"].get(scenario), systems["all_gpu"].get(scenario)
        if ndp is None or ref is None:
            lines.append(f"5/6. {scenario}: not measured")
            continue
        nodes = node_cpu_s(ndp)
        fbgemm, source = embedding_step_s(ref)
        if nodes is not None and fbgemm > 0:
            ratio = nodes / fbgemm
            verdict = "met" if ratio <= 4.0 else f"MISSED ({ratio / 4.0:.1f}x over)"
            lines.append(
                f"5. {scenario}: storage nodes' CPU per step {nodes * 1e3:.1f} ms vs all_gpu "
                f"embedding fwd+bwd/update ({source}) {fbgemm * 1e3:.1f} ms = {ratio:.1f}x "
                f"(target <= 4x) {verdict}"
            )
        ndp_us, ref_us = ndp.get("machine_cpu_us_per_sample"), ref.get("machine_cpu_us_per_sample")
        if ndp_us and ref_us:
            ratio = ndp_us / ref_us
            verdict = "met" if ratio <= 1.3 else f"MISSED by {ratio - 1.3:.2f}x"
            lines.append(
                f"6. {scenario}: machine CPU per sample ndp / all_gpu {ndp_us:.0f} / "
                f"{ref_us:.0f} us = {ratio:.2f}x (target <= 1.3x) {verdict}"
            )
    full = systems["ndp_lookahead"].get("cache_full")
    five = systems["ndp_lookahead"].get("cache_5pct")
    if full and five:
        got = five["samples_per_s"] / full["samples_per_s"]
        lines.append(_ratio_line("7. cache at 5%: ndp_lookahead / whole table cached", got, 0.85))
    ratios = {
        scenario: run["samples_per_s"] / systems["ndp"][scenario]["samples_per_s"]
        for scenario, run in systems["ndp_lookahead"].items()
        if scenario in systems["ndp"]
    }
    if ratios:
        worst = min(ratios, key=ratios.__getitem__)
        each = ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
        lines.append(
            _ratio_line(
                f"8. lookahead never costs (worst: {worst}): ndp_lookahead / ndp",
                ratios[worst],
                0.95,
            )
            + f" [{each}]"
        )
    return lines


def embedding_step_s(all_gpu_run: dict[str, Any]) -> tuple[float, str]:
    """(seconds, where from) of all_gpu's FBGEMM forward + backward/update per step.

    The median step of `ndp.bench.embedding_probe` (the same module and timed batches, trained
    again in a loop of their own) where measured: the phase clock's median of the timed
    window moved 35% between runs on the shared machine. Else that phase median.
    """
    probe = all_gpu_run.get("embedding_probe")
    if probe:
        return float(probe["wall_s_median"]), f"median of {probe['steps']:.0f} probe steps"
    phases = all_gpu_run.get("per_step_median") or all_gpu_run.get("per_step", {})
    fbgemm = phases.get("embedding_forward_s", 0.0) + phases.get("embedding_backward_update_s", 0.0)
    return fbgemm, "median step of the run"


def cpu_per_sample_line(systems: dict[str, dict[str, Any]]) -> str:
    """Machine busy CPU-us per trained sample of every system, and its ratio to all_gpu.

    Why printed beside the throughput: on a machine whose cores every process of ndp shares,
    wall-clock ratios measure the sharing; CPU per sample measures the design.
    """
    parts = []
    for scenario in REPORTED_SCENARIOS:
        ref = systems.get("all_gpu", {}).get(scenario, {}).get("machine_cpu_us_per_sample")
        cells = []
        for system, runs in systems.items():
            us = runs.get(scenario, {}).get("machine_cpu_us_per_sample")
            if us is None:
                continue
            cells.append(f"{system} {us:.0f}" + (f" ({us / ref:.2f}x)" if ref else ""))
        if cells:
            parts.append(f"{scenario}: " + ", ".join(cells))
    return "CPU per sample (machine busy us/sample, x all_gpu): " + ("; ".join(parts) or "none")


def link_bytes_check(systems: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """Measured pooled bytes per sample (fp32 and fp16 wire) against the pooled size."""
    runs = systems.get("ndp", {})
    if "wire_bytes_per_sample" not in runs.get("fits_in_dram", {}):
        return None
    wire = runs["fits_in_dram"]["wire_bytes_per_sample"]
    out = {
        "expected_fp32": float(len(CRITEO_ROWS) * DIM * WIRE_BYTES["fp32"]),
        "pooled_data_fp32": wire.get("Lookup.received.float_data", 0.0),
        "lookup_reply_fp32": wire.get("Lookup.received", 0.0),
        # gradients ride on the next lookup (`pipeline.push`) or go in pushes of their own
        "gradient_data_fp32": wire.get("PushGradients.sent.float_data", 0.0)
        + wire.get("Lookup.sent.float_data", 0.0),
    }
    if "fits_in_dram_fp16_wire" in runs:
        wire16 = runs["fits_in_dram_fp16_wire"]["wire_bytes_per_sample"]
        out["pooled_data_fp16"] = wire16.get("Lookup.received.float_data", 0.0)
        out["lookup_reply_fp16"] = wire16.get("Lookup.received", 0.0)
    return out


def _link_bytes_line(systems: dict[str, dict[str, Any]]) -> str:
    check = link_bytes_check(systems)
    name = "4. link bytes per sample (pooled vectors in, measured on the wire)"
    if check is None:
        return f"{name}: not measured (fits_in_dram not run)"
    fp32, expected = check["pooled_data_fp32"], check["expected_fp32"]
    verdict = "equal" if abs(fp32 - expected) < 1e-6 else "DIFFERENT"
    run = systems["ndp"]["fits_in_dram"]
    link = run.get("link_bytes_per_sample", {})
    line = (
        f"{name}: whole Lookup replies {check['lookup_reply_fp32']:.1f} B/sample, of which "
        f"the pooled vectors' bytes fields {fp32:.1f} vs pooled size {expected:.0f} = "
        f"{len(CRITEO_ROWS)} features x {DIM} dim x 4 B ({verdict}; protobuf framing "
        f"{check['lookup_reply_fp32'] / expected - 1:+.1%}); gradients' bytes fields out "
        f"{check['gradient_data_fp32']:.1f}; every message in/out "
        f"{link.get('link_bytes_in', 0.0):.1f} / {link.get('link_bytes_out', 0.0):.1f}"
    )
    if "pooled_data_fp16" in check:
        fp16 = check["pooled_data_fp16"]
        line += f"; fp16 wire: {fp16:.1f} ({fp16 / fp32 if fp32 else 0:.3f}x of fp32)"
    return line


def _throughput_table(systems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    scenarios = [s for s in REPORTED_SCENARIOS if _ran(systems, s)]
    rows = []
    for system, runs in systems.items():
        row: list[Any] = [system]
        for scenario in scenarios:
            run = runs.get(scenario)
            row.append(round(run["samples_per_s"], 1) if run else "-")
        rows.append(row)
    return {"title": "samples/s", "columns": ["system", *scenarios], "rows": rows}


def _cpu_per_sample_table(systems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Machine busy CPU-us per sample, each with its ratio to all_gpu in the same scenario."""
    scenarios = [s for s in REPORTED_SCENARIOS if _ran(systems, s)]
    rows = []
    for system, runs in systems.items():
        row: list[Any] = [system]
        for scenario in scenarios:
            us = runs.get(scenario, {}).get("machine_cpu_us_per_sample")
            ref_run = systems.get("all_gpu", {}).get(scenario) or systems.get("all_gpu", {}).get(
                "fits_in_dram" if scenario == "fits_in_dram_fp16_wire" else ""
            )
            ref = (ref_run or {}).get("machine_cpu_us_per_sample")
            row.append("-" if us is None else f"{us:.0f}" + (f" ({us / ref:.2f}x)" if ref else ""))
        rows.append(row)
    return {
        "title": "machine CPU per sample (busy CPU-us per trained sample; x all_gpu)",
        "columns": ["system", *scenarios],
        "rows": rows,
    }


def _page_cache_limit_cell(limit: dict[str, Any]) -> str:
    """os_paged's limit as it applied: the page cache each step starts with, and the room the
    step's faulted pages may use within it (`baselines.PageCacheBudget`'s headroom; at
    cache_5pct 34 MiB against a 0.63 MiB budget, enough to keep a step's pages until its
    update, which a storage node's cache budget does not allow)."""
    budget = limit.get("page_cache_budget_bytes", 0)
    cell = f"cgroup v{limit.get('cgroup_version', 1)}: page cache {budget / 2**20:.2f} MiB"
    headroom = limit.get("headroom_bytes")
    if headroom:
        cell += f" at each step's start, + {headroom / 2**20:.1f} MiB within a step"
    return cell


def _node_memory_cell(limit: dict[str, Any]) -> str:
    """ndp's DRAM for rows: each node's cache, and the flash blocks its nodes held beyond it
    (the most of any node, at any time and carried across a step boundary)."""
    cell = f"cache {limit['bytes_per_node'] / 2**20:.2f} MiB x {limit['nodes']} nodes"
    peak = limit.get("held_blocks_peak_bytes", 0)
    if peak:
        across = limit.get("held_blocks_peak_across_steps_bytes", 0)
        cell += (
            f", + up to {peak / 2**20:.1f} MiB of held flash blocks per node"
            f" ({across / 2**20:.1f} MiB across steps)"
        )
    return cell


def _flash_and_memory_table(systems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Flash bytes per sample, hit rates over every access, the memory limit that applied."""
    rows = []
    for system, scenario, run in _all_runs(systems):
        limit = run.get("memory_limit", {})
        if not limit.get("applied"):
            memory = "unlimited"
        elif "bytes_per_node" in limit:
            memory = _node_memory_cell(limit)
        else:
            memory = _page_cache_limit_cell(limit)
        rates = run.get("cache_hit_rate")
        rows.append(
            [
                system,
                scenario,
                _bytes_cell(run.get("flash_bytes_read_per_sample")),
                _bytes_cell(run.get("flash_bytes_written_per_sample")),
                " / ".join(f"{r:.3f}" for r in rates) if rates else "-",
                memory,
            ]
        )
    columns = ["system", "scenario", "flash read B/sample", "flash written B/sample"]
    columns += ["node hit rate (every access)", "memory limit"]
    return {"title": "flash traffic, hit rates, memory limits", "columns": columns, "rows": rows}


def _bytes_cell(value: float | None) -> Any:
    return "-" if value is None else round(value, 1)


def _ran(systems: dict[str, dict[str, Any]], scenario: str) -> bool:
    return any(scenario in runs for runs in systems.values())


def _breakdown_table(systems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-step milliseconds by phase (worker clocks; `unaccounted` = wall - their sum)."""
    runs = _all_runs(systems)
    phases = sorted({p for _, _, run in runs for p in run["per_step"]})
    rows = [
        [
            system,
            scenario,
            round(run["step_s"] * 1e3, 1),
            *(round(run["per_step"].get(p, 0.0) * 1e3, 1) for p in phases),
        ]
        for system, scenario, run in runs
    ]
    columns = ["system", "scenario", "step ms", *(p.removesuffix("_s") + " ms" for p in phases)]
    return {"title": "per-step breakdown (ms)", "columns": columns, "rows": rows}


def _all_runs(systems: dict[str, dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(system, scenario, run) of every measured run, in report order."""
    return [
        (system, scenario, run)
        for system, by_scenario in systems.items()
        for scenario, run in by_scenario.items()
    ]


def _per_process_ms(cpu: dict[str, Any], *, digits: int) -> str:
    """'name ms, name ms' of the per-step CPU time of each measured process."""
    return ", ".join(
        f"{name} {seconds * 1e3:.{digits}f}"
        for name, seconds in (cpu.get("per_process_s") or {}).items()
        if seconds is not None
    )


def _cpu_table(systems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """CPU-ms per step: the machine's busy time, the floor it puts under the step, by process."""
    rows = []
    for system, scenario, run in _all_runs(systems):
        cpu = run.get("cpu_per_step") or {}
        if cpu.get("machine_busy_s") is None:
            continue
        processes = _per_process_ms(cpu, digits=1)
        rows.append(
            [
                system,
                scenario,
                round(run["step_s"] * 1e3, 1),
                round(cpu["machine_busy_s"] * 1e3, 1),
                round(cpu["floor_step_s"] * 1e3, 1),
                processes,
            ]
        )
    columns = ["system", "scenario", "step ms", "machine busy CPU-ms", "CPU floor ms"]
    columns.append("CPU-ms by process")
    return {
        "title": "CPU per step (machine-wide; floor = busy / usable cores)",
        "columns": columns,
        "rows": rows,
    }


def _wire_table(systems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """ndp link bytes per sample by RPC and direction, and hit rates and peak RSS."""
    keys = (
        "Lookup.sent",
        "Lookup.sent.float_data",
        "Lookup.received",
        "Lookup.received.float_data",
        "PushGradients.sent",
        "PushGradients.sent.float_data",
        "EarlyLookup.sent",
    )
    rows = []
    for system in ("ndp", "ndp_lookahead"):
        for scenario, run in systems.get(system, {}).items():
            wire = run["wire_bytes_per_sample"]
            rows.append(
                [
                    system,
                    scenario,
                    *(round(wire.get(k, 0.0), 1) for k in keys),
                    " / ".join(f"{r:.3f}" for r in run["cache_hit_rate"]),
                    round(max(run["peak_rss_bytes"].values()) / 2**20),
                ]
            )
    columns = ["system", "scenario", *(f"{k} B/sample" for k in keys)]
    columns += ["cache hit rate per node", "max peak RSS MiB"]
    return {"title": "ndp link bytes per sample, hit rates", "columns": columns, "rows": rows}


def _throughput_plot(systems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    scenarios = [s for s in REPORTED_SCENARIOS if _ran(systems, s)]
    return {
        "kind": "bars",
        "title": "training throughput per scenario",
        "xlabel": "scenario",
        "ylabel": "samples/s",
        "categories": scenarios,
        "series": [
            {
                "label": system,
                "y": [runs[s]["samples_per_s"] if s in runs else None for s in scenarios],
            }
            for system, runs in systems.items()
        ],
    }
