"""Baselines the train benchmark measures ndp against (StepEngines, same data, same math).

- `HybridEngine`: the classic DLRM CPU-GPU split. Tables are `nn.EmbeddingBag(sparse=True)`
  in the worker machine's host memory with a CPU sparse SGD; the dense half runs on the
  configured device (cuda if asked and present, else cpu).
- `OsPagedEngine`: tables are memory-mapped files (`np.memmap`); the OS page cache is the
  only cache, under whatever memory limit the process runs in. `python -m
  ndp.bench.baselines CONFIG.json OUT.json WARMUP STEPS` runs it as a subprocess so the
  benchmark can put that process (alone) into a memory cgroup with the storage nodes' DRAM
  budget.

Both use plain SGD for the tables (the benchmark configures `optimizer.sparse.name = sgd`
for every system): SGD is linear in the gradient, so updating a table once per feature
that reads it equals one update with the merged gradient.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ndp.config import Config, config_from_dict
from ndp.data.batch import Batch
from ndp.model.dense import build_dense_half
from ndp.model.init import init_rows
from ndp.reference import build_dense_optimizer, resolve_device

_INIT_CHUNK_ROWS = 1 << 18


def _feature_tables(cfg: Config) -> dict[str, tuple[str, str]]:
    """{feature: (table name, pooling)} over the effective tables."""
    return {
        feature: (table.name, table.pooling)
        for table in cfg.model.effective_tables()
        for feature in table.features
    }


def _init_table(cfg: Config, name: str, num_rows: int, dim: int, out: np.ndarray) -> None:
    """Fill `out` [num_rows, dim] with the shared initialiser, chunk by chunk (bounded RAM)."""
    for start in range(0, num_rows, _INIT_CHUNK_ROWS):
        end = min(start + _INIT_CHUNK_ROWS, num_rows)
        out[start:end] = init_rows(
            seed=cfg.train.seed,
            table_name=name,
            num_rows=num_rows,
            embedding_dim=dim,
            row_start=start,
            row_end=end,
        )


class _DenseStep:
    """The dense half, its optimizer and phase clocks, shared by both baselines."""

    def __init__(self, cfg: Config) -> None:
        self.device = resolve_device(cfg.train.device)
        self.dense_half = build_dense_half(cfg.model, seed=cfg.train.seed).to(self.device)
        self.optimizer = build_dense_optimizer(
            cfg.optimizer.dense, list(self.dense_half.parameters())
        )
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.seconds: dict[str, float] = defaultdict(float)

    def run(self, batch: Batch, pooled: dict[str, torch.Tensor]) -> tuple[float, dict]:
        """Forward/backward/step on `pooled` {feature: [B, D]} (CPU leaves); their grads."""
        start = time.perf_counter()
        leaves = {f: t.detach().to(self.device).requires_grad_() for f, t in pooled.items()}
        logits = self.dense_half(batch.dense.to(self.device), leaves)
        loss = self.loss_fn(logits, batch.labels.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        grads = {f: leaf.grad.detach().cpu() for f, leaf in leaves.items()}
        self.seconds["dense_compute_s"] += time.perf_counter() - start
        return float(loss.detach()), grads

    def timings(self) -> dict[str, float]:
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


class HybridEngine:
    """Tables in host memory (EmbeddingBag, sparse SGD on CPU), dense half on the device."""

    mode = "hybrid"

    def __init__(self, cfg: Config) -> None:
        self.features = _feature_tables(cfg)
        self.bags = nn.ModuleDict()
        for table in cfg.model.effective_tables():
            bag = nn.EmbeddingBag(
                table.num_rows,
                table.embedding_dim,
                mode=table.pooling,
                sparse=True,
                include_last_offset=True,
            )
            with torch.no_grad():
                _init_table(
                    cfg, table.name, table.num_rows, table.embedding_dim, bag.weight.numpy()
                )
            self.bags[table.name] = bag
        self.sparse_optimizer = torch.optim.SGD(self.bags.parameters(), lr=cfg.optimizer.sparse.lr)
        self.dense = _DenseStep(cfg)

    def train_step(self, step: int, batch: Batch) -> float:
        start = time.perf_counter()
        pooled = {}
        for feature, jagged in batch.sparse.to_dict().items():
            table, _ = self.features[feature]
            pooled[feature] = self.bags[table](jagged.values(), jagged.offsets())
        self.dense.seconds["embedding_forward_s"] += time.perf_counter() - start
        loss, grads = self.dense.run(batch, pooled)
        start = time.perf_counter()
        self.sparse_optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(list(pooled.values()), list(grads.values()))
        self.sparse_optimizer.step()
        self.dense.seconds["embedding_update_s"] += time.perf_counter() - start
        return loss

    def timings(self) -> dict[str, float]:
        return self.dense.timings()

    def close(self) -> None:
        self.bags = nn.ModuleDict()


class OsPagedEngine:
    """Tables as memory-mapped files; only the OS page cache keeps rows in DRAM."""

    mode = "os_paged"

    def __init__(self, cfg: Config, directory: str | Path | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="ndp-os-paged-", dir=directory)
        self.features = _feature_tables(cfg)
        self.lr = cfg.optimizer.sparse.lr
        self.tables: dict[str, np.memmap] = {}
        for table in cfg.model.effective_tables():
            path = Path(self._tmp.name) / f"{table.name}.f32"
            rows = np.memmap(
                path, dtype=np.float32, mode="w+", shape=(table.num_rows, table.embedding_dim)
            )
            _init_table(cfg, table.name, table.num_rows, table.embedding_dim, rows)
            rows.flush()
            self.tables[table.name] = rows
        self.dense = _DenseStep(cfg)

    def train_step(self, step: int, batch: Batch) -> float:
        start = time.perf_counter()
        pooled, gathered = {}, {}
        for feature, jagged in batch.sparse.to_dict().items():
            table, pooling = self.features[feature]
            unique_rows, inverse = np.unique(jagged.values().numpy(), return_inverse=True)
            rows = torch.from_numpy(np.ascontiguousarray(self.tables[table][unique_rows]))
            pooled[feature] = F.embedding_bag(
                torch.from_numpy(inverse.reshape(-1)),
                rows,
                jagged.offsets(),
                mode=pooling,
                include_last_offset=True,
            )
            gathered[feature] = (table, unique_rows, torch.from_numpy(inverse.reshape(-1)))
        self.dense.seconds["embedding_forward_s"] += time.perf_counter() - start
        loss, grads = self.dense.run(batch, pooled)
        start = time.perf_counter()
        for feature, (table, unique_rows, inverse) in gathered.items():
            jagged = batch.sparse[feature]
            weights = torch.zeros(unique_rows.size, grads[feature].shape[1], requires_grad=True)
            F.embedding_bag(
                inverse,
                weights,
                jagged.offsets(),
                mode=self.features[feature][1],
                include_last_offset=True,
            ).backward(grads[feature])
            rows = self.tables[table]
            rows[unique_rows] -= self.lr * weights.grad.numpy()
        self.dense.seconds["embedding_update_s"] += time.perf_counter() - start
        return loss

    def timings(self) -> dict[str, float]:
        return self.dense.timings()

    def close(self) -> None:
        self.tables = {}
        self._tmp.cleanup()


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak resident set (VmHWM) of a process on this machine, from /proc; 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PageCacheBudget:
    """Holds this process's memory cgroup (v1) to its non-cache memory + a page-cache budget.

    Why a moving limit: what the storage nodes get for rows is `storage.cache_bytes` of DRAM;
    the fair counterpart for memory-mapped tables is the same amount of page cache. A cgroup
    limit caps anonymous memory and page cache together, and the anonymous part (Python,
    torch, the dense half, batches) drifts by megabytes while training, so a fixed limit
    would hand that drift to (or take it from) the page cache. Before every timed step the
    limit is set to `usage - cache + page_cache_bytes` (a limit below the usage makes the
    kernel reclaim page cache first), so each step starts with at most the budget cached,
    as a storage node starts a step with its cache; then it is raised by `headroom`, the
    largest transient anonymous growth within one warm-up step (+4 MiB): without it the
    step's temporaries would find nothing to reclaim and the kernel would kill the process.
    Within the step, rows it faults in may use that headroom (a node also holds a step's
    rows while it serves them); `report()` gives the page cache each step started with.
    """

    MARGIN_BYTES = 4 << 20

    def __init__(self, group: Path, page_cache_bytes: int) -> None:
        self.group = group
        self.page_cache_bytes = page_cache_bytes
        self.headroom = 0
        self.limited = False
        self.reclaim_refusals = 0
        self.limits: list[int] = []
        self.caches: list[int] = []
        self._before: tuple[int, int] = (0, 0)

    def _stat(self) -> dict[str, int]:
        lines = (self.group / "memory.stat").read_text().splitlines()
        return {key: int(value) for key, value in (line.split() for line in lines)}

    def _read(self, name: str) -> int:
        return int((self.group / name).read_text())

    def before_step(self) -> None:
        usage, cache = self._read("memory.usage_in_bytes"), self._stat()["cache"]
        if self.limited:
            tight = usage - cache + self.page_cache_bytes
            try:  # reclaim the page cache down to the budget ...
                (self.group / "memory.limit_in_bytes").write_text(str(tight))
            except OSError:  # EBUSY: the kernel could not reclaim that much; go on
                self.reclaim_refusals += 1
            self.caches.append(self._stat()["cache"])  # what this step starts with
            # ... then leave the step room for its temporaries (faulted rows may use it)
            (self.group / "memory.limit_in_bytes").write_text(str(tight + self.headroom))
            self.limits.append(tight + self.headroom)
        else:  # warm-up: measure the step's transient anonymous growth
            (self.group / "memory.max_usage_in_bytes").write_text("0")
            self._before = (usage, cache)

    def after_step(self) -> None:
        if not self.limited:
            usage, cache = self._before
            grown_cache = self._stat()["cache"] - cache
            spike = self._read("memory.max_usage_in_bytes") - usage - max(0, grown_cache)
            self.headroom = max(self.headroom, spike + self.MARGIN_BYTES)

    def start(self) -> None:
        """From now on, limit each step; reset the kernel's peak and limit-hit counters."""
        self.limited = True
        (self.group / "memory.max_usage_in_bytes").write_text("0")
        (self.group / "memory.failcnt").write_text("0")

    def report(self) -> dict[str, int]:
        """Page cache each timed step started with, limits, headroom and kernel counters."""
        stat = self._stat()
        return {
            "page_cache_budget_bytes": self.page_cache_bytes,
            "headroom_bytes": self.headroom,
            "page_cache_bytes_max": max(self.caches, default=0),
            "page_cache_bytes_mean": int(sum(self.caches) / max(1, len(self.caches))),
            "page_cache_bytes_at_end": stat["cache"],
            "anon_bytes_at_end": stat["rss"],
            "limit_bytes_min": min(self.limits, default=0),
            "limit_bytes_max": max(self.limits, default=0),
            "limit_hits": self._read("memory.failcnt"),
            "reclaim_refusals": self.reclaim_refusals,
            "major_page_faults": stat.get("pgmajfault", 0),
        }


class OsPagedBudgeted:
    """An OsPagedEngine whose page cache is held to a budget at every step."""

    mode = "os_paged"

    def __init__(self, engine: OsPagedEngine, budget: PageCacheBudget) -> None:
        self.engine, self.budget = engine, budget

    def train_step(self, step: int, batch: Batch) -> float:
        self.budget.before_step()
        loss = self.engine.train_step(step, batch)
        self.budget.after_step()
        return loss

    def timings(self) -> dict[str, float]:
        return self.engine.timings()


def _main(argv: list[str]) -> int:
    """Subprocess entry: run OsPagedEngine on the config's data; write the measurement.

    argv: CONFIG.json OUT.json WARMUP STEPS [CGROUP_DIR PAGE_CACHE_BUDGET_BYTES]. With a
    cgroup (this process already in it), the warm-up runs unlimited and the timed steps
    with the page cache held to the budget.
    """
    from ndp.bench.train import measure_engine
    from ndp.data.loader import build_datasets

    config_path, out_path, warmup, steps = argv[0], argv[1], int(argv[2]), int(argv[3])
    cfg = config_from_dict(json.loads(Path(config_path).read_text()))
    train_data, _ = build_datasets(cfg)
    batches = list(train_data.batches(cfg.train.batch_size))
    engine = OsPagedEngine(cfg)
    budget = PageCacheBudget(Path(argv[4]), int(argv[5])) if len(argv) > 4 else None

    def limit() -> None:
        if budget is not None:
            for rows in engine.tables.values():
                rows.flush()  # dirty pages written back, so the reclaim can drop them
            budget.start()

    try:
        stepper = engine if budget is None else OsPagedBudgeted(engine, budget)
        result = measure_engine(
            stepper, batches, cfg.train.batch_size, warmup, steps, at_timed_start=limit
        )
        if budget is not None:
            result["memory_limit"] = budget.report()
    finally:
        engine.close()
    result["peak_rss_bytes"] = {"os_paged": peak_rss_bytes()}
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
