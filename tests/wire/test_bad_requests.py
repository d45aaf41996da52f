"""Requests that used to be accepted, wait or crash and now are refused at once, naming what
is wrong, with nothing applied (rows, optimizer state and applied_step as they were).

- values a request may carry that would make rows non-finite for good (per-sample weights,
  mean divisors, gradients);
- bytes that are no message of the RPC at all;
- a malformed lookup of a future step (checked before it waits for its step barrier);
- a checkpoint or restore path the node cannot use (refused by the core, nothing changed).
"""

from __future__ import annotations

import json
import time

import grpc
import pytest
import torch

from ndp.plan import Bags
from protos import storage_node_pb2 as pb
from storage_node import codec
from storage_node.auth import ERROR_METADATA_KEY
from storage_node.errors import (
    BadRequestError,
    BadTensorError,
    IndexOutOfRangeError,
    ShardFileError,
    StepOrderError,
)
from storage_node.rpc_methods import SERVICE
from wire.test_errors import AUTH, assert_unchanged, raw_call, snapshot
from wire.tiny_node import random_bags, random_grads

FAR_STEP = 5
"""A step whose barrier never opens in these tests (nothing pushes steps 0..3)."""

QUICK_S = 5.0
"""Refusals must come well before the server's step wait (30 s in `serve_node`)."""


def lookup_refusal(node, bags: dict[str, Bags], *, step: int = 0, **fields) -> grpc.RpcError:
    request = codec.lookup_request(step, 0, bags, train=True, dtype=torch.float32)
    for name, value in fields.items():
        setattr(request, name, value)
    return raw_call(node, "Lookup", request)


def assert_nothing_recorded(node, before) -> None:
    """Rows, optimizer state and applied_step unchanged, no lookup kept for a push, and the
    step still completes with a well-formed lookup and push."""
    assert_unchanged(node.core, before)
    assert node.core.health()["pending_steps"] == []
    with node.client() as client:
        with pytest.raises(StepOrderError, match="without a training lookup"):
            client.push_gradients(0, 0, random_grads(2, seed=0))
        client.lookup(0, 0, random_bags(2, seed=0))
        assert client.push_gradients(0, 0, random_grads(2, seed=0)) is True


# ------------------------------------------------------------------ values that poison rows


def with_weight(value: float) -> dict[str, Bags]:
    """`random_bags(2)` with f0's second per-sample weight set to `value`."""
    bags = random_bags(2, seed=0)
    bags["f0"].per_sample_weights[1] = value
    return bags


def with_divisor(divisor: list[float], offsets: list[int] | None = None) -> dict[str, Bags]:
    """`random_bags(2)` with mean divisors on f2 (the mean-pooled feature)."""
    bags = random_bags(2, seed=0)
    if offsets is not None:
        bags["f2"] = Bags(torch.arange(offsets[-1]), torch.tensor(offsets))
    bags["f2"].mean_divisor = torch.tensor(divisor)
    return bags


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), 3e38, -3e38, 1.5e6, -1.5e6])
def test_per_sample_weights_must_be_finite_and_at_most_a_million_in_size(cfg, serve_node, weight):
    node = serve_node(cfg)
    before = snapshot(node.core)
    error = lookup_refusal(node, with_weight(weight))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    for part in ("'f0'", "per_sample_weights", f"{torch.tensor(weight).item():g}", "1e+06"):
        assert part in error.details()
    with node.client() as client, pytest.raises(BadTensorError, match="'f0'"):
        client.lookup(0, 0, with_weight(weight))
    assert_nothing_recorded(node, before)


def test_per_sample_weights_of_a_million_in_size_are_pooled(cfg, serve_node):
    node = serve_node(cfg)
    with node.client() as client:
        pooled = client.lookup(0, 0, with_weight(-1e6))
        assert bool(torch.isfinite(pooled["f0"]).all())
        assert client.push_gradients(0, 0, random_grads(2, seed=0)) is True
    assert bool(torch.isfinite(snapshot(node.core)[1]).all())


@pytest.mark.parametrize(
    "divisor",
    [
        [2.0, float("nan")],
        [float("inf"), 2.0],
        [-1.0, 2.0],
        [0.0, 2.0],  # the first bag holds values: its whole bag cannot be empty
        [0.5, 2.0],
    ],
    ids=["nan", "inf", "negative", "zero_for_a_bag_with_values", "below_one_for_a_bag_with_values"],
)
def test_mean_divisor_must_be_finite_and_at_least_one_for_a_bag_with_values(
    cfg, serve_node, divisor
):
    node = serve_node(cfg)
    before = snapshot(node.core)
    error = lookup_refusal(node, with_divisor(divisor))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    bad = next(d for d in divisor if not 1.0 <= d < float("inf"))
    for part in ("'f2'", "mean_divisor", f"{bad:g}"):
        assert part in error.details()
    assert_nothing_recorded(node, before)


def test_mean_divisor_zero_of_an_empty_bag_pools_zeros(cfg, serve_node):
    """What the encoder sends for an empty bag of a feature without divisors (its local
    length, 0) next to a feature with them."""
    node = serve_node(cfg)
    with node.client() as client:
        pooled = client.lookup(0, 0, with_divisor([0.0, 2.0], offsets=[0, 0, 2]))
    assert torch.equal(pooled["f2"][0], torch.zeros_like(pooled["f2"][0]))


def test_early_lookup_with_a_non_finite_weight_is_refused_and_keeps_nothing(cfg, serve_node):
    node = serve_node(cfg)
    with node.client() as client, pytest.raises(BadTensorError, match="'f0'.*nan"):
        client.early_lookup(1, 0, with_weight(float("nan")))
    assert node.core.stats()["early"]["early_pools"] == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 3e38, -3e38, 2e9])
def test_gradients_must_be_finite_and_at_most_a_billion_in_size(cfg, serve_node, value):
    node = serve_node(cfg)
    with node.client() as client:
        client.lookup(0, 0, random_bags(2, seed=0))
    before = snapshot(node.core)
    grads = random_grads(2, seed=0)
    grads["f1"][1, 3] = value
    with node.client() as client:
        with pytest.raises(BadTensorError) as caught:
            client.push_gradients(0, 0, grads)
        for part in ("'f1'", f"{torch.tensor(value).item():g}", "1e+09"):
            assert part in str(caught.value)
        assert_unchanged(node.core, before)
        assert client.push_gradients(0, 0, random_grads(2, seed=0)) is True  # still completes


# ------------------------------------------------------------------ bytes that are no message


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
def test_bytes_that_do_not_parse_are_invalid_argument_naming_the_message(cfg, serve_node, method):
    node = serve_node(cfg)
    before = snapshot(node.core)
    with grpc.insecure_channel(node.server.address) as channel:
        call = channel.unary_unary(f"/{SERVICE.full_name}/{method}")  # bytes as they are
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\xff\xff\xffnot a protobuf", metadata=AUTH, timeout=30)
    error = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert SERVICE.methods_by_name[method].input_type.name in error.details()
    assert "17 bytes" in error.details()
    assert dict(error.trailing_metadata())[ERROR_METADATA_KEY] == BadRequestError.__name__
    assert_unchanged(node.core, before)
    with node.client() as client:  # the node still answers
        client.lookup(0, 0, random_bags(2, seed=0), train=False)
    assert node.core.applied_step == -1


# ------------------------------------------------------------------ checked before waiting


def _unknown_feature() -> dict[str, Bags]:
    return {"nope": Bags(torch.tensor([0]), torch.tensor([0, 1]))}


def _out_of_range() -> dict[str, Bags]:
    return {"f1": Bags(torch.tensor([3, 97]), torch.tensor([0, 1, 2]))}


MALFORMED_LOOKUPS = {
    "unknown_feature": (_unknown_feature, {}),
    "index_out_of_range": (_out_of_range, {}),
    "non_finite_weight": (lambda: with_weight(float("nan")), {}),
    "bad_mean_divisor": (lambda: with_divisor([-1.0, 2.0]), {}),
    "worker_not_served": (lambda: random_bags(2, seed=0), {"worker": 3}),
    "evaluation_lookup": (_out_of_range, {"train": False}),
}


@pytest.mark.parametrize("case", list(MALFORMED_LOOKUPS))
def test_a_malformed_lookup_of_a_future_step_is_refused_before_it_waits(cfg, serve_node, case):
    node = serve_node(cfg)
    bags, fields = MALFORMED_LOOKUPS[case]
    started = time.monotonic()
    error = lookup_refusal(node, bags(), step=FAR_STEP, **fields)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert time.monotonic() - started < QUICK_S


def test_a_bagless_lookup_of_a_future_step_for_a_worker_not_served_is_refused_before_it_waits(
    cfg, serve_node
):
    node = serve_node(cfg)
    started = time.monotonic()
    request = pb.LookupRequest(step=FAR_STEP, worker=3, train=True, use_early=True)
    error = raw_call(node, "Lookup", request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "worker 3" in error.details()
    assert time.monotonic() - started < QUICK_S


def test_many_malformed_lookups_of_a_future_step_do_not_hold_up_other_calls(cfg, serve_node):
    """More refused lookups than the server has RPC threads (16), all at once."""
    node = serve_node(cfg)
    with node.client(timeout_s=QUICK_S) as client:
        calls = [client.lookup_async(FAR_STEP, 0, _out_of_range()) for _ in range(40)]
        client.lookup(0, 0, random_bags(2, seed=0), train=False)
        assert node.core.applied_step == -1
        for call in calls:
            with pytest.raises(IndexOutOfRangeError):
                call.result()


# ------------------------------------------------------------------ checkpoint paths
# No RPC names a directory on the node (checkpoint and restore are control: the job streams
# restores through the node's actor); a checkpoint or restore path is the in-process
# caller's, and the core refuses a bad one with nothing changed.


def test_checkpoint_to_a_path_the_node_cannot_create_raises_naming_it_and_changes_nothing(
    cfg, serve_node, tmp_path
):
    node = serve_node(cfg)
    (tmp_path / "a_file").write_text("not a directory")
    target = tmp_path / "a_file" / "ckpt"
    before = snapshot(node.core)
    with pytest.raises(OSError, match="Not a directory") as refused:
        node.core.checkpoint(target)
    assert str(tmp_path / "a_file") in str(refused.value)
    assert_unchanged(node.core, before)
    with node.client() as client:  # the node still serves
        client.lookup(0, 0, random_bags(2, seed=0), train=False)


def test_restore_of_a_checkpoint_missing_a_file_is_refused_naming_it_and_changes_nothing(
    cfg, serve_node, tmp_path
):
    node = serve_node(cfg)
    manifest = node.core.checkpoint(tmp_path / "ckpt")
    with node.client() as client:
        client.lookup(0, 0, random_bags(2, seed=0))
        client.push_gradients(0, 0, random_grads(2, seed=0))
    missing = tmp_path / "ckpt" / manifest["shards"][1]["file"]
    missing.unlink()
    before = snapshot(node.core)
    with pytest.raises((OSError, ShardFileError)) as refused:
        node.core.restore(tmp_path / "ckpt")
    assert manifest["shards"][1]["file"] in str(refused.value)
    assert_unchanged(node.core, before)


def test_restore_of_a_manifest_that_is_not_json_is_refused_naming_it(cfg, serve_node, tmp_path):
    node = serve_node(cfg)
    node.core.checkpoint(tmp_path / "ckpt")
    (manifest,) = (tmp_path / "ckpt").glob("*.manifest.json")
    manifest.write_text(json.dumps({"format": 1})[:-3])
    before = snapshot(node.core)
    with pytest.raises(ShardFileError) as refused:
        node.core.restore(tmp_path / "ckpt")
    assert str(manifest) in str(refused.value) and "JSON" in str(refused.value)
    assert_unchanged(node.core, before)
