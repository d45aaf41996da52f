"""Starting or joining Ray the way ndp needs it."""

from __future__ import annotations

import os


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
        ray.init(address=address, log_to_driver=True)
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
