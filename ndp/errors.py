"""User-facing errors.

Everything a person can fix (config, data, requests, plans) raises a subclass of `NDPError`
with a message that says what to change. The CLI turns these into exit status 2 and a
one-line message; anything else is a bug and exits 1 with a traceback. All errors take only a
message so they pickle cleanly across Ray actors.
"""


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


class ComponentTimeoutError(NDPError):
    """An actor did not answer within `cluster.step_timeout_s` (hung, stopped or stalled);
    recovery treats it like a dead one."""
