"""Which failures `ndp.recovery` restarts a job for, decided by exception type.

A component failure is a dead, hung or unreachable process: restarting every actor and rolling
back to a checkpoint cures it. Anything else, a person's mistake (any other `NDPError`: an index
outside its table, a step out of order, a flash dir the node refuses) or a bug, fails the same
way after a restart, so it is raised at once.

    exception                                  raised where                        component
    ---------------------------------------------------------------------------------------------
    ComponentFailedError: ComponentTimeoutError, the coordinator's `_get` (an actor  its
      ComponentDiedError, CollectiveError        silent or dead), a worker's         `component`
                                                 all-reduce (a peer gone)
    StorageNodeUnavailableError                a gRPC call to a node that is gone  storage-node
    torch.distributed.DistError                the GPU workers' process group      gpu-worker
    ray: RayActorError (ActorDiedError,        ray.get outside `_get`: no caller   actor
      ActorUnavailableError), GetTimeoutError, that knows whose task it was
      WorkerCrashedError, NodeDiedError,
      ObjectLostError; ConnectionError
    ray: RayTaskError                          an actor task raised: its `.cause` decides

No decision reads an exception's text: the layers that know which component failed (the
coordinator for its actors, the worker for its all-reduce, the storage client for its node)
raise a typed error that says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from ndp.errors import ComponentFailedError, ComponentKind, NDPError

_DESCRIPTIONS: dict[ComponentKind, str] = {
    "storage-node": "a storage node",
    "gpu-worker": "a GPU worker",
    "actor": "an actor",
}


@dataclass(frozen=True)
class ComponentFailure:
    """A failure that recovery restarts the job for."""

    component: ComponentKind
    """Which kind of component failed ("actor" where the exception does not say)."""
    cause: BaseException
    """The exception as raised (named in the log and in `RecoveryError`)."""

    def describe(self) -> str:
        """`a storage node`, `a GPU worker` or `an actor`, for messages."""
        return _DESCRIPTIONS[self.component]


def classify_failure(exc: BaseException) -> ComponentFailure | None:
    """The component failure `exc` stands for, or None for a user error or a bug."""
    component = _failed_component(exc)
    return None if component is None else ComponentFailure(component, exc)


def _failed_component(exc: BaseException) -> ComponentKind | None:
    import ray
    import torch.distributed as dist

    from storage_node.client import StorageNodeUnavailableError

    if isinstance(exc, ray.exceptions.RayTaskError):  # also the class Ray derives from the cause
        cause = getattr(exc, "cause", None)
        return None if cause is None else _failed_component(cause)
    if isinstance(exc, ComponentFailedError):
        return exc.component
    if isinstance(exc, StorageNodeUnavailableError):
        return "storage-node"
    if isinstance(exc, NDPError):
        return None
    if isinstance(exc, dist.DistError):
        return "gpu-worker"
    lost = ray.exceptions  # a process (actor, worker, machine) gone or silent
    if isinstance(
        exc,
        lost.RayActorError  # ActorDiedError, ActorUnavailableError
        | lost.GetTimeoutError
        | lost.WorkerCrashedError
        | lost.NodeDiedError
        | lost.ObjectLostError  # OwnerDiedError, ObjectReconstructionFailedError
        | ConnectionError,
    ):
        return "actor"
    return None
