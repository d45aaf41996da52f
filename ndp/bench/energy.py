"""Energy per iteration of every system `ndp-bench train` measures (`ndp.energy` priced).

Each system's counters come from its own timed window (the same steps its samples/s is
measured over); `COUNTER_SOURCES` says where each one comes from, and every run records it.
A counter a system cannot have is 0 by construction and says so (the hybrid's tables never
touch a file); a counter a system should have measured and did not is an error
(`CounterNotMeasured`), never a silent 0.

                 ndp / ndp_lookahead        all_gpu, hybrid             os_paged
    dram         nodes' cache bytes r+w     rows gathered + updated     same + page-cache fills
    flash        nodes' flash counters      0 (tables in memory)        its cgroup's block I/O
    link         gRPC message bytes         batch/pooled tensors to     flash bytes (NVMe link)
                                            the device (0 on cpu)       + the same
    cpu          CPU-s of coordinator       CPU-s of the bench process  CPU-s of its subprocess
                 and worker
    device       CPU-s of the nodes         0 (no device compute)       0
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch

from ndp.config import Config, EnergyConfig
from ndp.energy import TERMS, EnergyCounters, energy_terms, shares
from ndp.model.dense_step import resolve_device

OS_PAGE_BYTES = 4096
"""The kernel moves a memory-mapped file to and from its device in 4 KiB pages."""
COUNTER_SOURCES = {
    "ndp": {
        "dram_bytes": "storage nodes' cache counters: row bytes read + written",
        "flash": "storage nodes' flash counters: bytes and pages of O_DIRECT preads/pwrites",
        "link_bytes": "lengths of every gRPC message the worker's and coordinator's clients "
        "sent and received",
        "cpu_busy_s": "CPU-s of the coordinator and GPU worker processes",
        "device_busy_s": "CPU-s of the storage-node processes (the device's compute)",
    },
    "in_memory": {
        "dram_bytes": "rows the step's indices gathered + rows the update read and wrote "
        "(unique per table and step), from the timed batches",
        "flash": "none: every table is in memory",
        "link_bytes": "batch / pooled and gradient tensors moved to and from the device "
        "(0 when the device is the cpu)",
        "cpu_busy_s": "CPU-s of the bench process",
    },
    "os_paged": {
        "dram_bytes": "rows gathered + updated as in memory, plus the page cache's fills "
        "and write-backs (the flash bytes)",
        "flash": "its cgroup's (else its own) block I/O bytes; pages = bytes / 4 KiB",
        "link_bytes": "the flash bytes (they cross the SSD's host link) + device transfers",
        "cpu_busy_s": "CPU-s of the os_paged subprocess",
    },
}


class CounterNotMeasured(RuntimeError):
    """A counter the energy model prices was not measured by the run."""


def _cpu_busy_s(run: dict[str, Any], steps: int, system: str) -> tuple[float, float]:
    """(host, storage-node) busy CPU-seconds over the window, from the per-process meter."""
    per_process = (run.get("cpu_per_step") or {}).get("per_process_s") or {}
    if not per_process or any(v is None for v in per_process.values()):
        raise CounterNotMeasured(f"{system}: CPU seconds per process not measured")
    device = sum(v for k, v in per_process.items() if k.startswith("storage-node"))
    host = sum(v for k, v in per_process.items() if not k.startswith("storage-node"))
    return float(host) * steps, float(device) * steps


def ndp_counters(
    nodes: list[dict[str, int]], wire: dict[str, int], run: dict[str, Any], steps: int
) -> EnergyCounters:
    """ndp's counters over the timed window.

    Args:
        nodes: per node, the change of `dram_bytes`, `flash_bytes_read/written` and
            `flash_pages_read/written` over the window (`ndp.bench.train._node_counters`).
        wire: change of the engine's `wire_bytes()` over the window.
        run: the `measure_engine` result (its `cpu_per_step`).
    """
    keys = ("dram_bytes", "flash_bytes_read", "flash_bytes_written")
    keys += ("flash_pages_read", "flash_pages_written")
    missing = [k for k in keys for node in nodes if k not in node]
    if not nodes or missing:
        raise CounterNotMeasured(f"ndp: node counters not measured: {sorted(set(missing))}")
    messages = [k for k in wire if k.count(".") == 1]  # "<Rpc>.<sent|received>"
    if not messages:
        raise CounterNotMeasured("ndp: no gRPC message bytes measured on the link")
    host_s, device_s = _cpu_busy_s(run, steps, "ndp")
    if not any(k.startswith("storage-node") for k in run["cpu_per_step"]["per_process_s"]):
        raise CounterNotMeasured("ndp: the storage nodes' CPU seconds are not measured")
    return EnergyCounters(
        **{k: sum(node[k] for node in nodes) for k in keys},
        link_bytes=sum(wire[k] for k in messages),
        cpu_busy_s=host_s,
        device_busy_s=device_s,
    )


def row_traffic_bytes(batches: list[Any], cfg: Config) -> int:
    """DRAM bytes an in-memory table engine moves for `batches`: every looked-up row read
    once, every row the update touches read and written once (unique per table and step)."""
    tables = cfg.model.effective_tables()
    table_of = {f: i for i, t in enumerate(tables) for f in t.features}
    row_bytes = torch.tensor([t.embedding_dim * 4 for t in tables], dtype=torch.int64)
    stride = max(t.num_rows for t in tables)
    total = 0
    for batch in batches:
        sparse = batch.sparse
        lengths = sparse.lengths().view(len(sparse.keys()), -1).sum(dim=1)
        table_ids = torch.tensor([table_of[k] for k in sparse.keys()], dtype=torch.int64)
        value_tables = torch.repeat_interleave(table_ids, lengths)
        gathered = row_bytes[value_tables].sum()
        unique = torch.unique(value_tables * stride + sparse.values().to(torch.int64))
        updated = row_bytes[unique // stride].sum()
        total += int(gathered + 2 * updated)
    return total


def _device_bytes(system: str, batches: list[Any], cfg: Config) -> int:
    """Bytes the engine moves between host and device; 0 when the device is the cpu."""
    if resolve_device(cfg.train.device).type == "cpu":
        return 0
    pooled_width = sum(t.embedding_dim * len(t.features) for t in cfg.model.effective_tables())
    total = 0
    for batch in batches:
        inputs = batch.dense.nbytes + batch.labels.nbytes
        if system == "all_gpu":  # the whole batch goes to the device
            sparse = batch.sparse
            total += inputs + sparse.values().nbytes + sparse.lengths().nbytes
        else:  # pooled vectors in, their gradients out (fp32)
            total += inputs + 2 * batch.dense.shape[0] * pooled_width * 4
    return total


def baseline_counters(
    system: str, run: dict[str, Any], timed_batches: list[Any], cfg: Config, steps: int
) -> EnergyCounters:
    """all_gpu's, hybrid's or os_paged's counters over the timed window."""
    dram = row_traffic_bytes(timed_batches, cfg)
    device = _device_bytes(system, timed_batches, cfg)
    host_s, _ = _cpu_busy_s(run, steps, system)
    if system != "os_paged":
        return EnergyCounters(
            dram_bytes=dram,
            flash_bytes_read=0,
            flash_bytes_written=0,
            flash_pages_read=0,
            flash_pages_written=0,
            link_bytes=device,
            cpu_busy_s=host_s,
        )
    if run.get("flash_bytes_read") is None or run.get("flash_bytes_written") is None:
        raise CounterNotMeasured("os_paged: flash bytes not measured")
    read, written = int(run["flash_bytes_read"]), int(run["flash_bytes_written"])
    return EnergyCounters(
        dram_bytes=dram + read + written,
        flash_bytes_read=read,
        flash_bytes_written=written,
        flash_pages_read=math.ceil(read / OS_PAGE_BYTES),
        flash_pages_written=math.ceil(written / OS_PAGE_BYTES),
        link_bytes=read + written + device,
        cpu_busy_s=host_s,
    )


def counter_sources(system: str) -> dict[str, str]:
    """Where `system`'s counters come from (recorded beside them)."""
    if system.startswith("ndp"):
        return COUNTER_SOURCES["ndp"]
    return COUNTER_SOURCES["os_paged" if system == "os_paged" else "in_memory"]


# --------------------------------------------------------------------------- pricing, report


def price_runs(
    systems: dict[str, dict[str, Any]], constants: EnergyConfig, *, steps: int, batch_size: int
) -> None:
    """Add `energy` (joules per iteration and per sample, per term, shares) to every run."""
    for system, runs in systems.items():
        for run in runs.values():
            counters = EnergyCounters(**run["energy_counters"])
            terms = energy_terms(counters, constants)
            total = sum(terms.values())
            run["energy"] = {
                "per_iteration_j": total / steps,
                "per_sample_j": total / (steps * batch_size),
                "per_iteration_by_term_j": {k: v / steps for k, v in terms.items()},
                "shares": shares(terms),
                "counters_per_iteration": counters.scaled(1 / steps),
                "counter_sources": counter_sources(system),
            }


def energy_model_record(constants: EnergyConfig, device_profile: str | None) -> dict[str, Any]:
    """What results.json keeps about the model: the constants and the profile that set them."""
    return {"device_profile": device_profile, "constants": asdict(constants), "terms": TERMS}


def energy_table(systems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """mJ per iteration, uJ per sample and each term's share, for every run."""
    rows = []
    for system, runs in systems.items():
        for scenario, run in runs.items():
            energy = run["energy"]
            rows.append(
                [
                    system,
                    scenario,
                    round(energy["per_iteration_j"] * 1e3, 3),
                    round(energy["per_sample_j"] * 1e6, 3),
                    *(f"{energy['shares'][t]:.1%}" for t in TERMS),
                ]
            )
    columns = ["system", "scenario", "mJ/iteration", "uJ/sample", *(f"{t} share" for t in TERMS)]
    return {"title": "energy per iteration (ndp.energy model)", "columns": columns, "rows": rows}


def energy_plot(systems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Bars of mJ per iteration per scenario, one series per system."""
    scenarios = list(dict.fromkeys(s for runs in systems.values() for s in runs))
    return {
        "kind": "bars",
        "title": "energy per iteration (model)",
        "xlabel": "scenario",
        "ylabel": "mJ / iteration",
        "categories": scenarios,
        "series": [
            {
                "label": system,
                "y": [
                    runs[s]["energy"]["per_iteration_j"] * 1e3 if s in runs else None
                    for s in scenarios
                ],
            }
            for system, runs in systems.items()
        ],
    }


def energy_lines(systems: dict[str, dict[str, Any]]) -> list[str]:
    """Per scenario: mJ per iteration of every system, and ndp / hybrid."""
    scenarios = list(dict.fromkeys(s for runs in systems.values() for s in runs))
    lines = []
    for scenario in scenarios:
        cells = [
            f"{system} {runs[scenario]['energy']['per_iteration_j'] * 1e3:.2f}"
            for system, runs in systems.items()
            if scenario in runs
        ]
        ndp = systems.get("ndp", {}).get(scenario)
        hybrid = systems.get("hybrid", {}).get(scenario)
        ratio = (
            f"; ndp / hybrid = {ndp['energy']['per_iteration_j'] / hybrid['energy']['per_iteration_j']:.2f}x"
            if ndp and hybrid and hybrid["energy"]["per_iteration_j"] > 0
            else ""
        )
        lines.append(f"energy per iteration, {scenario} (mJ): " + ", ".join(cells) + ratio)
    return lines
