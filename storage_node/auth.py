"""Shared-token authentication of storage-node RPCs.

Every call carries the cluster's token in the metadata key `ndp-token`. The server compares
it in constant time (`hmac.compare_digest`) before any handler runs, so a refused call
changes nothing; the token itself is never logged or echoed in an error.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from ndp.errors import StorageNodeError

TOKEN_METADATA_KEY = "ndp-token"
"""gRPC metadata key of the shared token (lower case, as gRPC requires)."""

ERROR_METADATA_KEY = "ndp-error"
"""Trailing metadata key naming the `StorageNodeError` subclass behind a refused call."""


class UnauthenticatedError(StorageNodeError):
    """The storage node refused a call whose `ndp-token` was missing or wrong."""


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata a client sends with every RPC."""
    return ((TOKEN_METADATA_KEY, token),)


def token_matches(supplied: str | bytes | None, expected: str) -> bool:
    """Whether a supplied token equals the expected one, in time independent of the content."""
    if supplied is None:
        return False
    if isinstance(supplied, str):
        supplied = supplied.encode()
    return hmac.compare_digest(supplied, expected.encode())


def _supplied_token(metadata: Sequence[Any] | None) -> str | bytes | None:
    for key, value in metadata or ():
        if key == TOKEN_METADATA_KEY:
            return value
    return None


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call without the right `ndp-token`, before its handler."""

    def __init__(self, token: str, *, node_id: str = "") -> None:
        if not token:
            raise StorageNodeError("a storage node needs a non-empty shared token")
        self._token = token
        message = (
            f"storage node {node_id}: " if node_id else "storage node: "
        ) + f"missing or wrong '{TOKEN_METADATA_KEY}' metadata; send the cluster's shared token"

        def refuse(request: Any, context: grpc.ServicerContext) -> None:
            context.set_trailing_metadata(((ERROR_METADATA_KEY, UnauthenticatedError.__name__),))
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        self._refuse = grpc.unary_unary_rpc_method_handler(refuse)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        supplied = _supplied_token(handler_call_details.invocation_metadata)
        if token_matches(supplied, self._token):
            return continuation(handler_call_details)
        return self._refuse
