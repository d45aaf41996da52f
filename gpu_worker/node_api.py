"""What a GPU worker needs of a storage node, and that same API over a core in this process.

`DenseWorker` talks to each storage node through a `NodeApi`: the four calls of a training
step and its lookahead, each returning a reply to collect later (so a worker asks every node
at once and overlaps the gradient push with the rest of its step), plus byte counters and
`close`. This is the data plane; control (start, stats, rows, restore) goes through the
node's Ray actor (docs/architecture.md, "Two planes").

    NodeApi                      satisfied by
    --------------------------------------------------------------------------------------
    lookup_async                 storage_node.client.StorageClient: gRPC, the nodes' actors
    early_lookup_async           InProcessNode(core): a `NodeCore` (storage_node.node.
    push_gradients_async           StorageNodeCore) in this process, no Ray, no gRPC
    prefetch_async
    take_wire_bytes, close

`InProcessNode` runs each call when it is made and keeps its outcome (value or error) for
`result()`, the way a gRPC reply raises the node's refusal when collected. Calls that would
wait on the node's step barrier therefore run in the order the worker makes them: right for
one worker (`num_workers=1`), whose push of step s is applied before it looks up step s + 1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Generic, Protocol, TypeVar

import torch

from ndp.plan import Bags
from storage_node.client import EarlyLookupAnswer

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

NodeBags = Mapping[str, Bags]
"""{feature: Bags} of one step for one node (`ndp.routing.route_lookup`'s per-node part)."""


class Reply(Protocol[T_co]):
    """A call in flight: `result()` waits for it and returns its value or raises its error."""

    def result(self, timeout: float | None = None) -> T_co: ...


class NodeApi(Protocol):
    """One storage node as a GPU worker uses it (`storage_node.client.StorageClient`)."""

    def lookup_async(
        self,
        step: int,
        worker: int,
        bags: NodeBags,
        *,
        train: bool = True,
        use_early: bool = False,
        previous_push: Mapping[str, torch.Tensor] | None = None,
    ) -> Reply[dict[str, torch.Tensor]]:
        """Pooled vectors {feature: float32 [B, D]} of the bags; with `use_early`, of the
        bags this worker's kept `early_lookup` of `step` pooled (not sent again);
        `previous_push`: this worker's gradients of step - 1, applied first (same call)."""
        ...

    def early_lookup_async(
        self,
        step: int,
        worker: int,
        bags: NodeBags,
        *,
        correct: bool = True,
        prefetch: tuple[int, Mapping[str, torch.Tensor]] | None = None,
    ) -> Reply[EarlyLookupAnswer]:
        """Pool a future step's bags now; answers whether the node kept them and whether every
        row it holds is resident. `prefetch`: (a later step, its rows) staged in the same
        call."""
        ...

    def push_gradients_async(
        self, step: int, worker: int, grads: Mapping[str, torch.Tensor]
    ) -> Reply[bool]:
        """d(loss)/d(pooled) {feature: [B, D]} of (step, worker); True once the step applied."""
        ...

    def prefetch_async(self, step: int, indices: Mapping[str, torch.Tensor]) -> Reply[bool]:
        """Stage {feature: local rows int64 [n]} of a future step into the node's cache;
        answers whether every row the node holds is resident."""
        ...

    def take_wire_bytes(self) -> dict[str, int]:
        """Bytes on the wire since the last call, per `<Rpc>.<sent|received>[.float_data]`."""
        ...

    def close(self) -> None: ...


class NodeCore(Protocol):
    """A storage node's core in this process (`storage_node.node.StorageNodeCore`)."""

    def lookup(
        self,
        step: int,
        worker: int,
        bags: dict[str, Bags],
        *,
        train: bool = True,
        previous_push: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]: ...

    def lookup_early(
        self, step: int, worker: int, *, previous_push: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]: ...

    def early_lookup(
        self, step: int, worker: int, bags: dict[str, Bags], *, correct: bool = True
    ) -> bool: ...

    def push_gradients(self, step: int, worker: int, grads: dict[str, torch.Tensor]) -> bool: ...

    def prefetch(self, step: int, indices: dict[str, torch.Tensor]) -> None: ...

    def every_row_resident(self) -> bool: ...


class InProcessNode:
    """A `NodeApi` over a `NodeCore` in this process: each call runs when made.

    Args:
        core: the node; its owner closes it (`close()` here only ends this view of it).
    """

    def __init__(self, core: NodeCore) -> None:
        self.core = core

    def lookup_async(
        self,
        step: int,
        worker: int,
        bags: NodeBags,
        *,
        train: bool = True,
        use_early: bool = False,
        previous_push: Mapping[str, torch.Tensor] | None = None,
    ) -> Reply[dict[str, torch.Tensor]]:
        push = None if previous_push is None else dict(previous_push)
        if use_early:
            return _Done(lambda: self.core.lookup_early(step, worker, previous_push=push))
        return _Done(
            lambda: self.core.lookup(step, worker, dict(bags), train=train, previous_push=push)
        )

    def early_lookup_async(
        self,
        step: int,
        worker: int,
        bags: NodeBags,
        *,
        correct: bool = True,
        prefetch: tuple[int, Mapping[str, torch.Tensor]] | None = None,
    ) -> Reply[EarlyLookupAnswer]:
        def call() -> EarlyLookupAnswer:
            kept = self.core.early_lookup(step, worker, dict(bags), correct=correct)
            if prefetch is not None:
                self.core.prefetch(prefetch[0], dict(prefetch[1]))
            return EarlyLookupAnswer(kept, self.core.every_row_resident())

        return _Done(call)

    def push_gradients_async(
        self, step: int, worker: int, grads: Mapping[str, torch.Tensor]
    ) -> Reply[bool]:
        return _Done(lambda: self.core.push_gradients(step, worker, dict(grads)))

    def prefetch_async(self, step: int, indices: Mapping[str, torch.Tensor]) -> Reply[bool]:
        def call() -> bool:
            self.core.prefetch(step, dict(indices))
            return self.core.every_row_resident()

        return _Done(call)

    def take_wire_bytes(self) -> dict[str, int]:
        """Nothing crosses a wire in this process."""
        return {}

    def close(self) -> None:
        """The core belongs to whoever built it; nothing to release here."""


class _Done(Generic[T]):
    """The outcome of a call that already ran: its value, or the error `result()` raises."""

    def __init__(self, call: Callable[[], T]) -> None:
        self._error: Exception | None = None
        try:
            self._value = call()
        except Exception as error:  # raised when collected, as a gRPC reply's would be
            self._error = error

    def result(self, timeout: float | None = None) -> T:
        if self._error is not None:
            raise self._error
        return self._value
