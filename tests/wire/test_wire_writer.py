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

from ndp.plan import Bags
from protos import storage_node_pb2 as pb
from protos import storage_node_pb2_grpc as pb_grpc
from storage_node import codec
from storage_node.auth import token_metadata
from storage_node.wire_writer import serialize, varint
from wire.tiny_node import TOKEN, random_bags


def reference_tensor(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> pb.TensorProto:
    itemsize = torch.empty((), dtype=dtype).element_size()
    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]
    data = tensor.to(dtype).contiguous().view(int_type).numpy().astype(f"<i{itemsize}").tobytes()
    return pb.TensorProto(data=data, dtype=name, shape=list(tensor.shape))


def reference_bags(bags: dict[str, Bags]) -> pb.KeyedJaggedTensor:
    """The KeyedJaggedTensor of `bags` (one batch size), as the proto comments specify it."""
    parts = list(bags.values())
    lengths = torch.cat([b.offsets[1:] - b.offsets[:-1] for b in parts])
    message = pb.KeyedJaggedTensor(
        keys=list(bags),
        stride=parts[0].offsets.numel() - 1,
        lengths=reference_tensor(lengths, torch.int32, "int32"),
        values=reference_tensor(torch.cat([b.indices for b in parts]), torch.int64, "int64"),
    )
    if any(b.per_sample_weights is not None for b in parts):
        weights = [
            torch.ones(b.indices.numel()) if b.per_sample_weights is None else b.per_sample_weights
            for b in parts
        ]
        message.weights.CopyFrom(reference_tensor(torch.cat(weights), torch.float32, "float32"))
    if any(b.mean_divisor is not None for b in parts):
        divisors = [
            (b.offsets[1:] - b.offsets[:-1]).float() if b.mean_divisor is None else b.mean_divisor
            for b in parts
        ]
        message.mean_divisor.CopyFrom(
            reference_tensor(torch.cat(divisors), torch.float32, "float32")
        )
    return message


def reference_keyed(tensors: dict[str, torch.Tensor], dtype, name) -> pb.KeyedTensor:
    return pb.KeyedTensor(
        keys=list(tensors),
        dims=[t.shape[1] for t in tensors.values()],
        values=reference_tensor(torch.cat(list(tensors.values()), dim=1), dtype, name),
    )


def mixed_bags() -> dict[str, Bags]:
    """Plain, weighted, mean-divided and empty bags (two each), and a name outside ASCII."""
    return {
        "plain": Bags(torch.tensor([3, 0, 7]), torch.tensor([0, 2, 3])),
        "weighted": Bags(
            torch.tensor([1, 2]), torch.tensor([0, 1, 2]), per_sample_weights=torch.rand(2)
        ),
        "divided": Bags(
            torch.tensor([5]), torch.tensor([0, 1, 1]), mean_divisor=torch.tensor([3.0, 1.0])
        ),
        "empty_é": Bags(torch.zeros(0, dtype=torch.int64), torch.tensor([0, 0, 0])),
    }


@pytest.mark.parametrize("step", [0, 1, 300, -2, 2**40])
@pytest.mark.parametrize("use_early", [False, True])
def test_a_lookup_request_is_what_protobuf_writes(step, use_early):
    bags = mixed_bags()
    reference = pb.LookupRequest(
        step=step, worker=3, train=True, wire_dtype="float16", use_early=use_early
    )
    if not use_early:
        reference.bags.CopyFrom(reference_bags(bags))

    written = codec.lookup_request_bytes(
        step, 3, bags, train=True, dtype=torch.float16, use_early=use_early
    )

    assert written == reference.SerializeToString()


@pytest.mark.parametrize(
    ("dtype", "name"),
    [(torch.float32, "float32"), (torch.float16, "float16"), (torch.bfloat16, "bfloat16")],
)
def test_pooled_vectors_and_gradients_are_what_protobuf_writes(dtype, name):
    tensors = {"f0": torch.randn(5, 4), "f1": torch.randn(5, 0), "g": torch.randn(5, 1)}
    keyed = reference_keyed(tensors, dtype, name)

    reply = codec.lookup_response_bytes(tensors, dtype)
    push, float_data = codec.push_gradients_request_bytes(7, 0, tensors, dtype)

    assert reply == pb.LookupResponse(pooled=keyed).SerializeToString()
    assert push == pb.PushGradientsRequest(step=7, worker=0, grads=keyed).SerializeToString()
    assert float_data == len(keyed.values.data) == 5 * 5 * torch.empty((), dtype=dtype).itemsize


def test_a_reply_or_push_is_not_changed_by_the_next_one_written_on_the_same_thread():
    # the [B, sum of dims] buffer is reused from call to call (codec._scratch_tensor): each
    # message must be a copy of it, and a buffer too big to keep must work the same way
    small = {"f0": torch.randn(4, 3), "f1": torch.randn(4, 5)}
    big = {"f0": torch.randn(codec._SCRATCH_MAX_BYTES // 4 // 8 + 1, 8)}
    first = codec.lookup_response_bytes(small, torch.float32)
    push, _ = codec.push_gradients_request_bytes(0, 0, small, torch.bfloat16)
    codec.lookup_response_bytes({"f0": torch.zeros(4, 8)}, torch.float32)
    codec.lookup_response_bytes(big, torch.float32)
    assert (
        first
        == pb.LookupResponse(
            pooled=reference_keyed(small, torch.float32, "float32")
        ).SerializeToString()
    )
    assert (
        push
        == pb.PushGradientsRequest(
            step=0, worker=0, grads=reference_keyed(small, torch.bfloat16, "bfloat16")
        ).SerializeToString()
    )
    decoded = codec.parse_lookup_response(
        pb.LookupResponse.FromString(codec.lookup_response_bytes(big, torch.float32))
    )
    assert torch.equal(decoded["f0"], big["f0"])


def test_an_empty_lookup_reply_is_what_protobuf_writes():
    reference = pb.LookupResponse(
        pooled=pb.KeyedTensor(values=pb.TensorProto(dtype="float32", shape=[0, 0]))
    )
    assert codec.lookup_response_bytes({}, torch.float32) == reference.SerializeToString()


def test_early_lookup_and_prefetch_requests_are_what_protobuf_writes():
    bags = mixed_bags()
    early = pb.EarlyLookupRequest(step=4, worker=1, bags=reference_bags(bags), correct=True)
    rows = {"a": torch.tensor([1, 5, 9]), "b": torch.zeros(0, dtype=torch.int64)}
    prefetch = pb.PrefetchRequest(
        step=9,
        rows=pb.KeyedJaggedTensor(
            keys=["a", "b"],
            stride=1,
            lengths=reference_tensor(torch.tensor([3, 0]), torch.int64, "int64"),
            values=reference_tensor(rows["a"], torch.int64, "int64"),
        ),
    )

    assert codec.early_lookup_request_bytes(4, 1, bags, correct=True) == early.SerializeToString()
    assert codec.prefetch_request_bytes(9, rows) == prefetch.SerializeToString()


def test_repeated_strings_and_bytes_from_several_buffers_are_what_protobuf_writes():
    buffers = [np.arange(3, dtype="<i8"), b"", memoryview(b"xyz"), np.zeros(0, dtype="<f4")]
    fields = {"keys": ["a", "", "é"], "values": {"data": buffers, "dtype": "int64"}}
    reference = pb.KeyedJaggedTensor(
        keys=["a", "", "é"],
        values=pb.TensorProto(data=b"".join(bytes(b) for b in buffers), dtype="int64"),
    )
    assert serialize(pb.KeyedJaggedTensor.DESCRIPTOR, fields) == reference.SerializeToString()
    empty = {"values": {"data": [b"", np.zeros(0)]}}
    assert serialize(pb.KeyedJaggedTensor.DESCRIPTOR, empty) == (
        pb.KeyedJaggedTensor(values=pb.TensorProto()).SerializeToString()
    )


def test_varints_match_protobufs_for_negative_and_large_values():
    for value in [0, 1, 127, 128, 300, 2**31 - 1, 2**63 - 1, -1, -(2**63)]:
        fields = {"step": value, "wire_dtype": "n"}  # int64, string
        assert serialize(pb.LookupRequest.DESCRIPTOR, fields) == (
            pb.LookupRequest(**fields).SerializeToString()
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
            pb.LookupRequest(step=0, worker=0, wire_dtype="float32", bags=reference_bags(bags)),
            metadata=token_metadata(TOKEN),
            timeout=30,
        )
    values = np.frombuffer(reply.pooled.values.data, "<f4").reshape(list(reply.pooled.values.shape))
    columns = np.cumsum([0, *reply.pooled.dims])
    theirs = {
        key: values[:, columns[k] : columns[k + 1]] for k, key in enumerate(reply.pooled.keys)
    }
    assert list(ours) == list(theirs)
    for feature, pooled in ours.items():
        np.testing.assert_array_equal(pooled.numpy(), theirs[feature])
