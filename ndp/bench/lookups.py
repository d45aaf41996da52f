"""Pooled-lookup throughput: a storage node over gRPC vs `embedding_bag` in process.

The node runs in a *separate process* (multiprocessing `spawn`): a real `StorageNodeCore`
behind `serve()` on 127.0.0.1, listening on TCP and on a unix-domain socket. The bench
process is the client (`StorageClient`), sending one `Lookup` per batch that carries every
feature, as ndp's coordinator does. The in-process side pools the same rows (the same
`init_rows` weights, so results are compared too) from the same indices with
`torch.nn.functional.embedding_bag`, one call per feature.

The node's cache is sized to hold every table and warmed before timing, so the figure is
the wire plus near-data pooling, not flash. A lookup is one pooled bag (one sample of one
feature): lookups/s = batch_size * num_features * calls / elapsed seconds.

    bench process                         node process (spawn)
    +----------------------+  Lookup   +------------------------------+
    | StorageClient        | --------> | serve() -> StorageNodeCore   |
    | (unix: or host:port) | <-------- | cache (all rows) -> pooling  |
    +----------------------+  pooled   +------------------------------+
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_worker.storage_client import StorageClient
from ndp.config import SparseOptimizerConfig, StorageConfig
from ndp.model.init import init_rows
from storage_node.cache import SLOT_METADATA_BYTES
from storage_node.spec import Bags, ShardSpec

SEED = 0
MAX_MESSAGE_BYTES = 1 << 30
_READY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class LookupShape:
    """What one lookup call carries."""

    num_features: int
    """Features per call, one table each."""
    num_rows: int
    """Rows per table (all cached on the node)."""
    embedding_dim: int
    batch_size: int

    def shards(self) -> list[ShardSpec]:
        return [
            ShardSpec(
                table_name=f"bench_t{f}",
                table_num_rows=self.num_rows,
                embedding_dim=self.embedding_dim,
                row_start=0,
                row_end=self.num_rows,
                pooling="sum",
                features=(f"bench_f{f}",),
            )
            for f in range(self.num_features)
        ]

    def cache_bytes(self) -> int:
        """A node cache budget that holds every row of every table (SGD: no optimizer state)."""
        per_row = 4 * self.embedding_dim + SLOT_METADATA_BYTES
        return self.num_features * self.num_rows * per_row + (1 << 20)


def _node_process(
    conn: Connection, shape: LookupShape, token: str, flash_dir: str, unix_path: str
) -> None:
    """Child process: build the core, serve it, report addresses, wait for 'stop'."""
    from storage_node.node import StorageNodeCore
    from storage_node.server import serve

    storage = StorageConfig(cache_bytes=shape.cache_bytes(), cache_policy="lru")
    core = StorageNodeCore(
        node_id="bench",
        shards=shape.shards(),
        storage=storage,
        optimizer=SparseOptimizerConfig(name="sgd"),
        seed=SEED,
        flash_dir=flash_dir,
    )
    server = serve(
        core,
        host="127.0.0.1",
        token=token,
        max_message_bytes=MAX_MESSAGE_BYTES,
        unix_socket_path=unix_path,
    )
    conn.send({"tcp": server.address, "unix": server.unix_address})
    try:
        conn.recv()  # anything (or EOF when the parent dies) means stop
    except EOFError:
        pass
    finally:
        server.stop(0.5)
        core.close()


@contextlib.contextmanager
def _environment(**variables: str) -> Iterator[None]:
    """`os.environ` with `variables` set while the block runs (a spawned child inherits it)."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class NodeProcess:
    """A storage node serving `shape`'s tables in a spawned process (context manager).

    The node runs one intra-op thread, as a storage-node actor does (Ray gives an actor
    without a CPU request OMP_NUM_THREADS=1): with more, every gRPC handler thread that pools
    gets its own OpenMP team, and on 2 cores the idle teams' spinning slowed the node's own
    lookup from ~1.5 to ~1.9 ms per call (pooling 1).
    """

    def __init__(self, shape: LookupShape) -> None:
        self.shape = shape
        self.token = secrets.token_hex(16)
        self._tmp = tempfile.TemporaryDirectory(prefix="ndp-bench-node-")
        context = mp.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_node_process,
            args=(
                child_conn,
                shape,
                self.token,
                self._tmp.name,
                str(Path(self._tmp.name) / "sock"),
            ),
            daemon=True,
        )
        with _environment(OMP_NUM_THREADS="1"):
            self._process.start()
        child_conn.close()
        if not self._conn.poll(_READY_TIMEOUT_S):
            self.close()
            raise RuntimeError("benchmark storage node did not start")
        self.addresses: dict[str, str] = self._conn.recv()

    def client(self, transport: str, wire_dtype: str) -> StorageClient:
        return StorageClient(
            self.addresses[transport],
            token=self.token,
            wire_dtype=wire_dtype,
            max_message_bytes=MAX_MESSAGE_BYTES,
            timeout_s=600.0,
        )

    def close(self) -> None:
        try:
            self._conn.send("stop")
        except (BrokenPipeError, OSError):
            pass
        self._process.join(30)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._tmp.cleanup()

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def make_batches(
    shape: LookupShape, pooling_factor: int, count: int, seed: int
) -> list[dict[str, Bags]]:
    """`count` batches of fixed-length bags with uniform random rows, per feature."""
    generator = torch.Generator().manual_seed(seed * 1000 + pooling_factor)
    nnz = shape.batch_size * pooling_factor
    offsets = torch.arange(0, nnz + 1, pooling_factor, dtype=torch.int64)
    return [
        {
            f"bench_f{f}": Bags(
                torch.randint(0, shape.num_rows, (nnz,), generator=generator), offsets
            )
            for f in range(shape.num_features)
        }
        for _ in range(count)
    ]


def table_weights(shape: LookupShape) -> dict[str, torch.Tensor]:
    """The rows the node initialises, {feature: [num_rows, D]} (the in-process side's tables)."""
    return {
        f"bench_f{f}": torch.from_numpy(
            init_rows(
                seed=SEED,
                table_name=f"bench_t{f}",
                num_rows=shape.num_rows,
                embedding_dim=shape.embedding_dim,
                row_start=0,
                row_end=shape.num_rows,
            )
        )
        for f in range(shape.num_features)
    }


def pool_in_process(
    weights: dict[str, torch.Tensor], batch: dict[str, Bags]
) -> dict[str, torch.Tensor]:
    """The in-process side: one `embedding_bag` per feature."""
    return {
        feature: F.embedding_bag(
            bags.indices, weights[feature], bags.offsets, mode="sum", include_last_offset=True
        )
        for feature, bags in batch.items()
    }


def _call_seconds(call, batches: list, calls: int, first: int) -> list[float]:
    """Seconds of each of `calls` calls of `call(batch)`, cycling over `batches`."""
    seconds = []
    for i in range(calls):
        began = time.perf_counter()
        call(batches[(first + i) % len(batches)])
        seconds.append(time.perf_counter() - began)
    return seconds


def _side(seconds: list[float], lookups_per_call: int) -> dict:
    """Raw figures of one side; the rate uses the median call (robust to a busy machine)."""
    median = statistics.median(seconds)
    return {
        "calls": len(seconds),
        "elapsed_s": sum(seconds),
        "lookups": len(seconds) * lookups_per_call,
        "median_call_s": median,
        "min_call_s": min(seconds),
        "lookups_per_s": lookups_per_call / median,
        "lookups_per_s_mean": len(seconds) * lookups_per_call / sum(seconds),
    }


def measure_lookups(
    shape: LookupShape,
    *,
    pooling_factors: tuple[int, ...],
    transports: tuple[str, ...],
    wire_dtypes: tuple[str, ...],
    rounds: int,
    calls_per_round: int,
    distinct_batches: int = 4,
) -> list[dict]:
    """Lookups/s of every (pooling, transport, wire dtype) against in-process pooling.

    The sides are measured in interleaved rounds (in-process, then each client, repeated
    `rounds` times) so that load from other processes hits all of them alike; each side's
    rate comes from its median call.

    Returns:
        One point per (pooling, transport, wire dtype) with the raw figures of both sides.
    """
    weights = table_weights(shape)
    lookups_per_call = shape.batch_size * shape.num_features
    points = []
    with NodeProcess(shape) as node:
        clients = {(t, d): node.client(t, d) for t in transports for d in wire_dtypes}
        try:
            for pooling in pooling_factors:
                batches = make_batches(shape, pooling, distinct_batches, seed=SEED)
                expected = pool_in_process(weights, batches[0])
                max_error = {}
                for key, client in clients.items():
                    for batch in batches:  # warm the node's cache and the channel
                        client.lookup(0, 0, batch, train=False)
                    got = client.lookup(0, 0, batches[0], train=False)
                    max_error[key] = max(float((got[f] - expected[f]).abs().max()) for f in got)
                local_seconds: list[float] = []
                grpc_seconds: dict[tuple[str, str], list[float]] = {key: [] for key in clients}
                node_work = {key: {"lookup_seconds": 0.0, "lookup_calls": 0} for key in clients}
                for r in range(rounds):
                    first = r * calls_per_round
                    local_seconds += _call_seconds(
                        lambda b: pool_in_process(weights, b), batches, calls_per_round, first
                    )
                    for key, client in clients.items():
                        before = client.stats()
                        grpc_seconds[key] += _call_seconds(
                            lambda b, c=client: c.lookup(0, 0, b, train=False),
                            batches,
                            calls_per_round,
                            first,
                        )
                        after = client.stats()
                        for field in ("lookup_seconds", "lookup_calls"):
                            node_work[key][field] += after[field] - before[field]
                local = _side(local_seconds, lookups_per_call)
                for (transport, dtype), seconds in grpc_seconds.items():
                    remote = _side(seconds, lookups_per_call)
                    work = node_work[(transport, dtype)]
                    # the node's own time per call (checks + pooling), measured inside it:
                    # the rest of a call is the wire, (de)serialisation and gRPC itself
                    remote["node_lookup_s_per_call"] = work["lookup_seconds"] / max(
                        1, work["lookup_calls"]
                    )
                    points.append(
                        {
                            "pooling_factor": pooling,
                            "transport": transport,
                            "address": node.addresses[transport],
                            "wire_dtype": dtype,
                            "batch_size": shape.batch_size,
                            "num_features": shape.num_features,
                            "embedding_dim": shape.embedding_dim,
                            "num_rows": shape.num_rows,
                            "max_abs_error": max_error[(transport, dtype)],
                            "grpc": remote,
                            "in_process": local,
                            "ratio": remote["lookups_per_s"] / local["lookups_per_s"],
                        }
                    )
        finally:
            for client in clients.values():
                client.close()
    return points
