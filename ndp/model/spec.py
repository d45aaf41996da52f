"""Sizes of embedding state, shared by the planner, the storage nodes and the benchmarks."""

from __future__ import annotations

FLOAT_BYTES = 4


def optimizer_state_width(optimizer: str, embedding_dim: int) -> int:
    """Floats of optimizer state stored beside each row (FBGEMM's layouts).

    sgd: none; adagrad: one accumulator per element; rowwise_adagrad: one per row;
    adam: first and second moment per element.
    """
    widths = {"sgd": 0, "adagrad": embedding_dim, "rowwise_adagrad": 1, "adam": 2 * embedding_dim}
    if optimizer not in widths:
        raise ValueError(f"unknown sparse optimizer {optimizer!r}; allowed: {', '.join(widths)}")
    return widths[optimizer]


def row_bytes(optimizer: str, embedding_dim: int) -> int:
    """Bytes of one row: fp32 weights plus fp32 optimizer state."""
    return (embedding_dim + optimizer_state_width(optimizer, embedding_dim)) * FLOAT_BYTES
