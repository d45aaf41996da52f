"""With lookahead a worker's prefetch of a later step rides on its next early lookup (one
call per node and step fewer): over a real gRPC server the node keeps the early pool and
stages and pins the prefetched rows, as the two calls would; bad rows are refused."""

from __future__ import annotations

import pytest
import torch

from ndp.errors import StorageNodeError
from storage_node.client import EarlyLookupAnswer
from wire.tiny_node import random_bags, tiny_config


def test_a_prefetch_riding_on_an_early_lookup_stages_and_pins_its_rows(serve_node):
    cfg = tiny_config(cache_bytes=4096)  # a few rows of cache: most rows start on flash
    node = serve_node(cfg)
    rows = {"f0": torch.tensor([1, 2, 3]), "f2": torch.tensor([4, 5])}
    with node.client() as client:
        client.lookup(0, 0, random_bags(4, seed=0))
        assert node.core.stats()["cache"]["pinned_rows"] == 0
        answer = client.early_lookup_async(1, 0, random_bags(4, seed=1), prefetch=(2, rows))
        assert answer.result() == EarlyLookupAnswer(kept=True, every_row_resident=False)
        assert node.core.early_counters["early_pools"] == 1
        assert node.core.stats()["cache"]["pinned_rows"] == 5  # pinned until step 2 applies
        wire = client.take_wire_bytes()
    assert "Prefetch.sent" not in wire and wire["EarlyLookup.sent"] > 0


def test_a_riding_prefetch_with_a_row_outside_its_table_is_refused_by_name(serve_node):
    node = serve_node(tiny_config())
    with node.client() as client:
        client.lookup(0, 0, random_bags(4, seed=0))
        bad = {"f2": torch.tensor([1, 25])}  # t1 has 25 rows
        with pytest.raises(StorageNodeError, match="f2"):
            client.early_lookup_async(1, 0, random_bags(4, seed=1), prefetch=(2, bad)).result()
        assert node.core.stats()["cache"]["pinned_rows"] == 0


def test_a_node_whose_cache_holds_every_row_says_so_in_its_lookahead_replies(serve_node):
    """The worker stops sending early lookups and prefetches to such a node: they would stage
    nothing and pool nothing early (`DenseWorker._resident_nodes`)."""
    node = serve_node(tiny_config(cache_bytes=1 << 20))  # 65 rows: all preloaded at open
    rows = {"f0": torch.tensor([1, 2, 3])}
    with node.client() as client:
        client.lookup(0, 0, random_bags(4, seed=0))
        answer = client.early_lookup_async(1, 0, random_bags(4, seed=1), prefetch=(2, rows))
        assert answer.result() == EarlyLookupAnswer(kept=True, every_row_resident=True)
        assert client.prefetch_async(3, rows).result() is True
