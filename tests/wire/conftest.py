"""A tiny model, its storage-node core, and that core served over gRPC on 127.0.0.1."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from ndp.config import Config
from ndp.planner import shards_for
from storage_node.client import StorageClient
from storage_node.node import StorageNodeCore
from storage_node.server import RunningServer, serve
from wire.tiny_node import TOKEN, tiny_config


@pytest.fixture()
def cfg() -> Config:
    return tiny_config()


@pytest.fixture()
def make_core(tmp_path) -> Iterator[Callable[..., StorageNodeCore]]:
    """Builds real cores over tiny shards in private flash dirs; closes them after the test."""
    cores: list[StorageNodeCore] = []
    counter = itertools.count()

    def make(cfg: Config, num_workers: int = 1) -> StorageNodeCore:
        flash_dir = tmp_path / f"flash{next(counter)}"
        flash_dir.mkdir()
        core = StorageNodeCore(
            node_id="0",
            shards=shards_for(cfg, 0, ["t0", "t1"]),
            storage=cfg.storage,
            optimizer=cfg.optimizer.sparse,
            seed=cfg.train.seed,
            num_workers=num_workers,
            flash_dir=flash_dir,
        )
        cores.append(core)
        return core

    yield make
    for core in cores:
        core.close()


@dataclass
class ServedNode:
    core: StorageNodeCore
    server: RunningServer
    cfg: Config

    def client(self, *, token: str = TOKEN, timeout_s: float = 30.0, **options) -> StorageClient:
        return StorageClient(
            self.server.address,
            token=token,
            max_message_bytes=self.cfg.storage.max_message_bytes,
            timeout_s=timeout_s,
            **options,
        )


@pytest.fixture()
def serve_node(make_core) -> Iterator[Callable[..., ServedNode]]:
    """Serves a fresh core on 127.0.0.1 at a free port; stops the servers after the test."""
    servers: list[RunningServer] = []

    def start(cfg: Config, num_workers: int = 1) -> ServedNode:
        core = make_core(cfg, num_workers)
        server = serve(
            core,
            host="127.0.0.1",
            token=TOKEN,
            max_message_bytes=cfg.storage.max_message_bytes,
            step_wait_timeout_s=30.0,
        )
        servers.append(server)
        return ServedNode(core=core, server=server, cfg=cfg)

    yield start
    for server in servers:
        server.stop(grace_s=None)
