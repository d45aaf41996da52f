"""The storage node's client: the data plane of one node, over gRPC.

Lookups, early lookups, prefetches and gradient pushes: the tensors of a training step.
Control (start, stats, rows, restore) is not here: it goes through the node's Ray actor
(`storage_node.actor`; docs/architecture.md, "Two planes"). Shipped with the node (GPU workers, the coordinator, recovery and the benchmarks import it),
so the wire's two halves live in one package; it needs only the wire modules (`codec`,
`rpc_methods`, `auth`, `tls`, `errors`), never the node's internals.

Every operation has a blocking form (`lookup`) and an `*_async` form returning a future
(`lookup_async(...).result()`), so a worker can send one request to every node at once and
then collect the replies. Refusals come back as the `StorageNodeError` subclass the node
raised (INVALID_ARGUMENT -> IndexOutOfRangeError / BadTensorError / UnknownFeatureError,
FAILED_PRECONDITION -> StepOrderError, UNAUTHENTICATED -> UnauthenticatedError); a node
that cannot be reached raises `StorageNodeUnavailableError`.
"""

from __future__ import annotations

import os
import socket
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import torch

from ndp.errors import StorageNodeError
from ndp.plan import Bags
from storage_node import codec
from storage_node import errors as node_errors
from storage_node.auth import ERROR_METADATA_KEY, UnauthenticatedError, token_metadata
from storage_node.rpc_methods import Received, channel_options, client_methods, wire_size
from storage_node.tls import TlsFiles, channel_credentials

T = TypeVar("T")


class StorageNodeUnavailableError(StorageNodeError):
    """A storage node did not answer (down, unreachable, or past the RPC deadline)."""


_ERRORS_BY_NAME: dict[str, type[StorageNodeError]] = {
    cls.__name__: cls
    for cls in (
        *(
            value
            for value in vars(node_errors).values()
            if isinstance(value, type) and issubclass(value, StorageNodeError)
        ),
        UnauthenticatedError,
        StorageNodeUnavailableError,
    )
}

_ERRORS_BY_CODE: dict[grpc.StatusCode, type[StorageNodeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: node_errors.BadTensorError,
    grpc.StatusCode.FAILED_PRECONDITION: node_errors.StepOrderError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.UNAVAILABLE: StorageNodeUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: StorageNodeUnavailableError,
}


def error_from_rpc(error: grpc.RpcError, address: str) -> StorageNodeError:
    """The `StorageNodeError` a failed call stands for (class from `ndp-error`, else the code)."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    trailing = dict(error.trailing_metadata() or ())
    cls = _ERRORS_BY_NAME.get(trailing.get(ERROR_METADATA_KEY, ""))
    if cls is None:
        cls = _ERRORS_BY_CODE.get(code, StorageNodeError)
    if cls is StorageNodeUnavailableError or cls is StorageNodeError:
        hint = ""
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            hint = "; raise storage.max_message_bytes or lower train.batch_size"
        details = f"storage node at {address}: {code.name}: {details}{hint}"
    return cls(details)


def pick_address(addresses: str | Mapping[str, Any]) -> str:
    """The address to dial: the unix socket when the node is on this machine, else TCP.

    Args:
        addresses: a `host:port` string, or the mapping `StorageNodeActor.addresses()`
            reports: {"tcp": "host:port", "unix": "unix:PATH" | None, "hostname": str}.
    """
    if isinstance(addresses, str):
        return addresses
    unix = addresses.get("unix")
    if (
        unix
        and addresses.get("hostname") == socket.gethostname()
        and os.path.exists(unix.removeprefix("unix:"))
    ):
        return unix
    return addresses["tcp"]


@dataclass(frozen=True)
class EarlyLookupAnswer:
    """A node's answer to an early lookup (`EarlyLookupResponse`)."""

    kept: bool
    """The node keeps the pooled vectors for the step's lookup (False: already applied)."""
    every_row_resident: bool
    """Every row the node holds is cached for good: early lookups (exact mode) and
    prefetches to it change nothing a lookup would not do."""


class ReplyFuture(Generic[T]):
    """A call in flight; `.result()` waits, decodes the reply, or raises its StorageNodeError."""

    def __init__(self, call: grpc.Future, decode: Callable[[Any], T], address: str) -> None:
        self._call = call
        self._decode = decode
        self._address = address

    def done(self) -> bool:
        return self._call.done()

    def result(self, timeout: float | None = None) -> T:
        try:
            reply = self._call.result(timeout=timeout)
        except grpc.RpcError as error:
            raise error_from_rpc(error, self._address) from None
        return self._decode(reply)


class StorageClient:
    """Talks to one storage node.

    Args:
        address: `host:port`, `unix:PATH`, or an addresses mapping (see `pick_address`).
        token: the cluster's shared token, sent with every call.
        wire_dtype: dtype of pooled vectors and gradients on the wire (`fp32`, `fp16`, `bf16`).
        max_message_bytes: largest request or reply (`storage.max_message_bytes`).
        timeout_s: deadline of each call (`cluster.rpc_timeout_s`); a lookup waiting for the
            previous step's update waits at most this long.
        tls: dial with TLS, trusting `tls.ca` and presenting `tls.cert` if set
            (`storage_node.tls`); None: plaintext.
    """

    def __init__(
        self,
        address: str | Mapping[str, Any],
        *,
        token: str,
        wire_dtype: str = "fp32",
        max_message_bytes: int = 512 << 20,
        timeout_s: float = 120.0,
        tls: TlsFiles | None = None,
    ) -> None:
        self.address = pick_address(address)
        self.wire_dtype = codec.wire_dtype(wire_dtype)
        self.timeout_s = timeout_s
        self._metadata = token_metadata(token)
        options = channel_options(max_message_bytes)
        if tls is None:
            self._channel = grpc.insecure_channel(self.address, options=options)
        else:
            if self.address.startswith("unix:"):
                # A socket path is no host name: check the node's certificate for `localhost`
                # (the node is on this machine, which is why the socket was picked).
                options = [*options, ("grpc.ssl_target_name_override", "localhost")]
            self._channel = grpc.secure_channel(
                self.address, channel_credentials(tls), options=options
            )
        self._methods = client_methods(self._channel)
        self._wire_bytes: dict[str, int] = defaultdict(int)

    def _call(
        self,
        rpc: str,
        request: Any,
        decode: Callable[[Any], T],
        *,
        sent_float_data: int = 0,
        received_float_data: Callable[[Any], int] = lambda reply: 0,
    ) -> ReplyFuture[T]:
        """Send `request` (a message or its serialized bytes) to method `rpc`.

        Args:
            sent_float_data / received_float_data: the pooled-vector or gradient bytes in the
                request / in the reply (`take_wire_bytes`' `.float_data` keys).
        """
        self._count(rpc, "sent", wire_size(request), sent_float_data)
        call = self._methods[rpc].future(request, timeout=self.timeout_s, metadata=self._metadata)

        def count_and_decode(reply: Received) -> T:
            decoded = decode(reply.message)  # first: it checks every tensor's byte count
            self._count(rpc, "received", reply.wire_bytes, received_float_data(reply.message))
            return decoded

        return ReplyFuture(call, count_and_decode, self.address)

    def _count(self, rpc: str, direction: str, size: int, float_data: int) -> None:
        self._wire_bytes[f"{rpc}.{direction}"] += size
        self._wire_bytes[f"{rpc}.{direction}.float_data"] += float_data

    def take_wire_bytes(self) -> dict[str, int]:
        """Bytes on the wire since the last call, per `<Rpc>.<sent|received>`, and reset.

        Why measured and not computed: what travels is the serialised protobuf message
        (tensor bytes plus names, dtypes, shapes and field tags: the length of the bytes sent,
        and of the bytes the reply's deserializer got), so a benchmark
        can check that the link carries the pooled size and no more. `<key>.float_data` is
        the raw bytes of the pooled vectors / gradients inside those messages (the one
        KeyedTensor buffer, B x sum of dims in the wire dtype), without framing. Replies are
        counted when their future is resolved.
        """
        out, self._wire_bytes = dict(self._wire_bytes), defaultdict(int)
        return out

    # ----------------------------------------------------------------- async forms

    def lookup_async(
        self,
        step: int,
        worker: int,
        bags: Mapping[str, Bags],
        *,
        train: bool = True,
        use_early: bool = False,
        previous_push: Mapping[str, torch.Tensor] | None = None,
    ) -> ReplyFuture[dict[str, torch.Tensor]]:
        """Pooled vectors {feature: float32 [B, D]} of every feature in `bags`.

        The bags travel as one KeyedJaggedTensor, the answer as one KeyedTensor [B, sum of
        dims] (`storage_node.codec`); the [B, D] tensors are column views of that one tensor.

        Args:
            use_early: `bags` are those of this worker's kept `early_lookup` of `step`: they
                are not sent again, the node answers the kept vectors (training only).
            previous_push: this worker's d(loss)/d(pooled) of step - 1 on this node, applied
                before the lookup (one call instead of a push and a lookup; training only).
        """
        request = codec.lookup_request_bytes(
            step,
            worker,
            bags,
            train=train,
            dtype=self.wire_dtype,
            use_early=use_early,
            previous_push=previous_push,
        )
        pushed = 0
        if previous_push is not None:
            pushed = sum(g.numel() for g in previous_push.values()) * self.wire_dtype.itemsize
        return self._call(
            "Lookup",
            request,
            codec.parse_lookup_response,
            sent_float_data=pushed,
            received_float_data=lambda reply: codec.float_data_bytes(reply.pooled),
        )

    def push_gradients_async(
        self, step: int, worker: int, grads: Mapping[str, torch.Tensor]
    ) -> ReplyFuture[bool]:
        """Send d(loss)/d(pooled) {feature: [B, D]} (one KeyedTensor [B, sum of dims]); True
        when this push applied the step."""
        request, float_data = codec.push_gradients_request_bytes(
            step, worker, grads, self.wire_dtype
        )
        return self._call(
            "PushGradients", request, lambda reply: reply.applied, sent_float_data=float_data
        )

    def early_lookup_async(
        self,
        step: int,
        worker: int,
        bags: Mapping[str, Bags],
        *,
        correct: bool = True,
        prefetch: tuple[int, Mapping[str, torch.Tensor]] | None = None,
    ) -> ReplyFuture[EarlyLookupAnswer]:
        """Have the node pool a future training step's bags now (lookahead early pooling),
        and stage `prefetch` = (a later step, {feature: local rows}) in the same call.

        Resolves to whether the node kept the pooled vectors (not when the step is already
        applied) and whether every row it holds is resident (`EarlyLookupAnswer`).
        """
        request = codec.early_lookup_request_bytes(
            step, worker, bags, correct=correct, prefetch=prefetch
        )
        return self._call(
            "EarlyLookup",
            request,
            lambda reply: EarlyLookupAnswer(reply.kept, reply.every_row_resident),
        )

    def prefetch_async(self, step: int, indices: Mapping[str, torch.Tensor]) -> ReplyFuture[bool]:
        """Stage {feature: local rows int64 [n]} of a future step into the node's cache.

        Resolves to whether every row the node holds is resident (then prefetches to it
        stage nothing; `EarlyLookupAnswer.every_row_resident`)."""
        return self._call(
            "Prefetch",
            codec.prefetch_request_bytes(step, indices),
            lambda reply: reply.every_row_resident,
        )

    # ----------------------------------------------------------------- blocking forms

    def lookup(
        self,
        step: int,
        worker: int,
        bags: Mapping[str, Bags],
        *,
        train: bool = True,
        previous_push: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        return self.lookup_async(
            step, worker, bags, train=train, previous_push=previous_push
        ).result()

    def push_gradients(self, step: int, worker: int, grads: Mapping[str, torch.Tensor]) -> bool:
        return self.push_gradients_async(step, worker, grads).result()

    def early_lookup(
        self, step: int, worker: int, bags: Mapping[str, Bags], *, correct: bool = True
    ) -> bool:
        return self.early_lookup_async(step, worker, bags, correct=correct).result().kept

    def prefetch(self, step: int, indices: Mapping[str, torch.Tensor]) -> None:
        self.prefetch_async(step, indices).result()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> StorageClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def connect(address: str | Mapping[str, Any], cfg: Any, *, token: str) -> StorageClient:
    """A client to one storage node with the run's wire settings (`cfg`: the run's Config).

    The one place where dtype, message size, deadline and TLS come from the config, so that
    GPU workers and the coordinator always dial a node the same way.
    """
    return StorageClient(
        address,
        token=token,
        wire_dtype=cfg.storage.wire_dtype,
        max_message_bytes=cfg.storage.max_message_bytes,
        timeout_s=cfg.cluster.rpc_timeout_s,
        tls=TlsFiles.client_from_cluster(cfg.cluster),
    )


def link_bytes(wire: Mapping[str, int]) -> tuple[int, int]:
    """(received, sent) whole-message bytes of a `wire_bytes` map, over every RPC."""
    received = sum(v for k, v in wire.items() if k.endswith(".received"))
    sent = sum(v for k, v in wire.items() if k.endswith(".sent"))
    return received, sent
