"""The `StorageNode` service's methods for grpc, from the generated descriptor, with one
change to the generated stubs: a message may be given already serialized.

Why: requests and replies that carry megabytes of tensors are written by
`storage_node.wire_writer` (one copy) instead of being built as upb messages and serialized
(two more copies into fresh memory); the generated stubs and servicer registration call
`<Message>.SerializeToString` on whatever they get and would refuse bytes. Parsing is
unchanged (the generated `FromString`), and so are the method paths on the wire, so a client
built from the generated stub (tests do) talks to this server as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from protos import storage_node_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["StorageNode"]


def serialize(message: Any) -> bytes:
    """Bytes pass through; messages are serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def wire_size(message: Any) -> int:
    """Bytes `message` (or its serialized bytes) takes on the wire."""
    return len(message) if isinstance(message, bytes) else message.ByteSize()


def add_servicer(servicer: Any, server: grpc.Server) -> None:
    """Serve every method of the service with `servicer.<Method>` (as the generated
    `add_StorageNodeServicer_to_server` does, registered methods included)."""
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=getattr(pb, method.input_type.name).FromString,
            response_serializer=serialize,
        )
        for method in SERVICE.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


@dataclass(frozen=True)
class Received:
    """A reply and its size on the wire (upb's `ByteSize()` of a parsed multi-megabyte
    message costs milliseconds; the deserializer has the length for free)."""

    message: Any
    wire_bytes: int


def client_methods(channel: grpc.Channel) -> dict[str, grpc.UnaryUnaryMultiCallable]:
    """{method name: callable} on `channel`; requests may be messages or bytes, replies
    come as `Received`."""
    return {
        method.name: channel.unary_unary(
            f"/{SERVICE.full_name}/{method.name}",
            request_serializer=serialize,
            response_deserializer=_receiver(getattr(pb, method.output_type.name)),
            _registered_method=True,
        )
        for method in SERVICE.methods
    }


def _receiver(message_type: Any) -> Callable[[bytes], Received]:
    def receive(data: bytes) -> Received:
        return Received(message_type.FromString(data), len(data))

    return receive
