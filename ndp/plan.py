"""Plan types every layer imports: where rows live and what one routed request carries.

Plain data, no Ray and no gRPC (as torchrec's `distributed/types.py`). The planner
(`ndp/planner.py: plan_shards`) makes a `ShardingPlan` of `Placement`s; a storage node is
built from the `ShardSpec`s of its pieces (`ShardingPlan.shards_for_node`); routing
(`ndp/routing.py`) turns a batch into one `Bags` per feature and piece, which travel to the
node over the wire.

    ShardingPlan    every table's pieces: Placement(table, [row_start, row_end), node)
    ShardSpec       one piece as a node holds it (table shape, pooling, features)
    Bags            one feature's bags for one request, indices local to the piece
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from ndp.config import TableConfig
from ndp.errors import PlanError


@dataclass(frozen=True)
class ShardSpec:
    """One piece of an embedding table held by a storage node."""

    table_name: str
    table_num_rows: int
    """Rows of the whole table (for init bounds and range errors)."""
    embedding_dim: int
    row_start: int
    """This piece holds global rows [row_start, row_end)."""
    row_end: int
    pooling: Literal["sum", "mean"]
    features: tuple[str, ...]
    expected_lookups: float = 0.0
    """Row lookups per training step expected to land on this piece (the planner's
    `expected_load`); 0 = unknown. The node splits its cache budget by it."""


@dataclass
class Bags:
    """One feature's bags for one request."""

    indices: torch.Tensor
    """int64 [nnz], LOCAL to the piece: [0, row_end - row_start)."""
    offsets: torch.Tensor
    """int64 [B + 1]."""
    per_sample_weights: torch.Tensor | None = None
    """float32 [nnz]."""
    mean_divisor: torch.Tensor | None = None
    """float32 [B]: whole-bag length for mean pooling across row-wise pieces; None = local lengths."""


@dataclass(frozen=True)
class KeyedJagged:
    """Every feature's bags of one request, flat: torchrec's KeyedJaggedTensor.

    What the wire delivers (one lengths and one values tensor for all features, feature after
    feature). Why a type of its own: a storage node validates and pools it as it is, one
    tensor operation per stage for every feature, instead of splitting it into per-feature
    `Bags` and joining them again. Built by the wire codec, which has checked the shapes:
    lengths >= 0, `lengths.sum() == len(values)`, one weight per value, one divisor per bag.
    """

    keys: list[str]
    lengths: torch.Tensor
    """int64 [K, B]: the length of every bag, feature by feature."""
    values: torch.Tensor
    """int64 [nnz]: the rows of every bag, feature after feature."""
    weights: torch.Tensor | None = None
    """float32 [nnz] per-sample weights; None: all 1."""
    mean_divisor: torch.Tensor | None = None
    """float32 [K, B] whole-bag lengths for mean pooling; None: the local lengths."""

    def to_bags(self) -> dict[str, Bags]:
        """{feature: Bags}, every tensor a view of this one's (no copies)."""
        if not self.keys:
            return {}
        num_keys, stride = self.lengths.shape
        offsets = torch.zeros(num_keys, stride + 1, dtype=torch.int64)
        offsets[:, 1:] = self.lengths.cumsum(dim=1)
        nnz_per_key = offsets[:, -1].tolist()
        indices = torch.split(self.values, nnz_per_key)
        weights: Sequence[torch.Tensor | None] = [None] * num_keys
        if self.weights is not None:
            weights = torch.split(self.weights, nnz_per_key)
        divisors: Sequence[torch.Tensor | None] = [None] * num_keys
        if self.mean_divisor is not None:
            divisors = self.mean_divisor.unbind()
        return {
            key: Bags(indices[k], offsets[k], weights[k], divisors[k])
            for k, key in enumerate(self.keys)
        }


ShardingType = Literal["table_wise", "row_wise", "table_row_wise"]
SHARDING_TYPES: tuple[str, ...] = ("table_wise", "row_wise", "table_row_wise")
PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Placement:
    """One piece of a table: global rows [row_start, row_end) on storage node `node`."""

    table_name: str
    row_start: int
    row_end: int
    node: int
    sharding_type: ShardingType
    num_bytes: int = 0
    """Weights + optimizer state of the piece's rows."""
    expected_load: float = 0.0
    """Expected row lookups per training step that land on this piece."""

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start


@dataclass(frozen=True)
class ShardingPlan:
    """Where every row of every table lives; plain data, JSON round-trippable.

    Attributes:
        num_nodes: storage nodes the plan was made for (0..num_nodes-1).
        placements: every piece, ordered by table (model order), then row_start.
        node_bytes: [num_nodes] bytes of table state assigned to each node.
        node_load: [num_nodes] expected row lookups per step served by each node.
        feature_tables: (feature, table_name) pairs in model order.
        node_capacity_bytes: the per-node capacity the plan was checked against.
    """

    num_nodes: int
    placements: tuple[Placement, ...]
    node_bytes: tuple[int, ...]
    node_load: tuple[float, ...]
    feature_tables: tuple[tuple[str, str], ...]
    node_capacity_bytes: int

    # ------------------------------------------------------------------ queries

    @property
    def table_names(self) -> list[str]:
        """Tables in model order."""
        return list(dict.fromkeys(p.table_name for p in self.placements))

    @property
    def feature_names(self) -> list[str]:
        """Sparse features in model order."""
        return [feature for feature, _ in self.feature_tables]

    def table_of(self, feature: str) -> str:
        """The table that serves `feature`."""
        for name, table in self.feature_tables:
            if name == feature:
                return table
        raise PlanError(
            f"feature {feature!r} is not in the sharding plan; plan features: "
            f"{', '.join(self.feature_names)} (was the plan made for another model config?)"
        )

    def pieces_of(self, table_name: str) -> list[Placement]:
        """The pieces of one table, ordered by row_start (they tile [0, num_rows))."""
        pieces = sorted(
            (p for p in self.placements if p.table_name == table_name), key=lambda p: p.row_start
        )
        if not pieces:
            raise PlanError(
                f"table {table_name!r} is not in the sharding plan; plan tables: "
                f"{', '.join(self.table_names)}"
            )
        return pieces

    def num_rows_of(self, table_name: str) -> int:
        return self.pieces_of(table_name)[-1].row_end

    def imbalance(self) -> float:
        """max/mean expected load over nodes (1.0 = perfectly balanced)."""
        mean = sum(self.node_load) / self.num_nodes
        return max(self.node_load) / mean if mean > 0 else 1.0

    def shards_for_node(self, node: int, tables: Sequence[TableConfig]) -> list[ShardSpec]:
        """The pieces node `node` must hold, as storage-node shard specs.

        Args:
            node: 0-based storage node.
            tables: the model's effective tables (`cfg.model.effective_tables()`); must be the
                tables the plan was made for (checked, so that a checkpointed plan is never
                applied to a different model).
        """
        if not 0 <= node < self.num_nodes:
            raise PlanError(
                f"node {node} does not exist; the plan has nodes 0..{self.num_nodes - 1}"
            )
        by_name = {t.name: t for t in tables}
        self._check_tables(by_name)
        return [
            ShardSpec(
                table_name=p.table_name,
                table_num_rows=by_name[p.table_name].num_rows,
                embedding_dim=by_name[p.table_name].embedding_dim,
                row_start=p.row_start,
                row_end=p.row_end,
                pooling=by_name[p.table_name].pooling,
                features=tuple(by_name[p.table_name].features),
                expected_lookups=p.expected_load,
            )
            for p in self.placements
            if p.node == node
        ]

    def _check_tables(self, by_name: Mapping[str, TableConfig]) -> None:
        for name in self.table_names:
            if name not in by_name:
                raise PlanError(
                    f"the sharding plan places table {name!r}, which the model does not have; "
                    "re-plan for this config (or restore with the config the plan was made for)"
                )
            planned, actual = self.num_rows_of(name), by_name[name].num_rows
            if planned != actual:
                raise PlanError(
                    f"table {name!r}: the sharding plan covers {planned} rows but the model has "
                    f"{actual}; re-plan for this config (check model.max_rows_per_table)"
                )

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (saved with the run and with checkpoints)."""
        return {
            "version": PLAN_FORMAT_VERSION,
            "num_nodes": self.num_nodes,
            "node_capacity_bytes": self.node_capacity_bytes,
            "feature_tables": [[f, t] for f, t in self.feature_tables],
            "placements": [asdict(p) for p in self.placements],
            "node_bytes": list(self.node_bytes),
            "node_load": list(self.node_load),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ShardingPlan:
        """Inverse of `to_dict`; rejects malformed or inconsistent plans with PlanError."""
        try:
            if raw["version"] != PLAN_FORMAT_VERSION:
                raise PlanError(
                    f"sharding plan format version {raw['version']} is not supported "
                    f"(this ndp reads version {PLAN_FORMAT_VERSION})"
                )
            plan = cls(
                num_nodes=int(raw["num_nodes"]),
                placements=tuple(Placement(**p) for p in raw["placements"]),
                node_bytes=tuple(int(b) for b in raw["node_bytes"]),
                node_load=tuple(float(x) for x in raw["node_load"]),
                feature_tables=tuple((str(f), str(t)) for f, t in raw["feature_tables"]),
                node_capacity_bytes=int(raw["node_capacity_bytes"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed sharding plan: {exc!r}") from None
        plan.validate()
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ShardingPlan:
        return cls.from_dict(json.loads(text))

    def validate(self) -> None:
        """Check the invariants every consumer relies on; PlanError if one is broken.

        Pieces of a table tile [0, num_rows) with no gap or overlap, sit on existing nodes,
        a node holds at most one piece of a table, and every feature's table is placed.
        """
        if len(self.node_bytes) != self.num_nodes or len(self.node_load) != self.num_nodes:
            raise PlanError("sharding plan: node_bytes/node_load must have one entry per node")
        for p in self.placements:
            if p.sharding_type not in SHARDING_TYPES:
                raise PlanError(
                    f"sharding plan: table {p.table_name!r} has sharding type "
                    f"{p.sharding_type!r}; allowed: {', '.join(SHARDING_TYPES)}"
                )
            if not 0 <= p.node < self.num_nodes:
                raise PlanError(
                    f"sharding plan: table {p.table_name!r} placed on node {p.node}, "
                    f"nodes are 0..{self.num_nodes - 1}"
                )
        for name in self.table_names:
            pieces = self.pieces_of(name)
            nodes = [p.node for p in pieces]
            if len(set(nodes)) != len(nodes):
                raise PlanError(f"sharding plan: a node holds two pieces of table {name!r}")
            expected_start = 0
            for p in pieces:
                if p.row_start != expected_start or p.row_end <= p.row_start:
                    raise PlanError(
                        f"sharding plan: pieces of table {name!r} do not tile its rows "
                        f"(piece [{p.row_start}, {p.row_end}) after row {expected_start})"
                    )
                expected_start = p.row_end
        placed = set(self.table_names)
        for feature, table in self.feature_tables:
            if table not in placed:
                raise PlanError(
                    f"sharding plan: feature {feature!r} maps to table {table!r}, not placed"
                )

    # ------------------------------------------------------------------ display

    def format_table(self) -> str:
        """A human-readable summary for `ndp-train --dry-run`."""
        lines = [
            f"sharding plan: {len(self.table_names)} tables on {self.num_nodes} storage nodes "
            f"(capacity {_fmt_bytes(self.node_capacity_bytes)} each)",
            "",
            f"{'table':<24} {'type':<15} {'node':>4} {'rows':>22} {'bytes':>10} {'load/step':>11}",
        ]
        for p in self.placements:
            rows = f"[{p.row_start}, {p.row_end})"
            lines.append(
                f"{p.table_name:<24} {p.sharding_type:<15} {p.node:>4} {rows:>22} "
                f"{_fmt_bytes(p.num_bytes):>10} {p.expected_load:>11.1f}"
            )
        lines += ["", f"{'node':>4} {'bytes':>10} {'used':>6} {'load/step':>11}"]
        for node in range(self.num_nodes):
            used = self.node_bytes[node] / self.node_capacity_bytes
            lines.append(
                f"{node:>4} {_fmt_bytes(self.node_bytes[node]):>10} {used:>6.1%} "
                f"{self.node_load[node]:>11.1f}"
            )
        lines.append(f"load imbalance (max/mean): {self.imbalance():.3f}")
        return "\n".join(lines)


def _fmt_bytes(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")
