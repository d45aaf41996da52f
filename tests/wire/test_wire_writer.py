"""Messages written by `wire_writer` are byte for byte what protobuf writes, and both kinds of
client talk to the server.

The references below are built with the protobuf API only (never through `codec`, which
uses the writer), so a writer that drifts from the schema fails here.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from protos import storage_node_pb2 as pb
from protos import storage_node_pb2_grpc as pb_grpc
from storage_node import codec
from storage_node.auth import token_metadata
from storage_node.spec import Bags
from storage_node.wire_writer import serialize, varint
from wire.tiny_node import TOKEN, random_bags


def reference_tensor(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> pb.TensorProto:
    itemsize = torch.empty((), dtype=dtype).element_size()
    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]
    data = tensor.to(dtype).contiguous().view(int_type).numpy().astype(f"<i{itemsize}").tobytes()
    return pb.TensorProto(data=data, dtype=name, shape=list(tensor.shape))


def reference_bags(feature: str, bags: Bags) -> pb.FeatureBags:
    message = pb.FeatureBags(
        feature=feature,
        indices=reference_tensor(bags.indices, torch.int64, "int64"),
        offsets=reference_tensor(bags.offsets, torch.int64, "int64"),
    )
    if bags.per_sample_weights is not None:
        message.per_sample_weights.CopyFrom(
            reference_tensor(bags.per_sample_weights, torch.float32, "float32")
        )
    if bags.mean_divisor is not None:
        message.mean_divisor.CopyFrom(reference_tensor(bags.mean_divisor, torch.float32, "float32"))
    return message


def mixed_bags() -> dict[str, Bags]:
    """Plain, weighted, mean-divided and empty bags, and a feature name outside ASCII."""
    return {
        "plain": Bags(torch.tensor([3, 0, 7]), torch.tensor([0, 2, 3])),
        "weighted": Bags(
            torch.tensor([1, 2]), torch.tensor([0, 1, 2]), per_sample_weights=torch.rand(2)
        ),
        "divided": Bags(torch.tensor([5]), torch.tensor([0, 1]), mean_divisor=torch.tensor([3.0])),
        "empty_é": Bags(torch.zeros(0, dtype=torch.int64), torch.tensor([0, 0])),
    }


@pytest.mark.parametrize("step", [0, 1, 300, -2, 2**40])
@pytest.mark.parametrize("use_early", [False, True])
def test_a_lookup_request_is_what_protobuf_writes(step, use_early):
    bags = mixed_bags()
    reference = pb.LookupRequest(
        step=step, worker=3, train=True, wire_dtype="float16", use_early=use_early
    )
    if not use_early:
        reference.features.extend(reference_bags(f, b) for f, b in bags.items())

    written = codec.lookup_request_bytes(
        step, 3, bags, train=True, dtype=torch.float16, use_early=use_early
    )

    assert written == reference.SerializeToString()


@pytest.mark.parametrize(
    ("dtype", "name"),
    [(torch.float32, "float32"), (torch.float16, "float16"), (torch.bfloat16, "bfloat16")],
)
def test_pooled_vectors_and_gradients_are_what_protobuf_writes(dtype, name):
    tensors = {"f0": torch.randn(5, 4), "f1": torch.randn(0, 4), "g": torch.randn(1, 1)}
    named = [
        pb.NamedTensor(name=f, tensor=reference_tensor(t, dtype, name)) for f, t in tensors.items()
    ]

    reply = codec.lookup_response_bytes(tensors, dtype)
    push, float_data = codec.push_gradients_request_bytes(7, 0, tensors, dtype)

    assert reply == pb.LookupResponse(pooled=named).SerializeToString()
    assert push == pb.PushGradientsRequest(step=7, worker=0, grads=named).SerializeToString()
    assert float_data == sum(len(entry.tensor.data) for entry in named)


def test_early_lookup_and_prefetch_requests_are_what_protobuf_writes():
    bags = mixed_bags()
    early = pb.EarlyLookupRequest(
        step=4, worker=1, features=[reference_bags(f, b) for f, b in bags.items()], correct=True
    )
    rows = {"a": torch.tensor([1, 5, 9]), "b": torch.zeros(0, dtype=torch.int64)}
    prefetch = pb.PrefetchRequest(
        step=9,
        indices=[
            pb.NamedTensor(name=f, tensor=reference_tensor(r, torch.int64, "int64"))
            for f, r in rows.items()
        ],
    )

    assert codec.early_lookup_request_bytes(4, 1, bags, correct=True) == early.SerializeToString()
    assert codec.prefetch_request_bytes(9, rows) == prefetch.SerializeToString()


def test_varints_match_protobufs_for_negative_and_large_values():
    for value in [0, 1, 127, 128, 300, 2**31 - 1, 2**63 - 1, -1, -(2**63)]:
        fields = {"node_id": "n", "applied_step": value}  # string, int64
        assert serialize(pb.HealthResponse.DESCRIPTOR, fields) == (
            pb.HealthResponse(**fields).SerializeToString()
        )
    assert varint(-1) == b"\xff" * 9 + b"\x01"  # 64-bit two's complement, 10 bytes


def test_a_field_the_message_lacks_or_a_type_it_cannot_write_is_refused():
    with pytest.raises(KeyError, match="no field"):
        serialize(pb.TensorProto.DESCRIPTOR, {"data": b"x", "bogus": 1})
    with pytest.raises(TypeError):
        serialize(pb.TensorProto.DESCRIPTOR, {"data": 3.5})


def test_the_generated_stub_and_the_ndp_client_get_the_same_pooled_vectors(cfg, serve_node):
    node = serve_node(cfg)
    bags = random_bags(4, seed=3)
    ours = node.client().lookup(0, 0, bags, train=False)
    with grpc.insecure_channel(node.server.address) as channel:
        reply = pb_grpc.StorageNodeStub(channel).Lookup(
            pb.LookupRequest(
                step=0,
                worker=0,
                wire_dtype="float32",
                features=[reference_bags(f, b) for f, b in bags.items()],
            ),
            metadata=token_metadata(TOKEN),
            timeout=30,
        )
    theirs = {
        entry.name: np.frombuffer(entry.tensor.data, "<f4").reshape(list(entry.tensor.shape))
        for entry in reply.pooled
    }
    assert ours.keys() == theirs.keys()
    for feature, pooled in ours.items():
        np.testing.assert_array_equal(pooled.numpy(), theirs[feature])
