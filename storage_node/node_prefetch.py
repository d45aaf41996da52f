"""Prefetch and pins: the lookahead's first stage on a node (a part of `StorageNodeCore`).

`prefetch(step, indices)` stages the rows of a future step from flash into the cache and
pins them until that step is applied. The flash reads run without the node lock (lookups
and updates of the current steps go on meanwhile); rows some update wrote in between are
read again when pinned. An arena whose cache holds every row stages and pins nothing:
its rows are resident from the start and never evicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from storage_node.arena import Arena, ArenaDetachedRead
from storage_node.errors import ShardFileError
from storage_node.flash import FlashStore
from storage_node.keyed_bags import check_range, int_vector


@dataclass
class StagingPlan:
    """One arena's share of a prefetch: rows to pin, and those read from flash unlocked."""

    arena: Arena
    stores: list[FlashStore]
    rows: np.ndarray
    missing: np.ndarray
    reader: ArenaDetachedRead | None
    records: np.ndarray | None = None


class PrefetchPins:
    """`StorageNodeCore`'s prefetch and pins (state: `_pins`, under the node's `_lock`)."""

    def prefetch(self, step: int, indices: dict[str, torch.Tensor]) -> None:
        """Stage the rows of a future step into the cache, pinned until that step is applied.

        Rows that find no slot (cache full of pinned rows) are left on flash and read there
        when used. A prefetch for an already-applied step does nothing.
        """
        with self._lock:
            self._check_open()
            per_arena: dict[int, tuple[Arena, list[torch.Tensor]]] = {}
            for feature, values in indices.items():
                piece = self._piece_for(feature)
                values = int_vector(values, f"feature {feature!r}: prefetch indices")
                check_range(piece.place, feature, values)
                per_arena.setdefault(id(piece.arena), (piece.arena, []))[1].append(
                    values + piece.base
                )
            if step <= self.applied_step:
                return
            plans = []
            for arena, parts in per_arena.values():
                if arena.cache.holds_all:  # every row resident, none ever evicted
                    continue
                rows = torch.unique(torch.cat(parts)).numpy()
                missing = arena.cache.rows_to_stage(rows)
                reader = arena.flash.detached_read(missing) if missing.size else None
                plans.append(StagingPlan(arena, list(arena.flash.stores), rows, missing, reader))
        # Flash reads without the node lock: lookups and updates of the current steps go on
        # meanwhile (a prefetch is for a step at least one ahead).
        for plan in plans:
            if plan.reader is not None:
                try:
                    plan.records = plan.reader.read()
                except (OSError, ShardFileError):
                    plan.records = None  # the store was closed or replaced: nothing staged
        with self._lock:
            for plan in plans:
                stale = plan.reader.finish() if plan.reader is not None else None
                replaced = any(
                    a is not b for a, b in zip(plan.stores, plan.arena.flash.stores, strict=True)
                )
                if self._closed or step <= self.applied_step or replaced:
                    continue  # applied, closed or restored meanwhile: nothing to pin
                staged = None
                if plan.records is not None and stale is not None:
                    keep = ~stale  # rows written meanwhile are read again by `pin`
                    staged = (plan.missing[keep], plan.records[keep])
                pinned = plan.arena.cache.pin(plan.rows, staged)
                self._pins.setdefault(step, []).append((plan.arena, pinned))

    def _release_pins(self, *, up_to_step: int) -> None:
        for step in [s for s in self._pins if s <= up_to_step]:
            for arena, rows in self._pins.pop(step):
                arena.cache.unpin(rows)
