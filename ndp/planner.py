"""The planner: which storage node holds which rows of which embedding table.

Pure (no Ray, no gRPC), as torchrec's planner: a `Config` (tables, cluster, optimizer, data
statistics) goes in, a `ShardingPlan` of plain data (`ndp/plan.py`) comes out. The plan is
saved with the run and with every checkpoint, so a resumed job puts every row back where it
was.

Sharding types keep torchrec's names:

    table_wise      the whole table on one node            t0: [0, N) -> node 2
    row_wise        contiguous row ranges over all nodes    t1: [0, a) -> 0, [a, b) -> 1, ...
                    (or all nodes a constraint allows)
    table_row_wise  contiguous row ranges over a subset     t2: [0, a) -> 1, [a, N) -> 3

Greedy, biggest table first: a table goes whole onto the allowed node with the lowest
combined score (share of all bytes + share of all expected lookups) that still has room;
when no node has room, it is split row-wise over the allowed nodes, each range sized so
that the pieces carry about equal expected lookups without exceeding any node's free bytes.
A node never holds two pieces of the same table, so `(node, table)` names a piece.

Expected lookups of a table per step = batch_size x sum of its features' pooling factors
(`data.synthetic.pooling_factor` for synthetic data, 1 per feature otherwise). Which rows
carry those lookups comes from `index_frequencies` when given (power-law data puts most of
them on a few rows), else rows are assumed equally popular.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ndp.config import Config, TableConfig
from ndp.errors import ConfigError, PlanError
from ndp.model.spec import row_bytes
from ndp.plan import Placement, ShardingPlan, ShardingType, ShardSpec

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ndp.data.batch import Batch


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _TableDemand:
    """What one table asks of the cluster."""

    table: TableConfig
    row_bytes: int
    load: float
    """Expected row lookups per step of the whole table."""
    cumulative_load: np.ndarray | None
    """float64 [num_rows + 1]: expected lookups of rows [0, r) at index r; None when rows are
    equally popular (kept implicit: a billion-row table must not cost an array to plan)."""

    @property
    def num_bytes(self) -> int:
        return self.table.num_rows * self.row_bytes

    def load_before(self, row: int) -> float:
        """Expected lookups per step of rows [0, row)."""
        if self.cumulative_load is None:
            return self.load * row / self.table.num_rows
        return float(self.cumulative_load[row])

    def range_load(self, start: int, end: int) -> float:
        return self.load_before(end) - self.load_before(start)

    def row_reaching(self, target: float) -> int:
        """Smallest row boundary r with load_before(r) >= target (up to rounding)."""
        slack = 1e-9 * self.load
        if self.cumulative_load is None:
            rows = self.table.num_rows
            return min(rows, max(0, int(np.ceil((target - slack) * rows / self.load))))
        return int(np.searchsorted(self.cumulative_load, target - slack))


def plan_shards(
    cfg: Config, index_frequencies: Mapping[str, np.ndarray] | None = None
) -> ShardingPlan:
    """Place every (effective) table of `cfg.model` on `cfg.cluster.num_storage_nodes` nodes.

    Args:
        cfg: the run's config; uses model tables, cluster (nodes, capacity, constraints),
            the sparse optimizer (row size) and the data's pooling factors.
        index_frequencies: optional measured access statistics per table name: either
            counts per row (an array of exactly `num_rows` entries) or a sample of row
            indices (any other length; integers in [0, num_rows)). Only the shape of the
            distribution over rows is used; the table's total load still comes from the
            pooling factors.

    Raises:
        PlanError: the tables do not fit (names the table, bytes needed vs capacity and what
            to change), a constraint cannot be met, or `index_frequencies` is malformed.
    """
    tables = cfg.model.effective_tables()
    num_nodes = cfg.cluster.num_storage_nodes
    capacity = cfg.cluster.node_capacity_bytes
    demands = _table_demands(cfg, tables, index_frequencies or {})
    _check_total_fits(demands, num_nodes, capacity)

    total_bytes = float(sum(d.num_bytes for d in demands)) or 1.0
    total_load = float(sum(d.load for d in demands)) or 1.0
    node_bytes = np.zeros(num_nodes, dtype=np.int64)
    node_load = np.zeros(num_nodes, dtype=np.float64)
    pieces: dict[str, list[Placement]] = {}

    # biggest first (then hottest, then name for a deterministic order)
    order = sorted(demands, key=lambda d: (-d.num_bytes, -d.load, d.table.name))
    for demand in order:
        constraint = cfg.cluster.constraints.get(demand.table.name)
        forced = constraint.sharding_type if constraint else None
        allowed = (
            sorted(set(constraint.nodes))
            if constraint and constraint.nodes
            else list(range(num_nodes))
        )
        score = node_bytes / total_bytes + node_load / total_load
        free = capacity - node_bytes

        if forced in (None, "table_wise"):
            fitting = [n for n in allowed if free[n] >= demand.num_bytes]
            if fitting:
                node = min(fitting, key=lambda n: (score[n], n))
                placed = [
                    Placement(
                        table_name=demand.table.name,
                        row_start=0,
                        row_end=demand.table.num_rows,
                        node=node,
                        sharding_type="table_wise",
                        num_bytes=demand.num_bytes,
                        expected_load=demand.load,
                    )
                ]
            elif forced == "table_wise":
                raise PlanError(
                    f"table {demand.table.name!r} needs {demand.num_bytes} bytes but the most "
                    f"free on its allowed nodes {allowed} is {int(free[allowed].max())} bytes "
                    f"(missing {demand.num_bytes - int(free[allowed].max())}); allow row_wise "
                    "sharding for it, allow more nodes, or raise cluster.node_capacity_bytes"
                )
            else:
                kind: ShardingType = "row_wise" if len(allowed) == num_nodes else "table_row_wise"
                placed = _split_rows(demand, allowed, free, kind)
        elif forced == "row_wise":
            placed = _split_rows(demand, allowed, free, "row_wise")
        else:  # table_row_wise
            subset = (
                allowed
                if constraint and constraint.nodes
                else _smallest_subset(demand, allowed, free, score)
            )
            placed = _split_rows(demand, subset, free, "table_row_wise")

        for p in placed:
            node_bytes[p.node] += p.num_bytes
            node_load[p.node] += p.expected_load
        pieces[demand.table.name] = placed

    assert (node_bytes <= capacity).all(), "planner exceeded a node's capacity"
    plan = ShardingPlan(
        num_nodes=num_nodes,
        placements=tuple(p for t in tables for p in pieces[t.name]),
        node_bytes=tuple(int(b) for b in node_bytes),
        node_load=tuple(float(x) for x in node_load),
        feature_tables=tuple((f, t.name) for t in tables for f in t.features),
        node_capacity_bytes=capacity,
    )
    plan.validate()
    return plan


def _table_demands(
    cfg: Config, tables: list[TableConfig], index_frequencies: Mapping[str, np.ndarray]
) -> list[_TableDemand]:
    known = {t.name for t in tables}
    for name in index_frequencies:
        if name not in known:
            raise PlanError(
                f"index_frequencies: unknown table {name!r}; tables: {', '.join(sorted(known))}"
            )
    factors = _pooling_factors(cfg)
    demands = []
    for table in tables:
        load = cfg.train.batch_size * sum(factors[f] for f in table.features)
        weights = _row_weights(table, index_frequencies.get(table.name))
        cumulative = None
        if weights is not None:
            cumulative = np.concatenate(([0.0], np.cumsum(weights, dtype=np.float64)))
            cumulative *= load / cumulative[-1]
        demands.append(
            _TableDemand(
                table=table,
                row_bytes=row_bytes(cfg.optimizer.sparse.name, table.embedding_dim),
                load=float(load),
                cumulative_load=cumulative,
            )
        )
    return demands


def _pooling_factors(cfg: Config) -> dict[str, float]:
    """Mean bag length per feature: the synthetic generator's setting, else one-hot."""
    features = cfg.model.feature_names
    if cfg.data.source != "synthetic":
        return dict.fromkeys(features, 1.0)
    factor = cfg.data.synthetic.pooling_factor
    values = factor if isinstance(factor, list) else [factor] * len(features)
    return {f: float(v) for f, v in zip(features, values, strict=True)}


def _row_weights(table: TableConfig, sample: np.ndarray | None) -> np.ndarray | None:
    """Relative popularity of each row: float64 [num_rows] summing to > 0; None = uniform."""
    num_rows = table.num_rows
    if sample is None:
        return None
    values = np.asarray(sample).reshape(-1)
    if values.shape[0] == num_rows:  # counts per row
        counts = values.astype(np.float64)
        if not np.isfinite(counts).all() or (counts < 0).any():
            raise PlanError(
                f"index_frequencies[{table.name!r}]: counts per row must be finite and >= 0"
            )
    else:  # a sample of row indices
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise PlanError(
                f"index_frequencies[{table.name!r}]: {values.shape[0]} values is not one count "
                f"per row ({num_rows} rows), so it must be a sample of integer row indices, "
                f"got dtype {values.dtype}"
            )
        if values.size and (values.min() < 0 or values.max() >= num_rows):
            bad = values[(values < 0) | (values >= num_rows)][0]
            raise PlanError(
                f"index_frequencies[{table.name!r}]: index {int(bad)} outside [0, {num_rows}) "
                "(sample indices must be hashed into the effective table size)"
            )
        counts = np.bincount(values.astype(np.int64), minlength=num_rows).astype(np.float64)
    return counts if counts.sum() > 0 else None


def _check_total_fits(demands: list[_TableDemand], num_nodes: int, capacity: int) -> None:
    needed = sum(d.num_bytes for d in demands)
    total = num_nodes * capacity
    if needed > total:
        biggest = max(demands, key=lambda d: d.num_bytes)
        raise PlanError(
            f"the tables need {needed} bytes but {num_nodes} storage nodes x {capacity} bytes "
            f"hold {total} (missing {needed - total} bytes; biggest table {biggest.table.name!r} "
            f"alone needs {biggest.num_bytes}); set cluster.num_storage_nodes >= "
            f"{-(-needed // capacity)} or cluster.node_capacity_bytes >= {-(-needed // num_nodes)}"
        )


def _smallest_subset(
    demand: _TableDemand, allowed: list[int], free: np.ndarray, score: np.ndarray
) -> list[int]:
    """Fewest least-loaded nodes (at least two, where there are two) that can hold the table."""
    ranked = sorted(allowed, key=lambda n: (score[n], n))
    for count in range(min(2, len(ranked)), len(ranked) + 1):
        subset = ranked[:count]
        if sum(int(free[n]) // demand.row_bytes for n in subset) >= demand.table.num_rows:
            return sorted(subset)
    return sorted(ranked)  # _split_rows reports what is missing


def _split_rows(
    demand: _TableDemand, nodes: list[int], free: np.ndarray, kind: ShardingType
) -> list[Placement]:
    """Cut a table into contiguous row ranges, one per node in `nodes` (ascending).

    Each range aims at an equal share of the table's expected load (equal rows when rows are
    equally popular) and is clamped to what the node has room for, while leaving enough rows
    for the remaining nodes' room. Nodes whose range comes out empty get no piece.
    """
    table = demand.table
    room = np.array([int(free[n]) // demand.row_bytes for n in nodes], dtype=np.int64)
    if int(room.sum()) < table.num_rows:
        missing = (table.num_rows - int(room.sum())) * demand.row_bytes
        raise PlanError(
            f"table {table.name!r} needs {demand.num_bytes} bytes but its allowed nodes {nodes} "
            f"have {int(room.sum()) * demand.row_bytes} bytes free for its rows (missing "
            f"{missing} bytes); add storage nodes (cluster.num_storage_nodes), raise "
            "cluster.node_capacity_bytes, or relax cluster.constraints for this table"
        )
    # rooms of the nodes after position i: a range may not leave more rows than they can take
    room_after = np.concatenate((np.cumsum(room[::-1])[::-1][1:], [0]))
    placed: list[Placement] = []
    start = 0
    for i, node in enumerate(nodes):
        remaining_nodes = len(nodes) - i
        remaining_load = demand.range_load(start, table.num_rows)
        target = demand.load_before(start) + remaining_load / remaining_nodes
        # first row boundary whose cumulative load reaches the target
        if remaining_load > 0:
            end = demand.row_reaching(target)
            end = max(end, start + 1)
        else:  # the rest is never looked up: share its rows evenly
            end = start + -(-(table.num_rows - start) // remaining_nodes)
        end = max(end, table.num_rows - int(room_after[i]))  # leave no more than the rest fits
        end = min(end, start + int(room[i]), table.num_rows)  # fit in this node
        if i == len(nodes) - 1:
            end = table.num_rows
        if end > start:
            placed.append(
                Placement(
                    table_name=table.name,
                    row_start=start,
                    row_end=end,
                    node=node,
                    sharding_type=kind,
                    num_bytes=(end - start) * demand.row_bytes,
                    expected_load=demand.range_load(start, end),
                )
            )
        start = end
    assert start == table.num_rows, "row split left rows unplaced"
    return placed


def shards_for(cfg: Config, node_id: int, tables: Sequence[str] | None) -> list[ShardSpec]:
    """What storage node `node_id` serves: the named whole tables (`ndp-storage-node
    --tables`), or its pieces of the sharding plan."""
    effective = cfg.model.effective_tables()
    if tables is None:
        return plan_shards(cfg).shards_for_node(node_id, effective)
    by_name = {t.name: t for t in effective}
    unknown = [name for name in tables if name not in by_name]
    if unknown:
        raise ConfigError(
            f"--tables: unknown table(s) {', '.join(unknown)}; tables: {', '.join(by_name)}"
        )
    return [
        ShardSpec(
            table_name=t.name,
            table_num_rows=t.num_rows,
            embedding_dim=t.embedding_dim,
            row_start=0,
            row_end=t.num_rows,
            pooling=t.pooling,
            features=tuple(t.features),
        )
        for t in (by_name[name] for name in tables)
    ]


def sample_index_frequencies(cfg: Config, batches: Iterable[Batch]) -> dict[str, np.ndarray]:
    """Row indices each table saw in `batches`: a sample for `plan_shards(index_frequencies=)`.

    Features that share a table are pooled together. Tables up to 2**24 rows get counts per
    row; bigger ones keep the sample of indices itself (shorter than the table, so that
    `plan_shards` cannot mistake it for counts), so a table of billions of rows costs only
    the sample's size.
    """
    tables = {t.name: t for t in cfg.model.effective_tables()}
    table_of = {f: t.name for t in tables.values() for f in t.features}
    samples: dict[str, list[np.ndarray]] = {name: [] for name in tables}
    for batch in batches:
        for feature, jagged in batch.sparse.to_dict().items():
            samples[table_of[feature]].append(jagged.values().numpy().astype(np.int64))
    frequencies: dict[str, np.ndarray] = {}
    for name, parts in samples.items():
        if not parts:
            continue
        indices = np.concatenate(parts)
        num_rows = tables[name].num_rows
        if num_rows <= _MAX_COUNTED_ROWS:
            frequencies[name] = np.bincount(indices, minlength=num_rows).astype(np.float64)
        else:
            frequencies[name] = indices[: num_rows - 1]
    return frequencies


_MAX_COUNTED_ROWS = 1 << 24
