"""Over a real gRPC server on 127.0.0.1, the node computes what the core computes directly."""

from __future__ import annotations

import grpc
import pytest
import torch

from ndp.errors import StorageNodeError
from ndp.plan import Bags
from protos import storage_node_pb2 as pb
from protos import storage_node_pb2_grpc as pb_grpc
from storage_node import codec
from storage_node.auth import token_metadata
from storage_node.client import connect
from wire.tiny_node import DIM, TOKEN, random_bags, random_grads, tiny_config


def test_lookup_and_push_over_the_wire_equal_the_core_called_directly(cfg, serve_node, make_core):
    node = serve_node(cfg)
    direct = make_core(cfg)
    with node.client() as client:
        for step in range(3):
            bags = random_bags(8, seed=step)
            remote = client.lookup(step, 0, bags)
            local = direct.lookup(step, 0, bags)
            assert list(remote) == list(bags)
            for feature in bags:
                assert remote[feature].dtype == torch.float32
                assert torch.equal(remote[feature], local[feature]), feature
            grads = random_grads(8, seed=step)
            assert client.push_gradients(step, 0, grads) is True
            assert direct.push_gradients(step, 0, grads) is True
    assert node.core.applied_step == 2
    rows = torch.arange(40)
    weights_remote, state_remote = node.core.read_rows("t0", rows)
    weights_direct, state_direct = direct.read_rows("t0", rows)
    assert torch.equal(weights_remote, weights_direct)
    assert torch.equal(state_remote, state_direct)
    assert not torch.equal(weights_remote, make_core(cfg).read_rows("t0", rows)[0]), (
        "the pushes must have changed the rows"
    )


@pytest.mark.parametrize("wire_dtype", ["fp16", "bf16"])
def test_half_precision_wire_halves_pooled_bytes_and_stays_close(cfg, serve_node, wire_dtype):
    node = serve_node(cfg)
    bags = random_bags(32, seed=1)
    channel = grpc.insecure_channel(node.server.address)
    stub = pb_grpc.StorageNodeStub(channel)
    sizes = {}
    for name in ("fp32", wire_dtype):
        request = codec.lookup_request(0, 0, bags, train=False, dtype=codec.wire_dtype(name))
        reply = stub.Lookup(request, metadata=token_metadata(TOKEN), timeout=30)
        sizes[name] = len(reply.pooled.values.data)
        assert reply.pooled.values.dtype == codec.DTYPE_NAMES[codec.wire_dtype(name)]
        assert list(reply.pooled.values.shape) == [32, 3 * DIM]
    channel.close()
    assert sizes["fp32"] == 3 * 32 * DIM * 4
    assert sizes[wire_dtype] * 2 == sizes["fp32"]

    with node.client() as exact, node.client(wire_dtype=wire_dtype) as half:
        full = exact.lookup(0, 0, bags, train=False)
        approx = half.lookup(0, 0, bags, train=False)
        tolerance = 2e-2 if wire_dtype == "bf16" else 2e-3
        for feature in bags:
            assert approx[feature].dtype == torch.float32
            torch.testing.assert_close(
                approx[feature], full[feature], rtol=tolerance, atol=tolerance
            )
        # gradients also travel in the half dtype and are applied in fp32
        half.lookup(0, 0, bags)
        assert half.push_gradients(0, 0, random_grads(32, seed=1)) is True
    assert node.core.applied_step == 0


def test_connect_sends_pooled_vectors_and_gradients_in_the_configured_wire_dtype(serve_node):
    cfg = tiny_config(wire_dtype="bf16")
    node = serve_node(cfg)
    bags = random_bags(4, seed=2)
    with connect(node.server.address, cfg, token=TOKEN) as client:
        client.lookup(0, 0, bags)
        assert client.push_gradients(0, 0, random_grads(4, seed=2)) is True
        wire = client.take_wire_bytes()
    half_bytes = 3 * 4 * DIM * 2  # three features, [4, 16] each, 2 bytes per value
    assert wire["Lookup.received.float_data"] == half_bytes
    assert wire["PushGradients.sent.float_data"] == half_bytes


def test_lookup_larger_than_grpc_default_4mb_succeeds(serve_node):
    cfg = tiny_config(max_message_bytes=64 << 20)
    node = serve_node(cfg)
    batch_size = 70_000  # pooled reply: 70k * 16 * 4 B = 4.5 MB; request about 2.2 MB
    offsets = torch.arange(batch_size + 1, dtype=torch.int64)
    indices = torch.arange(batch_size, dtype=torch.int64) % 40
    with node.client() as client:
        pooled = client.lookup(0, 0, {"f0": Bags(indices=indices, offsets=offsets)}, train=False)
    assert pooled["f0"].shape == (batch_size, DIM)
    assert pooled["f0"].numel() * 4 > 4 << 20
    weights, _ = node.core.read_rows("t0", torch.arange(40))
    assert torch.equal(pooled["f0"][:40], weights)
    assert torch.equal(pooled["f0"][40:80], weights)


def test_push_larger_than_grpc_default_4mb_succeeds(serve_node):
    cfg = tiny_config(max_message_bytes=64 << 20)
    node = serve_node(cfg)
    batch_size = 70_000  # gradient request: 70k * 16 * 4 B = 4.5 MB, received by the node
    bags = {
        "f0": Bags(
            indices=torch.arange(batch_size, dtype=torch.int64) % 40,
            offsets=torch.arange(batch_size + 1, dtype=torch.int64),
        )
    }
    grads = {"f0": torch.full((batch_size, DIM), 1e-3)}
    with node.client() as client:
        client.lookup(0, 0, bags)
        assert client.push_gradients(0, 0, grads) is True
    assert node.core.applied_step == 0


def test_reply_above_the_configured_message_limit_is_refused_with_a_hint(serve_node):
    node = serve_node(tiny_config(max_message_bytes=1 << 20))
    batch_size = 20_000  # pooled reply: 20k * 16 * 4 B = 1.3 MB > 1 MB
    bags = {
        "f0": Bags(
            indices=torch.zeros(batch_size, dtype=torch.int64),
            offsets=torch.arange(batch_size + 1, dtype=torch.int64),
        )
    }
    with node.client() as client, pytest.raises(StorageNodeError, match="max_message_bytes"):
        client.lookup(0, 0, bags, train=False)


def test_prefetch_over_the_wire_and_checkpoint_restore_of_the_served_core(
    cfg, serve_node, tmp_path
):
    """Prefetch, lookup and push travel over the wire; checkpoint, stats and restore are
    control (no RPC carries them: the job reaches them through the node's actor), called
    on the core the server serves, and the wire then serves the restored rows."""
    node = serve_node(cfg)
    bags = random_bags(4, seed=3)
    with node.client() as client:
        client.prefetch(0, {feature: b.indices for feature, b in bags.items()})
        before = client.lookup(0, 0, bags)
        manifest = node.core.checkpoint(tmp_path / "ckpt")
        assert isinstance(manifest, dict)
        client.push_gradients(0, 0, random_grads(4, seed=3))
        assert node.core.applied_step == 0
        stats = node.core.stats()
        assert stats["applied_step"] == 0 and stats["node_id"] == "0"
        node.core.restore(tmp_path / "ckpt")
        assert node.core.applied_step == -1
        after = client.lookup(0, 0, bags)
    for feature in bags:
        assert torch.equal(after[feature], before[feature])


def test_eval_lookup_does_not_wait_for_a_step_barrier(cfg, serve_node):
    node = serve_node(cfg)
    with node.client(timeout_s=30.0) as client:
        client.lookup(0, 0, random_bags(4, seed=0))
        client.push_gradients(0, 0, random_grads(4, seed=0))
        # step 0 is applied; an evaluation lookup numbered 1 (or an older step) answers now
        assert set(client.lookup(1, 0, random_bags(4, seed=0), train=False)) == {"f0", "f1", "f2"}


def test_async_forms_return_futures(cfg, serve_node):
    node = serve_node(cfg)
    with node.client() as client:
        bags = random_bags(2, seed=0)
        rows = {feature: b.indices for feature, b in bags.items()}
        futures = [client.prefetch_async(1, rows), client.lookup_async(0, 0, bags)]
        prefetched, pooled = (future.result() for future in futures)
    assert prefetched is True  # every row of tiny_config is resident
    assert pooled["f2"].shape == (2, DIM)


def test_pb_module_names_every_rpc_of_the_contract():
    service = pb.DESCRIPTOR.services_by_name["StorageNode"]
    assert set(service.methods_by_name) == {
        "Lookup",
        "Prefetch",
        "EarlyLookup",
        "PushGradients",
    }
