"""The gRPC servicer: translates wire messages to calls on `StorageNodeCore` and back.

The data plane only (Lookup, EarlyLookup, Prefetch, PushGradients); control (stats, rows,
restore) goes through the node's Ray actor, `storage_node.actor` (docs/architecture.md, "Two
planes").

Nothing here decides anything about embeddings: decode (storage_node.codec), call the core,
encode. Errors are translated once, in `_translate_errors`:

    IndexOutOfRangeError, UnknownFeatureError, BadTensorError,
    BadRequestError (bytes that are no request message),
    any other StorageNodeError / NDPError      -> INVALID_ARGUMENT
    StepOrderError, a step that never became ready,
    ShardFileError (a shard file that does not fit) -> FAILED_PRECONDITION
    anything else (a bug)                      -> INTERNAL

with the exception's message as details and its class name in trailing metadata
`ndp-error`, so the client re-raises the same `StorageNodeError` subclass.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from ndp.errors import NDPError
from protos import storage_node_pb2 as pb
from protos import storage_node_pb2_grpc as pb_grpc
from storage_node import codec
from storage_node.auth import ERROR_METADATA_KEY
from storage_node.errors import BadRequestError, ShardFileError, StepOrderError
from storage_node.link import EmulatedLink
from storage_node.node import StorageNodeCore
from storage_node.rpc_methods import Undecodable, wire_size

log = logging.getLogger(__name__)

_STEP_WAIT_MARGIN_S = 0.05
"""Time left to answer FAILED_PRECONDITION before the client's own deadline expires."""

Reply = TypeVar("Reply")


def status_for_error(error: BaseException) -> grpc.StatusCode:
    """The status code a refused request gets."""
    if isinstance(error, StepOrderError | ShardFileError | TimeoutError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, NDPError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def _translate_errors(
    method: Callable[[Any, Any, grpc.ServicerContext], Reply],
) -> Callable[[Any, Any, grpc.ServicerContext], Reply]:
    @functools.wraps(method)
    def handler(self: Any, request: Any, context: grpc.ServicerContext) -> Reply:
        try:
            if isinstance(request, Undecodable):
                raise BadRequestError(str(request))
            return method(self, request, context)
        except (NDPError, TimeoutError) as error:
            name = (
                StepOrderError.__name__ if isinstance(error, TimeoutError) else type(error).__name__
            )
            code, details = status_for_error(error), str(error)
        except Exception as error:  # a bug: keep the node up, report it, tell the client
            log.exception("storage node %s failed in %s", self.node_id, method.__name__)
            name = type(error).__name__
            code, details = grpc.StatusCode.INTERNAL, f"storage node bug: {name}: {error}"
        context.set_trailing_metadata(((ERROR_METADATA_KEY, name),))
        context.abort(code, details)
        raise AssertionError("context.abort returned")  # pragma: no cover

    return handler


class StorageNodeServicer(pb_grpc.StorageNodeServicer):
    """One storage node's RPCs over one `StorageNodeCore`.

    Args:
        core: the node's pure core (thread-safe; several RPCs run at once).
        step_wait_timeout_s: longest a lookup waits for the previous step's update; the
            client's remaining deadline shortens it.
    """

    def __init__(self, core: StorageNodeCore, *, step_wait_timeout_s: float = 120.0) -> None:
        self.core = core
        self.node_id = getattr(core, "node_id", "?")
        self.step_wait_timeout_s = step_wait_timeout_s
        storage = getattr(core, "storage", None)
        self.link = EmulatedLink(storage.emulation.link_bandwidth_mbps if storage else None)

    def _wait_timeout(self, context: grpc.ServicerContext) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return self.step_wait_timeout_s
        return max(0.0, min(self.step_wait_timeout_s, remaining - _STEP_WAIT_MARGIN_S))

    def _carry(self, message: Any) -> None:
        """Pass `message` (or its serialized bytes) through the emulated link (free when link
        emulation is off)."""
        if self.link.bandwidth_mbps is not None:
            self.link.transfer(wire_size(message))

    @_translate_errors
    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> bytes:
        """The serialized `LookupResponse` (see `storage_node.wire_writer`: megabytes of pooled
        vectors go out as one KeyedTensor [B, sum of dims], one `torch.cat` into reused
        memory and the final join; `server.add_servicer` passes bytes through)."""
        self._carry(request)
        bags, answer_dtype = codec.parse_lookup_request(request)
        previous_push = codec.parse_previous_push(request)
        # A training lookup reads weights that step s-1's update must already have changed;
        # an evaluation lookup only needs them not to be older than that. The core checks
        # the request before it waits (and before it applies a push riding on it), so a
        # malformed one is refused at once.
        wait_s = self._wait_timeout(context)
        if request.use_early:
            pooled = self.core.lookup_early(
                request.step, request.worker, wait_timeout_s=wait_s, previous_push=previous_push
            )
        else:
            pooled = self.core.lookup(
                request.step,
                request.worker,
                bags,
                train=request.train,
                wait_timeout_s=wait_s,
                previous_push=previous_push,
            )
        reply = codec.lookup_response_bytes(pooled, answer_dtype)
        self._carry(reply)
        return reply

    @_translate_errors
    def EarlyLookup(
        self, request: pb.EarlyLookupRequest, context: grpc.ServicerContext
    ) -> pb.EarlyLookupResponse:
        self._carry(request)
        bags = codec.parse_early_lookup_request(request)
        prefetch = codec.parse_riding_prefetch(request)
        kept = self.core.early_lookup(request.step, request.worker, bags, correct=request.correct)
        if prefetch is not None:
            self.core.prefetch(*prefetch)
        return pb.EarlyLookupResponse(
            kept=bool(kept), every_row_resident=self.core.every_row_resident()
        )

    @_translate_errors
    def Prefetch(
        self, request: pb.PrefetchRequest, context: grpc.ServicerContext
    ) -> pb.PrefetchResponse:
        self._carry(request)
        self.core.prefetch(request.step, codec.parse_prefetch_request(request))
        return pb.PrefetchResponse(every_row_resident=self.core.every_row_resident())

    @_translate_errors
    def PushGradients(
        self, request: pb.PushGradientsRequest, context: grpc.ServicerContext
    ) -> pb.PushGradientsResponse:
        self._carry(request)
        grads = codec.parse_push_gradients_request(request)
        applied = self.core.push_gradients(request.step, request.worker, grads)
        return pb.PushGradientsResponse(applied=bool(applied))
