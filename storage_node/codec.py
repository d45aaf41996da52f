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

Why raw bytes rather than `repeated float`: an exact byte count, so fp16/bf16 really halve
the link traffic, and the bytes can be written straight from the tensor's memory: requests
and replies are serialized by `wire_writer` from `*_fields` mappings (one copy, the final
join), and the message-returning builders here parse those same bytes. Pooled vectors and
gradients may travel in fp32, fp16 or bf16 (the client's `wire_dtype`); both ends do their
math in fp32.

Every decode checks dtype, rank and byte count and raises `BadTensorError` naming the
tensor, so a malformed request becomes INVALID_ARGUMENT instead of a crash or a silent
misread. Semantic checks (offsets monotone, row dims, index ranges) belong to the core.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from protos import storage_node_pb2 as pb
from storage_node.errors import BadTensorError
from storage_node.spec import Bags
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
    target = dtype or tensor.dtype
    if target not in DTYPE_NAMES:
        raise BadTensorError(
            f"dtype {target} cannot travel; allowed: {', '.join(DTYPE_NAMES.values())}"
        )
    flat = tensor.detach().to(device="cpu", dtype=target).contiguous().reshape(-1)
    itemsize = flat.element_size()
    # Reinterpret as a same-size integer so bf16 (unknown to numpy) works and the byte
    # order can be fixed to little-endian on any host (a no-op on little-endian hosts).
    raw = flat.view(_INT_TORCH[itemsize]).numpy()
    if _BIG_ENDIAN_HOST:
        raw = raw.astype(_SAME_SIZE_INT[itemsize])
    return {"data": raw, "dtype": DTYPE_NAMES[target], "shape": list(tensor.shape)}


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
    if len(message.data) != expected_bytes:
        raise BadTensorError(
            f"{name}: malformed tensor: {len(message.data)} bytes of data, but shape "
            f"{list(shape)} of {message.dtype} needs {expected_bytes}"
        )
    raw = np.frombuffer(message.data, dtype=_SAME_SIZE_INT[itemsize])
    native = raw.astype(raw.dtype.newbyteorder("="), copy=True)
    return torch.from_numpy(native).view(dtype).reshape(shape)


def named_tensor_fields(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> list[dict[str, Any]]:
    """`NamedTensor` fields of per-feature float tensors (pooled vectors, gradients) in the
    wire dtype."""
    return [{"name": name, "tensor": tensor_fields(t, dtype)} for name, t in tensors.items()]


def encode_float_tensors(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> list[pb.NamedTensor]:
    """Per-feature float tensors as `NamedTensor` messages (to build requests by hand)."""
    return [
        pb.NamedTensor.FromString(serialize(pb.NamedTensor.DESCRIPTOR, fields))
        for fields in named_tensor_fields(tensors, dtype)
    ]


def payload_bytes(named: list[dict[str, Any]]) -> int:
    """Tensor bytes in `named_tensor_fields` output: what `<Rpc>.<dir>.float_data` counts."""
    return sum(entry["tensor"]["data"].nbytes for entry in named)


def float_data_bytes(entries: Iterable[pb.NamedTensor]) -> int:
    """Tensor bytes of decoded (so well-formed) `NamedTensor`s, from dtype and shape.

    Why not `len(entry.tensor.data)`: upb hands out a fresh copy of the bytes on each read.
    """
    return sum(math.prod(entry.tensor.shape) * _ITEMSIZE[entry.tensor.dtype] for entry in entries)


def decode_float_tensors(
    entries: Iterable[pb.NamedTensor], *, what: str, ndim: int = 2
) -> dict[str, torch.Tensor]:
    """Per-feature float tensors from the wire, as float32 for the math."""
    return {
        name: tensor.to(torch.float32)
        for name, tensor in _decode_named(
            entries, what=what, allowed=_FLOAT_DTYPES, ndim=ndim
        ).items()
    }


def _decode_named(
    entries: Iterable[pb.NamedTensor], *, what: str, allowed: tuple[torch.dtype, ...], ndim: int
) -> dict[str, torch.Tensor]:
    decoded: dict[str, torch.Tensor] = {}
    for entry in entries:
        _check_new_feature(entry.name, decoded)
        decoded[entry.name] = decode_tensor(
            entry.tensor, name=f"feature {entry.name!r} {what}", allowed=allowed, ndim=ndim
        )
    return decoded


def _check_new_feature(feature: str, seen: Mapping[str, object]) -> None:
    if feature in seen:
        raise BadTensorError(f"feature {feature!r} appears twice in one request; send it once")


# --------------------------------------------------------------------------- bags


def bags_fields(feature: str, bags: Bags) -> dict[str, Any]:
    """`FeatureBags` fields of one feature's bags (absent optional tensors stay unset)."""
    fields: dict[str, Any] = {
        "feature": feature,
        "indices": tensor_fields(bags.indices, torch.int64),
        "offsets": tensor_fields(bags.offsets, torch.int64),
    }
    if bags.per_sample_weights is not None:
        fields["per_sample_weights"] = tensor_fields(bags.per_sample_weights, torch.float32)
    if bags.mean_divisor is not None:
        fields["mean_divisor"] = tensor_fields(bags.mean_divisor, torch.float32)
    return fields


def encode_bags(feature: str, bags: Bags) -> pb.FeatureBags:
    """One feature's bags as a wire message."""
    return pb.FeatureBags.FromString(
        serialize(pb.FeatureBags.DESCRIPTOR, bags_fields(feature, bags))
    )


def decode_bags(message: pb.FeatureBags) -> Bags:
    """A `Bags` from the wire; tensors checked for dtype and rank."""
    where = f"feature {message.feature!r}"

    def optional(field: str) -> torch.Tensor | None:
        if not message.HasField(field):
            return None
        return decode_tensor(
            getattr(message, field), name=f"{where} {field}", allowed=(torch.float32,), ndim=1
        )

    return Bags(
        indices=decode_tensor(
            message.indices, name=f"{where} indices", allowed=(torch.int64,), ndim=1
        ),
        offsets=decode_tensor(
            message.offsets, name=f"{where} offsets", allowed=(torch.int64,), ndim=1
        ),
        per_sample_weights=optional("per_sample_weights"),
        mean_divisor=optional("mean_divisor"),
    )


# --------------------------------------------------------------------------- requests


def lookup_request_bytes(
    step: int,
    worker: int,
    bags: Mapping[str, Bags],
    *,
    train: bool,
    dtype: torch.dtype,
    use_early: bool = False,
) -> bytes:
    """A serialized `LookupRequest`: all features one node serves for one batch.

    With `use_early` the bags stay home: the node answers the early pool it kept for them.
    """
    fields = {
        "step": step,
        "worker": worker,
        "train": train,
        "features": [] if use_early else [bags_fields(f, b) for f, b in bags.items()],
        "wire_dtype": DTYPE_NAMES[dtype],
        "use_early": use_early,
    }
    return serialize(pb.LookupRequest.DESCRIPTOR, fields)


def lookup_request(*args: Any, **kwargs: Any) -> pb.LookupRequest:
    """`lookup_request_bytes(...)` (same arguments) as a message, to inspect or alter."""
    return pb.LookupRequest.FromString(lookup_request_bytes(*args, **kwargs))


def parse_lookup_request(
    request: pb.LookupRequest,
) -> tuple[dict[str, Bags], torch.dtype]:
    """The bags of a lookup request and the dtype the answer must use."""
    if request.use_early and (not request.train or len(request.features)):
        raise BadTensorError(
            "a use_early lookup is a training lookup without features (the node answers the "
            "early pool it keeps for the step); set train and send no features"
        )
    bags: dict[str, Bags] = {}
    for message in request.features:
        _check_new_feature(message.feature, bags)
        bags[message.feature] = decode_bags(message)
    answer_dtype = _DTYPES_BY_NAME.get(request.wire_dtype or "float32")
    if answer_dtype not in _FLOAT_DTYPES:
        raise BadTensorError(
            f"lookup wire_dtype {request.wire_dtype!r} is not accepted; send "
            + ", ".join(DTYPE_NAMES[d] for d in _FLOAT_DTYPES)
        )
    return bags, answer_dtype


def early_lookup_request_bytes(
    step: int, worker: int, bags: Mapping[str, Bags], *, correct: bool
) -> bytes:
    """A serialized `EarlyLookupRequest`: a future training step's bags for one node, to
    pool early (`correct`: exact mode)."""
    fields = {
        "step": step,
        "worker": worker,
        "features": [bags_fields(f, b) for f, b in bags.items()],
        "correct": correct,
    }
    return serialize(pb.EarlyLookupRequest.DESCRIPTOR, fields)


def parse_early_lookup_request(request: pb.EarlyLookupRequest) -> dict[str, Bags]:
    """The bags of an early lookup request."""
    bags: dict[str, Bags] = {}
    for message in request.features:
        _check_new_feature(message.feature, bags)
        bags[message.feature] = decode_bags(message)
    return bags


def parse_prefetch_request(request: pb.PrefetchRequest) -> dict[str, torch.Tensor]:
    """Per-feature local row indices to stage."""
    return _decode_named(request.indices, what="prefetch indices", allowed=(torch.int64,), ndim=1)


def prefetch_request_bytes(step: int, indices: Mapping[str, torch.Tensor]) -> bytes:
    """A serialized `PrefetchRequest`: per-feature local row indices of a future step."""
    named = [{"name": f, "tensor": tensor_fields(rows, torch.int64)} for f, rows in indices.items()]
    return serialize(pb.PrefetchRequest.DESCRIPTOR, {"step": step, "indices": named})


def push_gradients_request_bytes(
    step: int, worker: int, grads: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> tuple[bytes, int]:
    """A serialized `PushGradientsRequest` and the gradient bytes inside it."""
    named = named_tensor_fields(grads, dtype)
    fields = {"step": step, "worker": worker, "grads": named}
    return serialize(pb.PushGradientsRequest.DESCRIPTOR, fields), payload_bytes(named)


def lookup_response_bytes(pooled: Mapping[str, torch.Tensor], dtype: torch.dtype) -> bytes:
    """A serialized `LookupResponse`: per-feature pooled vectors in the wire dtype."""
    fields = {"pooled": named_tensor_fields(pooled, dtype)}
    return serialize(pb.LookupResponse.DESCRIPTOR, fields)
