"""Specification of `plan_shards`: where tables go, when they split, what constraints do."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ndp.config import SparseOptimizerConfig
from ndp.errors import PlanError
from ndp.plan import ShardingPlan
from ndp.planner import plan_shards

SGD_ROW_BYTES = 16  # sgd rows of dim 4 (see conftest.build_config)


def assert_tiles_rows(plan: ShardingPlan, table_name: str, num_rows: int) -> None:
    pieces = plan.pieces_of(table_name)
    assert pieces[0].row_start == 0
    assert pieces[-1].row_end == num_rows
    for left, right in zip(pieces, pieces[1:], strict=False):
        assert left.row_end == right.row_start, "gap or overlap between pieces"
    assert all(p.row_end > p.row_start for p in pieces)
    nodes = [p.node for p in pieces]
    assert len(set(nodes)) == len(nodes), "a node holds two pieces of the same table"


def test_small_tables_go_table_wise_and_balance_bytes_and_load(make_config):
    cfg = make_config([("a", 100), ("b", 100), ("c", 100), ("d", 100)], num_nodes=2)

    plan = plan_shards(cfg)

    assert {p.sharding_type for p in plan.placements} == {"table_wise"}
    assert len(plan.placements) == 4
    assert plan.node_bytes == (200 * SGD_ROW_BYTES, 200 * SGD_ROW_BYTES)
    assert plan.node_load[0] == plan.node_load[1] == 2 * 8.0
    assert plan.imbalance() == 1.0


def test_biggest_tables_first_then_small_ones_even_out_bytes_and_lookups(make_config):
    # every table has one feature, so equal lookups; bytes differ. big and mid go apart first,
    # then the small tables split so that neither node carries both more bytes and more load.
    cfg = make_config([("s1", 25), ("big", 100), ("s2", 25), ("mid", 50)], num_nodes=2)

    plan = plan_shards(cfg)

    node_of = {p.table_name: p.node for p in plan.placements}
    assert node_of["mid"] != node_of["big"]
    assert node_of["s1"] != node_of["s2"]
    assert plan.node_load == (16.0, 16.0)


def test_placements_follow_model_table_order(make_config):
    cfg = make_config([("small", 10), ("large", 90)], num_nodes=2)

    plan = plan_shards(cfg)

    assert plan.table_names == ["small", "large"]
    assert plan.feature_names == ["f_small", "f_large"]


def test_table_larger_than_a_node_is_split_row_wise_covering_every_row_once(make_config):
    cfg = make_config([("huge", 1001)], num_nodes=3, capacity_bytes=400 * SGD_ROW_BYTES)

    plan = plan_shards(cfg)

    assert_tiles_rows(plan, "huge", 1001)
    pieces = plan.pieces_of("huge")
    assert len(pieces) == 3
    assert {p.sharding_type for p in pieces} == {"row_wise"}
    assert max(p.num_rows for p in pieces) - min(p.num_rows for p in pieces) <= 1
    assert all(b <= cfg.cluster.node_capacity_bytes for b in plan.node_bytes)


def test_row_wise_split_respects_the_free_room_of_partly_filled_nodes(make_config):
    # "a" and "b" go whole first (biggest first) and leave 50 and 200 rows of room;
    # "c" fits neither, and an even 120/120 split would overflow node 0.
    cfg = make_config(
        [("a", 450), ("b", 300), ("c", 240)], num_nodes=2, capacity_bytes=500 * SGD_ROW_BYTES
    )

    plan = plan_shards(cfg)

    assert_tiles_rows(plan, "c", 240)
    assert [(p.node, p.num_rows) for p in plan.pieces_of("c")] == [(0, 50), (1, 190)]
    assert plan.node_bytes == (500 * SGD_ROW_BYTES, 490 * SGD_ROW_BYTES)


def test_more_nodes_than_rows_leaves_no_empty_piece(make_config):
    cfg = make_config(
        [("tiny", 2)], num_nodes=4, constraints={"tiny": {"sharding_type": "row_wise"}}
    )

    plan = plan_shards(cfg)

    assert_tiles_rows(plan, "tiny", 2)
    assert len(plan.pieces_of("tiny")) == 2


def test_constraint_forces_row_wise_on_a_table_that_would_fit(make_config):
    cfg = make_config(
        [("a", 90), ("b", 10)], num_nodes=3, constraints={"b": {"sharding_type": "row_wise"}}
    )

    plan = plan_shards(cfg)

    assert_tiles_rows(plan, "b", 10)
    assert [p.node for p in plan.pieces_of("b")] == [0, 1, 2]
    assert [p.sharding_type for p in plan.pieces_of("a")] == ["table_wise"]


def test_constraint_nodes_pin_a_table_wise_table(make_config):
    cfg = make_config([("a", 10), ("b", 10)], num_nodes=4, constraints={"b": {"nodes": [3]}})

    plan = plan_shards(cfg)

    assert [(p.node, p.sharding_type) for p in plan.pieces_of("b")] == [(3, "table_wise")]


def test_constraint_table_row_wise_uses_only_the_given_nodes(make_config):
    cfg = make_config(
        [("t", 90)],
        num_nodes=4,
        constraints={"t": {"sharding_type": "table_row_wise", "nodes": [1, 3]}},
    )

    plan = plan_shards(cfg)

    pieces = plan.pieces_of("t")
    assert [p.node for p in pieces] == [1, 3]
    assert {p.sharding_type for p in pieces} == {"table_row_wise"}
    assert_tiles_rows(plan, "t", 90)


def test_table_row_wise_without_nodes_picks_the_fewest_nodes_that_fit(make_config):
    cfg = make_config(
        [("t", 150)],
        num_nodes=4,
        capacity_bytes=100 * SGD_ROW_BYTES,
        constraints={"t": {"sharding_type": "table_row_wise"}},
    )

    plan = plan_shards(cfg)

    assert len(plan.pieces_of("t")) == 2
    assert_tiles_rows(plan, "t", 150)


def test_constrained_nodes_too_small_for_the_table_raise_plan_error(make_config):
    cfg = make_config(
        [("t", 300)],
        num_nodes=4,
        capacity_bytes=100 * SGD_ROW_BYTES,
        constraints={"t": {"nodes": [0, 1]}},
    )

    with pytest.raises(PlanError, match=r"'t'.*missing 1600 bytes"):
        plan_shards(cfg)


def test_forced_table_wise_that_fits_no_node_raises_plan_error(make_config):
    cfg = make_config(
        [("t", 150)],
        num_nodes=2,
        capacity_bytes=100 * SGD_ROW_BYTES,
        constraints={"t": {"sharding_type": "table_wise"}},
    )

    with pytest.raises(PlanError, match=r"'t' needs 2400 bytes.*missing 800.*row_wise"):
        plan_shards(cfg)


def test_plan_that_cannot_fit_names_the_missing_bytes_and_what_to_change(make_config):
    cfg = make_config([("a", 150), ("b", 100)], num_nodes=2, capacity_bytes=100 * SGD_ROW_BYTES)

    with pytest.raises(PlanError) as raised:
        plan_shards(cfg)

    message = str(raised.value)
    assert "need 4000 bytes" in message
    assert "hold 3200" in message
    assert "missing 800 bytes" in message
    assert "'a'" in message
    assert "num_storage_nodes >= 3" in message
    assert "node_capacity_bytes >= 2000" in message


def test_row_bytes_include_optimizer_state(make_config):
    cfg = make_config([("a", 10)], num_nodes=1)
    adam = replace(cfg, optimizer=replace(cfg.optimizer, sparse=SparseOptimizerConfig(name="adam")))

    assert plan_shards(cfg).node_bytes == (10 * SGD_ROW_BYTES,)
    assert plan_shards(adam).node_bytes == (10 * 3 * SGD_ROW_BYTES,)


def test_max_rows_per_table_caps_the_planned_rows(make_config):
    cfg = make_config([("a", 1000)], num_nodes=1)
    capped = replace(cfg, model=replace(cfg.model, max_rows_per_table=64))

    plan = plan_shards(capped)

    assert plan.num_rows_of("a") == 64


def test_expected_load_follows_pooling_factors_and_batch_size(make_config):
    cfg = make_config([("a", 10), ("b", 10)], num_nodes=2, pooling_factor=[3.0, 1.0], batch_size=16)

    plan = plan_shards(cfg)

    load = {p.table_name: p.expected_load for p in plan.placements}
    assert load == {"a": 48.0, "b": 16.0}
    assert sorted(plan.node_load) == [16.0, 48.0]


def test_index_frequencies_move_the_row_split_toward_hot_rows(make_config):
    cfg = make_config([("t", 100)], num_nodes=2, constraints={"t": {"sharding_type": "row_wise"}})
    counts = np.ones(100)
    counts[:10] = 100.0  # rows 0..9 take ~92% of the lookups

    uniform = plan_shards(cfg)
    skewed = plan_shards(cfg, index_frequencies={"t": counts})

    assert uniform.pieces_of("t")[0].row_end == 50
    assert skewed.pieces_of("t")[0].row_end < 10
    assert skewed.imbalance() < 1.2  # an even row split would give 1.9


def test_index_frequencies_shift_load_onto_the_node_holding_hot_rows(make_config):
    # capacity forces an even 50/50 row split, so the hot rows' load lands on node 0
    cfg = make_config([("t", 100)], num_nodes=2, capacity_bytes=50 * SGD_ROW_BYTES)
    counts = np.ones(100)
    counts[:10] = 100.0

    plan = plan_shards(cfg, index_frequencies={"t": counts})

    total = 8.0
    assert plan.node_load[0] == pytest.approx(total * 1040 / 1090)
    assert plan.node_load[1] == pytest.approx(total * 50 / 1090)


def test_index_frequencies_accept_a_sample_of_indices(make_config):
    cfg = make_config([("t", 100)], num_nodes=2, constraints={"t": {"sharding_type": "row_wise"}})
    sample = np.array([0, 0, 0, 1, 1, 1, 99, 50], dtype=np.int64)
    counts = np.bincount(sample, minlength=100)

    from_sample = plan_shards(cfg, index_frequencies={"t": sample})
    from_counts = plan_shards(cfg, index_frequencies={"t": counts})

    assert from_sample == from_counts


def test_index_frequencies_for_an_unknown_table_raise_plan_error(make_config):
    cfg = make_config([("t", 10)])

    with pytest.raises(PlanError, match="unknown table 'nope'"):
        plan_shards(cfg, index_frequencies={"nope": np.ones(10)})


def test_index_sample_outside_the_table_raises_plan_error(make_config):
    cfg = make_config([("t", 10)])

    with pytest.raises(PlanError, match="index 12 outside"):
        plan_shards(cfg, index_frequencies={"t": np.array([1, 12, 3])})


def test_a_table_too_big_for_one_of_its_allowed_nodes_goes_table_row_wise_over_them(make_config):
    cfg = make_config(
        [("t", 150)],
        num_nodes=4,
        capacity_bytes=100 * SGD_ROW_BYTES,
        constraints={"t": {"nodes": [0, 2]}},
    )

    plan = plan_shards(cfg)

    assert [(p.node, p.sharding_type) for p in plan.pieces_of("t")] == [
        (0, "table_row_wise"),
        (2, "table_row_wise"),
    ]
    assert_tiles_rows(plan, "t", 150)
