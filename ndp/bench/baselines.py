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


def _limit_own_cgroup(group: Path, dram_budget: int, slack: int) -> None:
    """Cap this process's memory cgroup at its anonymous memory + `dram_budget` + `slack`.

    Why now and from inside: the anonymous part (Python, torch, the dense half, batches) is
    only known once the process is warm; what the limit leaves above it is what the page
    cache may hold of the memory-mapped tables, the same DRAM the storage nodes get for
    rows. Writing a limit below the current usage makes the kernel reclaim page cache first.
    """
    stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
    anon = int(stat["rss"])  # rss includes rss_huge in cgroup v1
    limit = anon + dram_budget + slack
    (group / "memory.limit_in_bytes").write_text(str(limit))
    (group / "memory.max_usage_in_bytes").write_text("0")
    _CGROUP_LIMIT.update(anon_bytes=anon, limit_bytes=limit, page_cache_budget_bytes=dram_budget)


_CGROUP_LIMIT: dict[str, int] = {}


def _cgroup_report(group: Path) -> dict[str, int]:
    stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
    return {
        **_CGROUP_LIMIT,
        "max_usage_bytes_timed": int((group / "memory.max_usage_in_bytes").read_text()),
        "page_cache_bytes_at_end": int(stat["cache"]),
        "anon_bytes_at_end": int(stat["rss"]),
        "limit_hits": int((group / "memory.failcnt").read_text()),
        "pages_faulted_in_major": int(stat.get("pgmajfault", 0)),
    }


def _main(argv: list[str]) -> int:
    """Subprocess entry: run OsPagedEngine on the config's data; write the measurement.

    argv: CONFIG.json OUT.json WARMUP STEPS [CGROUP_DIR DRAM_BUDGET SLACK]
    """
    from ndp.bench.train import measure_engine
    from ndp.data.loader import build_datasets

    config_path, out_path, warmup, steps = argv[0], argv[1], int(argv[2]), int(argv[3])
    group = Path(argv[4]) if len(argv) > 4 else None
    cfg = config_from_dict(json.loads(Path(config_path).read_text()))
    train_data, _ = build_datasets(cfg)
    batches = list(train_data.batches(cfg.train.batch_size))
    engine = OsPagedEngine(cfg)

    def limit() -> None:
        if group is not None:
            for rows in engine.tables.values():
                rows.flush()  # dirty pages written back, so the reclaim can drop them
            _limit_own_cgroup(group, int(argv[5]), int(argv[6]))

    try:
        result = measure_engine(
            engine, batches, cfg.train.batch_size, warmup, steps, at_timed_start=limit
        )
        if group is not None:
            result["memory_limit"] = _cgroup_report(group)
    finally:
        engine.close()
    result["peak_rss_bytes"] = {"os_paged": peak_rss_bytes()}
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
