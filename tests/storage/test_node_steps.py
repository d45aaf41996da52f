"""Step order, workers, validation and idempotence of `StorageNodeCore`."""

from __future__ import annotations

import threading

import pytest
import torch

from ndp.plan import Bags
from storage_node.errors import (
    BadTensorError,
    IndexOutOfRangeError,
    StepOrderError,
    UnknownFeatureError,
)

from .conftest import shard

ALL_ROWS = torch.arange(40)


def bags(indices: list[int], offsets: list[int]) -> Bags:
    return Bags(torch.tensor(indices, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64))


def snapshot(node):
    return node.read_rows("t0", ALL_ROWS)


def test_two_workers_are_summed_like_one_worker_with_the_concatenated_batch(make_node, tmp_path):
    a, b = bags([1, 2, 2], [0, 2, 3]), bags([2, 5], [0, 1, 2])
    grad_a, grad_b = torch.randn(2, 8), torch.randn(2, 8)
    two = make_node(num_workers=2, node_id="two")
    two.lookup(0, 0, {"f_t0": a})
    two.lookup(0, 1, {"f_t0": b})
    assert two.push_gradients(0, 1, {"f_t0": grad_b}) is False
    assert two.applied_step == -1
    assert two.push_gradients(0, 0, {"f_t0": grad_a}) is True
    one = make_node(num_workers=1, node_id="one")
    one.lookup(0, 0, {"f_t0": bags([1, 2, 2, 2, 5], [0, 2, 3, 4, 5])})
    one.push_gradients(0, 0, {"f_t0": torch.cat([grad_a, grad_b])})
    for x, y in zip(snapshot(two), snapshot(one), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert two.applied_step == one.applied_step == 0


def test_out_of_range_index_names_table_feature_value_and_range_and_changes_nothing(make_node):
    node = make_node([shard("t0", start=10, end=40), shard("t1", features=("f_t1",))], cache_rows=4)
    before = node.read_rows("t1", ALL_ROWS)
    stats_before = node.stats()
    good = bags([1, 2], [0, 2])
    with pytest.raises(IndexOutOfRangeError) as err:
        node.lookup(0, 0, {"f_t1": good, "f_t0": bags([0, 30], [0, 2])})
    message = str(err.value)
    for part in ("'t0'", "'f_t0'", "index 30", "[0, 30)", "[10, 40)"):
        assert part in message
    assert node.stats()["cache"] == stats_before["cache"]
    for x, y in zip(node.read_rows("t1", ALL_ROWS), before, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    with pytest.raises(StepOrderError):  # nothing was recorded for step 0
        node.push_gradients(0, 0, {"f_t1": torch.ones(1, 8)})


def test_negative_index_is_out_of_range(make_node):
    with pytest.raises(IndexOutOfRangeError, match="index -1"):
        make_node().lookup(0, 0, {"f_t0": bags([-1], [0, 1])})


def test_unknown_feature_lists_the_served_ones(make_node):
    with pytest.raises(UnknownFeatureError, match="serves: f_t0"):
        make_node().lookup(0, 0, {"nope": bags([1], [0, 1])})


def test_offsets_must_end_at_the_number_of_indices(make_node):
    with pytest.raises(BadTensorError, match="offsets"):
        make_node().lookup(0, 0, {"f_t0": bags([1, 2], [0, 1])})


def test_gradient_of_wrong_shape_is_rejected_and_can_be_resent(make_node):
    node = make_node()
    node.lookup(0, 0, {"f_t0": bags([1], [0, 1])})
    with pytest.raises(BadTensorError, match=r"expected \(1, 8\)"):
        node.push_gradients(0, 0, {"f_t0": torch.ones(2, 8)})
    assert node.push_gradients(0, 0, {"f_t0": torch.ones(1, 8)})


def test_push_for_a_future_step_is_a_step_order_error(make_node):
    node = make_node()
    with pytest.raises(StepOrderError, match="applies step 0 next"):
        node.push_gradients(1, 0, {})


def test_push_without_a_training_lookup_is_a_step_order_error(make_node):
    node = make_node()
    node.lookup(0, 0, {"f_t0": bags([1], [0, 1])}, train=False)  # records nothing
    with pytest.raises(StepOrderError, match="without a training lookup"):
        node.push_gradients(0, 0, {"f_t0": torch.ones(1, 8)})


def test_training_lookup_of_an_applied_step_is_a_step_order_error(make_node):
    node = make_node()
    node.lookup(0, 0, {"f_t0": bags([1], [0, 1])})
    node.push_gradients(0, 0, {"f_t0": torch.ones(1, 8)})
    with pytest.raises(StepOrderError, match="already applied"):
        node.lookup(0, 0, {"f_t0": bags([1], [0, 1])})


def test_duplicate_push_is_acknowledged_without_effect(make_node):
    node = make_node(num_workers=2)
    node.lookup(0, 0, {"f_t0": bags([1], [0, 1])})
    node.lookup(0, 1, {"f_t0": bags([2], [0, 1])})
    grad = {"f_t0": torch.ones(1, 8)}
    assert node.push_gradients(0, 0, grad) is False
    assert node.push_gradients(0, 0, grad) is False  # pending: ignored
    assert node.applied_step == -1
    assert node.push_gradients(0, 1, grad) is True
    after = snapshot(node)
    assert node.push_gradients(0, 1, grad) is True  # applied: acknowledged
    assert node.push_gradients(0, 0, grad) is True
    for x, y in zip(snapshot(node), after, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert node.applied_step == 0


def test_wait_for_step_times_out_with_a_step_order_error(make_node):
    with pytest.raises(StepOrderError, match="timed out"):
        make_node().wait_for_step(1, timeout_s=0.01)


def test_evaluation_wait_is_satisfied_by_later_updates_a_training_wait_is_not(make_node):
    """An evaluation lookup may wake after more updates landed than it waited for (rows are
    only newer); a training lookup of an applied step is out of order."""
    node = make_node()
    for step in range(2):
        node.lookup(step, 0, {"f_t0": bags([1], [0, 1])})
        node.push_gradients(step, 0, {"f_t0": torch.ones(1, 8)})
    assert node.applied_step == 1
    node.wait_for_step(1, timeout_s=0.01, training=False)
    with pytest.raises(StepOrderError, match="already applied"):
        node.wait_for_step(1, timeout_s=0.01)


def test_training_lookup_of_the_next_step_waits_for_the_update(make_node):
    node = make_node()
    node.lookup(0, 0, {"f_t0": bags([1], [0, 1])})
    results: dict[str, torch.Tensor] = {}
    waiter = threading.Thread(
        target=lambda: results.update(node.lookup(1, 0, {"f_t0": bags([1], [0, 1])}))
    )
    waiter.start()
    waiter.join(timeout=0.05)
    assert "f_t0" not in results  # still waiting for step 0
    node.push_gradients(0, 0, {"f_t0": torch.ones(1, 8)})
    waiter.join(timeout=30)
    weights, _ = node.read_rows("t0", torch.tensor([1]))
    torch.testing.assert_close(results["f_t0"], weights)


def test_mean_pooling_uses_the_given_whole_bag_divisor(make_node):
    node = make_node([shard(pooling="mean")])
    weights, _ = node.read_rows("t0", torch.tensor([1, 2]))
    local = Bags(torch.tensor([1, 2]), torch.tensor([0, 2]), mean_divisor=torch.tensor([4.0]))
    pooled = node.lookup(0, 0, {"f_t0": local}, train=False)["f_t0"]
    torch.testing.assert_close(pooled, weights.sum(0, keepdim=True) / 4)


def test_arenas_updated_concurrently_end_exactly_as_updated_one_after_another(make_node):
    # four tables of two dims (two arenas: one per record width), small caches (constant
    # eviction and write-back), early pools corrected
    tables = [shard(f"t{i}", num_rows=40, dim=DIMS[i]) for i in range(4)]
    concurrent = make_node(tables, cache_rows=3, node_id="concurrent", update_threads=3)
    sequential = make_node(tables, cache_rows=3, node_id="sequential")
    assert concurrent._update_threads is not None and sequential._update_threads is None
    assert len(concurrent._arenas) == 2
    generator = torch.Generator().manual_seed(3)

    def step_bags() -> dict[str, Bags]:
        return {
            f"f_t{i}": bags(
                torch.randint(0, 40, (12,), generator=generator).tolist(), list(range(0, 13, 2))
            )
            for i in range(4)
        }

    steps = [step_bags() for _ in range(6)]
    grads = [
        {f"f_t{i}": torch.randn(6, DIMS[i], generator=generator) for i in range(4)} for _ in steps
    ]
    pooled = {}
    for node in (concurrent, sequential):
        pooled[node] = [node.lookup(0, 0, steps[0])]
        for step in range(len(steps)):
            if step + 1 < len(steps):
                node.early_lookup(step + 1, 0, steps[step + 1])
            node.push_gradients(step, 0, grads[step])
            if step + 1 < len(steps):
                pooled[node].append(node.lookup_early(step + 1, 0))  # corrected by the update
    for got, expected in zip(pooled[concurrent], pooled[sequential], strict=True):
        for feature in expected:
            torch.testing.assert_close(got[feature], expected[feature], rtol=0, atol=0)
    for i in range(4):
        for got, expected in zip(
            concurrent.read_rows(f"t{i}", ALL_ROWS),
            sequential.read_rows(f"t{i}", ALL_ROWS),
            strict=True,
        ):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


DIMS = (8, 4, 8, 4)


@pytest.mark.parametrize("num_rows", [50, 10_000])  # dense map / sort and binary search
def test_updated_rows_are_distinct_sorted_with_inverse_and_found_by_value(num_rows):
    from storage_node.early_pools import UpdatedRows as _UpdatedRows

    generator = torch.Generator().manual_seed(num_rows)
    rows = torch.randint(0, 40, (200,), generator=generator) * (num_rows // 50)
    updated = _UpdatedRows.of(rows, num_rows)
    assert (updated._position_of_row is None) == (num_rows > 8 * rows.numel())

    expected, inverse = torch.unique(rows, return_inverse=True)
    assert torch.equal(updated.rows, expected) and torch.equal(updated.inverse, inverse)
    values = torch.randint(0, num_rows, (300,), generator=generator)
    values[:50] = rows[:50]  # some certainly updated
    positions = updated.positions_or_zero_row(values)
    hit = positions < updated.rows.numel()  # not updated: the zero row after the deltas
    assert torch.equal(hit, torch.isin(values, expected))
    assert torch.equal(updated.rows[positions[hit]], values[hit])
