"""Pooled outputs, updated rows and optimizer state equal FBGEMM's (CPU, HOST) step by step.

FBGEMM's CPU build trains EXACT_SGD, EXACT_ADAGRAD and EXACT_ROWWISE_ADAGRAD; it refuses ADAM
("not supported in CPU mode"), so Adam is checked step by step against FBGEMM's ADAM formula
(lazy rows, global iteration counter) on an in-memory table, with the same bags and cache.
The node's cache holds 3 rows, so almost every access evicts and writes back through flash.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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

NUM_ROWS, DIM, BATCH, STEPS = 30, 8, 6, 4
FBGEMM_OPTIM = {
    "sgd": OptimType.EXACT_SGD,
    "adagrad": OptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": OptimType.EXACT_ROWWISE_ADAGRAD,
}


def fbgemm_table(optimizer: str, pooling: str) -> SplitTableBatchedEmbeddingBagsCodegen:
    emb = SplitTableBatchedEmbeddingBagsCodegen(
        [(NUM_ROWS, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=FBGEMM_OPTIM[optimizer],
        learning_rate=0.05,
        eps=1e-8,
        pooling_mode=PoolingMode.SUM if pooling == "sum" else PoolingMode.MEAN,
    )
    with torch.no_grad():
        emb.split_embedding_weights()[0].copy_(
            init_table(seed=SEED, table_name="t0", num_rows=NUM_ROWS, embedding_dim=DIM)
        )
    return emb


def random_bags(rng: np.random.Generator, weighted: bool) -> Bags:
    """Multi-hot bags of length 0..5 over a few hot rows (many duplicates, some empty)."""
    lengths = rng.integers(0, 6, size=BATCH)
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])).to(torch.int64)
    indices = torch.from_numpy(rng.integers(0, 12, size=int(lengths.sum()))).to(torch.int64)
    weights = (
        torch.from_numpy(rng.uniform(0.5, 2.0, size=indices.numel()).astype(np.float32))
        if weighted
        else None
    )
    return Bags(indices, offsets, weights)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
@pytest.mark.parametrize(("pooling", "weighted"), [("sum", False), ("mean", False), ("sum", True)])
def test_steps_match_fbgemm_with_a_tiny_evicting_cache(make_node, optimizer, pooling, weighted):
    emb = fbgemm_table(optimizer, pooling)
    node = make_node(
        [shard(num_rows=NUM_ROWS, dim=DIM, pooling=pooling)],
        optimizer=optimizer,
        cache_rows=3,
        cache_policy="lru",
    )
    rng = np.random.default_rng(0)
    all_rows = torch.arange(NUM_ROWS)
    for step in range(STEPS):
        bags = random_bags(rng, weighted)
        expected = emb(bags.indices, bags.offsets, per_sample_weights=bags.per_sample_weights)
        pooled = node.lookup(step, 0, {"f_t0": bags})["f_t0"]
        torch.testing.assert_close(pooled, expected.detach(), rtol=1e-6, atol=1e-7)

        grad = torch.from_numpy(rng.standard_normal((BATCH, DIM)).astype(np.float32))
        expected.backward(grad)
        assert node.push_gradients(step, 0, {"f_t0": grad})

        weights, state = node.read_rows("t0", all_rows)
        torch.testing.assert_close(weights, emb.split_embedding_weights()[0], rtol=1e-6, atol=1e-7)
        if optimizer != "sgd":
            fb_state = emb.split_optimizer_states()[0][0].reshape(NUM_ROWS, -1)
            torch.testing.assert_close(state, fb_state, rtol=1e-6, atol=1e-7)
    assert node.stats()["cache"]["evictions"] > 0


def test_fbgemm_cpu_build_refuses_adam():
    """Documents why Adam is checked against its formula rather than against FBGEMM."""
    with pytest.raises(AssertionError, match="not supported in CPU mode"):
        SplitTableBatchedEmbeddingBagsCodegen(
            [(NUM_ROWS, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU)],
            optimizer=OptimType.ADAM,
        )


@pytest.mark.parametrize(("pooling", "weighted"), [("sum", False), ("mean", False), ("sum", True)])
def test_adam_steps_match_fbgemm_adam_formula_with_a_tiny_evicting_cache(
    make_node, pooling, weighted
):
    """FBGEMM ADAM: only rows in the batch move; bias correction uses the module's step t."""
    lr, eps, beta1, beta2 = 0.05, 1e-8, 0.9, 0.999  # make_node's config, Adam's defaults
    weights = init_table(seed=SEED, table_name="t0", num_rows=NUM_ROWS, embedding_dim=DIM)
    weights = weights.to(torch.float64)
    m, v = torch.zeros_like(weights), torch.zeros_like(weights)
    node = make_node(
        [shard(num_rows=NUM_ROWS, dim=DIM, pooling=pooling)],
        optimizer="adam",
        cache_rows=3,
        cache_policy="lru",
    )
    rng = np.random.default_rng(0)
    all_rows = torch.arange(NUM_ROWS)
    for step in range(STEPS):
        bags = random_bags(rng, weighted)
        table = weights.clone().requires_grad_()
        sample_weights = bags.per_sample_weights
        expected = F.embedding_bag(
            bags.indices,
            table,
            bags.offsets,
            mode=pooling,
            per_sample_weights=None if sample_weights is None else sample_weights.double(),
            include_last_offset=True,
        )
        pooled = node.lookup(step, 0, {"f_t0": bags})["f_t0"]
        torch.testing.assert_close(pooled, expected.detach().float(), rtol=1e-6, atol=1e-7)

        grad = torch.from_numpy(rng.standard_normal((BATCH, DIM)).astype(np.float32))
        expected.backward(grad.to(torch.float64))
        assert node.push_gradients(step, 0, {"f_t0": grad})

        rows = torch.unique(bags.indices)  # lazy: untouched rows keep weights and moments
        g, t = table.grad[rows], step + 1
        m[rows] = beta1 * m[rows] + (1 - beta1) * g
        v[rows] = beta2 * v[rows] + (1 - beta2) * g * g
        m_hat, v_hat = m[rows] / (1 - beta1**t), v[rows] / (1 - beta2**t)
        weights[rows] -= lr * m_hat / (v_hat.sqrt() + eps)

        node_weights, node_state = node.read_rows("t0", all_rows)
        torch.testing.assert_close(node_weights, weights.float(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(node_state, torch.cat([m, v], 1).float(), rtol=1e-6, atol=1e-7)
    assert node.stats()["cache"]["evictions"] > 0
