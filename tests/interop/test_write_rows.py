"""StorageNodeCore.write_rows: the path imports take into a storage node."""

from __future__ import annotations

import pytest
import torch

from ndp.config import SparseOptimizerConfig, StorageConfig
from ndp.plan import Bags, ShardSpec
from storage_node.errors import BadTensorError, IndexOutOfRangeError, StepOrderError
from storage_node.node import StorageNodeCore

DIM = 4


@pytest.fixture()
def core(tmp_path):
    spec = ShardSpec(
        table_name="t",
        table_num_rows=100,
        embedding_dim=DIM,
        row_start=40,
        row_end=100,
        pooling="sum",
        features=("f",),
    )
    node = StorageNodeCore(
        node_id="0",
        shards=[spec],
        # room for ~4 rows: most written rows must land on flash and come back from it
        storage=StorageConfig(cache_bytes=4 * 4 * (DIM + 1) + 200, cache_policy="lru"),
        optimizer=SparseOptimizerConfig(name="rowwise_adagrad", lr=0.1),
        seed=0,
        flash_dir=tmp_path,
    )
    yield node
    node.close()


def test_written_rows_read_back_and_keep_their_state(core):
    rows = torch.arange(40, 100)
    _, state_before = core.read_rows("t", rows)
    weights = torch.randn(60, DIM)
    core.write_rows("t", rows, weights)
    got_w, got_s = core.read_rows("t", rows)
    torch.testing.assert_close(got_w, weights)
    torch.testing.assert_close(got_s, state_before)

    states = torch.full((2, 1), 7.0)
    core.write_rows("t", torch.tensor([41, 99]), torch.zeros(2, DIM), states)
    got_w, got_s = core.read_rows("t", torch.tensor([41, 99, 42]))
    torch.testing.assert_close(got_w[:2], torch.zeros(2, DIM))
    torch.testing.assert_close(got_s[:2], states)
    torch.testing.assert_close(got_w[2], weights[2])


def test_lookups_after_a_write_see_the_new_rows(core):
    weights = torch.arange(60 * DIM, dtype=torch.float32).reshape(60, DIM)
    core.write_rows("t", torch.arange(40, 100), weights)
    bags = Bags(indices=torch.tensor([0, 59, 3]), offsets=torch.tensor([0, 2, 3]))
    pooled = core.lookup(0, 0, {"f": bags}, train=False)["f"]
    torch.testing.assert_close(pooled, torch.stack([weights[0] + weights[59], weights[3]]))


def test_bad_writes_are_refused_without_effect(core):
    rows = torch.tensor([40, 41])
    before, _ = core.read_rows("t", rows)
    with pytest.raises(IndexOutOfRangeError, match=r"row 39 is outside .*\[40, 100\)"):
        core.write_rows("t", torch.tensor([39, 40]), torch.ones(2, DIM))
    with pytest.raises(BadTensorError, match="duplicate"):
        core.write_rows("t", torch.tensor([40, 40]), torch.ones(2, DIM))
    with pytest.raises(BadTensorError, match=rf"\[2, {DIM}\]"):
        core.write_rows("t", rows, torch.ones(2, DIM + 1))
    with pytest.raises(BadTensorError, match=r"\[2, 1\] for rowwise_adagrad"):
        core.write_rows("t", rows, torch.ones(2, DIM), torch.ones(2, DIM))
    torch.testing.assert_close(core.read_rows("t", rows)[0], before)


def test_a_write_during_a_step_in_flight_is_refused(core):
    bags = Bags(indices=torch.tensor([1]), offsets=torch.tensor([0, 1]))
    core.lookup(0, 0, {"f": bags}, train=True)
    with pytest.raises(StepOrderError, match="in flight"):
        core.write_rows("t", torch.tensor([41]), torch.ones(1, DIM))
    core.push_gradients(0, 0, {"f": torch.ones(1, DIM)})
    core.write_rows("t", torch.tensor([41]), torch.ones(1, DIM))
    torch.testing.assert_close(core.read_rows("t", torch.tensor([41]))[0], torch.ones(1, DIM))
