"""Starting or joining Ray the way ndp needs it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def init_local_ray(
    *, num_cpus: int | None = None, address: str | None = None, include_dashboard: bool = False
) -> None:
    """Join `address`, or start a local Ray whose node address is 127.0.0.1.

    `include_dashboard` starts Ray's dashboard with a local instance, on 127.0.0.1 only
    (port 8265, or the next free one); it has no effect when joining `address`, whose head
    decides.

    Why the environment variable: Ray picks the machine's interface address for a local
    instance unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set for it, and ndp keeps local
    traffic on loopback. Custom resources are declared generously so that configs asking for
    `{"storage_node": 1}` also schedule on a laptop.
    """
    import ray

    if ray.is_initialized():
        return
    if address is not None:
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as exc:
            if not _refused_for_auth(exc):
                raise
            from ndp.errors import ConfigError

            raise ConfigError(auth_advice(address, os.environ, Path.home())) from None
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=include_dashboard,
        dashboard_host="127.0.0.1",
        resources={"storage_node": 64, "gpu_worker": 64},
        log_to_driver=True,
        _node_ip_address="127.0.0.1",
    )


AUTH_DOC = "docs/cluster.md, 'Token authentication'"


def _refused_for_auth(exc: BaseException) -> bool:
    """Whether joining failed on Ray's token authentication.

    Why the text match: Ray retries the GCS connection and then raises a ConnectionError
    whose cause carries the last `AuthenticationError` only as formatted text
    (`InvalidAuthToken`); a missing token with `RAY_AUTH_MODE=token` raises the
    `AuthenticationError` itself.
    """
    from ray.exceptions import AuthenticationError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, AuthenticationError) or "InvalidAuthToken" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def auth_advice(address: str, environ: Mapping[str, str], home: Path) -> str:
    """What to set when the cluster at `address` refuses this process's Ray token.

    Ray (2.60) enables token authentication on its own on a head that finds
    `~/.ray/auth_token` (left there by any local run), but never when joining an explicit
    address: the joining side needs `RAY_AUTH_MODE=token` and the head's token, which Ray
    reads from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else
    `home/.ray/auth_token`.
    """
    where = (
        "in ~/.ray/auth_token, in the file RAY_AUTH_TOKEN_PATH names, or in RAY_AUTH_TOKEN "
        f"(`ray get-auth-token` on the head prints it) ({AUTH_DOC})"
    )
    mode = environ.get("RAY_AUTH_MODE", "")
    if mode.lower() != "token":
        return (
            f"cluster.address {address}: the Ray cluster there requires token authentication "
            f"and RAY_AUTH_MODE is {mode or 'unset'} here: set RAY_AUTH_MODE=token and put the "
            f"cluster's token {where}"
        )
    if environ.get("RAY_AUTH_TOKEN"):
        source, present = "RAY_AUTH_TOKEN", True
    elif environ.get("RAY_AUTH_TOKEN_PATH"):
        source = environ["RAY_AUTH_TOKEN_PATH"]
        present = Path(source).is_file()
    else:
        source = "~/.ray/auth_token"
        present = (home / ".ray" / "auth_token").is_file()
    if not present:
        return (
            f"cluster.address {address}: RAY_AUTH_MODE=token but this machine has no Ray "
            f"token ({source} is missing): put the cluster's token {where}"
        )
    return (
        f"cluster.address {address}: the Ray cluster there refused the token in {source}, "
        f"which is not the cluster's: put the cluster's token {where}"
    )


def ray_tasks(
    fn: Callable[[T], R], items: Sequence[T], *, address: str | None = None
) -> Iterator[tuple[int, R]]:
    """Run `fn` on every item as a Ray task (one CPU each); yield (index, result) as each
    finishes. Closing the iterator early cancels the tasks not yet finished.

    Why here: only the runtime layer imports Ray, so the data layer hands its work to this
    (`ndp.data.preprocess.RunTasks`) instead of starting tasks itself. An `NDPError` raised in
    a task is raised here as itself, not wrapped in Ray's task error.
    """
    import ray

    from ndp.errors import NDPError

    init_local_ray(address=address)
    task = ray.remote(num_cpus=1)(_call)  # `fn` may be a partial, which ray.remote refuses
    refs = {task.remote(fn, item): index for index, item in enumerate(items)}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, NDPError):
                    raise exc.cause from None
                raise
            yield refs[done[0]], result
    finally:
        for ref in pending:
            ray.cancel(ref)


def _call(fn: Callable[[T], R], item: T) -> R:
    return fn(item)
