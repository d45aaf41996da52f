"""Baselines the train benchmark measures ndp against (StepEngines, same data, same math).

- `HybridEngine`: the classic DLRM CPU-GPU split. Tables are `nn.EmbeddingBag(sparse=True)`
  in the worker machine's host memory with a CPU sparse SGD; the dense half runs on the
  configured device (cuda if asked and present, else cpu).
- `OsPagedEngine`: tables are memory-mapped files (`np.memmap`); the OS page cache is the
  only cache, under whatever memory limit the process runs in. `python -m
  ndp.bench.baselines CONFIG.json OUT.json WARMUP STEPS [CGROUP_DIR CGROUP_VERSION BUDGET]`
  runs it as a subprocess so the benchmark can put that process (alone) into a memory
  cgroup (v1 or v2, `ndp.bench.memory_limit`) with the storage nodes' DRAM budget, and
  count its flash bytes (`flash_bytes`). Given storage-node shard files it maps those
  (`beyond_ram`), so both systems read the same bytes.

Both use plain SGD for the tables (the benchmark configures `optimizer.sparse.name = sgd`
for every system): SGD is linear in the gradient, so updating a table once per feature
that reads it equals one update with the merged gradient.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ndp.bench.memory import peak_rss_bytes
from ndp.bench.memory_limit import MemoryCgroup
from ndp.config import Config, config_from_dict
from ndp.data.batch import Batch
from ndp.model.dense_step import DenseStep
from ndp.model.init import init_rows

_INIT_CHUNK_ROWS = 1 << 18
SHARD_PIECES_KEY = "os_paged_shard_pieces"
"""Key of the subprocess's config JSON (removed before loading) naming shard files to map."""


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
        self.dense = DenseStep(cfg)

    def train_step(self, step: int, batch: Batch) -> float:
        with self.dense.clock.phase("embedding_forward_s"):
            pooled = {}
            for feature, jagged in batch.sparse.to_dict().items():
                table, _ = self.features[feature]
                pooled[feature] = self.bags[table](jagged.values(), jagged.offsets())
        loss, grads = self.dense.train_on(batch.dense, pooled, batch.labels)
        with self.dense.clock.phase("embedding_update_s"):
            self.sparse_optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(list(pooled.values()), list(grads.values()))
            self.sparse_optimizer.step()
        return loss

    def timings(self) -> dict[str, float]:
        return self.dense.clock.take()

    def phase_medians(self) -> dict[str, float]:
        return self.dense.clock.medians()

    def close(self) -> None:
        self.bags = nn.ModuleDict()


class OsPagedEngine:
    """Tables as memory-mapped files; only the OS page cache keeps rows in DRAM."""

    mode = "os_paged"

    def __init__(
        self,
        cfg: Config,
        directory: str | Path | None = None,
        shard_pieces: list[dict[str, Any]] | None = None,
    ) -> None:
        """
        Args:
            shard_pieces: map these storage-node shard files (`beyond_ram.ShardPiece` as
                dicts) instead of writing tables of its own: the same bytes the nodes read.
        """
        self._tmp = tempfile.TemporaryDirectory(prefix="ndp-os-paged-", dir=directory)
        self.features = _feature_tables(cfg)
        self.lr = cfg.optimizer.sparse.lr
        self.tables: dict[str, Any] = {}
        if shard_pieces is not None:
            self.tables = _mapped_shard_files(cfg, shard_pieces)
        for table in cfg.model.effective_tables():
            if table.name in self.tables:
                continue
            path = Path(self._tmp.name) / f"{table.name}.f32"
            rows = np.memmap(
                path, dtype=np.float32, mode="w+", shape=(table.num_rows, table.embedding_dim)
            )
            _init_table(cfg, table.name, table.num_rows, table.embedding_dim, rows)
            rows.flush()
            self.tables[table.name] = rows
        self.dense = DenseStep(cfg)

    def train_step(self, step: int, batch: Batch) -> float:
        with self.dense.clock.phase("embedding_forward_s"):
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
        loss, grads = self.dense.train_on(batch.dense, pooled, batch.labels)
        with self.dense.clock.phase("embedding_update_s"):
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
        return loss

    def timings(self) -> dict[str, float]:
        return self.dense.clock.take()

    def phase_medians(self) -> dict[str, float]:
        return self.dense.clock.medians()

    def close(self) -> None:
        self.tables = {}
        self._tmp.cleanup()


class PiecedRows:
    """A table made of row ranges of memory-mapped files, indexed like one array by sorted
    unique rows (what `OsPagedEngine` gathers and updates).

    Args:
        starts: first table row of each piece, ascending.
        pieces: each piece's rows [n_i, dim] (views of `maps`).
        maps: the mappings behind them (flushed by `flush`).
    """

    def __init__(self, starts: list[int], pieces: list[np.ndarray], maps: list[mmap.mmap]) -> None:
        self.starts = np.asarray(starts, dtype=np.int64)
        self.pieces = pieces
        self.maps = maps

    def _split(self, rows: np.ndarray) -> Iterator[tuple[int, slice, np.ndarray]]:
        which = np.searchsorted(self.starts, rows, side="right") - 1
        bounds = np.searchsorted(which, np.arange(len(self.pieces) + 1))  # rows are sorted
        for index in np.flatnonzero(np.diff(bounds)).tolist():
            lo, hi = int(bounds[index]), int(bounds[index + 1])
            yield index, slice(lo, hi), rows[lo:hi] - self.starts[index]

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((rows.size, self.pieces[0].shape[1]), dtype=np.float32)
        for index, where, local in self._split(rows):
            out[where] = self.pieces[index][local]
        return out

    def __setitem__(self, rows: np.ndarray, values: np.ndarray) -> None:
        for index, where, local in self._split(rows):
            self.pieces[index][local] = values[where]

    def flush(self) -> None:
        for mapping in self.maps:
            mapping.flush()


def _mapped_shard_files(cfg: Config, pieces: list[dict[str, Any]]) -> dict[str, PiecedRows]:
    """{table: its rows}: each table's shard files mapped past their header page, advised
    MADV_RANDOM (rows are read at random; read-around would fetch pages the budget drops),
    after dropping whatever of them the page cache holds (`POSIX_FADV_DONTNEED`).

    Why drop first: pages cached before this process started (the storage nodes' buffered
    initialisation of the files, an earlier round's os_paged, whose pages outlive its memory
    cgroup) are charged to other cgroups, so the budget never reclaims them and they served
    this run's reads for free: os_paged at beyond_ram_5pct did 2,977 samples/s right after
    the files were written against 1,855 in a run that reused them."""
    dims = {t.name: t.embedding_dim for t in cfg.model.effective_tables()}
    by_table: dict[str, list[dict[str, Any]]] = {}
    for piece in sorted(pieces, key=lambda p: (p["table"], p["row_start"])):
        by_table.setdefault(piece["table"], []).append(piece)
    tables = {}
    for name, parts in by_table.items():
        maps, arrays = [], []
        for part in parts:
            with open(part["path"], "r+b") as file:
                os.fsync(file.fileno())  # dirty pages are not dropped
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                mapping = mmap.mmap(file.fileno(), 0)
            mapping.madvise(mmap.MADV_RANDOM)
            num_rows = part["row_end"] - part["row_start"]
            rows = np.frombuffer(
                mapping, dtype=np.float32, count=num_rows * dims[name], offset=part["offset"]
            )
            maps.append(mapping)
            arrays.append(rows.reshape(num_rows, dims[name]))
        tables[name] = PiecedRows([p["row_start"] for p in parts], arrays, maps)
    return tables


class PageCacheBudget:
    """Holds a memory cgroup (v1 or v2) to its non-cache memory + a page-cache budget.

    Why a moving limit: what the storage nodes get for rows is `storage.cache_bytes` of DRAM;
    the fair counterpart for memory-mapped tables is the same amount of page cache. A cgroup
    limit caps anonymous memory and page cache together, and the anonymous part (Python,
    torch, the dense half, batches) drifts by megabytes while training, so a fixed limit
    would hand that drift to (or take it from) the page cache. Before every timed step the
    group is reclaimed down to `usage - cache + page_cache_bytes` (the kernel drops page
    cache first), so each step starts with at most the budget cached, as a storage node
    starts a step with its cache; then the limit is set `headroom` above that, the largest
    transient anonymous growth within one warm-up step (+4 MiB): without it the step's
    temporaries would find nothing to reclaim and the kernel would kill the process.
    Within the step, rows it faults in may use that headroom (a node also holds a step's
    rows while it serves them); `report()` gives the page cache each step started with.
    """

    MARGIN_BYTES = 4 << 20
    NO_PEAK_HEADROOM_BYTES = 64 << 20
    """Headroom where the kernel cannot measure a step's peak (v2 before 6.12)."""

    def __init__(self, group: MemoryCgroup, page_cache_bytes: int) -> None:
        self.group = group
        self.page_cache_bytes = page_cache_bytes
        self.headroom = 0
        self.peak_measured = True
        self.limited = False
        self.reclaim_refusals = 0
        self.limits: list[int] = []
        self.caches: list[int] = []
        self._before: tuple[int, int] = (0, 0)
        self._at_start: dict[str, int] = {}

    def before_step(self) -> None:
        usage, cache = self.group.usage_bytes(), self.group.page_cache_bytes()
        if self.limited:
            tight = usage - cache + self.page_cache_bytes
            if not self.group.reclaim_to(tight):  # the page cache down to the budget ...
                self.reclaim_refusals += 1  # the kernel could not reclaim that much; go on
            self.caches.append(self.group.page_cache_bytes())  # what this step starts with
            # ... then leave the step room for its temporaries (faulted rows may use it);
            # never below the usage: v2 would answer a limit under it with the OOM killer
            limit = max(tight, self.group.usage_bytes()) + self.headroom
            self.group.set_limit(limit)
            self.limits.append(limit)
        else:  # warm-up: measure the step's transient anonymous growth
            self.peak_measured &= self.group.reset_peak()
            self._before = (usage, cache)

    def after_step(self) -> None:
        if not self.limited:
            usage, cache = self._before
            grown_cache = self.group.page_cache_bytes() - cache
            peak = self.group.peak_bytes() if self.peak_measured else None
            if peak is None:  # only the growth that stayed is measurable
                peak, margin = self.group.usage_bytes(), self.NO_PEAK_HEADROOM_BYTES
            else:
                margin = self.MARGIN_BYTES
            spike = peak - usage - max(0, grown_cache)
            self.headroom = max(self.headroom, spike + margin)

    def start(self) -> None:
        """From now on, limit each step; the kernel counters count from here."""
        self.limited = True
        self.group.reset_peak()
        self._at_start = self._counters()

    def _counters(self) -> dict[str, int]:
        return {
            "limit_hits": self.group.limit_hits(),
            "oom_kills": self.group.oom_kills(),
            "major_page_faults": self.group.stat().get("pgmajfault", 0),
        }

    def report(self) -> dict[str, Any]:
        """Page cache each timed step started with, limits, headroom and kernel counters
        (limit hits, OOM kills, major faults) over the timed steps."""
        counters = {k: v - self._at_start.get(k, 0) for k, v in self._counters().items()}
        return {
            "applied": True,
            "cgroup_version": self.group.version,
            "page_cache_budget_bytes": self.page_cache_bytes,
            "headroom_bytes": self.headroom,
            "headroom_from_peak": self.peak_measured,
            "page_cache_bytes_max": max(self.caches, default=0),
            "page_cache_bytes_mean": int(sum(self.caches) / max(1, len(self.caches))),
            "page_cache_bytes_at_end": self.group.page_cache_bytes(),
            "anon_bytes_at_end": self.group.anon_bytes(),
            "peak_bytes": self.group.peak_bytes(),
            "limit_bytes_min": min(self.limits, default=0),
            "limit_bytes_max": max(self.limits, default=0),
            "reclaim_refusals": self.reclaim_refusals,
            **counters,
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

    def phase_medians(self) -> dict[str, float]:
        return self.engine.phase_medians()


def proc_io_bytes(pid: int | str = "self") -> tuple[int, int]:
    """Bytes (read, written) a process made the kernel move from and to storage, from
    /proc/PID/io: reads its faults and reads submitted, writes counted when it dirtied a
    page (mmap stores included), whenever the kernel writes it back."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["read_bytes"]), int(fields["write_bytes"])


def _io_counters(group: MemoryCgroup | None) -> dict[str, tuple[int, int]]:
    """{source: (bytes read, bytes written)} so far: this process's, and its cgroup's."""
    counters = {"proc_io": proc_io_bytes()}
    group_io = None if group is None else group.io_bytes()
    if group_io is not None:
        counters["cgroup_io"] = group_io
    return counters


def flash_bytes(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], samples: int
) -> dict[str, Any]:
    """Flash bytes of a timed window from `_io_counters` at its start and end: the cgroup's
    device I/O where both ends read it (writeback by the kernel's threads included), else
    this process's /proc/self/io."""
    by_source = {
        source: {"read": after[source][0] - first[0], "written": after[source][1] - first[1]}
        for source, first in before.items()
        if source in after
    }
    source = "cgroup_io" if "cgroup_io" in by_source else "proc_io"
    read, written = by_source[source]["read"], by_source[source]["written"]
    return {
        "flash_bytes_read": read,
        "flash_bytes_written": written,
        "flash_bytes_read_per_sample": read / samples,
        "flash_bytes_written_per_sample": written / samples,
        "flash_bytes_source": source,
        "flash_bytes_by_source": by_source,
    }


def _main(argv: list[str]) -> int:
    """Subprocess entry: run OsPagedEngine on the config's data; write the measurement.

    argv: CONFIG.json OUT.json WARMUP STEPS [CGROUP_DIR CGROUP_VERSION PAGE_CACHE_BUDGET_BYTES].
    With a cgroup (this process already in it), the warm-up runs unlimited and the timed
    steps with the page cache held to the budget. Flash bytes count the timed steps only.
    """
    from ndp.bench.measure import measure_engine
    from ndp.data.loader import build_datasets

    config_path, out_path, warmup, steps = argv[0], argv[1], int(argv[2]), int(argv[3])
    raw = json.loads(Path(config_path).read_text())
    shard_pieces = raw.pop(SHARD_PIECES_KEY, None)
    cfg = config_from_dict(raw)
    train_data, _ = build_datasets(cfg)
    batches = list(train_data.batches(cfg.train.batch_size))
    engine = OsPagedEngine(cfg, shard_pieces=shard_pieces)
    group = MemoryCgroup(argv[4], int(argv[5])) if len(argv) > 4 else None
    budget = PageCacheBudget(group, int(argv[6])) if group is not None else None
    io_at_start: dict[str, tuple[int, int]] = {}

    def timed_start() -> None:
        for rows in engine.tables.values():
            rows.flush()  # the warm-up's dirty pages written back: not the timed steps' I/O,
            # and reclaimable by the budget
        if budget is not None:
            budget.start()
        io_at_start.update(_io_counters(group))

    try:
        stepper = engine if budget is None else OsPagedBudgeted(engine, budget)
        result = measure_engine(
            stepper, batches, cfg.train.batch_size, warmup, steps, at_timed_start=timed_start
        )
        io_at_end = _io_counters(group)
        if budget is not None:
            result["memory_limit"] = budget.report()
    finally:
        engine.close()
    result.update(flash_bytes(io_at_start, io_at_end, steps * cfg.train.batch_size))
    result["peak_rss_bytes"] = {"os_paged": peak_rss_bytes()}
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
