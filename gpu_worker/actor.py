"""The GPU worker as a Ray actor: `DenseWorker` wrapped with `ray.remote` where launched."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from gpu_worker.worker import DenseWorker
from ndp.config import Config
from storage_node.client import connect
from storage_node.process_env import keep_wire_buffers_in_heap


class GpuWorkerActor(DenseWorker):
    """A `DenseWorker` plus what only makes sense inside an actor: gRPC clients of the
    storage nodes, connected in the worker's own process, and the rendezvous address.

    Args:
        node_addresses: per storage node, an address accepted by `connect` (`pick_address`
            dials the unix socket when the node shares this machine).
        token: the job's token for storage-node RPCs.
        **kwargs: `DenseWorker`'s other arguments (rank, world_size, cfg, plan).
    """

    def __init__(self, *, node_addresses: Sequence[Any], token: str, **kwargs: Any) -> None:
        keep_wire_buffers_in_heap()  # storage_node/process_env.py says why
        cfg: Config = kwargs["cfg"]
        clients = [connect(address, cfg, token=token) for address in node_addresses]
        super().__init__(clients=clients, **kwargs)

    def rendezvous_address(self) -> tuple[str, int]:
        """An address and free port on this worker's node for the torch.distributed store."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        return host, port

    def ping(self) -> bool:
        return True


DEFAULT_WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
"""Set in every GPU-worker process unless `cluster.gpu_worker_env` gives another value."""


def worker_env(cfg: Config) -> dict[str, str]:
    """The environment variables a GPU-worker process gets: the defaults, then the config's."""
    return {**DEFAULT_WORKER_ENV, **cfg.cluster.gpu_worker_env}


def launch_gpu_worker(
    cfg: Config,
    rank: int,
    plan: dict,
    node_addresses: list[Any],
    token: str,
) -> Any:
    """Create the named Ray actor `ndp-gpu-worker-<rank>` with `cfg.cluster.gpu_worker_resources`."""
    import ray

    resources = dict(cfg.cluster.gpu_worker_resources)
    num_cpus = resources.pop("CPU", 0.0)
    num_gpus = resources.pop("GPU", 0.0)
    env = worker_env(cfg)
    return (
        ray.remote(GpuWorkerActor)
        .options(
            name=f"ndp-gpu-worker-{rank}",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            resources=resources,
            **({"runtime_env": {"env_vars": env}} if env else {}),
        )
        .remote(
            rank=rank,
            world_size=cfg.cluster.num_gpu_workers,
            cfg=cfg,
            plan=plan,
            node_addresses=node_addresses,
            token=token,
        )
    )
