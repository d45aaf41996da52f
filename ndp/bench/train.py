"""`ndp-bench train`: end-to-end training throughput of ndp against its baselines.

Every system trains the same DLRM (Criteo-shaped: 26 tables, 13 dense features, dim 16) on
the same synthetic batches, one after the other in this process tree:

    all_gpu        ReferenceEngine: everything on the worker's device (cpu without CUDA)
    hybrid         tables in host memory (EmbeddingBag + CPU sparse SGD), dense on the device
    os_paged       tables as memory-mapped files, in a subprocess inside a memory cgroup (v1)
                   whose limit holds its page cache to the storage nodes' DRAM budget
                   (`baselines.PageCacheBudget`, re-set after every step)
    ndp            NdpEngine, lookahead 0
    ndp_lookahead  NdpEngine, lookahead `BenchOptions.lookahead_depth` (early pooling on)

`ndp` and `ndp_lookahead` share one engine per scenario (one set of actors; the lookahead
run continues the step numbering after the ndp run), so a scenario starts its actors once.
The storage nodes read flash with O_DIRECT, so their DRAM for rows is exactly
`storage.cache_bytes`, as the os_paged cgroup's page cache is.

Scenarios: `fits_in_dram` (node caches hold every row), `large_zipf` (embedding state >= 4x
the nodes' cache budget), `cache_5pct` (cache = 5% of the tables) against `cache_full` (the
same run with the whole table in DRAM; ndp systems only), `multihot` (mean pooling factor
20). Each run: `warmup_steps`, then `steps` timed; samples/s, per-step phase seconds, link
bytes per sample (counted on the workers' gRPC clients: serialised message sizes), cache hit
rates over the timed steps (node stats), peak RSS per process, CPU seconds per step of each
process and of the whole machine (`ndp.bench.cpu`). A missed target's line says what limits
it: the CPU floor (busy CPU-seconds / usable cores) against the step, and the largest phases.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ndp.bench.baselines import HybridEngine, peak_rss_bytes
from ndp.bench.cpu import CpuMeter
from ndp.bench.report import machine_info, timestamp
from ndp.config import Config, config_from_dict
from ndp.data.loader import build_datasets
from ndp.pipeline import with_lookahead

CRITEO_ROWS = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
    14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
SYSTEMS = ("all_gpu", "hybrid", "os_paged", "ndp", "ndp_lookahead")
SCENARIOS = ("fits_in_dram", "large_zipf", "cache_5pct", "cache_full", "multihot")
NDP_ONLY_SCENARIOS = ("cache_full",)
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
    scenarios: tuple[str, ...] = SCENARIOS
    """Which scenarios to run (the targets of the missing ones are reported as not measured)."""
    fp16_wire: bool = True
    """Also run ndp on `fits_in_dram` with fp16 on the wire (target 4)."""
    worker_cpus: float | None = None
    """Ray CPUs of the GPU-worker actor, which Ray turns into its torch threads. None: the
    cores this process may run on, capped at what the Ray instance has, i.e. as many threads
    as the in-process baselines' dense half uses (without a CPU request an actor gets one)."""

    @classmethod
    def quick(cls) -> BenchOptions:
        return cls(batch_size=1024, warmup_steps=6, steps=36, fits_rows=20_000, large_rows=300_000)

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

    def __post_init__(self) -> None:
        unknown = [s for s in self.scenarios if s not in SCENARIOS]
        assert not unknown, f"unknown scenarios {unknown}; known: {SCENARIOS}"


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
    # ndp runs the ndp steps, then the lookahead steps on the same engine and data
    steps = 2 * (options.warmup_steps + options.steps) + options.lookahead_depth + 1
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
        },
        "pipeline": {"lookahead_depth": options.lookahead_depth},
        "logging": {"progress_bar": False},
    }


def measure_engine(
    engine: Any,
    batches: list[Any],
    batch_size: int,
    warmup: int,
    steps: int,
    *,
    cfg: Config | None = None,
    first_step: int = 0,
    at_timed_start: Callable[[], None] = lambda: None,
    cpu_pids: Mapping[str, int | str] | None = None,
) -> dict[str, Any]:
    """Train `warmup` untimed then `steps` timed steps; samples/s, per-step phase seconds and
    per-step CPU seconds (`ndp.bench.cpu`).

    Args:
        batches: the scenario's batches; steps `first_step ...` train on them in order.
        cfg: with a lookahead depth > 0, batches go through `with_lookahead` (ndp only).
        at_timed_start: called between the warm-up and the timed steps (counters reset).
        cpu_pids: {name: pid} of the processes doing the work; None: this process only.
    """
    meter = CpuMeter(cpu_pids) if cpu_pids is not None else CpuMeter()
    total = warmup + steps
    stream = ((first_step + i, batches[first_step + i]) for i in range(total))
    if cfg is not None:
        stream = with_lookahead(stream, engine, cfg.pipeline)
    start = time.perf_counter()
    for step, batch in stream:
        if step == first_step + warmup:
            at_timed_start()
            engine.timings()
            meter.start()
            start = time.perf_counter()
        engine.train_step(step, batch)
    elapsed = time.perf_counter() - start
    cpu = meter.stop(steps)
    timings = engine.timings()
    per_step = {k: v / steps for k, v in timings.items() if k.endswith("_s")}
    beside = {"storage_update_s"}  # the nodes' clocks: beside the workers' phases
    per_step["unaccounted_s"] = elapsed / steps - sum(
        v for k, v in per_step.items() if k not in beside
    )
    return {
        "samples_per_s": steps * batch_size / elapsed,
        "step_s": elapsed / steps,
        "per_step": per_step,
        "cpu_per_step": cpu,
        "link_bytes_per_sample_computed": {
            k: v / (steps * batch_size) for k, v in timings.items() if k.startswith("link_bytes")
        },
    }


# --------------------------------------------------------------------------- ndp


def _take_wire_bytes(engine: Any) -> dict[str, int]:
    """Bytes the GPU workers' gRPC clients sent/received since the last call, summed."""
    import ray

    def take(worker: Any) -> list[dict[str, int]]:
        return [client.take_wire_bytes() for client in worker.clients]

    workers = [ray.get_actor(f"ndp-gpu-worker-{rank}") for rank in range(engine.num_workers)]
    merged: dict[str, int] = {}
    per_worker = ray.get([w.__ray_call__.remote(take) for w in workers])
    for per_client in per_worker:
        for counts in per_client:
            for key, value in counts.items():
                merged[key] = merged.get(key, 0) + value
    return merged


def _cache_counts(engine: Any) -> list[tuple[int, int]]:
    return [(n["cache"]["hits"], n["cache"]["misses"]) for n in engine.node_stats()]


def _measure_ndp(
    engine: Any,
    batches: list,
    options: BenchOptions,
    cfg: Config | None,
    first_step: int,
    pids: Mapping[str, int | str],
) -> dict[str, Any]:
    """One ndp measurement on a running engine: throughput, wire bytes, hit rates."""
    before: dict[str, Any] = {}

    def reset() -> None:
        _take_wire_bytes(engine)
        before["cache"] = _cache_counts(engine)

    result = measure_engine(
        engine,
        batches,
        options.batch_size,
        options.warmup_steps,
        options.steps,
        cfg=cfg,
        first_step=first_step,
        at_timed_start=reset,
        cpu_pids=pids,
    )
    engine.flush()  # the last push's reply is counted when collected
    samples = options.steps * options.batch_size
    wire = _take_wire_bytes(engine)
    result["wire_bytes_per_sample"] = {k: v / samples for k, v in sorted(wire.items())}
    rates = []
    for (hits0, misses0), (hits1, misses1) in zip(
        before["cache"], _cache_counts(engine), strict=True
    ):
        lookups = hits1 + misses1 - hits0 - misses0
        rates.append((hits1 - hits0) / lookups if lookups else 0.0)
    result["cache_hit_rate"] = rates
    return result


def _run_ndp_pair(
    cfg: Config, batches: list, options: BenchOptions, systems: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    """`ndp` (no lookahead) then `ndp_lookahead` on one engine; {system: result}."""
    from ndp.coordinator import NdpEngine

    out: dict[str, dict[str, Any]] = {}
    with NdpEngine(cfg) as engine:
        pids: dict[str, int | str] = {"bench_process (coordinator)": "self"}
        pids.update(engine.component_pids())
        first_step = 0
        for system in systems:
            lookahead = cfg if system == "ndp_lookahead" else None
            out[system] = _measure_ndp(engine, batches, options, lookahead, first_step, pids)
            first_step += options.warmup_steps + options.steps
        rss = {name: peak_rss_bytes(pid) for name, pid in engine.component_pids().items()}
    for result in out.values():
        result["peak_rss_bytes"] = rss
    return out


# --------------------------------------------------------------------------- os_paged


def _make_cgroup() -> tuple[Path | None, str]:
    """A fresh child memory cgroup (v1), or None and why not."""
    root = Path("/sys/fs/cgroup/memory")
    group = root / f"ndp-bench-{os.getpid()}-{time.monotonic_ns()}"
    try:
        group.mkdir()
    except OSError as exc:
        return None, f"no memory cgroup ({root} not writable: {exc.strerror}); ran UNLIMITED"
    return group, str(group)


def _run_os_paged(raw: dict, options: BenchOptions, dram_budget: int) -> dict[str, Any]:
    """OsPagedEngine in a subprocess in its own memory cgroup; the cgroup removed after."""
    with tempfile.TemporaryDirectory(prefix="ndp-bench-") as tmp:
        config_path, out_path = Path(tmp) / "config.json", Path(tmp) / "out.json"
        config_path.write_text(json.dumps(raw))
        group, note = _make_cgroup()
        command = [sys.executable, "-m", "ndp.bench.baselines", str(config_path), str(out_path)]
        command += [str(options.warmup_steps), str(options.steps)]
        if group is not None:
            command += [str(group), str(dram_budget)]

        def enter_group() -> None:
            if group is not None:
                (group / "cgroup.procs").write_text(str(os.getpid()))

        try:
            subprocess.run(command, check=True, preexec_fn=enter_group)
        finally:
            if group is not None:
                _remove_cgroup(group)
        result = json.loads(out_path.read_text())
    if group is None:
        result["memory_limit"] = {"note": note}
    return result


def _remove_cgroup(group: Path) -> None:
    for _ in range(50):  # the exited child leaves the group asynchronously
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


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
    try:
        systems = _run_all(options, log)
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
    results["summary"] = target_lines(systems)
    results["tables"] = [
        _throughput_table(systems),
        _breakdown_table(systems),
        _cpu_table(systems),
        _wire_table(systems),
    ]
    results["plots"] = [_throughput_plot(systems)]
    return results


def _run_all(options: BenchOptions, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    systems: dict[str, dict[str, Any]] = {name: {} for name in SYSTEMS}
    for scenario in options.scenarios:
        raw = scenario_config(options, scenario)
        cfg = config_from_dict(copy.deepcopy(raw))
        train_data, _ = build_datasets(cfg)
        batches = list(train_data.batches(options.batch_size))
        budget = cfg.storage.cache_bytes * cfg.cluster.num_storage_nodes
        state = sum(t.num_rows for t in cfg.model.effective_tables()) * ROW_BYTES
        info = {"embedding_state_bytes": state, "node_cache_budget_bytes": budget}
        for system in ("all_gpu", "hybrid", "os_paged"):
            if scenario in NDP_ONLY_SCENARIOS:
                continue
            log(f"{scenario}: {system}")
            result = _run_baseline(system, raw, cfg, batches, options, budget)
            systems[system][scenario] = {**info, **result}
        log(f"{scenario}: ndp, ndp_lookahead")
        for system, result in _run_ndp_pair(
            cfg, batches, options, ("ndp", "ndp_lookahead")
        ).items():
            systems[system][scenario] = {**info, **result}
        if scenario == "fits_in_dram" and options.fp16_wire:
            fp16 = replace(cfg, storage=replace(cfg.storage, wire_dtype="fp16"))
            log(f"{scenario}: ndp (fp16 wire)")
            result = _run_ndp_pair(fp16, batches, options, ("ndp",))["ndp"]
            systems["ndp"]["fits_in_dram_fp16_wire"] = {**info, **result}
    return systems


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
    finally:
        engine.close()
    result["peak_rss_bytes"] = {"bench_process (cumulative)": peak_rss_bytes()}
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
        ratio_line(
            "2. large_zipf: ndp / os_paged",
            ("ndp", "large_zipf"),
            ("os_paged", "large_zipf"),
            3.0,
        ),
        ratio_line(
            "3. cache at 5%: ndp_lookahead / whole table in DRAM",
            ("ndp_lookahead", "cache_5pct"),
            ("ndp_lookahead", "cache_full"),
            0.8,
        ),
    ]
    lines.append(_link_bytes_line(systems))
    return lines


def link_bytes_check(systems: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """Measured pooled bytes per sample (fp32 and fp16 wire) against the pooled size."""
    runs = systems.get("ndp", {})
    if "fits_in_dram" not in runs:
        return None
    wire = runs["fits_in_dram"]["wire_bytes_per_sample"]
    out = {
        "expected_fp32": float(len(CRITEO_ROWS) * DIM * WIRE_BYTES["fp32"]),
        "pooled_data_fp32": wire.get("Lookup.received.float_data", 0.0),
        "lookup_reply_fp32": wire.get("Lookup.received", 0.0),
        "gradient_data_fp32": wire.get("PushGradients.sent.float_data", 0.0),
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
    line = (
        f"{name}: tensor bytes {fp32:.1f} vs pooled size {expected:.0f} = {len(CRITEO_ROWS)} "
        f"features x {DIM} dim x 4 B ({verdict}); whole Lookup replies "
        f"{check['lookup_reply_fp32']:.1f} B/sample (protobuf framing "
        f"{check['lookup_reply_fp32'] / expected - 1:+.1%}); gradients out "
        f"{check['gradient_data_fp32']:.1f}"
    )
    if "pooled_data_fp16" in check:
        fp16 = check["pooled_data_fp16"]
        line += f"; fp16 wire: {fp16:.1f} ({fp16 / fp32 if fp32 else 0:.3f}x of fp32)"
    return line


def _throughput_table(systems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    scenarios = [s for s in (*SCENARIOS, "fits_in_dram_fp16_wire") if _ran(systems, s)]
    rows = []
    for system, runs in systems.items():
        row: list[Any] = [system]
        for scenario in scenarios:
            run = runs.get(scenario)
            row.append(round(run["samples_per_s"], 1) if run else "-")
        rows.append(row)
    return {"title": "samples/s", "columns": ["system", *scenarios], "rows": rows}


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
    scenarios = [s for s in (*SCENARIOS, "fits_in_dram_fp16_wire") if _ran(systems, s)]
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
