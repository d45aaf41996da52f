"""The one initialiser of embedding rows, shared by the reference trainer and storage nodes.

Why counter-based: a storage node initialises a multi-GB shard in chunks, and a row-wise
shard holds rows [start, end) of a table. The value of element (row, col) therefore has to
be a pure function of (seed, table, row, col), independent of chunking and sharding. We use
SplitMix64 on a 64-bit counter ``row * dim + col`` keyed by (seed, table name), mapped to
uniform(-1/sqrt(num_rows), 1/sqrt(num_rows)) -- torchrec's default for EmbeddingBagConfig.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, vectorised over uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def table_key(seed: int, table_name: str) -> np.uint64:
    """64-bit key of one table's random stream."""
    digest = hashlib.blake2b(f"{seed}:{table_name}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def init_rows(
    *, seed: int, table_name: str, num_rows: int, embedding_dim: int, row_start: int, row_end: int
) -> np.ndarray:
    """Initial weights of rows [row_start, row_end) of a table.

    Returns:
        rows: float32 [row_end - row_start, embedding_dim]; identical for any chunking.
    """
    if not 0 <= row_start <= row_end <= num_rows:
        raise ValueError(f"rows [{row_start}, {row_end}) outside table of {num_rows} rows")
    key = table_key(seed, table_name)
    counters = np.arange(row_start * embedding_dim, row_end * embedding_dim, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = _splitmix64(counters ^ key)
    # top 24 bits -> exactly representable float32 in [0, 1)
    unit = (bits >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))
    bound = np.float32(1.0 / np.sqrt(num_rows))
    rows = (unit * np.float32(2.0) - np.float32(1.0)) * bound
    return rows.reshape(row_end - row_start, embedding_dim)


def init_table(*, seed: int, table_name: str, num_rows: int, embedding_dim: int) -> torch.Tensor:
    """All rows of a small table (reference trainer, tests)."""
    return torch.from_numpy(
        init_rows(
            seed=seed,
            table_name=table_name,
            num_rows=num_rows,
            embedding_dim=embedding_dim,
            row_start=0,
            row_end=num_rows,
        )
    )
