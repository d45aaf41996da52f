"""Tiny configs for planner and routing specifications."""

from __future__ import annotations

from typing import Any

import pytest

from ndp.config import Config, config_from_dict

DIM = 4
SGD_ROW_BYTES = DIM * 4  # sgd keeps no optimizer state: 16 bytes per row


def build_config(
    tables: list[tuple[str, int]] | list[dict[str, Any]],
    *,
    num_nodes: int = 2,
    capacity_bytes: int = 1 << 20,
    constraints: dict[str, dict[str, Any]] | None = None,
    pooling_factor: float | list[float] = 1.0,
    batch_size: int = 8,
) -> Config:
    """A synthetic-data config with sgd rows of 16 bytes; tables as (name, rows) or dicts."""
    table_dicts = [
        t
        if isinstance(t, dict)
        else {"name": t[0], "num_rows": t[1], "embedding_dim": DIM, "features": [f"f_{t[0]}"]}
        for t in tables
    ]
    return config_from_dict(
        {
            "model": {"tables": table_dicts, "bottom_mlp": [8, DIM], "top_mlp": [4, 1]},
            "data": {"source": "synthetic", "synthetic": {"pooling_factor": pooling_factor}},
            "optimizer": {"sparse": {"name": "sgd"}},
            "train": {"batch_size": batch_size},
            "cluster": {
                "num_storage_nodes": num_nodes,
                "node_capacity_bytes": capacity_bytes,
                "constraints": constraints or {},
            },
        }
    )


@pytest.fixture()
def make_config():
    return build_config
