"""Tensors and requests <-> wire messages (pure: no gRPC calls, no sockets).

A tensor travels as a `TensorProto`:

    TensorProto
    +-------------------------------------------------------------+
    | dtype: "float32" | "float16" | "bfloat16" | "int64" | "int32" |
    | shape: [d0, d1, ...]           (int64, row-major)             |
    | data:  d0*d1*...*itemsize bytes, little-endian, no padding    |
    +-------------------------------------------------------------+

    pooled [B, D] as fp16:  data = 2*B*D bytes
    bytes 0..1 = element (0, 0), 2..3 = (0, 1), ..., 2*D.. = (1, 0), ...

A request's features travel together, in the shapes of torchrec: the bags of every feature a
node serves as one `KeyedJaggedTensor`, pooled vectors and gradients as one `KeyedTensor`:

    KeyedJaggedTensor  keys [f0, f1], stride B = 3 (bags per key), K = 2 keys
    +-------------------------------------------------------------------------+
    | lengths       int32 [K*B]   [ 2 0 1 | 1 3 1 ]                            |
    | values        int64 [nnz]   [ a b c | d e f g h ]    rows local to piece |
    | weights       f32   [nnz]   optional: per-sample weights                 |
    | mean_divisor  f32   [K*B]   optional: whole-bag lengths (row-wise mean)  |
    +-------------------------------------------------------------------------+
    decoded  {f0: Bags(indices=values[0:3], offsets=[0 2 2 3]),
              f1: Bags(indices=values[3:8], offsets=[0 1 4 5])}
             indices and weights are slices of the one tensor; offsets are the rows of
             one [K, B + 1] cumulative sum of lengths (no copy per feature)

    KeyedTensor  keys [f0, f1], dims [D0, D1]
    +-------------------------------------------------------------------------+
    | values  [B, D0 + D1]  float32 | float16 | bfloat16                       |
    |         row b = f0's pooled vector of bag b | f1's pooled vector of bag b |
    +-------------------------------------------------------------------------+
    decoded  {f0: values[:, :D0], f1: values[:, D0:]}   column views, float32

Why raw bytes rather than `repeated float`: an exact byte count, so fp16/bf16 really halve
the link traffic, and the bytes can be written straight from the tensor's memory: requests
and replies are serialized by `wire_writer` from `*_fields` mappings, and the
message-returning builders here parse those same bytes. A KeyedJaggedTensor's values are
written from each feature's own index tensor (no concatenation: one copy, the final join);
a KeyedTensor is one `torch.cat` into the wire dtype (the cast folded in; into memory the
thread reuses, `_scratch_tensor`) and the join.
Pooled vectors and gradients may travel in fp32, fp16 or bf16 (the client's `wire_dtype`);
both ends do their math in fp32.

Every decode checks dtype, rank and byte count of each tensor and the shape rules between
them (one key once; lengths = keys x stride; lengths sum = len(values); one dim per key,
columns = sum of dims) and raises `BadTensorError` naming the field, so a malformed request
becomes INVALID_ARGUMENT instead of a crash or a silent misread. Semantic checks (row
ranges, row dims, features served) belong to the core.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ndp.plan import Bags, KeyedJagged
from protos import storage_node_pb2 as pb
from storage_node.errors import BadTensorError
from storage_node.wire_writer import serialize

WIRE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
"""Config names (`storage.wire_dtype`) of the dtypes pooled vectors and gradients may use."""

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
}
"""Wire names of every dtype a `TensorProto` may carry."""

_DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
_ITEMSIZE = {
    name: torch.empty((), dtype=dtype).element_size() for dtype, name in DTYPE_NAMES.items()
}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SAME_SIZE_INT = {1: np.dtype("<u1"), 2: np.dtype("<i2"), 4: np.dtype("<i4"), 8: np.dtype("<i8")}
_INT_TORCH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BIG_ENDIAN_HOST = sys.byteorder == "big"


# --------------------------------------------------------------------------- tensors


def wire_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config wire dtype name (`fp32`, `fp16`, `bf16`)."""
    if name not in WIRE_DTYPES:
        raise BadTensorError(
            f"wire dtype {name!r} is not supported; use one of {', '.join(WIRE_DTYPES)}"
        )
    return WIRE_DTYPES[name]


def tensor_fields(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The `TensorProto` fields of a CPU tensor (cast to `dtype` when given), for
    `wire_writer.serialize`: `data` refers to the tensor's memory (no copy when it already
    has that dtype and is contiguous)."""
    target = _travelling(dtype or tensor.dtype)
    return {"data": _raw(tensor, target), "dtype": DTYPE_NAMES[target], "shape": list(tensor.shape)}


def concatenated_fields(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> dict[str, Any]:
    """The `TensorProto` fields of the 1-D concatenation of `tensors` in `dtype`, without
    concatenating: `data` is the list of their buffers, which `wire_writer` writes back to
    back."""
    target = _travelling(dtype)
    return {
        "data": [_raw(tensor, target) for tensor in tensors],
        "dtype": DTYPE_NAMES[target],
        "shape": [sum(tensor.numel() for tensor in tensors)],
    }


def _travelling(dtype: torch.dtype) -> torch.dtype:
    if dtype not in DTYPE_NAMES:
        raise BadTensorError(
            f"dtype {dtype} cannot travel; allowed: {', '.join(DTYPE_NAMES.values())}"
        )
    return dtype


def _raw(tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """The little-endian elements of `tensor` in `dtype`, flat (a view when no cast or
    copy is needed: the common case, a CPU index or pooled tensor, costs ~3 us)."""
    if tensor.dtype is not dtype or tensor.device.type != "cpu" or not tensor.is_contiguous():
        tensor = tensor.to(device="cpu", dtype=dtype).contiguous()
    flat = tensor.detach().reshape(-1)
    if dtype is not torch.bfloat16 and not _BIG_ENDIAN_HOST:
        return flat.numpy()
    # Reinterpret as a same-size integer so bf16 (unknown to numpy) works and the byte
    # order can be fixed to little-endian on any host.
    itemsize = flat.element_size()
    raw = flat.view(_INT_TORCH[itemsize]).numpy()
    if _BIG_ENDIAN_HOST:
        raw = raw.astype(_SAME_SIZE_INT[itemsize])
    return raw


def encode_tensor(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> pb.TensorProto:
    """A CPU tensor (cast to `dtype` when given) as little-endian bytes + dtype + shape."""
    return pb.TensorProto.FromString(
        serialize(pb.TensorProto.DESCRIPTOR, tensor_fields(tensor, dtype))
    )


def decode_tensor(
    message: pb.TensorProto,
    *,
    name: str,
    allowed: Iterable[torch.dtype],
    ndim: int,
) -> torch.Tensor:
    """A wire tensor as a fresh, writable CPU tensor, after checking it is well formed.

    Args:
        message: the wire tensor.
        name: what it is, for error messages (`feature 'f1' indices`).
        allowed: dtypes accepted here.
        ndim: required rank.

    Raises:
        BadTensorError: unknown or disallowed dtype, wrong rank, negative dims, or a byte
            count that does not match dtype and shape.
    """
    allowed = tuple(allowed)
    allowed_names = ", ".join(DTYPE_NAMES[d] for d in allowed)
    dtype = _DTYPES_BY_NAME.get(message.dtype)
    if dtype is None or dtype not in allowed:
        raise BadTensorError(
            f"{name}: dtype {message.dtype!r} is not accepted; send {allowed_names}"
        )
    shape = tuple(int(d) for d in message.shape)
    if len(shape) != ndim:
        raise BadTensorError(
            f"{name}: shape {list(shape)} has rank {len(shape)}, expected rank {ndim}"
        )
    if any(d < 0 for d in shape):
        raise BadTensorError(f"{name}: shape {list(shape)} has a negative dimension")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected_bytes = math.prod(shape) * itemsize
    data = message.data  # read once: upb hands out a fresh copy of the bytes on each read
    if len(data) != expected_bytes:
        raise BadTensorError(
            f"{name}: malformed tensor: {len(data)} bytes of data, but shape "
            f"{list(shape)} of {message.dtype} needs {expected_bytes}"
        )
    raw = np.frombuffer(data, dtype=_SAME_SIZE_INT[itemsize])
    native = raw.astype(raw.dtype.newbyteorder("="), copy=True)
    return torch.from_numpy(native).view(dtype).reshape(shape)


# --------------------------------------------------------------------------- keys


def _unique_keys(keys: Iterable[str], what: str) -> list[str]:
    out = list(keys)
    if len(set(out)) != len(out):
        seen: set[str] = set()
        for key in out:
            if key in seen:
                raise BadTensorError(
                    f"{what}: feature {key!r} appears twice in keys; send each feature once"
                )
            seen.add(key)
    return out


def _same_batch_size(keys: Sequence[str], batch_sizes: Sequence[int], what: str) -> int:
    """The one batch size B of every feature (0 without features)."""
    for key, size in zip(keys, batch_sizes, strict=True):
        if size != batch_sizes[0]:
            raise BadTensorError(
                f"{what}: feature {keys[0]!r} has batch size {batch_sizes[0]} but {key!r} has "
                f"{size}; every feature of one request has the same batch size B (one "
                "[B, sum of dims] answer)"
            )
    return batch_sizes[0] if batch_sizes else 0


# --------------------------------------------------------------------------- keyed tensors


def keyed_tensor_fields(
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    *,
    what: str = "keyed tensor",
    scratch: bool = False,
) -> dict[str, Any]:
    """`KeyedTensor` fields of {feature: float [B, D]} (pooled vectors, gradients): one
    [B, sum of D] buffer in `dtype`, written by one `torch.cat` (which also casts).

    Args:
        what: what the tensors are, for error messages (`gradients`).
        scratch: write the buffer into this thread's reused scratch memory (see
            `_scratch_tensor`); the fields are then valid only until the thread's next call,
            so only for a message serialized at once (`lookup_response_bytes`,
            `push_gradients_request_bytes`).

    Raises:
        BadTensorError: a tensor that is not [B, D], or features with different B.
    """
    keys = list(tensors)
    parts = list(tensors.values())
    for key, part in zip(keys, parts, strict=True):
        if part.dim() != 2:
            raise BadTensorError(
                f"{what}: feature {key!r} has shape {tuple(part.shape)}; send [batch, dim] tensors"
            )
    batch = _same_batch_size(keys, [part.shape[0] for part in parts], what)
    dims = [part.shape[1] for part in parts]
    shape = (batch, sum(dims))
    target = _travelling(dtype)
    values = _scratch_tensor(shape, target) if scratch else torch.empty(shape, dtype=target)
    if parts:
        torch.cat([part.detach().cpu() for part in parts], dim=1, out=values)
    return {"keys": keys, "dims": dims, "values": tensor_fields(values)}


_SCRATCH_MAX_BYTES = 4 << 20
"""Largest KeyedTensor buffer kept for reuse per thread (a node's 16 RPC threads keep at most
64 MB); larger ones are allocated each time, where the copy costs more than the faults."""
_scratch = threading.local()


def _scratch_tensor(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised [shape] tensor in memory this thread reuses from call to call.

    Why: a fresh [B, sum of dims] buffer and the fresh serialized message that copies it,
    both megabytes and freed together, go back to the OS and come back page-faulting on the
    next call (800 minor faults, +1.5 ms per 26 x 1024 x 16 fp32 reply on the 2-core
    machine); with the buffer reused only the message is fresh memory, as it was when every
    feature travelled as its own tensor.
    """
    nbytes = math.prod(shape) * _ITEMSIZE[DTYPE_NAMES[dtype]]
    if nbytes > _SCRATCH_MAX_BYTES:
        return torch.empty(shape, dtype=dtype)
    memory = getattr(_scratch, "memory", None)
    if memory is None or memory.numel() < nbytes:
        memory = _scratch.memory = torch.empty(nbytes, dtype=torch.uint8)
    return memory[:nbytes].view(dtype).view(shape)


def encode_keyed_tensor(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> pb.KeyedTensor:
    """{feature: [B, D]} as one `KeyedTensor` message (to build requests by hand)."""
    return pb.KeyedTensor.FromString(
        serialize(pb.KeyedTensor.DESCRIPTOR, keyed_tensor_fields(tensors, dtype))
    )


def decode_keyed_tensor(message: pb.KeyedTensor, *, what: str) -> dict[str, torch.Tensor]:
    """{feature: float32 [B, D]}: column views of the one decoded [B, sum of dims] tensor.

    Raises:
        BadTensorError: a key twice, not one dim per key, a negative dim, columns other than
            the sum of dims, or a tensor whose bytes are not B x sum(dims) x the dtype's size.
    """
    keys = _unique_keys(message.keys, what)
    dims = list(message.dims)
    if len(dims) != len(keys):
        raise BadTensorError(
            f"{what}: dims has {len(dims)} entries for {len(keys)} keys; send one dim per key"
        )
    for key, dim in zip(keys, dims, strict=True):
        if dim < 0:
            raise BadTensorError(f"{what}: feature {key!r} has dim {dim}; dims must be >= 0")
    if not keys and not message.HasField("values"):
        return {}
    shape = list(message.values.shape)
    if len(shape) == 2 and shape[1] != sum(dims):
        raise BadTensorError(
            f"{what}: values has shape {shape}, but dims {dims} sum to {sum(dims)} columns; "
            "send [B, sum of dims]"
        )
    values = decode_tensor(message.values, name=f"{what} values", allowed=_FLOAT_DTYPES, ndim=2)
    values = values.to(torch.float32)
    if not keys:
        return {}
    return dict(zip(keys, torch.split(values, dims, dim=1), strict=True))


def payload_bytes(fields: Mapping[str, Any]) -> int:
    """Tensor bytes in `keyed_tensor_fields` output: what `<Rpc>.<dir>.float_data` counts."""
    return fields["values"]["data"].nbytes


def float_data_bytes(message: pb.KeyedTensor) -> int:
    """Tensor bytes of a decoded (so well-formed) `KeyedTensor`, from dtype and shape.

    Why not `len(message.values.data)`: upb hands out a fresh copy of the bytes on each read.
    """
    if not message.HasField("values"):
        return 0
    return math.prod(message.values.shape) * _ITEMSIZE[message.values.dtype]


# --------------------------------------------------------------------------- jagged


def _empty_or_decoded(
    message: Any, field: str, *, name: str, allowed: tuple[torch.dtype, ...]
) -> torch.Tensor:
    """A 1-D tensor field, or an empty one when the field is unset (an empty request)."""
    if not message.HasField(field):
        return torch.zeros(0, dtype=allowed[0])
    return decode_tensor(getattr(message, field), name=name, allowed=allowed, ndim=1)


def _optional_floats(
    message: pb.KeyedJaggedTensor, field: str, what: str, count: int, counted: str, fix: str
) -> torch.Tensor | None:
    """An optional float32 [count] field of a `KeyedJaggedTensor` (weights, mean divisors),
    None when unset; BadTensorError naming the field when its length is not `count`."""
    if not message.HasField(field):
        return None
    tensor = decode_tensor(
        getattr(message, field), name=f"{what} {field}", allowed=(torch.float32,), ndim=1
    )
    if tensor.numel() != count:
        raise BadTensorError(f"{what}: {field} has {tensor.numel()} entries, but {counted}; {fix}")
    return tensor


def decode_jagged(message: pb.KeyedJaggedTensor, *, what: str) -> KeyedJagged:
    """The checked flat bags of a `KeyedJaggedTensor` (shapes, counts, dtypes)."""
    keys = _unique_keys(message.keys, what)
    stride = int(message.stride)
    if stride < 0:
        raise BadTensorError(f"{what}: stride {stride} is negative; send the bags per feature")
    num_bags = len(keys) * stride
    lengths = _empty_or_decoded(
        message, "lengths", name=f"{what} lengths", allowed=(torch.int64, torch.int32)
    )
    if lengths.numel() != num_bags:
        raise BadTensorError(
            f"{what}: lengths has {lengths.numel()} entries, but keys ({len(keys)}) x stride "
            f"({stride}) = {num_bags}; send one length per bag of every feature"
        )
    lengths = lengths.to(torch.int64).reshape(len(keys), stride)
    if num_bags and bool((lengths < 0).any()):
        k = int((lengths < 0).any(dim=1).nonzero()[0])
        raise BadTensorError(
            f"{what}: feature {keys[k]!r} has a negative bag length "
            f"({int(lengths[k].min())}); lengths must be >= 0"
        )
    values = _empty_or_decoded(message, "values", name=f"{what} values", allowed=(torch.int64,))
    nnz_per_key = lengths.sum(dim=1)
    total = int(nnz_per_key.sum())
    if total != values.numel():
        raise BadTensorError(
            f"{what}: values has {values.numel()} entries, but lengths sum to {total}; "
            "send every bag's rows, feature after feature"
        )
    weights = _optional_floats(
        message, "weights", what, total, f"values has {total}", "send one weight per value"
    )
    mean_divisor = _optional_floats(
        message,
        "mean_divisor",
        what,
        num_bags,
        f"keys ({len(keys)}) x stride ({stride}) = {num_bags}",
        "send one per bag",
    )
    if mean_divisor is not None:
        mean_divisor = mean_divisor.reshape(len(keys), stride)
    return KeyedJagged(keys, lengths, values, weights, mean_divisor)


# --------------------------------------------------------------------------- bags


def bags_fields(bags: Mapping[str, Bags]) -> dict[str, Any]:
    """`KeyedJaggedTensor` fields of every feature's bags (one request).

    A feature without per-sample weights next to one with them gets weights 1, one without a
    mean divisor next to one with it gets its local bag lengths (what None means), so the
    optional tensors stay one tensor each; both are left out when no feature has them.

    Raises:
        BadTensorError: features with different batch sizes, or offsets that do not run from
            0 to len(indices).
    """
    keys = list(bags)
    parts = list(bags.values())
    batch = _same_batch_size(keys, [part.offsets.numel() - 1 for part in parts], "bags")
    if not parts:
        return {"keys": [], "stride": 0}
    if batch < 0:
        raise BadTensorError(
            f"feature {keys[0]!r}: offsets must have B + 1 entries from 0 to "
            f"len(indices)={parts[0].indices.numel()}"
        )
    offsets = torch.stack([part.offsets.to(torch.int64) for part in parts])  # [K, B + 1]
    nnz = torch.tensor([part.indices.numel() for part in parts], dtype=torch.int64)
    bad_ends = (offsets[:, 0] != 0) | (offsets[:, -1] != nnz)
    if bool(bad_ends.any()):
        k = int(bad_ends.nonzero()[0])
        raise BadTensorError(
            f"feature {keys[k]!r}: offsets must have B + 1 entries from 0 to "
            f"len(indices)={int(nnz[k])}"
        )
    lengths = offsets[:, 1:] - offsets[:, :-1]  # [K, B]; a bag's length fits in int32
    fields: dict[str, Any] = {
        "keys": keys,
        "stride": batch,
        "lengths": tensor_fields(lengths.reshape(-1).to(torch.int32)),
        "values": concatenated_fields([part.indices for part in parts], torch.int64),
    }
    if any(part.per_sample_weights is not None for part in parts):
        fields["weights"] = concatenated_fields(
            [
                torch.ones(part.indices.numel())
                if part.per_sample_weights is None
                else part.per_sample_weights
                for part in parts
            ],
            torch.float32,
        )
    if any(part.mean_divisor is not None for part in parts):
        fields["mean_divisor"] = concatenated_fields(
            [
                local if part.mean_divisor is None else part.mean_divisor
                for part, local in zip(parts, lengths, strict=True)
            ],
            torch.float32,
        )
    return fields


def encode_bags(bags: Mapping[str, Bags]) -> pb.KeyedJaggedTensor:
    """Every feature's bags as one `KeyedJaggedTensor` message (to build requests by hand)."""
    return pb.KeyedJaggedTensor.FromString(
        serialize(pb.KeyedJaggedTensor.DESCRIPTOR, bags_fields(bags))
    )


def decode_bags(message: pb.KeyedJaggedTensor, *, what: str = "bags") -> dict[str, Bags]:
    """{feature: Bags} of a `KeyedJaggedTensor`, every tensor a view of the decoded ones."""
    return decode_jagged(message, what=what).to_bags()


def rows_fields(indices: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """`KeyedJaggedTensor` fields of {feature: int64 [n] rows}: one bag per feature."""
    parts = list(indices.values())
    lengths = torch.tensor([part.numel() for part in parts], dtype=torch.int64)
    return {
        "keys": list(indices),
        "stride": 1,
        "lengths": tensor_fields(lengths),
        "values": concatenated_fields(parts, torch.int64),
    }


def decode_rows(message: pb.KeyedJaggedTensor, *, what: str) -> dict[str, torch.Tensor]:
    """{feature: int64 [n]} of a one-bag-per-feature `KeyedJaggedTensor` (views)."""
    if message.keys and message.stride != 1:
        raise BadTensorError(
            f"{what}: stride {message.stride}; send one bag (stride 1) of rows per feature"
        )
    jagged = decode_jagged(message, what=what)
    if not jagged.keys:
        return {}
    nnz_per_key = jagged.lengths.sum(dim=1).tolist()
    return dict(zip(jagged.keys, torch.split(jagged.values, nnz_per_key), strict=True))


# --------------------------------------------------------------------------- requests


def lookup_request_bytes(
    step: int,
    worker: int,
    bags: Mapping[str, Bags],
    *,
    train: bool,
    dtype: torch.dtype,
    use_early: bool = False,
    previous_push: Mapping[str, torch.Tensor] | None = None,
) -> bytes:
    """A serialized `LookupRequest`: all features one node serves for one batch.

    With `use_early` the bags stay home: the node answers the early pool it kept for them.
    `previous_push`: this worker's gradients of step - 1 on this node, in `dtype`, applied
    by the node before it answers (the request's `push` field).
    """
    fields = {
        "step": step,
        "worker": worker,
        "train": train,
        "wire_dtype": DTYPE_NAMES[dtype],
        "use_early": use_early,
        "bags": None if use_early else bags_fields(bags),
    }
    if previous_push is not None:
        grads = keyed_tensor_fields(previous_push, dtype, what="gradients", scratch=True)
        fields["push"] = {"step": step - 1, "worker": worker, "grads": grads}
    return serialize(pb.LookupRequest.DESCRIPTOR, fields)


def lookup_request(*args: Any, **kwargs: Any) -> pb.LookupRequest:
    """`lookup_request_bytes(...)` (same arguments) as a message, to inspect or alter."""
    return pb.LookupRequest.FromString(lookup_request_bytes(*args, **kwargs))


def parse_lookup_request(
    request: pb.LookupRequest,
) -> tuple[KeyedJagged, torch.dtype]:
    """The bags of a lookup request (flat, as they came) and the dtype the answer must use."""
    if request.use_early and (not request.train or len(request.bags.keys)):
        raise BadTensorError(
            "a use_early lookup is a training lookup without bags (the node answers the "
            "early pool it keeps for the step); set train and send no bags"
        )
    answer_dtype = _DTYPES_BY_NAME.get(request.wire_dtype or "float32")
    if answer_dtype not in _FLOAT_DTYPES:
        raise BadTensorError(
            f"lookup wire_dtype {request.wire_dtype!r} is not accepted; send "
            + ", ".join(DTYPE_NAMES[d] for d in _FLOAT_DTYPES)
        )
    return decode_jagged(request.bags, what="lookup bags"), answer_dtype


def parse_previous_push(request: pb.LookupRequest) -> dict[str, torch.Tensor] | None:
    """The gradients of step - 1 a training lookup carries (None without a `push`).

    Raises:
        BadTensorError: the push names another worker or step than step - 1, rides on an
            evaluation lookup, or its gradients are malformed.
    """
    if not request.HasField("push"):
        return None
    push = request.push
    if not request.train or push.worker != request.worker or push.step != request.step - 1:
        raise BadTensorError(
            f"a lookup's push must be the same worker's gradients of the step before, on a "
            f"training lookup: lookup step {request.step} worker {request.worker} "
            f"train={request.train} carries a push of step {push.step} worker {push.worker}"
        )
    return parse_push_gradients_request(push)


def early_lookup_request_bytes(
    step: int,
    worker: int,
    bags: Mapping[str, Bags],
    *,
    correct: bool,
    prefetch: tuple[int, Mapping[str, torch.Tensor]] | None = None,
) -> bytes:
    """A serialized `EarlyLookupRequest`: a future training step's bags for one node, to
    pool early (`correct`: exact mode); `prefetch`: (a later step, its rows) to stage."""
    fields = {"step": step, "worker": worker, "correct": correct, "bags": bags_fields(bags)}
    if prefetch is not None:
        fields["prefetch"] = {"step": prefetch[0], "rows": rows_fields(prefetch[1])}
    return serialize(pb.EarlyLookupRequest.DESCRIPTOR, fields)


def parse_early_lookup_request(request: pb.EarlyLookupRequest) -> KeyedJagged:
    """The bags of an early lookup request (flat, as they came)."""
    return decode_jagged(request.bags, what="early lookup bags")


def parse_riding_prefetch(
    request: pb.EarlyLookupRequest,
) -> tuple[int, dict[str, torch.Tensor]] | None:
    """(step, rows per feature) of the prefetch an early lookup carries, or None."""
    if not request.HasField("prefetch"):
        return None
    return request.prefetch.step, parse_prefetch_request(request.prefetch)


def prefetch_request_bytes(step: int, indices: Mapping[str, torch.Tensor]) -> bytes:
    """A serialized `PrefetchRequest`: per-feature local row indices of a future step."""
    return serialize(pb.PrefetchRequest.DESCRIPTOR, {"step": step, "rows": rows_fields(indices)})


def parse_prefetch_request(request: pb.PrefetchRequest) -> dict[str, torch.Tensor]:
    """Per-feature local row indices to stage."""
    return decode_rows(request.rows, what="prefetch rows")


def push_gradients_request_bytes(
    step: int, worker: int, grads: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> tuple[bytes, int]:
    """A serialized `PushGradientsRequest` and the gradient bytes inside it."""
    keyed = keyed_tensor_fields(grads, dtype, what="gradients", scratch=True)
    fields = {"step": step, "worker": worker, "grads": keyed}
    return serialize(pb.PushGradientsRequest.DESCRIPTOR, fields), payload_bytes(keyed)


def parse_push_gradients_request(request: pb.PushGradientsRequest) -> dict[str, torch.Tensor]:
    """d(loss)/d(pooled) {feature: float32 [B, D]} (column views of one tensor)."""
    return decode_keyed_tensor(request.grads, what="gradients")


def lookup_response_bytes(pooled: Mapping[str, torch.Tensor], dtype: torch.dtype) -> bytes:
    """A serialized `LookupResponse`: every feature's pooled vectors in the wire dtype."""
    fields = {"pooled": keyed_tensor_fields(pooled, dtype, what="pooled vectors", scratch=True)}
    return serialize(pb.LookupResponse.DESCRIPTOR, fields)


def parse_lookup_response(reply: pb.LookupResponse) -> dict[str, torch.Tensor]:
    """Pooled vectors {feature: float32 [B, D]} (column views of one tensor)."""
    return decode_keyed_tensor(reply.pooled, what="pooled vectors")
