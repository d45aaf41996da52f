"""The tensor wire format: exact round trips, halved bytes, and refusals of malformed tensors."""

from __future__ import annotations

import pytest
import torch

from ndp.plan import Bags
from protos import storage_node_pb2 as pb
from storage_node import codec
from storage_node.errors import BadTensorError


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
    keyed = codec.encode_keyed_tensor({"f": pooled}, dtype)
    assert keyed.values.data == half.data
    back = codec.decode_keyed_tensor(keyed, what="pooled")["f"]
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


def two_features() -> dict[str, Bags]:
    """Feature a: plain, 2 bags; feature b: weighted and mean-divided, 2 bags (one empty)."""
    return {
        "a": Bags(indices=torch.tensor([0, 3, 1]), offsets=torch.tensor([0, 2, 3])),
        "b": Bags(
            indices=torch.tensor([4, 5]),
            offsets=torch.tensor([0, 0, 2]),
            per_sample_weights=torch.tensor([0.5, 0.25]),
            mean_divisor=torch.tensor([2.0, 3.0]),
        ),
    }


def round_trip(bags: dict[str, Bags]) -> dict[str, Bags]:
    request = codec.lookup_request(7, 1, bags, train=True, dtype=torch.float16)
    decoded, answer_dtype = codec.parse_lookup_request(
        pb.LookupRequest.FromString(request.SerializeToString())
    )
    assert answer_dtype is torch.float16
    return decoded.to_bags()


def test_bags_travel_as_one_keyed_jagged_tensor_in_torchrec_layout():
    message = codec.encode_bags(two_features())
    assert list(message.keys) == ["a", "b"] and message.stride == 2
    lengths = codec.decode_tensor(message.lengths, name="lengths", allowed=(torch.int32,), ndim=1)
    assert lengths.tolist() == [2, 1, 0, 2]  # key-major: a's bags, then b's
    values = codec.decode_tensor(message.values, name="values", allowed=(torch.int64,), ndim=1)
    assert values.tolist() == [0, 3, 1, 4, 5]


def test_bags_round_trip_is_exact_and_every_feature_is_a_view_of_one_values_tensor():
    sent = two_features()
    got = round_trip(sent)
    assert list(got) == ["a", "b"]
    for feature in sent:
        assert torch.equal(got[feature].indices, sent[feature].indices)
        assert torch.equal(got[feature].offsets, sent[feature].offsets)
        assert got[feature].offsets.dtype == torch.int64
    assert torch.equal(got["b"].per_sample_weights, sent["b"].per_sample_weights)
    assert torch.equal(got["b"].mean_divisor, sent["b"].mean_divisor)
    base = got["a"].indices.untyped_storage().data_ptr()
    assert got["b"].indices.untyped_storage().data_ptr() == base  # slices, not copies


def test_optional_tensors_stay_absent_when_no_feature_has_them():
    plain = {"a": two_features()["a"]}
    message = codec.encode_bags(plain)
    assert not message.HasField("weights") and not message.HasField("mean_divisor")
    got = round_trip(plain)["a"]
    assert got.per_sample_weights is None and got.mean_divisor is None


def test_a_feature_without_weights_or_divisor_next_to_one_with_them_gets_ones_and_local_lengths():
    got = round_trip(two_features())["a"]  # what None means to the core, spelled out
    assert got.per_sample_weights.tolist() == [1.0, 1.0, 1.0]
    assert got.mean_divisor.tolist() == [2.0, 1.0]


def test_lookup_lengths_travel_as_int32_and_int64_lengths_are_accepted():
    message = codec.encode_bags(two_features())
    assert message.lengths.dtype == "int32"
    message.lengths.CopyFrom(codec.encode_tensor(torch.tensor([2, 1, 0, 2])))
    assert message.lengths.dtype == "int64"
    got = codec.decode_bags(message)
    assert got["b"].offsets.tolist() == [0, 0, 2]


def test_prefetch_rows_travel_as_one_bag_per_feature():
    rows = {"a": torch.tensor([1, 5, 9]), "b": torch.zeros(0, dtype=torch.int64)}
    request = pb.PrefetchRequest.FromString(codec.prefetch_request_bytes(3, rows))
    assert list(request.rows.keys) == ["a", "b"] and request.rows.stride == 1
    got = codec.parse_prefetch_request(request)
    assert list(got) == ["a", "b"]
    assert torch.equal(got["a"], rows["a"]) and got["b"].numel() == 0


def test_pooled_vectors_travel_as_one_keyed_tensor_and_decode_to_column_views():
    pooled = {"a": torch.randn(3, 4), "b": torch.randn(3, 2)}
    reply = pb.LookupResponse.FromString(codec.lookup_response_bytes(pooled, torch.float32))
    assert list(reply.pooled.keys) == ["a", "b"] and list(reply.pooled.dims) == [4, 2]
    assert list(reply.pooled.values.shape) == [3, 6]
    assert codec.float_data_bytes(reply.pooled) == 3 * 6 * 4
    got = codec.parse_lookup_response(reply)
    for feature in pooled:
        assert torch.equal(got[feature], pooled[feature])
    assert got["b"].data_ptr() == got["a"].data_ptr() + 4 * 4  # columns of one [3, 6] tensor


# ----------------------------------------------------------------- shape rules


def jagged(**fields) -> pb.KeyedJaggedTensor:
    """Two keys, stride 2, lengths [2 1 | 0 2], values [0 3 1 | 4 5]; `fields` override."""
    message = codec.encode_bags(two_features())
    for name, value in fields.items():
        if isinstance(value, torch.Tensor):
            getattr(message, name).CopyFrom(codec.encode_tensor(value))
        elif name == "keys":
            del message.keys[:]
            message.keys.extend(value)
        else:
            setattr(message, name, value)
    return message


def test_a_key_sent_twice_is_refused():
    with pytest.raises(BadTensorError, match="'a' appears twice in keys"):
        codec.decode_bags(jagged(keys=["a", "a"]))
    pooled = codec.encode_keyed_tensor({"a": torch.zeros(2, 4)}, torch.float32)
    pooled.keys.append("a")
    pooled.dims.append(0)
    with pytest.raises(BadTensorError, match="'a' appears twice in keys"):
        codec.decode_keyed_tensor(pooled, what="gradients")


def test_lengths_other_than_keys_times_stride_are_refused():
    with pytest.raises(
        BadTensorError, match=r"lengths has 4 entries, but keys \(2\) x stride \(3\)"
    ):
        codec.decode_bags(jagged(stride=3))
    with pytest.raises(BadTensorError, match="lengths has 3 entries"):
        codec.decode_bags(jagged(lengths=torch.tensor([2, 1, 0], dtype=torch.int32)))


def test_negative_stride_is_refused():
    with pytest.raises(BadTensorError, match="stride -1 is negative"):
        codec.decode_bags(jagged(stride=-1))


def test_negative_bag_length_is_refused_naming_the_feature():
    lengths = torch.tensor([2, 1, 4, -2], dtype=torch.int32)  # still sums to 5
    with pytest.raises(BadTensorError, match=r"feature 'b' has a negative bag length \(-2\)"):
        codec.decode_bags(jagged(lengths=lengths))


def test_lengths_that_do_not_sum_to_the_number_of_values_are_refused():
    with pytest.raises(BadTensorError, match="values has 4 entries, but lengths sum to 5"):
        codec.decode_bags(jagged(values=torch.tensor([0, 3, 1, 4])))


def test_weights_other_than_one_per_value_are_refused():
    with pytest.raises(BadTensorError, match="weights has 2 entries, but values has 5"):
        codec.decode_bags(jagged(weights=torch.tensor([1.0, 2.0])))


def test_mean_divisor_other_than_one_per_bag_is_refused():
    with pytest.raises(BadTensorError, match=r"mean_divisor has 2 entries, but keys \(2\) x"):
        codec.decode_bags(jagged(mean_divisor=torch.tensor([1.0, 2.0])))


def test_prefetch_rows_of_stride_other_than_one_are_refused():
    request = pb.PrefetchRequest.FromString(codec.prefetch_request_bytes(0, {"a": torch.ones(2)}))
    request.rows.stride = 2
    with pytest.raises(BadTensorError, match=r"stride 2; send one bag \(stride 1\)"):
        codec.parse_prefetch_request(request)


def keyed(**fields) -> pb.KeyedTensor:
    """Keys [a, b], dims [4, 2], values float32 [3, 6]; `fields` override."""
    message = codec.encode_keyed_tensor(
        {"a": torch.zeros(3, 4), "b": torch.zeros(3, 2)}, torch.float32
    )
    for name, value in fields.items():
        field = getattr(message, name)
        del field[:]
        field.extend(value)
    return message


def test_dims_other_than_one_per_key_are_refused():
    with pytest.raises(BadTensorError, match="dims has 1 entries for 2 keys"):
        codec.decode_keyed_tensor(keyed(dims=[6]), what="gradients")


def test_negative_dim_is_refused():
    with pytest.raises(BadTensorError, match="feature 'b' has dim -2"):
        codec.decode_keyed_tensor(keyed(dims=[8, -2]), what="gradients")


def test_columns_other_than_the_sum_of_dims_are_refused():
    with pytest.raises(BadTensorError, match=r"shape \[3, 6\], but dims \[4, 3\] sum to 7"):
        codec.decode_keyed_tensor(keyed(dims=[4, 3]), what="gradients")


def test_keyed_tensor_bytes_other_than_batch_times_sum_of_dims_times_itemsize_are_refused():
    message = keyed()
    message.values.data = message.values.data[:-4]
    with pytest.raises(BadTensorError, match=r"malformed tensor: 68 bytes .* \[3, 6\] .* needs 72"):
        codec.decode_keyed_tensor(message, what="gradients")


def test_features_with_different_batch_sizes_are_refused_when_encoding():
    bags = two_features()
    bags["c"] = Bags(indices=torch.tensor([1]), offsets=torch.tensor([0, 1]))
    with pytest.raises(BadTensorError, match="'a' has batch size 2 but 'c' has 1"):
        codec.encode_bags(bags)
    with pytest.raises(BadTensorError, match="'a' has batch size 2 but 'b' has 3"):
        codec.encode_keyed_tensor({"a": torch.zeros(2, 4), "b": torch.zeros(3, 4)}, torch.float32)


def test_offsets_that_do_not_run_from_zero_to_the_number_of_indices_are_refused_when_encoding():
    bags = two_features()
    bags["b"].offsets = torch.tensor([0, 1, 1])
    with pytest.raises(BadTensorError, match=r"'b': offsets must have B \+ 1 entries from 0 to"):
        codec.encode_bags(bags)


def test_a_use_early_lookup_with_bags_is_refused():
    request = codec.lookup_request(0, 0, two_features(), train=True, dtype=torch.float32)
    request.use_early = True
    with pytest.raises(BadTensorError, match="use_early"):
        codec.parse_lookup_request(request)


def test_integer_answer_dtype_is_refused():
    with pytest.raises(BadTensorError, match="wire_dtype 'int64'"):
        codec.parse_lookup_request(pb.LookupRequest(step=0, wire_dtype="int64"))


def test_unknown_config_wire_dtype_names_the_choices():
    with pytest.raises(BadTensorError, match="fp32, fp16, bf16"):
        codec.wire_dtype("fp8")
