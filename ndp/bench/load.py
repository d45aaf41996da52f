"""`ndp-bench load`: one storage node under many concurrent GPU-worker clients.

A real `StorageNodeCore` is served over gRPC on 127.0.0.1; `num_clients` threads, each with
its own `StorageClient` and worker rank (the node expects `num_workers = num_clients`), run
`steps` synchronous steps: lookup(step, worker) then push_gradients(step, worker). A monitor
thread polls the core's `stats()` throughout (in this process: stats are the node's control
plane, not an RPC). The run measures each call's latency and checks three
properties a loaded node must keep:

    answers     every lookup and push of every client is answered (no error, no timeout)
    budget      cached rows <= cache capacity in every stats sample
    no loss     with `sgd`, lr = 1 and integer-valued gradients, a row's final value is its
                initial value minus the exact sum of every gradient scattered to it

Why the no-loss check is exact: pooled gradients are small integers and pooling is `sum`
with weight 1, so every row gradient is an integer and (initial - final) rounds to exactly
the integer sum the clients pushed; a lost or doubled push changes it by at least 1.

Lookup latency includes the wait at the node's step barrier (the slowest peer's push of the
previous step): that is what a worker sees under synchronous training.
"""

from __future__ import annotations

import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from ndp.config import Config, config_from_dict

TABLE = "load"
FEATURE = "f_load"


@dataclass(frozen=True)
class LoadOptions:
    """Sizes of one load run."""

    num_clients: int = 8
    """Concurrent clients, one thread and one StorageClient each (= the node's num_workers)."""
    steps: int = 200
    """Synchronous steps; every client does one lookup and one push per step."""
    batch_size: int = 256
    """Samples per client per step."""
    pooling_factor: int = 8
    """Rows per bag (fixed)."""
    num_rows: int = 100_000
    embedding_dim: int = 64
    cache_fraction: float = 0.1
    """DRAM cache budget as a fraction of the table's bytes (the rest stays on flash)."""
    seed: int = 0

    @staticmethod
    def quick() -> LoadOptions:
        return LoadOptions(steps=50, batch_size=64, num_rows=20_000, embedding_dim=16)

    def scaled(self, scale: float) -> LoadOptions:
        """Fewer (or more) steps, same concurrency and sizes (tests run at a small scale)."""
        return replace(self, steps=max(2, round(self.steps * scale)))


@dataclass
class LoadResult:
    """What a run measured and checked."""

    lookup_latency_s: np.ndarray
    """float64 [num_clients * steps], seconds per lookup."""
    push_latency_s: np.ndarray
    wall_s: float
    max_cached_rows: int
    capacity_rows: int
    stats_samples: int
    mismatched_rows: int
    """Rows whose (initial - final) differs from the pushed gradient sum (0: nothing lost)."""
    max_abs_error: float


def load_config(options: LoadOptions) -> Config:
    """One sum-pooled table on one node; sgd lr = 1 (so updates are plain sums)."""
    table_bytes = options.num_rows * options.embedding_dim * 4
    return config_from_dict(
        {
            "model": {
                "bottom_mlp": [8, options.embedding_dim],
                "top_mlp": [8, 1],
                "tables": [
                    {
                        "name": TABLE,
                        "num_rows": options.num_rows,
                        "embedding_dim": options.embedding_dim,
                        "pooling": "sum",
                        "features": [FEATURE],
                    }
                ],
            },
            "data": {"source": "synthetic"},
            "optimizer": {"sparse": {"name": "sgd", "lr": 1.0}},
            "train": {"seed": options.seed},
            "storage": {"cache_bytes": max(4096, int(table_bytes * options.cache_fraction))},
        }
    )


def client_traffic(
    options: LoadOptions, step: int, worker: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices int64 [B * L], integer-valued gradients float32 [B, D]) of one client's step."""
    gen = torch.Generator().manual_seed(options.seed * 1_000_003 + step * 1009 + worker)
    nnz = options.batch_size * options.pooling_factor
    indices = torch.randint(0, options.num_rows, (nnz,), generator=gen)
    grads = torch.randint(-3, 4, (options.batch_size, options.embedding_dim), generator=gen)
    return indices, grads.to(torch.float32)


def expected_row_sums(options: LoadOptions) -> torch.Tensor:
    """float64 [num_rows, D]: every pushed gradient scattered to its rows and summed."""
    total = torch.zeros(options.num_rows, options.embedding_dim, dtype=torch.float64)
    for step in range(options.steps):
        for worker in range(options.num_clients):
            indices, grads = client_traffic(options, step, worker)
            per_index = grads.to(torch.float64).repeat_interleave(options.pooling_factor, dim=0)
            total.index_add_(0, indices, per_index)
    return total


def run_load(options: LoadOptions, *, log: Callable[[str], None] = lambda line: None) -> LoadResult:
    """Serve a fresh node, drive it with `num_clients` concurrent clients, check the result."""
    from ndp.plan import Bags
    from ndp.planner import shards_for
    from storage_node.client import StorageClient
    from storage_node.node import StorageNodeCore
    from storage_node.server import serve

    cfg = load_config(options)
    token = secrets.token_urlsafe(32)
    lookup_s = np.zeros((options.num_clients, options.steps))
    push_s = np.zeros((options.num_clients, options.steps))
    offsets = torch.arange(options.batch_size + 1, dtype=torch.int64) * options.pooling_factor
    with tempfile.TemporaryDirectory(prefix="ndp-load-") as flash_dir:
        core = StorageNodeCore(
            node_id="load",
            shards=shards_for(cfg, 0, [TABLE]),
            storage=cfg.storage,
            optimizer=cfg.optimizer.sparse,
            seed=cfg.train.seed,
            num_workers=options.num_clients,
            flash_dir=flash_dir,
        )
        all_rows = torch.arange(options.num_rows)
        initial = core.read_rows(TABLE, all_rows)[0].to(torch.float64)
        server = serve(
            core,
            host="127.0.0.1",
            token=token,
            max_message_bytes=cfg.storage.max_message_bytes,
            max_workers=2 * options.num_clients + 4,
        )
        errors: list[BaseException] = []
        done = threading.Event()
        samples: list[tuple[int, int]] = []

        def client_loop(worker: int) -> None:
            try:
                with StorageClient(server.address, token=token, timeout_s=120) as client:
                    for step in range(options.steps):
                        indices, grads = client_traffic(options, step, worker)
                        bags = {FEATURE: Bags(indices=indices, offsets=offsets)}
                        start = time.perf_counter()
                        client.lookup(step, worker, bags)
                        lookup_s[worker, step] = time.perf_counter() - start
                        start = time.perf_counter()
                        client.push_gradients(step, worker, {FEATURE: grads})
                        push_s[worker, step] = time.perf_counter() - start
            except BaseException as exc:  # reported after the join
                errors.append(exc)

        def monitor_loop() -> None:
            while not done.is_set():
                cache = core.stats()["tables"][TABLE]["cache"]
                samples.append((cache["cached_rows"], cache["capacity_rows"]))
                done.wait(0.05)

        try:
            threads = [
                threading.Thread(target=client_loop, args=(w,), name=f"ndp-load-{w}")
                for w in range(options.num_clients)
            ]
            monitor = threading.Thread(target=monitor_loop, name="ndp-load-stats")
            started = time.perf_counter()
            monitor.start()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall_s = time.perf_counter() - started
            done.set()
            monitor.join()
            if errors:
                raise errors[0]
            cache = core.stats()["tables"][TABLE]["cache"]
            samples.append((cache["cached_rows"], cache["capacity_rows"]))
            final = core.read_rows(TABLE, all_rows)[0].to(torch.float64)
        finally:
            server.stop(grace_s=None)
            core.close()
    log(f"{options.num_clients} clients x {options.steps} steps in {wall_s:.1f} s")
    applied = torch.round(initial - final)
    expected = expected_row_sums(options)
    mismatched = int((applied != expected).any(dim=1).sum())
    return LoadResult(
        lookup_latency_s=lookup_s.ravel(),
        push_latency_s=push_s.ravel(),
        wall_s=wall_s,
        max_cached_rows=max(rows for rows, _ in samples),
        capacity_rows=min(capacity for _, capacity in samples),
        stats_samples=len(samples),
        mismatched_rows=mismatched,
        max_abs_error=float((initial - final - expected).abs().max()),
    )


PERCENTILES = (50, 90, 99)


def latency_summary(latency_s: np.ndarray) -> dict[str, float]:
    """{"p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms"} of latencies in seconds."""
    ms = latency_s * 1e3
    out = {f"p{p}_ms": float(np.percentile(ms, p)) for p in PERCENTILES}
    out.update(max_ms=float(ms.max()), mean_ms=float(ms.mean()))
    return out


def run_load_bench(
    options: LoadOptions, *, command: str, log: Callable[[str], None] = lambda line: None
) -> dict[str, Any]:
    """Run `run_load` and build the results dict of `ndp.bench.report.write_results`."""
    from ndp.bench.report import machine_info, timestamp

    result = run_load(options, log=log)
    calls = options.num_clients * options.steps
    latency = {
        "lookup": latency_summary(result.lookup_latency_s),
        "push": latency_summary(result.push_latency_s),
    }
    columns = ["call", "calls", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms"]
    rows = [
        [name, calls, s["p50_ms"], s["p90_ms"], s["p99_ms"], s["max_ms"], s["mean_ms"]]
        for name, s in latency.items()
    ]
    summary = [
        f"{options.num_clients} concurrent clients x {options.steps} steps "
        f"(batch {options.batch_size}, pooling {options.pooling_factor}, "
        f"{options.num_rows} rows x dim {options.embedding_dim}): {result.wall_s:.1f} s, "
        f"{2 * calls / result.wall_s:.0f} calls/s",
        *(
            f"{name}: p50 {s['p50_ms']:.2f} ms, p90 {s['p90_ms']:.2f} ms, "
            f"p99 {s['p99_ms']:.2f} ms, max {s['max_ms']:.2f} ms"
            for name, s in latency.items()
        ),
        f"cache: at most {result.max_cached_rows} of {result.capacity_rows} rows cached "
        f"over {result.stats_samples} Stats samples",
        f"lost updates: {result.mismatched_rows} mismatched rows "
        f"(max |error| {result.max_abs_error:.2g})",
    ]
    cdf = np.linspace(0, 100, 101)
    return {
        "benchmark": "load",
        "command": command,
        "date": timestamp(),
        "machine": machine_info(),
        "options": asdict(options),
        "latency": latency,
        "wall_s": result.wall_s,
        "max_cached_rows": result.max_cached_rows,
        "capacity_rows": result.capacity_rows,
        "mismatched_rows": result.mismatched_rows,
        "tables": [{"title": "Latency under concurrent clients", "columns": columns, "rows": rows}],
        "plots": [
            {
                "title": f"Call latency, {options.num_clients} concurrent clients",
                "xlabel": "latency (ms)",
                "ylabel": "percentile",
                "xscale": "log",
                "series": [
                    {
                        "label": name,
                        "x": np.percentile(values * 1e3, cdf).tolist(),
                        "y": cdf.tolist(),
                    }
                    for name, values in (
                        ("lookup", result.lookup_latency_s),
                        ("push", result.push_latency_s),
                    )
                ],
            }
        ],
        "summary": summary,
    }
