"""FBGEMM's backward kernel on the cache's slot tensor (`storage_node.fused_update`) trains
exactly what the node's own dedupe/merge/optimizer path trains, in every case that path runs
beside it: several workers, tables read by two features, mean bags, weights, empty bags, kept
early pools; and the node falls back to its own path where the kernel cannot run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ndp.plan import Bags

from .conftest import shard

BATCH, STEPS = 6, 5
TABLES = {"t0": (40, "sum"), "t1": (9, "mean"), "t2": (25, "sum")}
FEATURES = {"a": "t0", "b": "t1", "c": "t2", "c2": "t2"}


def shards():
    return [
        shard(
            t,
            num_rows=rows,
            dim=8,
            pooling=pooling,
            features=tuple(f for f, table in FEATURES.items() if table == t),
        )
        for t, (rows, pooling) in TABLES.items()
    ]


def bags_for(rng: np.random.Generator, batch: int = BATCH) -> dict[str, Bags]:
    out = {}
    for feature, table in FEATURES.items():
        rows, pooling = TABLES[table]
        lengths = rng.integers(0, 4, size=batch)
        lengths[0] = 0  # an empty bag in every feature
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])).to(torch.int64)
        indices = torch.from_numpy(rng.integers(0, rows, size=int(lengths.sum()))).to(torch.int64)
        weights = None
        if pooling == "sum":
            weights = torch.from_numpy(rng.uniform(0.5, 2.0, indices.numel()).astype(np.float32))
        out[feature] = Bags(indices, offsets, weights)
    return out


def train(node, *, workers: int, early: bool, batch_of_worker=lambda w: BATCH) -> list:
    """STEPS steps of every worker's lookup and push (with `early`: each step's bags pooled
    early before the previous step's update); the rows of every table afterwards."""
    rng = np.random.default_rng(3)
    plan = [
        [(bags_for(rng, batch_of_worker(w)), rng) for w in range(workers)] for _ in range(STEPS)
    ]
    grads_rng = np.random.default_rng(4)
    for step in range(STEPS):
        if early and step + 1 < STEPS:
            for worker, (bags, _) in enumerate(plan[step + 1]):
                node.early_lookup(step + 1, worker, bags)
        for worker, (bags, _) in enumerate(plan[step]):
            pooled = node.lookup(step, worker, bags)
            grads = {
                f: torch.from_numpy(grads_rng.standard_normal(tuple(v.shape)).astype(np.float32))
                for f, v in pooled.items()
            }
            node.push_gradients(step, worker, grads)
    return [node.read_rows(t, torch.arange(rows))[0] for t, (rows, _) in TABLES.items()]


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("early", [False, True], ids=["plain", "early_pools"])
def test_fbgemm_kernel_trains_what_the_node_path_trains(
    make_node, tmp_path, optimizer, workers, early
):
    fused = make_node(
        shards(),
        optimizer=optimizer,
        cache_rows=1000,
        num_workers=workers,
        flash_dir=tmp_path / "fused",
    )
    own = make_node(
        shards(),
        optimizer=optimizer,
        cache_rows=3,
        num_workers=workers,
        flash_dir=tmp_path / "own",
        node_id="n1",
    )
    got, expected = (
        train(fused, workers=workers, early=early),
        train(own, workers=workers, early=early),
    )
    for got_rows, expected_rows in zip(got, expected, strict=True):
        torch.testing.assert_close(got_rows, expected_rows, rtol=1e-6, atol=1e-6)
    for table, (rows, _) in TABLES.items():  # and the optimizer state
        got_state = fused.read_rows(table, torch.arange(rows))[1]
        torch.testing.assert_close(got_state, own.read_rows(table, torch.arange(rows))[1])
    assert fused.stats()["update_paths"] == {"fbgemm_kernel": STEPS, "node_kernels": 0}
    assert own.stats()["update_paths"] == {"fbgemm_kernel": 0, "node_kernels": STEPS}
    if early:
        assert fused.stats()["early"]["early_hits"] == (STEPS - 1) * workers


def test_workers_with_different_batch_sizes_take_the_node_path(make_node, tmp_path):
    """FBGEMM's kernel has one batch size for every pseudo-table: workers whose batches
    differ are merged by the node's own path, with the same result."""
    fused = make_node(
        shards(), optimizer="sgd", cache_rows=1000, num_workers=2, flash_dir=tmp_path / "a"
    )
    own = make_node(
        shards(),
        optimizer="sgd",
        cache_rows=3,
        num_workers=2,
        flash_dir=tmp_path / "b",
        node_id="n1",
    )
    uneven = {0: BATCH, 1: BATCH - 2}.__getitem__
    got = train(fused, workers=2, early=False, batch_of_worker=uneven)
    expected = train(own, workers=2, early=False, batch_of_worker=uneven)
    for got_rows, expected_rows in zip(got, expected, strict=True):
        torch.testing.assert_close(got_rows, expected_rows, rtol=1e-6, atol=1e-6)
    assert fused.stats()["update_paths"]["fbgemm_kernel"] == 0


def test_adam_has_no_fbgemm_cpu_kernel_and_takes_the_node_path(make_node):
    node = make_node(shards(), optimizer="adam", cache_rows=1000)
    train(node, workers=1, early=False)
    assert node.stats()["update_paths"] == {"fbgemm_kernel": 0, "node_kernels": STEPS}
