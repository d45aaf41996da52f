"""Specification of routing: split bags by piece, pool per piece, add up == pool the whole table.

The storage node is played here by `pool_piece`, which follows the `Bags` contract of
docs/internals.md on the piece's slice of the full table: weighted sum of the bag's local
rows, divided by `mean_divisor` for mean pooling (or by the local bag length when None).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ndp.errors import DataError
from ndp.model.init import init_table
from ndp.plan import Bags
from ndp.planner import plan_shards
from ndp.routing import (
    check_indices,
    distinct_rows,
    reassemble,
    route_gradients,
    route_lookup,
)

BATCH = 6
DIM = 4


def pool_piece(weights: torch.Tensor, bags: Bags, pooling: str) -> torch.Tensor:
    """What a storage node answers for one feature: pooled [B, D] over its piece's rows."""
    pooled = F.embedding_bag(
        bags.indices,
        weights,
        bags.offsets,
        mode="sum",
        per_sample_weights=bags.per_sample_weights,
        include_last_offset=True,
    )
    if pooling == "mean":
        divisor = bags.mean_divisor
        if divisor is None:
            divisor = (bags.offsets[1:] - bags.offsets[:-1]).clamp(min=1).to(torch.float32)
        pooled = pooled / divisor.unsqueeze(1)
    return pooled


def pool_whole_table(weights, values, lengths, per_sample_weights, pooling) -> torch.Tensor:
    """The single-table reference: torch's embedding_bag on the full table."""
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    if pooling == "mean" and per_sample_weights is None:
        return F.embedding_bag(values, weights, offsets, mode="mean", include_last_offset=True)
    pooled = F.embedding_bag(
        values,
        weights,
        offsets,
        mode="sum",
        per_sample_weights=per_sample_weights,
        include_last_offset=True,
    )
    if pooling == "mean":  # weighted mean, as FBGEMM: weighted sum / bag length
        pooled = pooled / lengths.clamp(min=1).to(torch.float32).unsqueeze(1)
    return pooled


@pytest.fixture()
def setup(make_config):
    """'rw' split in three row-wise pieces (features a, b), 'tw' whole on one node (c)."""

    def build(pooling: str):
        cfg = make_config(
            [
                {
                    "name": "rw",
                    "num_rows": 30,
                    "embedding_dim": DIM,
                    "pooling": pooling,
                    "features": ["a", "b"],
                },
                {
                    "name": "tw",
                    "num_rows": 7,
                    "embedding_dim": DIM,
                    "pooling": pooling,
                    "features": ["c"],
                },
            ],
            num_nodes=3,
            constraints={"rw": {"sharding_type": "row_wise"}},
        )
        tables = cfg.model.effective_tables()
        plan = plan_shards(cfg)
        full = {
            t.name: init_table(seed=0, table_name=t.name, num_rows=t.num_rows, embedding_dim=DIM)
            for t in tables
        }
        return tables, plan, full

    return build


def make_batch(weighted: bool) -> KeyedJaggedTensor:
    # a: bag 0 hits all three pieces with duplicates; bag 2 empty; bag 5 stays in piece 2.
    a = [[0, 15, 15, 29, 0], [3], [], [10, 11, 12, 10], [29, 29], [25, 21]]
    b = [[], [9, 10], [19, 20], [], [1, 2, 3], [28]]
    c = [[6, 6], [0], [], [1, 2, 3], [4], [5]]
    lengths, values = [], []
    for feature in (a, b, c):
        lengths += [len(bag) for bag in feature]
        values += [i for bag in feature for i in bag]
    values_t = torch.tensor(values, dtype=torch.int64)
    weights = torch.linspace(0.5, 2.0, len(values)) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b", "c"],
        values=values_t,
        lengths=torch.tensor(lengths, dtype=torch.int64),
        weights=weights,
    )


def serve(requests, plan, tables, full):
    """Every node pools its requests on its own slice of the tables."""
    table_of = {f: t for t in tables for f in t.features}
    partials = {}
    for node, features in requests.items():
        partials[node] = {}
        for feature, bags in features.items():
            table = table_of[feature]
            piece = next(p for p in plan.pieces_of(table.name) if p.node == node)
            local = full[table.name][piece.row_start : piece.row_end]
            partials[node][feature] = pool_piece(local, bags, table.pooling)
    return partials


@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
def test_routed_pieces_reassemble_to_embedding_bag_on_the_full_table(setup, pooling, weighted):
    tables, plan, full = setup(pooling)
    assert len(plan.pieces_of("rw")) == 3
    sparse = make_batch(weighted)

    pooled = reassemble(serve(route_lookup(sparse, plan, tables), plan, tables, full), plan)

    assert list(pooled) == ["a", "b", "c"]
    jagged = sparse.to_dict()
    for feature, table in (("a", "rw"), ("b", "rw"), ("c", "tw")):
        jt = jagged[feature]
        expected = pool_whole_table(
            full[table], jt.values(), jt.lengths(), jt.weights_or_none(), pooling
        )
        torch.testing.assert_close(pooled[feature], expected, rtol=1e-6, atol=1e-6)


def test_every_piece_gets_all_bags_with_local_indices(setup):
    tables, plan, _ = setup("sum")
    sparse = make_batch(weighted=False)

    requests = route_lookup(sparse, plan, tables)

    pieces = plan.pieces_of("rw")
    for piece in pieces:
        for feature in ("a", "b"):
            bags = requests[piece.node][feature]
            assert bags.offsets.shape == (BATCH + 1,)
            assert bags.indices.dtype == torch.int64
            assert bool((bags.indices >= 0).all())
            assert bool((bags.indices < piece.num_rows).all())
    # bag 0 of "a" = [0, 15, 15, 29, 0]: piece order keeps the bag's order and duplicates
    a_rows = [
        (requests[p.node]["a"].indices[: requests[p.node]["a"].offsets[1]] + p.row_start).tolist()
        for p in pieces
    ]
    assert sorted(i for rows in a_rows for i in rows) == [0, 0, 15, 15, 29]
    assert all(rows == sorted(rows) for rows in a_rows)


def test_a_piece_without_any_index_still_gets_a_request_of_empty_bags(setup):
    tables, plan, _ = setup("sum")
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=["a"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 0, 1, 0, 0, 0])
    )

    requests = route_lookup(sparse, plan, tables)

    last = plan.pieces_of("rw")[-1]
    bags = requests[last.node]["a"]
    assert bags.indices.numel() == 0
    assert bags.offsets.tolist() == [0] * (BATCH + 1)


def test_mean_divisor_is_the_whole_bag_length_only_for_split_mean_tables(setup):
    tables, plan, _ = setup("mean")
    sparse = make_batch(weighted=False)

    requests = route_lookup(sparse, plan, tables)

    first = plan.pieces_of("rw")[0].node
    assert requests[first]["a"].mean_divisor.tolist() == [5.0, 1.0, 1.0, 4.0, 2.0, 2.0]
    tw_node = plan.pieces_of("tw")[0].node
    assert requests[tw_node]["c"].mean_divisor is None


def test_sum_pooled_tables_carry_no_mean_divisor(setup):
    tables, plan, _ = setup("sum")

    requests = route_lookup(make_batch(weighted=False), plan, tables)

    assert all(b.mean_divisor is None for f in requests.values() for b in f.values())


def test_per_sample_weights_follow_their_indices(setup):
    tables, plan, _ = setup("sum")
    sparse = make_batch(weighted=True)

    requests = route_lookup(sparse, plan, tables)

    routed = []
    for piece in plan.pieces_of("rw"):
        bags = requests[piece.node]["a"]
        routed += list(
            zip(
                (bags.indices + piece.row_start).tolist(),
                bags.per_sample_weights.tolist(),
                strict=True,
            )
        )
    jt = sparse.to_dict()["a"]
    original = list(zip(jt.values().tolist(), jt.weights().tolist(), strict=True))
    assert sorted(routed) == sorted(original)


def test_index_outside_the_table_raises_data_error_naming_feature_and_value(setup):
    tables, plan, _ = setup("sum")
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=["c"], values=torch.tensor([1, 7]), lengths=torch.tensor([1, 1, 0, 0, 0, 0])
    )

    with pytest.raises(DataError, match=r"feature 'c': index 7 outside \[0, 7\) of table 'tw'"):
        route_lookup(sparse, plan, tables)
    negative = KeyedJaggedTensor.from_lengths_sync(
        keys=["c"], values=torch.tensor([3, -1]), lengths=torch.tensor([1, 1, 0, 0, 0, 0])
    )
    with pytest.raises(DataError, match="index -1"):
        route_lookup(negative, plan, tables)


@pytest.mark.parametrize(
    ("feature", "bad", "named"),
    [("a", 30, "index 30 outside [0, 30) of table 'rw'"), ("b", -2, "index -2"),
     ("c", 7, "index 7 outside [0, 7) of table 'tw'")],
)  # fmt: skip
def test_the_whole_batch_check_names_what_routing_would_of_any_feature(setup, feature, bad, named):
    """`check_indices` (the coordinator's, before the batch is split among workers) refuses
    exactly what `route_lookup` refuses, with the same message, in one pass over every
    feature; a good batch, int32 indices and empty features pass."""
    tables, plan, _ = setup("sum")
    good = make_batch(weighted=False)
    check_indices(good, plan, tables)
    check_indices(
        KeyedJaggedTensor.from_lengths_sync(
            keys=good.keys(), values=good.values().to(torch.int32), lengths=good.lengths()
        ),
        plan,
        tables,
    )
    values = good.values().clone()
    start = good.offset_per_key()[good.keys().index(feature)]
    values[start + 1] = bad
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=good.keys(), values=values, lengths=good.lengths()
    )
    with pytest.raises(DataError) as routed:
        route_lookup(sparse, plan, tables)
    with pytest.raises(DataError) as checked:
        check_indices(sparse, plan, tables)
    assert f"feature '{feature}': {named}" in str(checked.value)
    assert str(checked.value) == str(routed.value)


def test_route_gradients_sends_each_piece_the_full_pooled_gradient(setup):
    tables, plan, _ = setup("sum")
    grads = {f: torch.randn(BATCH, DIM) for f in ("a", "b", "c")}

    routed = route_gradients(grads, plan)

    for piece in plan.pieces_of("rw"):
        assert set(routed[piece.node]) >= {"a", "b"}
        assert routed[piece.node]["a"].shape == (BATCH, DIM)
        assert routed[piece.node]["a"] is grads["a"]
    tw_node = plan.pieces_of("tw")[0].node
    assert routed[tw_node]["c"] is grads["c"]
    assert sum(len(features) for features in routed.values()) == 3 + 3 + 1


def test_distinct_rows_gives_unique_local_rows_of_every_piece(setup):
    tables, plan, _ = setup("sum")
    sparse = make_batch(weighted=False)

    routed = distinct_rows(route_lookup(sparse, plan, tables), plan)

    for feature in ("a", "b"):
        global_rows = []
        for piece in plan.pieces_of("rw"):
            local = routed[piece.node][feature]
            assert local.unique().numel() == local.numel()
            assert bool((local >= 0).all()) and bool((local < piece.num_rows).all())
            global_rows += (local + piece.row_start).tolist()
        assert sorted(global_rows) == sparse.to_dict()[feature].values().unique().tolist()
