"""What a storage node holds and what one lookup request carries (plain data, shared contract).

`ShardSpec` is one piece of a table placed on a node by the planner; `Bags` is one feature's
bags for one request, already routed to a piece (indices local to the piece).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


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

    def same_as(self, other: Bags) -> bool:
        """Equal tensors field by field (what an early pool must match to answer a lookup)."""

        def same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
            if x is None or y is None:
                return x is None and y is None
            return x.shape == y.shape and bool(torch.equal(x, y))

        return (
            same(self.indices, other.indices)
            and same(self.offsets, other.offsets)
            and same(self.per_sample_weights, other.per_sample_weights)
            and same(self.mean_divisor, other.mean_divisor)
        )
