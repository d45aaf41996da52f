"""Specification of `ShardingPlan` as data: serialisation, validation, views for nodes and people."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from ndp.errors import PlanError
from ndp.plan import ShardingPlan
from ndp.planner import plan_shards

SGD_ROW_BYTES = 16  # sgd rows of dim 4 (see conftest.build_config)


@pytest.fixture()
def mixed_plan(make_config):
    cfg = make_config(
        [
            {"name": "big", "num_rows": 300, "embedding_dim": 4, "features": ["u", "v"]},
            {
                "name": "small",
                "num_rows": 40,
                "embedding_dim": 4,
                "pooling": "mean",
                "features": ["w"],
            },
        ],
        num_nodes=3,
        capacity_bytes=200 * SGD_ROW_BYTES,
    )
    return cfg, plan_shards(cfg)


def test_plan_round_trips_through_to_dict_from_dict_and_json(mixed_plan):
    _, plan = mixed_plan

    text = json.dumps(plan.to_dict())
    restored = ShardingPlan.from_dict(json.loads(text))

    assert restored == plan
    assert ShardingPlan.from_json(plan.to_json()) == plan


def test_from_dict_rejects_pieces_that_overlap(mixed_plan):
    _, plan = mixed_plan
    raw = plan.to_dict()
    first = next(p for p in raw["placements"] if p["table_name"] == "big")
    first["row_end"] += 1

    with pytest.raises(PlanError, match="do not tile"):
        ShardingPlan.from_dict(raw)


def test_from_dict_rejects_a_missing_field(mixed_plan):
    _, plan = mixed_plan
    raw = plan.to_dict()
    del raw["node_load"]

    with pytest.raises(PlanError, match="malformed sharding plan"):
        ShardingPlan.from_dict(raw)


def test_from_dict_rejects_an_unknown_format_version(mixed_plan):
    _, plan = mixed_plan

    with pytest.raises(PlanError, match="version 99"):
        ShardingPlan.from_dict({**plan.to_dict(), "version": 99})


def test_pieces_of_are_ordered_by_row_start(mixed_plan):
    _, plan = mixed_plan
    shuffled = replace(plan, placements=tuple(reversed(plan.placements)))

    starts = [p.row_start for p in shuffled.pieces_of("big")]

    assert starts == sorted(starts)


def test_pieces_of_an_unknown_table_raise_plan_error(mixed_plan):
    _, plan = mixed_plan

    with pytest.raises(PlanError, match="'nope' is not in the sharding plan"):
        plan.pieces_of("nope")


def test_shards_for_node_lists_every_piece_on_that_node_as_shard_specs(mixed_plan):
    cfg, plan = mixed_plan
    tables = cfg.model.effective_tables()

    specs = [s for node in range(plan.num_nodes) for s in plan.shards_for_node(node, tables)]

    assert len(specs) == len(plan.placements)
    big = sorted((s for s in specs if s.table_name == "big"), key=lambda s: s.row_start)
    assert [(s.row_start, s.row_end) for s in big] == [
        (p.row_start, p.row_end) for p in plan.pieces_of("big")
    ]
    assert all(s.table_num_rows == 300 and s.features == ("u", "v") for s in big)
    small = next(s for s in specs if s.table_name == "small")
    assert (small.pooling, small.embedding_dim, small.features) == ("mean", 4, ("w",))
    # each piece tells its node the traffic the planner expects (the node's cache split)
    assert [s.expected_lookups for s in big] == [p.expected_load for p in plan.pieces_of("big")]
    assert all(s.expected_lookups > 0 for s in specs)


def test_shards_for_node_refuses_tables_of_another_size(mixed_plan):
    cfg, plan = mixed_plan
    tables = [replace(t, num_rows=t.num_rows + 1) for t in cfg.model.effective_tables()]

    with pytest.raises(PlanError, match="re-plan"):
        plan.shards_for_node(0, tables)


def test_format_table_mentions_every_table_node_and_the_imbalance(mixed_plan):
    _, plan = mixed_plan

    text = plan.format_table()

    for name in ("big", "small"):
        assert name in text
    for p in plan.placements:
        assert f"[{p.row_start}, {p.row_end})" in text
    assert "load imbalance (max/mean)" in text
    assert f"{plan.imbalance():.3f}" in text


def test_table_of_maps_features_to_tables(mixed_plan):
    _, plan = mixed_plan

    assert [plan.table_of(f) for f in ("u", "v", "w")] == ["big", "big", "small"]
    with pytest.raises(PlanError, match="feature 'x'"):
        plan.table_of("x")
