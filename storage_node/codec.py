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

Why raw bytes rather than `repeated float`: one copy at each end and an exact byte count,
so fp16/bf16 really halve the link traffic. Pooled vectors and gradients may travel in
fp32, fp16 or bf16 (the client's `wire_dtype`); both ends do their math in fp32.

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


def encode_tensor(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> pb.TensorProto:
    """A CPU tensor (cast to `dtype` when given) as little-endian bytes + dtype + shape."""
    message = pb.TensorProto()
    fill_tensor(message, tensor, dtype)
    return message


def fill_tensor(
    message: pb.TensorProto, tensor: torch.Tensor, dtype: torch.dtype | None = None
) -> None:
    """Write `tensor` into an existing (empty) `message` in place.

    Why: building a sub-message and then assigning it to its parent copies the payload
    again; filling the parent's own field (`reply.pooled.add().tensor`) copies the bytes
    once, from the tensor's memory straight into the message.
    """
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
    message.data = raw.tobytes()
    message.dtype = DTYPE_NAMES[target]
    message.shape.extend(tensor.shape)


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


def encode_float_tensors(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> list[pb.NamedTensor]:
    """Per-feature float tensors (pooled vectors, gradients) in the wire dtype."""
    out = []
    for name, tensor in tensors.items():
        entry = pb.NamedTensor(name=name)
        fill_tensor(entry.tensor, tensor, dtype)
        out.append(entry)
    return out


def fill_float_tensors(field: Any, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Append per-feature float tensors to a repeated `NamedTensor` field, in place.

    Why: `Reply(pooled=encode_float_tensors(...))` copies every payload into the reply once
    more; a reply of B x D floats per feature is megabytes per call.
    """
    for name, tensor in tensors.items():
        entry = field.add(name=name)
        fill_tensor(entry.tensor, tensor, dtype)


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


def encode_bags(feature: str, bags: Bags) -> pb.FeatureBags:
    """One feature's bags as a wire message (absent optional tensors stay unset)."""
    message = pb.FeatureBags(feature=feature)
    _fill_bags(message, bags)
    return message


def _fill_bags(message: pb.FeatureBags, bags: Bags) -> None:
    fill_tensor(message.indices, bags.indices, torch.int64)
    fill_tensor(message.offsets, bags.offsets, torch.int64)
    if bags.per_sample_weights is not None:
        fill_tensor(message.per_sample_weights, bags.per_sample_weights, torch.float32)
    if bags.mean_divisor is not None:
        fill_tensor(message.mean_divisor, bags.mean_divisor, torch.float32)


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


def lookup_request(
    step: int,
    worker: int,
    bags: Mapping[str, Bags],
    *,
    train: bool,
    dtype: torch.dtype,
    use_early: bool = False,
) -> pb.LookupRequest:
    """All features one node serves for one batch, in one message.

    With `use_early` the bags stay home: the node answers the early pool it kept for them.
    """
    request = pb.LookupRequest(
        step=step, worker=worker, train=train, wire_dtype=DTYPE_NAMES[dtype], use_early=use_early
    )
    if not use_early:
        for feature, b in bags.items():
            _fill_bags(request.features.add(feature=feature), b)
    return request


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


def early_lookup_request(
    step: int, worker: int, bags: Mapping[str, Bags], *, correct: bool
) -> pb.EarlyLookupRequest:
    """A future training step's bags for one node, to pool early (`correct`: exact mode)."""
    request = pb.EarlyLookupRequest(step=step, worker=worker, correct=correct)
    for feature, b in bags.items():
        _fill_bags(request.features.add(feature=feature), b)
    return request


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


def prefetch_request(step: int, indices: Mapping[str, torch.Tensor]) -> pb.PrefetchRequest:
    """Per-feature local row indices of a future step."""
    return pb.PrefetchRequest(
        step=step,
        indices=[
            pb.NamedTensor(name=name, tensor=encode_tensor(rows, torch.int64))
            for name, rows in indices.items()
        ],
    )
