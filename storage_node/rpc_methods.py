"""The `StorageNode` service's methods for grpc, from the generated descriptor, with two
changes to the generated stubs: a message may be given already serialized, and a request
whose bytes do not parse reaches the servicer as `Undecodable`.

Why bytes: requests and replies that carry megabytes of tensors are written by
`storage_node.wire_writer` (one copy) instead of being built as upb messages and serialized
(two more copies into fresh memory); the generated stubs and servicer registration call
`<Message>.SerializeToString` on whatever they get and would refuse bytes. Why `Undecodable`:
grpc parses a request before any servicer code runs and answers a parse failure with
INTERNAL "Exception deserializing request!", which reads as a node bug; the servicer refuses
it with INVALID_ARGUMENT naming the message type instead. Parsing is otherwise unchanged (the
generated `FromString`), and so are the method paths on the wire, so a client built from the
generated stub (tests do) talks to this server as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from protos import storage_node_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["StorageNode"]


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC options shared by server and client: message limits in both directions."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


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
            request_deserializer=_parser(getattr(pb, method.input_type.name)),
            response_serializer=serialize,
        )
        for method in SERVICE.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are no message of its RPC's request type."""

    message_type: str
    """The request type's full name (`ndp.storage_node.LookupRequest`)."""
    wire_bytes: int
    reason: str
    """protobuf's words (`Wire format was corrupt`, `String field had bad UTF-8`)."""

    def __str__(self) -> str:
        return (
            f"the request's {self.wire_bytes} bytes are no {self.message_type} message "
            f"({self.reason}); send one serialized from protos/storage_node.proto"
        )


def _parser(message_type: Any) -> Callable[[bytes], Any]:
    """`message_type.FromString`, except that bytes that do not parse become `Undecodable`."""
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as error:
            reason = str(error).rpartition(": ")[2] or "does not parse"
            return Undecodable(name, len(data), reason)

    return parse


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
