"""The tensor wire format: exact round trips, halved bytes, and refusals of malformed tensors."""

from __future__ import annotations

import pytest
import torch

from protos import storage_node_pb2 as pb
from storage_node import codec
from storage_node.errors import BadTensorError
from storage_node.spec import Bags


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(12, dtype=torch.int64).reshape(3, 4) - 5,
        torch.tensor([2**40, -(2**40)], dtype=torch.int64),
        torch.randn(5, 8, generator=torch.Generator().manual_seed(0)),
        torch.arange(6, dtype=torch.int32),
        torch.empty(0, 4),
    ],
)
def test_round_trip_is_exact(tensor):
    message = codec.encode_tensor(tensor)
    back = codec.decode_tensor(message, name="t", allowed=(tensor.dtype,), ndim=tensor.dim())
    assert back.dtype == tensor.dtype
    assert torch.equal(back, tensor)


def test_bytes_are_little_endian_row_major():
    message = codec.encode_tensor(torch.tensor([[1, 2]], dtype=torch.int32))
    assert message.data == b"\x01\x00\x00\x00\x02\x00\x00\x00"
    assert (message.dtype, list(message.shape)) == ("int32", [1, 2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_halves_bytes_and_stays_close(dtype):
    pooled = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    full = codec.encode_tensor(pooled)
    half = codec.encode_tensor(pooled, dtype)
    assert len(half.data) * 2 == len(full.data) == 16 * 8 * 4
    back = codec.decode_float_tensors([pb.NamedTensor(name="f", tensor=half)], what="pooled")["f"]
    assert back.dtype == torch.float32
    tolerance = 1e-2 if dtype is torch.bfloat16 else 1e-3
    torch.testing.assert_close(back, pooled, rtol=tolerance, atol=tolerance)
    assert not torch.equal(back, pooled)


def test_malformed_byte_count_is_refused_with_sizes():
    message = codec.encode_tensor(torch.zeros(3, dtype=torch.int64))
    message.data = message.data[:-1]
    with pytest.raises(BadTensorError, match="23 bytes.*needs 24"):
        codec.decode_tensor(message, name="idx", allowed=(torch.int64,), ndim=1)


def test_wrong_dtype_is_refused_naming_what_to_send():
    message = codec.encode_tensor(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(BadTensorError, match="idx: dtype 'int32' is not accepted; send int64"):
        codec.decode_tensor(message, name="idx", allowed=(torch.int64,), ndim=1)


def test_unknown_dtype_name_is_refused():
    message = pb.TensorProto(data=b"\x00" * 8, dtype="float64", shape=[1])
    with pytest.raises(BadTensorError, match="float64"):
        codec.decode_tensor(message, name="g", allowed=(torch.float32,), ndim=1)


def test_wrong_rank_is_refused():
    message = codec.encode_tensor(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(BadTensorError, match=r"shape \[2, 3\] has rank 2, expected rank 1"):
        codec.decode_tensor(message, name="offsets", allowed=(torch.int64,), ndim=1)


def test_negative_dimension_is_refused():
    message = pb.TensorProto(data=b"", dtype="int64", shape=[-1])
    with pytest.raises(BadTensorError, match="negative"):
        codec.decode_tensor(message, name="idx", allowed=(torch.int64,), ndim=1)


def test_bags_round_trip_keeps_optional_tensors_optional():
    plain = Bags(indices=torch.tensor([0, 3, 1]), offsets=torch.tensor([0, 2, 3]))
    weighted = Bags(
        indices=torch.tensor([4]),
        offsets=torch.tensor([0, 1]),
        per_sample_weights=torch.tensor([0.5]),
        mean_divisor=torch.tensor([2.0]),
    )
    request = codec.lookup_request(
        7, 1, {"a": plain, "b": weighted}, train=True, dtype=torch.float16
    )
    bags, answer_dtype = codec.parse_lookup_request(
        pb.LookupRequest.FromString(request.SerializeToString())
    )
    assert answer_dtype is torch.float16
    assert list(bags) == ["a", "b"]
    assert bags["a"].per_sample_weights is None and bags["a"].mean_divisor is None
    assert torch.equal(bags["a"].indices, plain.indices)
    assert torch.equal(bags["b"].per_sample_weights, weighted.per_sample_weights)
    assert torch.equal(bags["b"].mean_divisor, weighted.mean_divisor)


def test_a_feature_sent_twice_is_refused():
    bags = codec.encode_bags("a", Bags(indices=torch.tensor([0]), offsets=torch.tensor([0, 1])))
    request = pb.LookupRequest(step=0, features=[bags, bags])
    with pytest.raises(BadTensorError, match="'a' appears twice"):
        codec.parse_lookup_request(request)


def test_integer_answer_dtype_is_refused():
    with pytest.raises(BadTensorError, match="wire_dtype 'int64'"):
        codec.parse_lookup_request(pb.LookupRequest(step=0, wire_dtype="int64"))


def test_unknown_config_wire_dtype_names_the_choices():
    with pytest.raises(BadTensorError, match="fp32, fp16, bf16"):
        codec.wire_dtype("fp8")
