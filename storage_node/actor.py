"""The storage node as a Ray actor: a plain class, wrapped with `ray.remote` where launched.

Ray places and supervises the node, and its methods are the node's control plane: the
coordinator starts it, reads its stats and rows, writes rows and streams restores through
them (a dead node surfaces as Ray's typed `RayActorError`). The training data path never goes
through Ray: `start()` builds the core and a gRPC server on the node's own address and
reports where it listens; GPU workers then talk to it directly with
`storage_node.client.StorageClient` (lookups, early lookups, prefetches, pushes).
docs/architecture.md, "Two planes", says why the planes are split this way.

Restores come through Ray, streamed by the coordinator (`restore_begin`, `restore_rows` ...,
`restore_finish` to verify, `restore_commit` once every node verified; see
`storage_node.restore`): the restore directory is written under the
node's own flash dir, on its own machine, so no file system is shared with the coordinator.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from ndp.config import Config
from ndp.plan import ShardSpec
from storage_node.node import StorageNodeCore
from storage_node.process_env import keep_wire_buffers_in_heap
from storage_node.restore import RestoreDirWriter, RestoreHeader
from storage_node.server import RunningServer, serve
from storage_node.shard_files import creating_shard_files
from storage_node.tls import TlsFiles

LOOPBACK = "127.0.0.1"


def node_bind_host(bind_host: str | None) -> str:
    """Where a storage node listens: `bind_host`, else loopback on a local Ray, else the
    Ray node's address (never every interface)."""
    if bind_host:
        return bind_host
    try:
        import ray

        if not ray.is_initialized():
            return LOOPBACK
        node_ip = ray.util.get_node_ip_address()
    except Exception:  # outside Ray (a test, the CLI): stay on loopback
        return LOOPBACK
    return LOOPBACK if ipaddress.ip_address(node_ip).is_loopback else node_ip


def rpc_threads(num_workers: int) -> int:
    """RPC threads: each worker may hold one lookup blocked on the step barrier while its
    push (and everyone else's) still needs a thread."""
    return max(16, 4 * num_workers + 4)


class StorageNodeActor:
    """One emulated CSD: a `StorageNodeCore` behind a gRPC server.

    Args:
        node_id: the node's index or name (names the core and the actor).
        shards: pieces of tables this node holds (from the planner).
        cfg: the run's config (storage, optimizer, seed, bind host, rpc timeout).
        token: the cluster's shared token every RPC must carry.
        num_workers: GPU workers whose pushes make up one step.
        bind_host: address to listen on; None: `cfg.cluster.bind_host`, else see
            `node_bind_host`.
        port: TCP port; 0 (the default) picks a free one.
    """

    def __init__(
        self,
        node_id: int | str,
        shards: list[ShardSpec],
        cfg: Config,
        token: str,
        num_workers: int,
        bind_host: str | None = None,
        *,
        port: int = 0,
    ) -> None:
        keep_wire_buffers_in_heap()
        self.node_id = str(node_id)
        self.shards = list(shards)
        self.cfg = cfg
        self._token = token
        self.num_workers = num_workers
        self.bind_host = bind_host or cfg.cluster.bind_host
        self.port = port
        self._core: StorageNodeCore | None = None
        self._server: RunningServer | None = None
        self._runtime_dir: str | None = None
        self._flash_dir: str | None = None
        self._restore: RestoreDirWriter | None = None  # a restore being streamed in
        self._restore_manifest: dict | None = None  # set once that restore is verified

    def start(self) -> str:
        """Create the core and start serving; returns the TCP address `host:port`.

        Idempotent: a second call returns the running address. `addresses()` also reports
        the unix socket for clients on the same machine.
        """
        if self._server is not None:
            return self._server.address
        # Private, short-pathed dir (unix socket paths are limited to ~107 bytes): holds the
        # socket and, when storage.flash_dir is unset, the shard files; removed at shutdown.
        self._runtime_dir = tempfile.mkdtemp(prefix=f"ndp-sn{self.node_id}-")
        storage = self.cfg.storage
        flash_dir = storage.flash_dir or os.path.join(self._runtime_dir, "flash")
        self._flash_dir = flash_dir
        try:
            with creating_shard_files(
                Path(flash_dir),
                self.node_id,
                self.shards,
                optimizer=self.cfg.optimizer.sparse.name,
                storage=storage,
            ):
                self._core = StorageNodeCore(
                    node_id=self.node_id,
                    shards=self.shards,
                    storage=storage,
                    optimizer=self.cfg.optimizer.sparse,
                    seed=self.cfg.train.seed,
                    num_workers=self.num_workers,
                    flash_dir=flash_dir,
                )
            self._server = serve(
                self._core,
                host=node_bind_host(self.bind_host),
                port=self.port,
                token=self._token,
                max_message_bytes=storage.max_message_bytes,
                unix_socket_path=(
                    os.path.join(self._runtime_dir, "rpc.sock") if storage.use_unix_socket else None
                ),
                max_workers=rpc_threads(self.num_workers),
                step_wait_timeout_s=storage.step_wait_timeout_s,
                tls=TlsFiles.from_cluster(self.cfg.cluster),
            )
        except BaseException:
            self.shutdown()
            raise
        return self._server.address

    def addresses(self) -> dict[str, Any]:
        """{"tcp": "host:port", "unix": "unix:PATH" | None, "hostname": str}; see
        `storage_node.client.pick_address`."""
        if self._server is None:
            raise RuntimeError("storage node not started; call start() first")
        return {
            "tcp": self._server.address,
            "unix": self._server.unix_address,
            "hostname": socket.gethostname(),
        }

    def stats(self) -> dict:
        """The core's counters (tiers, bytes, steps), and under "link" the emulated link's
        (`storage_node.link.EmulatedLink.stats`)."""
        if self._core is None or self._server is None:
            raise RuntimeError("storage node not started; call start() first")
        return {**self._core.stats(), "link": self._server.link.stats()}

    def read_rows(self, table_name: str, global_rows: Any) -> tuple[Any, Any]:
        """Weights [n, D] and optimizer state [n, S] of global rows (exports, equivalence checks)."""
        if self._core is None:
            raise RuntimeError("storage node not started; call start() first")
        return self._core.read_rows(table_name, global_rows)

    def write_rows(
        self, table_name: str, global_rows: Any, weights: Any, states: Any = None
    ) -> None:
        """Overwrite weights (and optionally optimizer state) of global rows (model imports)."""
        if self._core is None:
            raise RuntimeError("storage node not started; call start() first")
        self._core.write_rows(table_name, global_rows, weights, states)

    def restore_begin(self, header: RestoreHeader) -> None:
        """Open a restore (dropping one left open): the rows `restore_rows` receives go into a
        private directory under this node's flash dir."""
        if self._core is None or self._flash_dir is None:
            raise RuntimeError("storage node not started; call start() first")
        self.restore_abort()
        directory = tempfile.mkdtemp(prefix=f"ndp-restore-sn{self.node_id}-", dir=self._flash_dir)
        self._restore = RestoreDirWriter(
            directory,
            node_id=self.node_id,
            header=header,
            storage=self.cfg.storage,
            seed=self.cfg.train.seed,
        )

    def restore_rows(self, table_name: str, row_start: int, records: Any) -> None:
        """The next rows of the open restore: records float32 [n, D + S] of global rows
        [row_start, row_start + n). A refused message drops the restore."""
        writer = self._open_restore()
        try:
            writer.write(table_name, row_start, records)
        except BaseException:
            self.restore_abort()
            raise

    def restore_finish(self, records_sha256: dict[str, str]) -> None:
        """Check the streamed rows (complete, sha256 per table) and the restore directory as
        the core would (`verify_restore`); nothing is replaced yet (`restore_commit` does).

        A refusal drops the restore and its directory.
        """
        writer = self._open_restore()
        try:
            assert self._core is not None
            directory = writer.finish(records_sha256)
            self._restore_manifest = self._core.verify_restore(directory)
        except BaseException:
            self.restore_abort()
            raise

    def restore_commit(self) -> None:
        """Replace the node's state with the verified restore; the directory is removed."""
        writer = self._open_restore()
        if self._restore_manifest is None:
            raise RuntimeError("restore not verified on this storage node; call restore_finish")
        try:
            assert self._core is not None
            self._core.restore_verified(writer.directory, self._restore_manifest, consume=True)
        finally:
            self.restore_abort()

    def restore_abort(self) -> None:
        """Drop the open restore, if any, and remove its directory (idempotent)."""
        self._restore_manifest = None
        if self._restore is not None:
            writer, self._restore = self._restore, None
            writer.close()
            shutil.rmtree(writer.directory, ignore_errors=True)

    def _open_restore(self) -> RestoreDirWriter:
        if self._restore is None:
            raise RuntimeError("no restore open on this storage node; call restore_begin first")
        return self._restore

    def shutdown(self) -> None:
        """Stop the server, close the core, remove the private runtime directory."""
        self.restore_abort()
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._core is not None:
            self._core.close()
            self._core = None
        if self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
            self._runtime_dir = None


def launch_storage_node(
    cfg: Config,
    node_id: int,
    shards: list[ShardSpec],
    token: str,
    num_workers: int,
    name: str | None = None,
) -> Any:
    """Create the named Ray actor `ndp-storage-node-<node_id>` (not started: call `start`).

    Resources come from `cfg.cluster.storage_node_resources`; its `CPU`/`GPU` entries become
    `num_cpus`/`num_gpus`, the rest custom resources such as {"storage_node": 1}.
    """
    import ray

    resources = dict(cfg.cluster.storage_node_resources)
    num_cpus = resources.pop("CPU", 0.0)
    num_gpus = resources.pop("GPU", 0.0)
    remote_class = ray.remote(StorageNodeActor)
    return remote_class.options(
        name=name or f"ndp-storage-node-{node_id}",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        resources=resources,
    ).remote(node_id, shards, cfg, token, num_workers, cfg.cluster.bind_host)
