"""Planning from a data sample: measured index frequencies decide where row ranges split."""

from __future__ import annotations

import numpy as np
import torch
from conftest import build_config
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ndp.data.batch import Batch
from ndp.planner import plan_shards, sample_index_frequencies


def _batch(indices: list[int]) -> Batch:
    n = len(indices)
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=["f_big"],
        values=torch.tensor(indices, dtype=torch.int64),
        lengths=torch.ones(n, dtype=torch.int64),
    )
    return Batch(dense=torch.zeros(n, 13), sparse=sparse, labels=torch.zeros(n))


def test_sample_counts_rows_per_table():
    cfg = build_config([("big", 1000)])
    frequencies = sample_index_frequencies(cfg, [_batch([0, 0, 5]), _batch([5, 999])])
    counts = frequencies["big"]
    assert counts.shape == (1000,)
    assert (counts[0], counts[5], counts[999], counts.sum()) == (2, 2, 1, 5)


def test_hot_rows_at_the_start_of_a_table_pull_the_row_wise_split_towards_them():
    cfg = build_config([("big", 1000)], constraints={"big": {"sharding_type": "row_wise"}})
    uniform = plan_shards(cfg).pieces_of("big")
    hot_head = [_batch(list(np.random.default_rng(0).integers(0, 100, size=64)))]
    measured = plan_shards(cfg, index_frequencies=sample_index_frequencies(cfg, hot_head))
    assert uniform[0].row_end == 500
    # Half of the lookups fall below row ~50: the first piece shrinks to about there.
    assert measured.pieces_of("big")[0].row_end < 100
