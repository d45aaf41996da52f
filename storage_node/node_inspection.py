"""Reading and writing rows by table, and a node's counters (a part of `StorageNodeCore`).

Rows are addressed as the tables number them (global rows); the node turns them into its
arena rows. Reads go through the cache without counting as accesses; writes go through the
write-back cache, so a cached copy never shadows a new value.
"""

from __future__ import annotations

import numpy as np
import torch

from ndp.model.spec import optimizer_state_width
from storage_node.arena import Piece
from storage_node.errors import (
    BadTensorError,
    IndexOutOfRangeError,
    StepOrderError,
    UnknownFeatureError,
)
from storage_node.keyed_bags import int_vector
from storage_node.stats import CacheCounters, FlashCounters, add_counters, summarize


class Inspection:
    """`StorageNodeCore`'s row access by table, stats and health (under the node's `_lock`)."""

    def _table_rows(self, table_name: str, global_rows: torch.Tensor) -> tuple[Piece, torch.Tensor]:
        """The piece of a table and the local rows of `global_rows` (all checked)."""
        piece = self._pieces.get(table_name)
        if piece is None:
            raise UnknownFeatureError(
                f"node {self.node_id!r} holds no piece of table {table_name!r}; "
                f"it holds: {', '.join(sorted(self._pieces))}"
            )
        rows = int_vector(global_rows, f"table {table_name!r}: rows")
        spec = piece.spec
        outside = (rows < spec.row_start) | (rows >= spec.row_end)
        if bool(outside.any()):
            raise IndexOutOfRangeError(
                f"table {table_name!r}: row {int(rows[outside][0])} is outside this node's "
                f"piece [{spec.row_start}, {spec.row_end})"
            )
        return piece, rows - spec.row_start

    def read_rows(
        self, table_name: str, global_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Current weights [n, D] and optimizer state [n, S] of global rows of a table."""
        with self._lock:
            self._check_open()
            piece, local = self._table_rows(table_name, global_rows)
            unique_rows, inverse = torch.unique(local + piece.base, return_inverse=True)
            records = torch.from_numpy(
                piece.cache.fetch(unique_rows.numpy(), admit=False, count=False)
            )[inverse]
            dim = piece.spec.embedding_dim
            return records[:, :dim].clone(), records[:, dim:].clone()

    def write_rows(
        self,
        table_name: str,
        global_rows: torch.Tensor,
        weights: torch.Tensor,
        states: torch.Tensor | None = None,
    ) -> None:
        """Overwrite the weights [n, D] (and, if given, optimizer state [n, S]) of global rows.

        Why: loading a model trained elsewhere (`ndp.interop`) into a running node. Rows go
        through the write-back cache, so a cached copy can never shadow the new value; with
        `states=None` each row keeps its optimizer state. Refused while a step is in flight
        (lookups recorded, update not applied), which would mix old and new weights.
        """
        with self._lock:
            self._check_open()
            if table_name in self._pieces and self._pending:
                raise StepOrderError(
                    f"node {self.node_id!r}: write_rows while step {min(self._pending)} is in "
                    "flight; write rows between steps"
                )
            piece, local_rows = self._table_rows(table_name, global_rows)
            if torch.unique(local_rows).numel() != local_rows.numel():
                raise BadTensorError(f"table {table_name!r}: write_rows got duplicate rows")
            dim = piece.spec.embedding_dim
            width = optimizer_state_width(self.optimizer.name, dim)
            n = local_rows.numel()
            if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (n, dim):
                raise BadTensorError(
                    f"table {table_name!r}: weights must be a float tensor [{n}, {dim}]"
                )
            if states is not None and (
                not isinstance(states, torch.Tensor) or tuple(states.shape) != (n, width)
            ):
                raise BadTensorError(
                    f"table {table_name!r}: optimizer state must be a float tensor [{n}, {width}] "
                    f"for {self.optimizer.name}"
                )
            rows = (local_rows + piece.base).numpy()
            if states is None:
                records = piece.cache.fetch(rows, admit=False, count=False)
            else:
                records = np.empty((n, dim + width), dtype=np.float32)
                records[:, dim:] = states.detach().to(torch.float32).numpy()
            records[:, :dim] = weights.detach().to(torch.float32).numpy()
            piece.cache.store(rows, records)
            self._early.clear()  # pooled before the write: the lookups pool afresh

    def stats(self) -> dict:
        """Counters per tier (cache, flash), hit rate, energy estimate, step, occupancy.

        The cache counters are the arenas' (one cache serves every piece of an arena); per
        table, the flash counters of its file and how many of its rows the cache holds.
        """
        with self._lock:
            total: dict = {}
            tables: dict[str, dict] = {}
            for arena in self._arenas:
                cache = arena.cache
                occupancy = {
                    "cached_rows": cache.cached_rows(),
                    "pinned_rows": cache.pinned_rows(),
                    "hot_rows": cache.slot_rows[cache.hot],
                }
                arena_part = summarize(cache.counters, FlashCounters(), self.storage.energy)
                arena_part["cache"].update(
                    capacity_rows=cache.capacity_rows,
                    **{name: int(rows.size) for name, rows in occupancy.items()},
                )
                total = add_counters(total, arena_part)
                for piece in arena.pieces:
                    part = summarize(CacheCounters(), piece.flash.counters, self.storage.energy)
                    low, high = piece.base, piece.base + piece.num_rows
                    part["cache"] = {
                        "capacity_rows": cache.capacity_rows,
                        **{
                            name: int(np.count_nonzero((rows >= low) & (rows < high)))
                            for name, rows in occupancy.items()
                        },
                    }
                    tables[piece.spec.table_name] = part
                    total = add_counters(
                        total, {"flash": part["flash"], "energy_pj": part["energy_pj"]}
                    )
            cache = total["cache"]
            lookups = cache["hits"] + cache["misses"]
            cache["hit_rate"] = cache["hits"] / lookups if lookups else 0.0
            return {
                "node_id": self.node_id,
                "applied_step": self.applied_step,
                "optimizer_step": self.optimizer_step,
                "update_seconds": self.update_seconds,
                "lookup_seconds": self.lookup_seconds,
                "lookup_calls": self.lookup_calls,
                "early": dict(self.early_counters),
                "update_paths": dict(self.update_paths),
                **total,
                "arenas": len(self._arenas),
                # DRAM beyond storage.cache_bytes: flash blocks held from a read to the
                # update that writes them (`ArenaFlash.carrying`), at most and across steps
                "held_blocks": {
                    "peak_bytes": sum(a.flash.peak_held_bytes for a in self._arenas),
                    "peak_across_steps_bytes": sum(
                        a.flash.peak_carried_bytes for a in self._arenas
                    ),
                },
                "tables": tables,
            }

    def health(self) -> dict:
        """Liveness and position (cheap; no I/O)."""
        with self._lock:
            return {
                "ok": not self._closed,
                "node_id": self.node_id,
                "applied_step": self.applied_step,
                "tables": sorted(self._pieces),
                "pending_steps": sorted(self._pending),
            }
