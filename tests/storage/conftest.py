"""Fixtures for the storage-node core: tiny nodes on a temporary flash directory."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ndp.config import SparseOptimizerConfig, StorageConfig
from ndp.plan import ShardSpec
from storage_node.node import StorageNodeCore

SEED = 7


def shard(
    table: str = "t0",
    *,
    num_rows: int = 40,
    dim: int = 8,
    start: int = 0,
    end: int | None = None,
    pooling: str = "sum",
    features: tuple[str, ...] | None = None,
) -> ShardSpec:
    """A small piece of table `table` (whole table unless start/end given)."""
    return ShardSpec(
        table_name=table,
        table_num_rows=num_rows,
        embedding_dim=dim,
        row_start=start,
        row_end=num_rows if end is None else end,
        pooling=pooling,
        features=features or (f"f_{table}",),
    )


@pytest.fixture()
def make_node(tmp_path) -> Callable[..., StorageNodeCore]:
    """Build nodes on `tmp_path/flash`; closes them at teardown."""
    nodes: list[StorageNodeCore] = []

    def build(
        shards: list[ShardSpec] | None = None,
        *,
        optimizer: str = "rowwise_adagrad",
        cache_rows: int | None = 4,
        num_workers: int = 1,
        node_id: str = "n0",
        flash_dir=None,
        **storage_fields,
    ) -> StorageNodeCore:
        shards = shards or [shard()]
        opt = SparseOptimizerConfig(name=optimizer, lr=0.05, eps=1e-8)
        storage = StorageConfig(page_bytes=512, io_threads=2, **storage_fields)
        if cache_rows is not None and "cache_bytes" not in storage_fields:
            from ndp.model.spec import row_bytes
            from storage_node.cache import SLOT_METADATA_BYTES

            slot = row_bytes(optimizer, shards[0].embedding_dim) + SLOT_METADATA_BYTES
            storage = StorageConfig(
                page_bytes=512,
                io_threads=2,
                cache_bytes=cache_rows * slot * len(shards),
                **storage_fields,
            )
        node = StorageNodeCore(
            node_id=node_id,
            shards=shards,
            storage=storage,
            optimizer=opt,
            seed=SEED,
            num_workers=num_workers,
            flash_dir=flash_dir or tmp_path / "flash",
        )
        nodes.append(node)
        return node

    yield build
    for node in nodes:
        node.close()
