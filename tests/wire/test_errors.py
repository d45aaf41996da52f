"""Refusals over the wire: the right status code, a message a person can act on, the matching
StorageNodeError subclass at the client, and nothing changed on the node."""

from __future__ import annotations

import pickle

import grpc
import pytest
import torch

from ndp.errors import ConfigError
from ndp.plan import Bags
from protos import storage_node_pb2 as pb
from protos import storage_node_pb2_grpc as pb_grpc
from storage_node import codec
from storage_node.auth import TOKEN_METADATA_KEY, UnauthenticatedError, token_metadata
from storage_node.client import StorageNodeUnavailableError, error_from_rpc
from storage_node.errors import (
    BadTensorError,
    IndexOutOfRangeError,
    StepOrderError,
    UnknownFeatureError,
)
from storage_node.server import serve
from wire.tiny_node import DIM, TOKEN, random_bags, random_grads

AUTH = token_metadata(TOKEN)


def raw_call(node, method: str, request, metadata=AUTH) -> grpc.RpcError:
    """Send `request` with the generated stub (no client-side encoding) and return its error."""
    with grpc.insecure_channel(node.server.address) as channel:
        stub = pb_grpc.StorageNodeStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            getattr(stub, method)(request, metadata=metadata, timeout=30)
    return caught.value


def snapshot(core) -> tuple[int, torch.Tensor, torch.Tensor]:
    """applied_step and every row of every table (weights and optimizer state)."""
    w0, s0 = core.read_rows("t0", torch.arange(40))
    w1, s1 = core.read_rows("t1", torch.arange(25))
    return core.applied_step, torch.cat([w0, w1]), torch.cat([s0, s1])


def assert_unchanged(core, before) -> None:
    after = snapshot(core)
    assert after[0] == before[0]
    assert torch.equal(after[1], before[1]) and torch.equal(after[2], before[2])


def lookup_with(bags: pb.KeyedJaggedTensor) -> pb.LookupRequest:
    return pb.LookupRequest(step=0, worker=0, train=True, bags=bags)


def test_out_of_range_index_is_invalid_argument_naming_table_feature_and_value(cfg, serve_node):
    node = serve_node(cfg)
    before = snapshot(node.core)
    bags = {"f1": Bags(indices=torch.tensor([3, 97]), offsets=torch.tensor([0, 1, 2]))}
    request = codec.lookup_request(0, 0, bags, train=True, dtype=torch.float32)
    error = raw_call(node, "Lookup", request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    for part in ("'t0'", "'f1'", "index 97", "[0, 40)"):
        assert part in error.details()
    with node.client() as client, pytest.raises(IndexOutOfRangeError, match="97"):
        client.lookup(0, 0, bags)
    assert_unchanged(node.core, before)
    with node.client() as client:  # the node still works
        client.lookup(0, 0, random_bags(2, seed=0))
        assert client.push_gradients(0, 0, random_grads(2, seed=0)) is True


def test_malformed_tensor_bytes_are_invalid_argument(cfg, serve_node):
    node = serve_node(cfg)
    message = codec.encode_bags(random_bags(2, seed=0))
    message.lengths.data = message.lengths.data[:-3]
    error = raw_call(node, "Lookup", lookup_with(message))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed" in error.details() and "lengths" in error.details()
    assert isinstance(error_from_rpc(error, node.server.address), BadTensorError)


def test_wrong_dtype_is_invalid_argument(cfg, serve_node):
    node = serve_node(cfg)
    message = codec.encode_bags(random_bags(2, seed=0))
    message.values.CopyFrom(codec.encode_tensor(torch.ones(list(message.values.shape))))
    error = raw_call(node, "Lookup", lookup_with(message))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "'float32' is not accepted; send int64" in error.details()


def test_wrong_shape_is_invalid_argument(cfg, serve_node):
    node = serve_node(cfg)
    message = codec.encode_bags(random_bags(2, seed=0))
    message.lengths.CopyFrom(codec.encode_tensor(torch.zeros(1, 6, dtype=torch.int32)))
    error = raw_call(node, "Lookup", lookup_with(message))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "rank 2, expected rank 1" in error.details()


def broken_bags(rule: str) -> pb.KeyedJaggedTensor:
    """The bags of `random_bags(2)` (keys f0 f1 f2, stride 2) breaking one shape rule."""
    message = codec.encode_bags(random_bags(2, seed=0))
    if rule == "key_repeated":
        message.keys[2] = "f0"
    elif rule == "lengths_not_keys_times_stride":
        message.stride = 3
    elif rule == "lengths_sum_not_len_values":
        values = codec.decode_tensor(message.values, name="v", allowed=(torch.int64,), ndim=1)
        message.values.CopyFrom(codec.encode_tensor(values[:-1]))
    elif rule == "negative_length":
        lengths = codec.decode_tensor(message.lengths, name="l", allowed=(torch.int32,), ndim=1)
        lengths[4] = -lengths[4]
        lengths[5] += 2 * -lengths[4]  # the sum stays len(values)
        message.lengths.CopyFrom(codec.encode_tensor(lengths))
    return message


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("key_repeated", "'f0' appears twice in keys"),
        ("lengths_not_keys_times_stride", "lengths has 6 entries, but keys (3) x stride (3) = 9"),
        ("lengths_sum_not_len_values", "but lengths sum to"),
        ("negative_length", "feature 'f2' has a negative bag length"),
    ],
)
def test_bags_breaking_a_keyed_jagged_shape_rule_are_invalid_argument_naming_it(
    cfg, serve_node, rule, message
):
    node = serve_node(cfg)
    before = snapshot(node.core)
    for method, request in (
        ("Lookup", lookup_with(broken_bags(rule))),
        ("EarlyLookup", pb.EarlyLookupRequest(step=0, worker=0, bags=broken_bags(rule))),
    ):
        error = raw_call(node, method, request)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, method
        assert message in error.details(), (method, error.details())
    assert_unchanged(node.core, before)
    assert node.core.health()["pending_steps"] == []


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("key_repeated", "'f0' appears twice in keys"),
        ("dims_not_one_per_key", "dims has 2 entries for 3 keys"),
        ("columns_not_sum_of_dims", "but dims [16, 16, 8] sum to 40 columns"),
        ("bytes_not_batch_times_dims_times_itemsize", "malformed tensor: 380 bytes"),
    ],
)
def test_gradients_breaking_a_keyed_tensor_shape_rule_are_invalid_argument_and_change_nothing(
    cfg, serve_node, rule, message
):
    node = serve_node(cfg)
    with node.client() as client:
        client.lookup(0, 0, random_bags(2, seed=0))
    before = snapshot(node.core)
    grads = codec.encode_keyed_tensor(random_grads(2, seed=0), torch.float32)
    if rule == "key_repeated":
        grads.keys[2] = "f0"
    elif rule == "dims_not_one_per_key":
        del grads.dims[2]
    elif rule == "columns_not_sum_of_dims":
        grads.dims[2] = 8
    else:
        grads.values.data = grads.values.data[:-4]
    error = raw_call(node, "PushGradients", pb.PushGradientsRequest(step=0, worker=0, grads=grads))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details() and "gradients" in error.details()
    assert_unchanged(node.core, before)
    with node.client() as client:  # the step still completes with a well-formed push
        assert client.push_gradients(0, 0, random_grads(2, seed=0)) is True


def test_gradient_of_wrong_width_is_refused_and_changes_nothing(cfg, serve_node):
    node = serve_node(cfg)
    grads = random_grads(2, seed=0)
    grads["f2"] = torch.zeros(2, 5)
    with node.client() as client:
        client.lookup(0, 0, random_bags(2, seed=0))
        before = snapshot(node.core)
        with pytest.raises(BadTensorError, match=r"'f2' has shape \(2, 5\), expected \(2, 16\)"):
            client.push_gradients(0, 0, grads)
    assert_unchanged(node.core, before)


def test_gradient_of_wrong_dtype_is_invalid_argument_and_changes_nothing(cfg, serve_node):
    node = serve_node(cfg)
    with node.client() as client:
        client.lookup(0, 0, random_bags(2, seed=0))
    before = snapshot(node.core)
    grads = codec.encode_keyed_tensor(random_grads(2, seed=0), torch.float32)
    grads.values.CopyFrom(codec.encode_tensor(torch.zeros(2, 3 * DIM, dtype=torch.int64)))
    request = pb.PushGradientsRequest(step=0, worker=0, grads=grads)
    error = raw_call(node, "PushGradients", request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "'int64' is not accepted" in error.details() and "gradient" in error.details()
    assert_unchanged(node.core, before)


def test_unknown_feature_is_invalid_argument(cfg, serve_node):
    node = serve_node(cfg)
    bags = {"not_a_feature": Bags(indices=torch.tensor([0]), offsets=torch.tensor([0, 1]))}
    request = codec.lookup_request(0, 0, bags, train=True, dtype=torch.float32)
    error = raw_call(node, "Lookup", request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not_a_feature" in error.details()
    with node.client() as client, pytest.raises(UnknownFeatureError):
        client.lookup(0, 0, bags)


def test_out_of_order_push_is_failed_precondition_and_changes_nothing(cfg, serve_node):
    node = serve_node(cfg)
    before = snapshot(node.core)
    request = pb.PushGradientsRequest(
        step=1, worker=0, grads=codec.encode_keyed_tensor(random_grads(2, 0), torch.float32)
    )
    error = raw_call(node, "PushGradients", request)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    with node.client() as client, pytest.raises(StepOrderError):
        client.push_gradients(1, 0, random_grads(2, seed=0))
    assert_unchanged(node.core, before)


def test_training_lookup_of_an_applied_step_is_failed_precondition(cfg, serve_node):
    node = serve_node(cfg)
    with node.client() as client:
        client.lookup(0, 0, random_bags(2, seed=0))
        assert client.push_gradients(0, 0, random_grads(2, seed=0)) is True
    before = snapshot(node.core)
    request = codec.lookup_request(0, 0, random_bags(2, seed=1), train=True, dtype=torch.float32)
    error = raw_call(node, "Lookup", request)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "already applied" in error.details()
    assert_unchanged(node.core, before)


def test_lookup_without_bags_and_no_early_pool_is_failed_precondition(cfg, serve_node):
    node = serve_node(cfg)
    before = snapshot(node.core)
    request = pb.LookupRequest(step=0, worker=0, train=True, use_early=True)
    error = raw_call(node, "Lookup", request)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "no early pool of step 0 for worker 0" in error.details()
    assert_unchanged(node.core, before)
    assert node.core.health()["pending_steps"] == []


@pytest.mark.parametrize(
    "request_fields", [{"train": False}, {"train": True, "bags": "some"}], ids=str
)
def test_lookup_from_the_early_pool_that_is_not_a_bagless_training_lookup_is_invalid_argument(
    cfg, serve_node, request_fields
):
    node = serve_node(cfg)
    with node.client() as client:
        assert client.early_lookup(0, 0, random_bags(2, seed=0))
    request = codec.lookup_request(0, 0, random_bags(2, seed=0), train=True, dtype=torch.float32)
    request.use_early = True
    request.train = request_fields["train"]
    if "bags" not in request_fields:
        request.ClearField("bags")
    error = raw_call(node, "Lookup", request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "use_early" in error.details()


def test_lookup_whose_previous_step_never_lands_is_failed_precondition(cfg, serve_node):
    node = serve_node(cfg)
    with node.client(timeout_s=1.0) as client, pytest.raises(StepOrderError):
        client.lookup(1, 0, random_bags(2, seed=0))  # step 0 is never pushed
    assert node.core.applied_step == -1


@pytest.mark.parametrize(
    "metadata",
    [(), ((TOKEN_METADATA_KEY, "wrong-token"),), ((TOKEN_METADATA_KEY, ""),)],
    ids=["missing", "wrong", "empty"],
)
def test_bad_token_is_unauthenticated_and_changes_nothing(cfg, serve_node, metadata):
    node = serve_node(cfg)
    before = snapshot(node.core)
    request = pb.PushGradientsRequest(
        step=0, worker=0, grads=codec.encode_keyed_tensor(random_grads(2, 0), torch.float32)
    )
    error = raw_call(node, "PushGradients", request, metadata=metadata)
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "wrong-token" not in error.details()
    assert_unchanged(node.core, before)


def test_client_with_wrong_token_raises_unauthenticated_error(cfg, serve_node):
    node = serve_node(cfg)
    before = snapshot(node.core)
    with node.client(token="wrong-token") as client:
        with pytest.raises(UnauthenticatedError, match="ndp-token"):
            client.push_gradients(0, 0, random_grads(2, seed=0))
        with pytest.raises(UnauthenticatedError):
            client.lookup(0, 0, random_bags(2, seed=0))
    assert_unchanged(node.core, before)


def test_unreachable_node_raises_unavailable_error():
    from storage_node.client import StorageClient

    with StorageClient("unix:/nonexistent/ndp.sock", token=TOKEN, timeout_s=5.0) as client:
        with pytest.raises(StorageNodeUnavailableError, match="UNAVAILABLE"):
            client.prefetch(0, {})


def test_errors_from_the_wire_pickle_with_class_and_message(cfg, serve_node):
    node = serve_node(cfg)
    with node.client() as client, pytest.raises(StepOrderError) as caught:
        client.push_gradients(5, 0, random_grads(2, seed=0))
    clone = pickle.loads(pickle.dumps(caught.value))
    assert type(clone) is StepOrderError and str(clone) == str(caught.value)


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_serve_refuses_to_listen_on_every_interface(cfg, make_core, host):
    with pytest.raises(ConfigError, match="every interface"):
        serve(make_core(cfg), host=host, token=TOKEN, max_message_bytes=1 << 20)
