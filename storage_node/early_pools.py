"""Early pooling's state: a request's validated bags, the pools kept for a future step, and
the exact correction an update adds to them.

An early pool is (step, worker)'s bags pooled before their step's turn (`early_lookup`).
Every update applied before that step's lookup adds its change to the kept vectors for the
rows it touched, ``pooled[b] += scale_b * sum_r weight_b,r * (w_new[r] - w_old[r])``, so the
lookup answers them without pooling, equal to pooling then up to float rounding.

What pooling early buys is reading the rows before the step's turn; rows already in the
cache cost nothing to read later, while the correction costs about what the pooling saves
(at pooling 20 with Zipf rows, most values hit an updated row: measured in process, the
correction took more than the update). So an exact-mode group whose every row is resident
when the early lookup comes is *deferred*: kept validated but unpooled (`pooled` None), and
pooled when the lookup comes, after the update, exactly as a lookup with bags would be.
Only groups that had to read rows (from flash) are pooled early and corrected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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

    def positions_or_zero_row(self, values: torch.Tensor) -> torch.Tensor:
        """int64 [n]: each value's position in `rows`, or `len(rows)` where it was not
        updated: an index into the deltas with one zero row appended."""
        updated = self.rows.numel()
        if self._position_of_row is not None:
            position = self._position_of_row[values.numpy()]  # a fresh array
            position[position < 0] = updated
            return torch.from_numpy(position)
        position = torch.searchsorted(self.rows, values).clamp_(max=updated - 1)
        return torch.where(self.rows[position] == values, position, updated)


@dataclass
class EarlyPool:
    """One (step, worker)'s bags pooled before their step's turn, kept until its lookup."""

    request: Request
    """The validated bags as they came (the lookup must send the same ones to use them)."""
    pooled: list[torch.Tensor | None]
    """float32 [sum B, D] per group of `request`, corrected for every update since pooling;
    None: deferred (every row was resident), pooled when the lookup comes."""
    correct: bool
    """False (stale mode): updates applied after pooling are not added."""

    def answer(self, pool: Callable[[Arena, KeyedBags], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every feature's vectors: kept ones as they are, deferred groups pooled by `pool`
        now (after every update before the step)."""
        out: dict[str, torch.Tensor] = {}
        for (arena, keyed), pooled in zip(self.request.groups, self.pooled, strict=True):
            out.update(keyed.split(pool(arena, keyed) if pooled is None else pooled))
        return out

    def pooled_groups(self, arena: Arena) -> list[tuple[KeyedBags, torch.Tensor]]:
        """The groups of `arena` pooled early that an update must correct (none in stale
        mode, none deferred)."""
        if not self.correct:
            return []
        return [
            (keyed, pooled)
            for (group_arena, keyed), pooled in zip(self.request.groups, self.pooled, strict=True)
            if group_arena is arena and pooled is not None and keyed.values.numel()
        ]


def pooled_early(pools: Iterable[EarlyPool], arena: Arena) -> list[tuple[KeyedBags, torch.Tensor]]:
    """Every kept group of `arena` an update must correct (empty: no old rows to keep)."""
    return [group for early in pools for group in early.pooled_groups(arena)]


def correct_early_pools(
    groups: Iterable[tuple[KeyedBags, torch.Tensor]], updated: UpdatedRows, delta: torch.Tensor
) -> None:
    """Add one arena's update to the early-pooled groups of that arena (`pooled_early`).

    Per group, whichever costs less: where few values hit an updated row, their changes
    gathered and added with one `index_add_`; where many do, the changes pooled as the bags
    were (one `embedding_bag` over the deltas with a zero row for unchanged rows).

    Args:
        updated: the arena rows the update changed.
        delta: float32 [u, D] new minus old weights of those rows (in `updated.rows` order).
    """
    if updated.rows.numel() == 0:
        return
    deltas: torch.Tensor | None = None
    for keyed, pooled in groups:
        positions = updated.positions_or_zero_row(keyed.values)
        hit = positions < updated.rows.numel()
        hits = int(hit.sum())
        if hits == 0:
            continue
        if hits * 4 < positions.numel():
            bag_of_value = keyed.bag_of_value()
            change = delta[positions[hit]]
            scale = keyed.scale(bag_of_value)  # weights x 1/divisor, as the pooling used
            if scale is not None:
                change = change * scale[hit][:, None]
            pooled.index_add_(0, bag_of_value[hit], change)
            continue
        if deltas is None:
            deltas = torch.cat([delta, delta.new_zeros(1, delta.shape[1])])
        pooled.add_(keyed.pool(deltas, positions, delta.shape[1]))
