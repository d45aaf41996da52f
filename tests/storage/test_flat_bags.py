"""The wire's flat bags (`KeyedJagged`) and its gradients (`KeyedTensor` column views) are taken
as they come by a node whose features share one arena, and train exactly like per-feature
`Bags` and contiguous gradients: same checks, same pooled vectors, same rows, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ndp.plan import Bags, KeyedJagged
from storage_node import codec
from storage_node.errors import BadTensorError, IndexOutOfRangeError
from storage_node.keyed_bags import KeyedBags

from .conftest import shard

BATCH = 6
# one embedding dim: every feature in one arena; sum with weights, mean, a table read twice
TABLES = {"t0": (30, "sum"), "t1": (9, "mean"), "t2": (50, "sum"), "t3": (12, "mean")}
FEATURES = {"f0": "t0", "f1": "t1", "f2": "t2", "f3": "t3", "f3b": "t3"}


def shards():
    return [
        shard(t, num_rows=rows, dim=8, pooling=pooling, features=_features_of(t))
        for t, (rows, pooling) in TABLES.items()
    ]


def _features_of(table: str) -> tuple[str, ...]:
    return tuple(f for f, t in FEATURES.items() if t == table)


def random_bags(rng: np.random.Generator, *, weighted: bool) -> dict[str, Bags]:
    bags = {}
    for feature, table in FEATURES.items():
        rows, _ = TABLES[table]
        lengths = rng.integers(0, 4, size=BATCH)
        lengths[0] = 0  # an empty bag in every feature
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
        indices = torch.from_numpy(rng.integers(0, rows, size=int(lengths.sum())))
        weights = None
        if weighted:
            weights = torch.from_numpy(rng.uniform(0.5, 2.0, indices.numel()).astype(np.float32))
        bags[feature] = Bags(indices, offsets, weights)
    return bags


def on_the_wire(bags: dict[str, Bags]) -> KeyedJagged:
    return codec.decode_jagged(codec.encode_bags(bags), what="bags")


def grads_on_the_wire(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Column views of one [B, sum of dims] tensor, as a node's push decodes them."""
    return codec.decode_keyed_tensor(
        codec.encode_keyed_tensor(grads, torch.float32), what="gradients"
    )


@pytest.mark.parametrize("weighted", [False, True])
def test_flat_bags_are_the_per_feature_bags_joined(make_node, weighted):
    node = make_node(shards(), cache_rows=None)
    bags = random_bags(np.random.default_rng(3), weighted=weighted)
    ((arena_a, joined),) = node._validated_request(bags).groups
    ((arena_b, flat),) = node._validated_request(on_the_wire(bags)).groups
    assert arena_a is arena_b
    assert flat.features == joined.features and flat.batch_sizes == joined.batch_sizes
    for name in ("values", "offsets", "weights", "inv_divisor"):
        a, b = getattr(joined, name), getattr(flat, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name
    assert flat.same_as(joined) and joined.same_as(flat)


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("cache_rows", [3, None], ids=["evicting", "holds_all"])
def test_wire_form_trains_exactly_like_per_feature_bags(make_node, tmp_path, optimizer, cache_rows):
    by_feature = make_node(shards(), optimizer=optimizer, cache_rows=cache_rows, node_id="a")
    by_wire = make_node(
        shards(), optimizer=optimizer, cache_rows=cache_rows, node_id="b", flash_dir=tmp_path / "b"
    )
    rng = np.random.default_rng(5)
    for step in range(4):
        bags = random_bags(rng, weighted=step % 2 == 1)
        pooled = by_feature.lookup(step, 0, bags)
        pooled_wire = by_wire.lookup(step, 0, on_the_wire(bags))
        for feature in FEATURES:
            assert torch.equal(pooled[feature], pooled_wire[feature]), feature
        grads = {
            f: torch.from_numpy(rng.standard_normal((BATCH, 8)).astype(np.float32))
            for f in FEATURES
        }
        assert by_feature.push_gradients(step, 0, grads)
        assert by_wire.push_gradients(step, 0, grads_on_the_wire(grads))
    for table, (rows, _) in TABLES.items():
        everything = torch.arange(rows)
        for a, b in zip(
            by_feature.read_rows(table, everything),
            by_wire.read_rows(table, everything),
            strict=True,
        ):
            assert torch.equal(a, b), table


def test_a_flat_request_out_of_range_names_feature_and_value_and_changes_nothing(make_node):
    node = make_node(shards(), cache_rows=None)
    bags = random_bags(np.random.default_rng(7), weighted=False)
    bags["f1"] = Bags(torch.tensor([0, 9]), torch.tensor([0, 1, 1, 1, 1, 1, 2]))
    before = node.read_rows("t1", torch.arange(9))
    with pytest.raises(IndexOutOfRangeError, match=r"table 't1', feature 'f1': index 9"):
        node.lookup(0, 0, on_the_wire(bags))
    assert all(
        torch.equal(a, b)
        for a, b in zip(before, node.read_rows("t1", torch.arange(9)), strict=True)
    )
    assert node.applied_step == -1


def test_a_flat_request_with_a_nan_weight_names_the_feature(make_node):
    node = make_node(shards(), cache_rows=None)
    bags = random_bags(np.random.default_rng(8), weighted=True)
    weights = bags["f2"].per_sample_weights.clone()
    weights[-1] = float("nan")
    bags["f2"] = Bags(bags["f2"].indices, bags["f2"].offsets, weights)
    with pytest.raises(BadTensorError, match="feature 'f2'"):
        node.lookup(0, 0, on_the_wire(bags))


def test_flat_bags_of_features_in_two_arenas_are_joined_per_arena(make_node):
    node = make_node([*shards(), shard("t9", num_rows=5, dim=4, features=("f9",))])
    bags = random_bags(np.random.default_rng(9), weighted=False)
    bags["f9"] = Bags(torch.tensor([4, 0]), torch.tensor([0, 1, 1, 1, 1, 1, 2]))
    groups = node._validated_request(on_the_wire(bags)).groups
    assert sorted(len(keyed.features) for _, keyed in groups) == [1, 5]
    assert isinstance(groups[0][1], KeyedBags)
