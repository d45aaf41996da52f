"""Early pooling on the storage-node core: a step's bags pooled before earlier updates land,
then corrected by each update, answer the step's lookup exactly as pooling after them would."""

from __future__ import annotations

import pytest
import torch

from ndp.config import SparseOptimizerConfig, StorageConfig
from ndp.plan import Bags, ShardSpec
from storage_node.errors import EarlyPoolMissingError
from storage_node.node import StorageNodeCore

DIM = 8
ROWS = 40


def _node(
    tmp_path, name: str, *, optimizer: str, pooling: str, cache_rows: int = 6
) -> StorageNodeCore:
    """A one-table node with a 6-row cache (most rows on flash), same seed for every name."""
    spec = ShardSpec(
        table_name="t0",
        table_num_rows=ROWS,
        embedding_dim=DIM,
        row_start=0,
        row_end=ROWS,
        pooling=pooling,
        features=("f0", "f1"),
    )
    return StorageNodeCore(
        node_id=name,
        shards=[spec],
        storage=StorageConfig(page_bytes=512, io_threads=2, cache_bytes=cache_rows * 200),
        optimizer=SparseOptimizerConfig(name=optimizer, lr=0.3, eps=1e-8),
        seed=3,
        flash_dir=tmp_path / name,
    )


def _bags(rows_per_bag: list[list[int]], weighted: bool) -> Bags:
    """Multi-hot bags (duplicates allowed); optional per-sample weights 0.5, 1.0, 1.5, ..."""
    indices = torch.tensor([r for bag in rows_per_bag for r in bag], dtype=torch.int64)
    lengths = torch.tensor([len(bag) for bag in rows_per_bag])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    weights = 0.5 * (1 + torch.arange(indices.numel(), dtype=torch.float32)) if weighted else None
    return Bags(indices, offsets, weights)


# Step s's batches: duplicate rows inside a bag (3, 3), an empty bag, and rows that steps 0,
# 1 and 2 share (3, 7, 11, 20), so every correction is non-trivial.
STEP_BAGS = [
    {"f0": [[3, 3, 7], [11], [], [20, 21]], "f1": [[7, 30], [3]]},
    {"f0": [[7, 3], [25, 11, 11], [20], [5]], "f1": [[3, 3, 3], [30]]},
    {"f0": [[3, 20, 7, 7], [11], [5, 25], [9]], "f1": [[30, 3], [7]]},
]


def _batch(step: int, weighted: bool) -> dict[str, Bags]:
    return {f: _bags(rows, weighted) for f, rows in STEP_BAGS[step].items()}


def _train(node: StorageNodeCore, step: int, weighted: bool) -> dict[str, torch.Tensor]:
    pooled = node.lookup(step, 0, _batch(step, weighted))
    generator = torch.Generator().manual_seed(100 + step)
    grads = {f: torch.randn(p.shape, generator=generator) for f, p in pooled.items()}
    node.push_gradients(step, 0, grads)
    return pooled


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize(("pooling", "weighted"), [("mean", False), ("sum", True)])
def test_early_pool_plus_corrections_equals_pooling_after_the_updates(
    tmp_path, optimizer, pooling, weighted
):
    plain = _node(tmp_path, "plain", optimizer=optimizer, pooling=pooling)
    early = _node(tmp_path, "early", optimizer=optimizer, pooling=pooling)
    stale = _node(tmp_path, "stale", optimizer=optimizer, pooling=pooling)
    # Step 2 pooled before steps 0 and 1 apply (two corrections), step 1 before step 0.
    assert early.early_lookup(2, 0, _batch(2, weighted))
    assert early.early_lookup(1, 0, _batch(1, weighted))
    assert stale.early_lookup(1, 0, _batch(1, weighted), correct=False)
    before_updates = stale.lookup(0, 0, _batch(1, weighted), train=False)
    exact = {}
    for step in range(3):
        exact[step] = _train(plain, step, weighted)
        got = _train(early, step, weighted)
        for feature in exact[step]:
            torch.testing.assert_close(got[feature], exact[step][feature], rtol=0, atol=1e-6)
    assert early.early_counters == {
        "early_pools": 2,
        "early_hits": 2,
        "early_hits_without_bags": 0,
        "early_mismatches": 0,
        # step 2's rows came from flash (a 6-row cache): pooled early, then corrected by
        # updates 0 and 1; step 1's rows had just been read by it: kept, pooled at its lookup
        "early_groups_deferred": 1,
    }
    torch.testing.assert_close(
        early.read_rows("t0", torch.arange(ROWS)), plain.read_rows("t0", torch.arange(ROWS))
    )

    _train(stale, 0, weighted)
    stale_pooled = stale.lookup(1, 0, _batch(1, weighted))
    for feature, vectors in stale_pooled.items():
        torch.testing.assert_close(vectors, before_updates[feature], rtol=0, atol=0)
    assert any(not torch.allclose(stale_pooled[f], exact[1][f], atol=1e-4) for f in stale_pooled), (
        "step 0 changed rows of step 1, so uncorrected vectors must be stale"
    )


def test_a_lookup_with_other_bags_pools_afresh(tmp_path):
    plain = _node(tmp_path, "plain", optimizer="sgd", pooling="sum")
    early = _node(tmp_path, "early", optimizer="sgd", pooling="sum")
    assert early.early_lookup(1, 0, _batch(2, weighted=False))  # not what step 1 will send
    for step in range(2):
        expected = _train(plain, step, weighted=False)
        got = _train(early, step, weighted=False)
        for feature in expected:
            torch.testing.assert_close(got[feature], expected[feature], rtol=0, atol=0)
    assert early.early_counters["early_mismatches"] == 1
    assert early.early_counters["early_hits"] == 0


def test_an_early_lookup_of_an_applied_step_keeps_nothing(tmp_path):
    node = _node(tmp_path, "n", optimizer="sgd", pooling="sum")
    _train(node, 0, weighted=False)
    assert not node.early_lookup(0, 0, _batch(0, weighted=False))
    assert node.early_counters["early_pools"] == 0


def test_a_lookup_without_bags_answers_the_kept_pool_as_the_lookup_with_them_would(tmp_path):
    plain = _node(tmp_path, "plain", optimizer="rowwise_adagrad", pooling="mean")
    early = _node(tmp_path, "early", optimizer="rowwise_adagrad", pooling="mean")
    assert early.early_lookup(1, 0, _batch(1, weighted=False))
    _train(plain, 0, weighted=False)
    _train(early, 0, weighted=False)  # corrects the kept pool of step 1
    expected = _train(plain, 1, weighted=False)
    got = early.lookup_early(1, 0)
    for feature in expected:
        torch.testing.assert_close(got[feature], expected[feature], rtol=0, atol=1e-6)
    generator = torch.Generator().manual_seed(101)  # the gradients `_train` pushes at step 1
    early.push_gradients(
        1, 0, {f: torch.randn(p.shape, generator=generator) for f, p in got.items()}
    )
    torch.testing.assert_close(
        early.read_rows("t0", torch.arange(ROWS)), plain.read_rows("t0", torch.arange(ROWS))
    )
    assert early.early_counters["early_hits_without_bags"] == 1


def test_a_lookup_without_bags_and_no_kept_pool_is_refused_and_changes_nothing(tmp_path):
    node = _node(tmp_path, "n", optimizer="sgd", pooling="sum")
    before = node.read_rows("t0", torch.arange(ROWS))
    with pytest.raises(EarlyPoolMissingError, match="no early pool of step 0 for worker 0"):
        node.lookup_early(0, 0)
    assert node.health()["pending_steps"] == []
    torch.testing.assert_close(node.read_rows("t0", torch.arange(ROWS)), before)


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_an_early_lookup_of_resident_rows_is_pooled_at_its_lookup_bit_for_bit(tmp_path, optimizer):
    """Every row in the cache: the early lookup keeps the validated bags unpooled (reading
    them later costs nothing; a correction would cost what pooling early saves), and the
    lookup pools them after the update, exactly as a lookup with its bags does."""
    plain = _node(tmp_path, "plain", optimizer=optimizer, pooling="mean", cache_rows=ROWS)
    early = _node(tmp_path, "early", optimizer=optimizer, pooling="mean", cache_rows=ROWS)
    for node in (plain, early):  # every row read once: all of them resident now
        node.lookup(0, 0, {"f0": _bags([list(range(ROWS))], False)}, train=False)
    _train(plain, 0, weighted=True)
    assert early.early_lookup(1, 0, _batch(1, True))
    _train(early, 0, weighted=True)
    got = early.lookup_early(1, 0)
    want = plain.lookup(1, 0, _batch(1, True))
    for feature, vectors in want.items():
        assert torch.equal(got[feature], vectors), feature
    assert early.early_counters["early_groups_deferred"] == 1
    assert early.early_counters["early_hits"] == 1


def test_a_correction_that_touches_few_values_equals_pooling_after_the_update(tmp_path):
    """Step 1's bags share one row with step 0's update among twelve values: the correction
    gathers that one change (the sparse form) instead of pooling every value's delta."""
    plain = _node(tmp_path, "plain", optimizer="sgd", pooling="sum")
    early = _node(tmp_path, "early", optimizer="sgd", pooling="sum")
    first = {"f0": _bags([[3, 4], [5]], True), "f1": _bags([[6]], True)}
    later = {
        "f0": _bags([[3, 30, 31], [32, 33], [34, 35, 36]], True),
        "f1": _bags([[37, 38], [39, 29]], True),
    }
    before = plain.lookup(1, 0, later, train=False)
    assert early.early_lookup(1, 0, later)
    for node in (plain, early):
        pooled = node.lookup(0, 0, first)
        grads = {f: torch.full(p.shape, 0.25) for f, p in pooled.items()}
        node.push_gradients(0, 0, grads)
    got = early.lookup_early(1, 0)
    want = plain.lookup(1, 0, later)
    for feature, vectors in want.items():
        torch.testing.assert_close(got[feature], vectors, rtol=0, atol=1e-6)
    # only the bag holding row 3 changed: the correction was needed, and confined to it
    assert not torch.equal(before["f0"][0], want["f0"][0])
    assert torch.equal(before["f0"][1:], want["f0"][1:]) and torch.equal(before["f1"], want["f1"])
    assert early.early_counters["early_groups_deferred"] == 0
