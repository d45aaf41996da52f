"""A gradient push that rides on the next training lookup (one call per node and step):
over a real gRPC server it does exactly what a push followed by a lookup does, and a
refused call applies nothing."""

from __future__ import annotations

import grpc
import pytest
import torch

from ndp.errors import StorageNodeError
from protos import storage_node_pb2 as pb
from protos import storage_node_pb2_grpc as pb_grpc
from storage_node import codec
from storage_node.auth import token_metadata
from wire.tiny_node import TOKEN, random_bags, random_grads

ROWS = torch.arange(40)


def test_a_push_riding_on_the_next_lookup_equals_a_push_then_a_lookup(cfg, serve_node, make_core):
    node = serve_node(cfg)
    direct = make_core(cfg)
    with node.client() as client:
        client.lookup(0, 0, random_bags(8, seed=0))
        direct.lookup(0, 0, random_bags(8, seed=0))
        for step in range(1, 4):
            grads, bags = random_grads(8, seed=step - 1), random_bags(8, seed=step)
            remote = client.lookup(step, 0, bags, previous_push=grads)
            assert direct.push_gradients(step - 1, 0, grads) is True
            local = direct.lookup(step, 0, bags)
            for feature in bags:
                assert torch.equal(remote[feature], local[feature]), (step, feature)
        wire = client.take_wire_bytes()
    assert node.core.applied_step == direct.applied_step == 2
    assert torch.equal(node.core.read_rows("t0", ROWS)[0], direct.read_rows("t0", ROWS)[0])
    assert torch.equal(node.core.read_rows("t0", ROWS)[1], direct.read_rows("t0", ROWS)[1])
    # three pushes went out inside lookups and were counted as gradient bytes sent
    assert "PushGradients.sent" not in wire
    assert wire["Lookup.sent.float_data"] == 3 * 8 * 3 * 16 * 4


def test_a_push_riding_on_an_early_pool_lookup_applies_before_the_kept_answer(
    cfg, serve_node, make_core
):
    node = serve_node(cfg)
    direct = make_core(cfg)
    with node.client() as client:
        bags0, bags1, grads0 = random_bags(8, seed=0), random_bags(8, seed=1), random_grads(8, 0)
        client.lookup(0, 0, bags0)
        direct.lookup(0, 0, bags0)
        assert client.early_lookup(1, 0, bags1) is True
        remote = client.lookup_async(1, 0, bags1, use_early=True, previous_push=grads0).result()
    direct.push_gradients(0, 0, grads0)
    local = direct.lookup(1, 0, bags1)
    for feature in bags1:  # the kept pool plus the exact change of step 0's update
        torch.testing.assert_close(remote[feature], local[feature], rtol=0, atol=1e-6)
    assert node.core.applied_step == 0


def _raw_lookup(node, request: pb.LookupRequest) -> grpc.RpcError:
    channel = grpc.insecure_channel(node.server.address)
    try:
        pb_grpc.StorageNodeStub(channel).Lookup(request, metadata=token_metadata(TOKEN), timeout=30)
    except grpc.RpcError as error:
        return error
    finally:
        channel.close()
    raise AssertionError("the node answered a call it must refuse")


@pytest.mark.parametrize(
    ("push_step", "push_worker", "train"),
    [(1, 0, True), (2, 0, True), (0, 1, True), (0, 0, False)],
    ids=["same step", "a later step", "another worker", "evaluation lookup"],
)
def test_a_push_that_is_not_this_workers_previous_step_is_refused_and_changes_nothing(
    cfg, serve_node, push_step, push_worker, train
):
    node = serve_node(cfg)
    with node.client() as client:
        client.lookup(0, 0, random_bags(8, seed=0))
    before = node.core.read_rows("t0", ROWS)[0]
    request = codec.lookup_request(
        1, 0, random_bags(8, seed=1), train=train, dtype=torch.float32,
        previous_push=random_grads(8, seed=0),
    )  # fmt: skip
    assert (request.push.step, request.push.worker) == (0, 0)
    request.push.step, request.push.worker = push_step, push_worker
    error = _raw_lookup(node, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "push" in error.details()
    assert node.core.applied_step == -1
    assert torch.equal(node.core.read_rows("t0", ROWS)[0], before)


def test_a_lookup_with_bad_bags_does_not_apply_the_push_it_carries(cfg, serve_node):
    node = serve_node(cfg)
    with node.client() as client:
        client.lookup(0, 0, random_bags(8, seed=0))
        before = node.core.read_rows("t0", ROWS)[0]
        bad = random_bags(8, seed=1)
        bad["f0"].indices[0] = 10_000  # outside t0's 40 rows
        with pytest.raises(StorageNodeError, match="10000"):
            client.lookup(1, 0, bad, previous_push=random_grads(8, seed=0))
        assert node.core.applied_step == -1
        assert torch.equal(node.core.read_rows("t0", ROWS)[0], before)
        # the same push riding on a good lookup then applies once
        client.lookup(1, 0, random_bags(8, seed=1), previous_push=random_grads(8, seed=0))
    assert node.core.applied_step == 0
