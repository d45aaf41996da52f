"""User-facing errors.

Everything a person can fix (config, data, requests, plans) raises a subclass of `NDPError`
with a message that says what to change. The CLI turns these into exit status 2 and a
one-line message; anything else is a bug and exits 1 with a traceback. All errors take a
message (and at most keywords with defaults) so they pickle cleanly across Ray actors.
"""

from typing import Literal


class NDPError(Exception):
    """Base of every error caused by user input rather than by a bug in ndp."""


class ConfigError(NDPError):
    """Invalid configuration: the message starts with the dotted path of the field."""


class DataError(NDPError):
    """Unreadable or malformed input data: the message names `file:line` where it can."""


class PlanError(NDPError):
    """The model cannot be placed on the configured cluster."""


class StorageNodeError(NDPError):
    """A storage node refused a request (bad indices, wrong step, bad tensor)."""


class NotAvailableError(NDPError):
    """A documented interface that this build does not provide yet."""


ComponentKind = Literal["storage-node", "gpu-worker", "actor"]
"""Which kind of actor a failure names (the prefix of its name); "actor" where unknown."""


class ComponentFailedError(NDPError):
    """A component of the job died, hung or cannot be reached: `ndp.recovery` restarts every
    actor and rolls back to the last checkpoint for it (`ndp.failure_policy`).

    Args:
        message: names the component (`gpu-worker-0`) and what happened.
        component: its kind; a keyword with a default, so the error still pickles across
            actors (unpickling calls the class with the message only, then restores it).
    """

    def __init__(self, message: str, *, component: ComponentKind = "actor") -> None:
        super().__init__(message)
        self.component: ComponentKind = component


class ComponentTimeoutError(ComponentFailedError):
    """An actor did not answer within `cluster.step_timeout_s` (hung, stopped or stalled);
    recovery treats it like a dead one."""


class ComponentDiedError(ComponentFailedError):
    """An actor the coordinator called died or became unreachable (Ray's `RayActorError`,
    named by the coordinator, which knows whose task it was)."""


class CollectiveError(ComponentFailedError):
    """The GPU workers' dense all-reduce failed: a peer died or cannot be reached (gloo
    raises a bare RuntimeError for it, which the worker names with this type)."""
