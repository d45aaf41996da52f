"""One request carrying many tables (sizes, dims, pooling modes, weights, empty bags, a table
read by two features) pools and trains exactly as FBGEMM's table-batched kernels do.

The node joins the request's features per arena and pools each arena with one
`embedding_bag`, merges every table's rows in one update: this checks that batching across
tables changes nothing. FBGEMM side: one `SplitTableBatchedEmbeddingBagsCodegen` per pooling
mode (a module has one), each holding several tables of different dims.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from ndp.model.init import init_table
from ndp.plan import Bags

from .conftest import SEED, shard

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
        EmbeddingLocation,
        PoolingMode,
    )
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        OptimType,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

BATCH, STEPS = 5, 4
# table: (rows, dim, pooling); t5 is read by features f5 and f5b
TABLES = {
    "t0": (30, 8, "sum"),
    "t1": (7, 8, "mean"),
    "t2": (100, 4, "sum"),
    "t3": (1, 8, "mean"),
    "t4": (50, 4, "sum"),
    "t5": (12, 8, "mean"),
}
FEATURES = {"f0": "t0", "f1": "t1", "f2": "t2", "f3": "t3", "f4": "t4", "f5": "t5", "f5b": "t5"}
OPTIM = {
    "sgd": OptimType.EXACT_SGD,
    "adagrad": OptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": OptimType.EXACT_ROWWISE_ADAGRAD,
}


def fbgemm_module(
    optimizer: str, pooling: str
) -> tuple[SplitTableBatchedEmbeddingBagsCodegen, list[str], list[str]]:
    """FBGEMM's module for the tables of one pooling mode; (module, tables, features)."""
    tables = [t for t, (_, _, p) in TABLES.items() if p == pooling]
    features = [f for f, t in FEATURES.items() if t in tables]
    module = SplitTableBatchedEmbeddingBagsCodegen(
        [(TABLES[t][0], TABLES[t][1], EmbeddingLocation.HOST, ComputeDevice.CPU) for t in tables],
        feature_table_map=[tables.index(FEATURES[f]) for f in features],
        optimizer=OPTIM[optimizer],
        learning_rate=0.05,
        eps=1e-8,
        pooling_mode=PoolingMode.SUM if pooling == "sum" else PoolingMode.MEAN,
    )
    with torch.no_grad():
        for weights, table in zip(module.split_embedding_weights(), tables, strict=True):
            rows, dim, _ = TABLES[table]
            weights.copy_(init_table(seed=SEED, table_name=table, num_rows=rows, embedding_dim=dim))
    return module, tables, features


def random_bags(rng: np.random.Generator, feature: str) -> Bags:
    """Bags of length 0..4 (some empty); per-sample weights on the sum-pooled features."""
    rows, _, pooling = TABLES[FEATURES[feature]]
    lengths = rng.integers(0, 5, size=BATCH)
    lengths[rng.integers(0, BATCH)] = 0
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])).to(torch.int64)
    indices = torch.from_numpy(rng.integers(0, rows, size=int(lengths.sum()))).to(torch.int64)
    weights = None
    if pooling == "sum":
        weights = torch.from_numpy(rng.uniform(0.5, 2.0, size=indices.numel()).astype(np.float32))
    return Bags(indices, offsets, weights)


def fbgemm_forward(module, features: list[str], bags: dict[str, Bags]) -> torch.Tensor:
    """[B, sum of dims] for `features` in order (FBGEMM's KJT-shaped input)."""
    indices = torch.cat([bags[f].indices for f in features])
    lengths = torch.cat([bags[f].offsets[1:] - bags[f].offsets[:-1] for f in features])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    weights = None
    if bags[features[0]].per_sample_weights is not None:
        weights = torch.cat([bags[f].per_sample_weights for f in features])
    return module(indices, offsets, per_sample_weights=weights)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
@pytest.mark.parametrize("cache_rows", [3, 1000], ids=["evicting", "holds_all"])
def test_one_request_of_many_tables_matches_fbgemm_table_batched(make_node, optimizer, cache_rows):
    """With a 3-slot cache the update goes through fetch/store and flash; with one that holds
    every row FBGEMM's own backward kernel runs in place on the slot tensors
    (`storage_node.fused_update`): both equal FBGEMM."""
    shards = [
        shard(
            t,
            num_rows=rows,
            dim=dim,
            pooling=pooling,
            features=tuple(f for f, table in FEATURES.items() if table == t),
        )
        for t, (rows, dim, pooling) in TABLES.items()
    ]
    node = make_node(shards, optimizer=optimizer, cache_rows=cache_rows, cache_policy="lru")
    assert len(node._arenas) == 2  # dims 8 and 4: two arenas, each one pooling call
    modules = [fbgemm_module(optimizer, "sum"), fbgemm_module(optimizer, "mean")]
    rng = np.random.default_rng(1)
    for step in range(STEPS):
        bags = {f: random_bags(rng, f) for f in FEATURES}
        pooled = node.lookup(step, 0, bags)
        grads = {}
        for module, _, features in modules:
            expected = fbgemm_forward(module, features, bags)
            dims = [TABLES[FEATURES[f]][1] for f in features]
            grad = torch.from_numpy(rng.standard_normal(tuple(expected.shape)).astype(np.float32))
            for feature, part, grad_part in zip(
                features, expected.split(dims, 1), grad.split(dims, 1), strict=True
            ):
                torch.testing.assert_close(pooled[feature], part.detach(), rtol=1e-6, atol=1e-6)
                grads[feature] = grad_part.contiguous()
            expected.backward(grad)
        assert node.push_gradients(step, 0, grads)
        for module, tables, _ in modules:
            weights = module.split_embedding_weights()
            states = module.split_optimizer_states() if optimizer != "sgd" else None
            for i, table in enumerate(tables):
                rows = torch.arange(TABLES[table][0])
                node_weights, node_state = node.read_rows(table, rows)
                torch.testing.assert_close(node_weights, weights[i], rtol=1e-6, atol=1e-6)
                if states is not None:
                    fb_state = states[i][0].reshape(len(rows), -1)
                    torch.testing.assert_close(node_state, fb_state, rtol=1e-6, atol=1e-6)
    stats = node.stats()
    evictions = stats["cache"]["evictions"]
    assert evictions > 0 if cache_rows == 3 else evictions == 0
    # resident rows are updated by FBGEMM's own backward kernel on the slot tensors; an
    # evicting cache by the node's own path
    fused = cache_rows == 1000
    paths = stats["update_paths"]
    assert paths == {
        "fbgemm_kernel": 2 * STEPS if fused else 0,
        "node_kernels": 0 if fused else 2 * STEPS,
    }
