"""Early pooling's state: a request's validated bags, the pools kept for a future step, and
the exact correction an update adds to them.

An early pool is (step, worker)'s bags pooled before their step's turn (`early_lookup`).
Every update applied before that step's lookup adds its change to the kept vectors for the
rows it touched, ``pooled[b] += scale_b * sum_r weight_b,r * (w_new[r] - w_old[r])``, so the
lookup answers them without pooling, equal to pooling then up to float rounding. One
correction per pool and arena: one look-up of the updated rows, one `index_add_`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ndp.rows import distinct_below, unique_inverse
from storage_node.arena import Arena
from storage_node.keyed_bags import KeyedBags


@dataclass
class Request:
    """One validated request: its features' bags joined per arena."""

    groups: list[tuple[Arena, KeyedBags]]

    def features(self) -> list[str]:
        return [f for _, keyed in self.groups for f in keyed.features]

    def same_as(self, other: Request) -> bool:
        return len(self.groups) == len(other.groups) and all(
            a is b and x.same_as(y)
            for (a, x), (b, y) in zip(self.groups, other.groups, strict=True)
        )


@dataclass
class UpdatedRows:
    """The distinct rows one table's update changes, and where any row sits among them.

    Why a dense map when the piece is small next to the update (a multi-hot update is ~20k
    values per table): `torch.unique` with inverse and a binary search per correction took
    ~1.2 ms per table per step there; an array over the piece's rows answers both with one
    gather. Large pieces keep the sort (an array per row would cost more than it saves).
    """

    rows: torch.Tensor
    """int64 [u] sorted distinct local rows."""
    inverse: torch.Tensor
    """int64 [n]: the position in `rows` of each input row."""
    _position_of_row: np.ndarray | None
    """int64 [piece rows]: position in `rows`, -1 if not updated (dense case only)."""
    order: torch.Tensor | None = None
    """int64 [n]: the input rows' stable sort order, when it was computed (sparse case):
    `merge_row_gradients` groups the values by row in exactly this order, so one sort
    serves both the dedupe and the merge."""

    @classmethod
    def of(cls, rows: torch.Tensor, num_rows: int) -> UpdatedRows:
        """`rows`: int64 [n] local rows in [0, num_rows), repeats allowed."""
        if num_rows > 8 * rows.numel():
            # one sort for the dedupe and the merge (`ndp.rows.unique_inverse`)
            unique, inverse, order = unique_inverse(rows.numpy(), num_rows)
            return cls(
                torch.from_numpy(unique), torch.from_numpy(inverse), None, torch.from_numpy(order)
            )
        values = rows.numpy()
        unique = distinct_below(values, num_rows)
        position_of_row = np.full(num_rows, -1, dtype=np.int64)
        position_of_row[unique] = np.arange(unique.size)
        return cls(
            torch.from_numpy(unique), torch.from_numpy(position_of_row[values]), position_of_row
        )

    @classmethod
    def of_distinct(cls, rows: np.ndarray, num_rows: int) -> tuple[UpdatedRows, np.ndarray]:
        """(`of` for int64 `rows` that are already distinct, in any order; the order that
        sorts them): one sort of the distinct rows instead of one of every value."""
        order = np.argsort(rows)
        ordered = rows[order]
        inverse = np.empty(rows.size, dtype=np.int64)
        inverse[order] = np.arange(rows.size)
        position_of_row = None
        if num_rows <= 8 * max(rows.size, 1):
            position_of_row = np.full(num_rows, -1, dtype=np.int64)
            position_of_row[ordered] = np.arange(ordered.size)
        return cls(torch.from_numpy(ordered), torch.from_numpy(inverse), position_of_row), order

    def find(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bool [n]: which of `values` were updated, int64 [hits]: their positions in `rows`)."""
        if self._position_of_row is not None:
            position = torch.from_numpy(self._position_of_row[values.numpy()])
            hit = position >= 0
            return hit, position[hit]
        # one binary search finds both whether each value was updated and where
        position = torch.searchsorted(self.rows, values).clamp_(max=self.rows.numel() - 1)
        hit = self.rows[position] == values
        return hit, position[hit]


@dataclass
class EarlyPool:
    """One (step, worker)'s bags pooled before their step's turn, kept until its lookup."""

    request: Request
    """The validated bags as they came (the lookup must send the same ones to use them)."""
    pooled: list[torch.Tensor]
    """float32 [sum B, D] per group of `request`, corrected for every update since pooling."""
    correct: bool
    """False (stale mode): updates applied after pooling are not added."""

    def answer(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for (_, keyed), pooled in zip(self.request.groups, self.pooled, strict=True):
            out.update(keyed.split(pooled))
        return out


def correct_early_pools(
    pools: Iterable[EarlyPool], arena: Arena, updated: UpdatedRows, delta: torch.Tensor
) -> None:
    """Add one arena's update to every kept early pool (exact mode) that reads its rows:
    one lookup of the updated rows and one `index_add_` per pool.

    Args:
        updated: the arena rows the update changed.
        delta: float32 [u, D] new minus old weights of those rows (in `updated.rows` order).
    """
    for early in pools:
        if not early.correct:
            continue
        for (group_arena, keyed), pooled in zip(early.request.groups, early.pooled, strict=True):
            if group_arena is not arena or keyed.values.numel() == 0:
                continue
            hit, position = updated.find(keyed.values)
            if position.numel() == 0:
                continue
            bag_of_value = keyed.bag_of_value()
            change = delta[position]
            scale = keyed.scale(bag_of_value)  # weights x 1/divisor, as the pooling used
            if scale is not None:
                change = change * scale[hit][:, None]
            pooled.index_add_(0, bag_of_value[hit], change)
